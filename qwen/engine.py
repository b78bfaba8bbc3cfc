"""A generation engine that serves many requests at once: continuous batching over a slot KV cache.

The server, the demos and any other concurrent user submit prompts; one background thread runs the model. Each
iteration admits waiting requests (prompts admitted together are prefilled together, in as few right-padded forwards
as their lengths allow), then decodes one token for every running request in a single batched forward, so a request that arrives while others are decoding joins the running batch at the next
step instead of waiting for them to finish. Finished or cancelled requests free their slot at once.

The layout follows gpt-fast: `prefill`, `decode_step` and `sample` are small functions; the KV cache is a
preallocated buffer per layer, `(slots, heads, capacity, head_dim)`, where running requests occupy rows 0..B-1 so the
batch's cache is a view, never a copy. With `use_cache_quantization` the buffers hold int8 keys and values packed as
`modeling_qwen.quantize_kv` packs them, and each decode step reads them dequantized.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from transformers.cache_utils import Cache

from .modeling_qwen import KV_PARAMS_BYTES, dequantize_kv, new_kv_cache, ntk_alpha_for_length, quantize_kv
from .qwen_generation_utils import context_length, reply_end_ids

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "error"]
REPLACEMENT_CHARACTER = "\ufffd"
# Most prompt tokens (rows x longest prompt) prefilled in one forward; bounds the activations of a batched prefill.
PREFILL_TOKEN_BUDGET = 4096


@dataclass(frozen=True)
class EngineCounters:
    """What an engine has done since it started: a snapshot (`GenerationEngine.counters()`) for monitoring and tests."""

    prefill_forwards: int = 0  # model forwards that prefilled prompts (several prompts can share one)
    prefilled_prompts: int = 0
    decode_steps: int = 0  # batched forwards that each decoded one token for every running request
    decoded_tokens: int = 0  # tokens those steps produced: more than the steps once requests share a step


# --------------------------------------------------------------------------------------------------------------------
# Requests and what they report back
# --------------------------------------------------------------------------------------------------------------------


# Bounds of the sampling values, chosen so that no value inside them can overflow fp32 logits (a logit divided by a
# temperature of 1e-39 is inf, and softmax over inf is NaN). Below GREEDY_BELOW_TEMPERATURE decoding is greedy, the
# rule of the original Qwen server (it turned a temperature under 0.01 into top_k=1); sampling that cold differs from
# greedy only in near-ties of the logits.
GREEDY_BELOW_TEMPERATURE = 0.01
REPETITION_PENALTY_RANGE = (0.01, 100.0)
PRESENCE_FREQUENCY_RANGE = (-2.0, 2.0)  # OpenAI's range for presence_penalty and frequency_penalty
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


class SamplingParamError(ValueError):
    """A sampling value out of its bounds; `field` names the SamplingParams field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _check_number(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise SamplingParamError(name, f"{name} must be a number from {low:g} to {high:g}, got {value!r}.")


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. `temperature == 0` (or below GREEDY_BELOW_TEMPERATURE, or `do_sample=False`) means
    greedy. Every value is checked against the bounds above at construction: SamplingParamError names the field."""

    max_new_tokens: int = 512
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SamplingParamError("max_new_tokens", f"max_new_tokens must be a whole number >= 1, got "
                                                       f"{self.max_new_tokens!r}.")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 <= self.temperature < math.inf:
            raise SamplingParamError("temperature", f"temperature must be a finite number >= 0, got "
                                                    f"{self.temperature!r}.")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise SamplingParamError("top_p", f"top_p must be in (0, 1], got {self.top_p!r}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingParamError("top_k", f"top_k must be a whole number >= 0 (0 turns it off), got {self.top_k!r}.")
        _check_number("repetition_penalty", self.repetition_penalty, *REPETITION_PENALTY_RANGE)
        _check_number("presence_penalty", self.presence_penalty, *PRESENCE_FREQUENCY_RANGE)
        _check_number("frequency_penalty", self.frequency_penalty, *PRESENCE_FREQUENCY_RANGE)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise SamplingParamError("seed", f"seed must be a whole number from -2**63 to 2**64 - 1, got {self.seed!r}.")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature < GREEDY_BELOW_TEMPERATURE

    @classmethod
    def from_generation_config(cls, generation_config: Any, **overrides: Any) -> SamplingParams:
        """The checkpoint's `generation_config.json` defaults, with every override that is not None on top.

        Unset fields fall back as transformers would: no top-k/top-p cut, temperature 1, 512 new tokens.
        """
        defaults = {"max_new_tokens": 512, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                    "repetition_penalty": 1.0}
        values: dict[str, Any] = {}
        for name, default in defaults.items():
            # `is None`, not `or`: a configured 0 (greedy temperature, an invalid top_p) must reach the checks.
            value = getattr(generation_config, name, None)
            values[name] = default if value is None else value
        values["do_sample"] = bool(values["do_sample"])
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)


def chat_stop_token_ids(tokenizer: Any) -> frozenset[int]:
    """The ids that end a ChatML reply (`reply_end_ids`), as the set a request's stop ids are."""
    return frozenset(reply_end_ids("chatml", tokenizer))


@dataclass
class GenerationEvent:
    """A piece of a reply. `text` is new text only; the last event has `finish_reason` set."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class RequestHandle:
    """What `GenerationEngine.submit` returns: iterate it (blocking) for events, or receive them by callback."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[GenerationEvent], None] | None):
        self.prompt_ids = prompt_ids
        self.params = params
        self._on_event = on_event
        self._events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.finished = threading.Event()

    def cancel(self) -> None:
        """Stop generating for this request; the engine frees its slot at the next step."""
        self.cancelled.set()

    def _emit(self, event: GenerationEvent) -> None:
        if event.finish_reason is not None:
            self.finished.set()
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # the consumer is gone (e.g. its event loop closed): stop generating for it
                logger.exception("a request's event callback failed; cancelling the request")
                self.cancelled.set()
        else:
            self._events.put(event)

    def __iter__(self) -> Iterator[GenerationEvent]:
        if self._on_event is not None:
            raise RuntimeError("This request reports through its on_event callback; it cannot also be iterated.")
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return


# --------------------------------------------------------------------------------------------------------------------
# The slot KV cache
# --------------------------------------------------------------------------------------------------------------------


class SlotKVCache(Cache):
    """Preallocated keys and values for up to `slots` sequences of different lengths.

    Rows 0..B-1 hold the running sequences. Before a batched decode step the engine gives `set_lengths` the tokens
    cached per row; `update` writes each row's new key at its own position and returns the first `max(lengths) + 1`
    positions of rows 0..B-1 as a view. The attention mask hides each row's positions past its own length.

    `quantized=True` stores every key and value vector as uint8 codes plus its scale and minimum, packed by
    `quantize_kv` into `head_dim + 8` bytes; `update` then returns those positions dequantized to `dtype`.
    """

    def __init__(self, num_layers: int, slots: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 quantized: bool = False):
        super().__init__(layers=[])
        self.num_layers, self.slots, self.heads, self.head_dim = num_layers, slots, heads, head_dim
        self.dtype, self.device = dtype, device  # dtype: what attention reads
        self.quantized = quantized
        self.storage_dtype = torch.uint8 if quantized else dtype
        self.storage_width = head_dim + KV_PARAMS_BYTES if quantized else head_dim
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths = torch.zeros(0, dtype=torch.long)  # tokens cached in each running row (see set_lengths)

    def ensure_capacity(self, needed: int) -> None:
        """Grow the buffers (doubling) so that every row can hold `needed` positions."""
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity, 256)
        shape = (self.slots, self.heads, capacity, self.storage_width)
        for layer in range(self.num_layers):
            for buffers in (self.keys, self.values):
                grown = torch.zeros(shape, dtype=self.storage_dtype, device=self.device)
                if buffers and self.capacity:
                    grown[:, :, : self.capacity] = buffers[layer]
                if len(buffers) > layer:
                    buffers[layer] = grown
                else:
                    buffers.append(grown)
        self.capacity = capacity

    def set_lengths(self, lengths: torch.Tensor) -> None:
        """Tokens cached in rows 0..B-1 before the next decode step, which writes each row's new key after them."""
        self.ensure_capacity(int(lengths.max()) + 1)
        self.lengths = lengths

    def store(self, row: int, prefilled: Cache, batch_index: int, length: int) -> None:
        """Copy the first `length` positions of sequence `batch_index` of a prefilled batch into `row`.

        `prefilled` stores what this cache stores (a QuantizedKVCache's packed bytes for a quantized one), so rows
        are copied as they are, never quantized twice.
        """
        stored = prefilled.layers[0].keys
        if stored.dtype != self.storage_dtype or stored.shape[-1] != self.storage_width:
            raise TypeError(f"The prefill cache holds {stored.dtype} vectors of {stored.shape[-1]}; this slot cache "
                            f"stores {self.storage_dtype} of {self.storage_width}. Prefill with new_kv_cache(config).")
        self.ensure_capacity(length + 1)
        for layer in range(self.num_layers):
            self.keys[layer][row, :, :length] = prefilled.layers[layer].keys[batch_index, :, :length]  # (nh, T, hs)
            self.values[layer][row, :, :length] = prefilled.layers[layer].values[batch_index, :, :length]

    def move_row(self, source: int, target: int) -> None:
        for buffers in (self.keys, self.values):
            for layer in range(self.num_layers):
                buffers[layer][target] = buffers[layer][source]

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value buffers (all slots, the whole capacity)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # The Cache interface the model uses ---------------------------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = key_states.shape[0]  # key_states: (B, nh, 1, hs)
        if self.quantized:
            key_states, value_states = quantize_kv(key_states), quantize_kv(value_states)  # (B, nh, 1, hs + 8)
        rows = torch.arange(batch, device=self.device)
        positions = self.lengths.to(self.device)
        self.keys[layer_idx][rows, :, positions] = key_states[:, :, 0]
        self.values[layer_idx][rows, :, positions] = value_states[:, :, 0]
        kv_len = self.get_seq_length() + 1
        keys, values = self.keys[layer_idx][:batch, :, :kv_len], self.values[layer_idx][:batch, :, :kv_len]
        if self.quantized:
            return dequantize_kv(keys, self.dtype), dequantize_kv(values, self.dtype)  # (B, nh, S, hs)
        return keys, values


# --------------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------------


def apply_penalties(logits: torch.Tensor, seen: list[int], generated_counts: dict[int, int], params: SamplingParams):
    """Repetition penalty over prompt and reply (as transformers does), presence/frequency over the reply (OpenAI)."""
    if params.repetition_penalty != 1.0 and seen:
        index = torch.tensor(sorted(set(seen)), device=logits.device)
        chosen = logits[index]
        logits[index] = torch.where(chosen < 0, chosen * params.repetition_penalty, chosen / params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and generated_counts:
        index = torch.tensor(list(generated_counts), device=logits.device)
        counts = torch.tensor(list(generated_counts.values()), dtype=logits.dtype, device=logits.device)
        logits[index] -= params.presence_penalty + params.frequency_penalty * counts
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from fp32 `logits` (V,): temperature, then top-k, then top-p (nucleus), as transformers orders them."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    candidates = None  # vocabulary ids of `probs`' entries; None means all of them, in order
    if params.top_k:
        logits, candidates = torch.topk(logits, min(params.top_k, logits.shape[-1]))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        # Nucleus sampling only needs the head of the distribution: look at the likeliest 1024 first, and sort
        # everything only when they do not reach top_p (a flat distribution).
        head_probs, head = torch.topk(probs, min(1024, probs.shape[-1]))
        if float(head_probs.sum()) < params.top_p:
            head_probs, head = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        keep = (torch.cumsum(head_probs, dim=-1) - head_probs) < params.top_p
        keep[0] = True
        probs = torch.where(keep, head_probs, torch.zeros_like(head_probs))
        candidates = head if candidates is None else candidates[head]
    choice = int(torch.multinomial(probs, 1, generator=generator))
    return choice if candidates is None else int(candidates[choice])


# --------------------------------------------------------------------------------------------------------------------
# Text assembly: stop strings and partial UTF-8 never reach the client
# --------------------------------------------------------------------------------------------------------------------


class TextAssembler:
    """Turns a growing list of token ids into safe text deltas.

    Text is held back while it ends in a partial UTF-8 character (decoded as U+FFFD) or in what may become a stop
    string; a stop string ends the reply before it.
    """

    def __init__(self, tokenizer: Any, stop_strings: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.token_ids: list[int] = []
        self.emitted = ""

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; return (new safe text, whether a stop string was reached)."""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True, errors="replace")
        for stop in self.stop_strings:
            position = text.find(stop, max(0, len(self.emitted) - len(stop)))
            if position != -1:
                return self._advance(text[:position]), True
        safe = text.rstrip(REPLACEMENT_CHARACTER)
        held = max((self._partial_stop_length(safe, stop) for stop in self.stop_strings), default=0)
        return self._advance(safe[: len(safe) - held]), False

    def flush(self) -> str:
        """The rest of the text at the end of a reply (a held-back stop-string prefix was not a stop after all)."""
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True, errors="replace")
        return self._advance(text)

    @staticmethod
    def _partial_stop_length(text: str, stop: str) -> int:
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:length]):
                return length
        return 0

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.emitted) or not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta


# --------------------------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Running:
    handle: RequestHandle
    assembler: TextAssembler
    generator: torch.Generator | None
    length: int  # tokens in the KV cache
    next_token: int  # sampled, not yet fed to the model
    seen: list[int]
    row: int  # its row in the slot cache
    ntk_alpha: float  # chosen at prefill, kept while decoding (as the released model does)
    generated_counts: dict[int, int] = field(default_factory=dict)
    completion_tokens: int = 0
    unsent_ids: list[int] = field(default_factory=list)  # tokens whose text is still held back


class GenerationEngine:
    """Runs a `QWenLMHeadModel` for many concurrent requests on one background thread.

    Args:
        model: the loaded model (any device and dtype it supports).
        tokenizer: its `QWenTokenizer`.
        max_batch_size: how many requests decode together; more wait in a queue.
        max_context: longest prompt + reply allowed. Default: `seq_length`, or the larger of it and
            `max_position_embeddings` when dynamic NTK stretches the context.
    """

    def __init__(self, model: Any, tokenizer: Any, max_batch_size: int = 8, max_context: int | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1.")
        config = model.config
        if getattr(config, "use_window_attn", False):
            raise ValueError("The batching engine does not support window attention; turn use_window_attn off.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_context = max_context or context_length(config)
        self.device = next(model.parameters()).device
        self.cache = SlotKVCache(
            config.num_hidden_layers, max_batch_size, config.num_attention_heads, config.kv_channels,
            next(model.parameters()).dtype, self.device,
            quantized=bool(getattr(config, "use_cache_quantization", False)),
        )
        self._waiting: queue.SimpleQueue[RequestHandle] = queue.SimpleQueue()
        self._running: list[_Running] = []
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._counters = EngineCounters()  # replaced, never mutated, by the engine thread: readers see whole snapshots
        self._thread = threading.Thread(target=self._loop, name="qwen-engine", daemon=True)
        self._thread.start()

    # Public API ------------------------------------------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_event: Callable[[GenerationEvent], None] | None = None,
    ) -> RequestHandle:
        """Queue a request. `on_event` (called on the engine thread) receives events instead of iteration."""
        if not prompt_ids:
            raise ValueError("The prompt is empty.")
        vocab_size = self.model.config.vocab_size
        if not 0 <= min(prompt_ids) <= max(prompt_ids) < vocab_size:
            # Checked here: inside a batched prefill, one bad id would fail every prompt prefilled with it.
            raise ValueError(f"The prompt holds token ids outside this model's vocabulary (0..{vocab_size - 1}).")
        if len(prompt_ids) >= self.max_context:
            raise ValueError(
                f"The prompt has {len(prompt_ids)} tokens; this model's context holds {self.max_context} "
                "including the reply. Shorten the conversation."
            )
        if self._closing.is_set():
            raise RuntimeError("The engine is shut down.")
        handle = RequestHandle(list(prompt_ids), params, on_event)
        self._waiting.put(handle)
        self._wake.set()
        if self._closing.is_set():  # shut down since the check above: the loop may have drained the queue already
            self._cancel_waiting()
        return handle

    @property
    def running(self) -> int:
        """Requests holding a slot (decoding)."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return self._waiting.qsize()

    def counters(self) -> EngineCounters:
        """How many prefill forwards and decode steps the engine has run so far, and how wide they were."""
        return self._counters

    def shutdown(self) -> None:
        """Refuse new requests and end every queued and running one with finish_reason "cancelled" after the current
        step, without waiting for that: only sets flags, so a signal handler on the event loop's thread may call it."""
        self._closing.set()
        self._wake.set()

    def close(self, timeout: float = 10.0) -> None:
        """Finish nothing more: cancel all requests and stop the thread (waiting up to `timeout` seconds for it)."""
        self.shutdown()
        self._thread.join(timeout)

    # The loop --------------------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closing.is_set():
            try:
                self._admit()
                self._drop_cancelled()
                if not self._running:
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._decode_step()
            except Exception as error:  # a failed step must not take the server down: fail its requests only
                logger.exception("generation step failed")
                for running in self._running:
                    self._finish(running, "error", error=f"{type(error).__name__}: {error}")
                self._running.clear()
        for running in self._running:
            self._finish(running, "cancelled")
        self._running.clear()
        self._cancel_waiting()

    def _cancel_waiting(self) -> None:
        """End every queued request as cancelled (the engine thread and `submit` may both call it)."""
        while True:
            try:
                handle = self._waiting.get_nowait()
            except queue.Empty:
                return
            handle._emit(GenerationEvent(finish_reason="cancelled", prompt_tokens=len(handle.prompt_ids)))

    def _admit(self) -> None:
        admitted: list[RequestHandle] = []
        while len(self._running) + len(admitted) < self.max_batch_size and not self._waiting.empty():
            handle = self._waiting.get()
            if handle.cancelled.is_set():
                handle._emit(GenerationEvent(finish_reason="cancelled", prompt_tokens=len(handle.prompt_ids)))
            else:
                admitted.append(handle)
        for group in self._prefill_groups(admitted):
            try:
                self._prefill(group)
            except Exception as error:
                logger.exception("prefill failed")
                for handle in group:
                    handle._emit(GenerationEvent(finish_reason="error", error=f"{type(error).__name__}: {error}",
                                                 prompt_tokens=len(handle.prompt_ids)))

    def _prefill_groups(self, handles: list[RequestHandle]) -> list[list[RequestHandle]]:
        """Split prompts admitted together into batches worth one forward each.

        On a CPU a short prompt's prefill costs about as much as reading every weight once, so prompts that arrive
        together are prefilled together. A batch is right-padded to its longest prompt; prompts of similar length go
        together so that padding stays within a third of the batch's tokens. A prompt past `seq_length` with dynamic
        NTK goes alone: its rotary scaling depends on its own length.
        """
        config = self.model.config
        groups: list[list[RequestHandle]] = []
        group: list[RequestHandle] = []
        for handle in sorted(handles, key=lambda h: len(h.prompt_ids)):
            length = len(handle.prompt_ids)
            padded = (len(group) + 1) * length
            real = sum(len(h.prompt_ids) for h in group) + length
            alone = config.use_dynamic_ntk and length > config.seq_length
            if group and (alone or padded > PREFILL_TOKEN_BUDGET or 2 * padded > 3 * real):
                groups.append(group)
                group = []
            group.append(handle)
        if group:
            groups.append(group)
        return groups

    @torch.inference_mode()
    def _prefill(self, handles: list[RequestHandle]) -> None:
        """Prefill prompts in one right-padded forward and start decoding them.

        Right padding needs no mask: under causal attention a prompt's tokens never see the padding after them, so
        each row's keys, values and last-token logits are those of the prompt alone.
        """
        lengths = [len(handle.prompt_ids) for handle in handles]
        longest = max(lengths)
        pad = self.tokenizer.eod_id
        ids = torch.tensor([h.prompt_ids + [pad] * (longest - len(h.prompt_ids)) for h in handles], device=self.device)
        prefilled = new_kv_cache(self.model.config)  # int8 when the slot cache is
        # The prompts of a group are all within seq_length, or one prompt alone (_prefill_groups): one alpha, kept
        # for every decode step of each of them, as the released model kept its prefill's.
        config = self.model.config
        ntk_alpha = ntk_alpha_for_length(longest, config.seq_length) if config.use_dynamic_ntk else 1.0
        logits = self.model.logits_at(ids, torch.tensor(lengths) - 1, cache=prefilled, ntk_alphas=[ntk_alpha])
        done = self._counters
        self._counters = replace(done, prefill_forwards=done.prefill_forwards + 1,
                                 prefilled_prompts=done.prefilled_prompts + len(handles))
        for index, (handle, length) in enumerate(zip(handles, lengths)):
            params = handle.params
            row = len(self._running)
            try:
                self.cache.store(row, prefilled, index, length)
                generator = None
                if params.seed is not None:
                    generator = torch.Generator(device=logits.device).manual_seed(params.seed)
            except Exception as error:  # this request's own setup: the others of the group go on
                logger.exception("starting a request failed")
                handle._emit(GenerationEvent(finish_reason="error", error=f"{type(error).__name__}: {error}",
                                             prompt_tokens=length))
                continue
            running = _Running(
                handle=handle,
                assembler=TextAssembler(self.tokenizer, params.stop_strings),
                generator=generator,
                length=length,
                next_token=-1,
                seen=list(handle.prompt_ids),
                row=row,
                ntk_alpha=ntk_alpha,
            )
            self._running.append(running)
            self._accept(running, logits[index])
        self._running = [r for r in self._running if not r.handle.finished.is_set()]
        self._compact()

    @torch.inference_mode()
    def _decode_step(self) -> None:
        done = self._counters
        self._counters = replace(done, decode_steps=done.decode_steps + 1,
                                 decoded_tokens=done.decoded_tokens + len(self._running))
        lengths = torch.tensor([r.length for r in self._running], dtype=torch.long)
        self.cache.set_lengths(lengths)
        kv_len = int(lengths.max()) + 1
        tokens = torch.tensor([[r.next_token] for r in self._running], device=self.device)  # (B, 1)
        positions = lengths.to(self.device)[:, None]  # (B, 1)
        allowed = torch.arange(kv_len, device=self.device)[None, :] <= positions  # (B, S)
        logits = self.model.logits_at(
            tokens,
            torch.zeros(len(self._running), dtype=torch.long),
            cache=self.cache,
            attention_mask=allowed[:, None, None, :],  # (B, 1, 1, S)
            position_ids=positions,
            ntk_alphas=[r.ntk_alpha for r in self._running],
        )
        for row, running in enumerate(list(self._running)):
            running.length += 1
            self._accept(running, logits[row])
        self._running = [r for r in self._running if not r.handle.finished.is_set()]
        self._compact()

    def _accept(self, running: _Running, logits: torch.Tensor) -> None:
        """Sample the next token for one request from its logits, stream its text, and finish it when due.

        Whatever fails here (NaN logits, a client callback that raises) ends this request alone with an error; the
        rows decoding beside it are untouched.
        """
        try:
            self._sample_and_emit(running, logits)
        except Exception as error:
            logger.exception("sampling a request's next token failed")
            self._finish(running, "error", error=f"{type(error).__name__}: {error}")

    def _sample_and_emit(self, running: _Running, logits: torch.Tensor) -> None:
        params = running.handle.params
        # `logits` is this request's own row of the step's output, so it is changed in place.
        logits = apply_penalties(logits, running.seen, running.generated_counts, params)
        # Ids past the tokenizer (embedding padding) have no text; a reply must always decode.
        logits[len(self.tokenizer):] = -math.inf
        token = sample(logits, params, running.generator)
        if token in params.stop_token_ids:
            self._finish(running, "stop")
            return
        running.completion_tokens += 1
        running.seen.append(token)
        running.generated_counts[token] = running.generated_counts.get(token, 0) + 1
        text, stopped = running.assembler.add(token)
        running.unsent_ids.append(token)
        if text:
            running.handle._emit(GenerationEvent(text=text, token_ids=running.unsent_ids))
            running.unsent_ids = []
        if stopped:
            self._finish(running, "stop", flush=False)
        elif running.completion_tokens >= params.max_new_tokens or running.length + 1 >= self.max_context:
            self._finish(running, "length")
        else:
            running.next_token = token

    def _finish(self, running: _Running, reason: FinishReason, flush: bool = True, error: str | None = None) -> None:
        if running.handle.finished.is_set():
            return
        rest = running.assembler.flush() if flush and reason != "error" else ""
        running.handle._emit(
            GenerationEvent(
                text=rest,
                token_ids=running.unsent_ids,
                finish_reason=reason,
                prompt_tokens=len(running.handle.prompt_ids),
                completion_tokens=running.completion_tokens,
                error=error,
            )
        )

    @torch.inference_mode()  # compacting writes into the cache, whose tensors were made in inference mode
    def _drop_cancelled(self) -> None:
        for running in self._running:
            if running.handle.cancelled.is_set():
                self._finish(running, "cancelled", flush=False)
        before = len(self._running)
        self._running = [r for r in self._running if not r.handle.finished.is_set()]
        if len(self._running) != before:
            self._compact()

    def _compact(self) -> None:
        """Keep running requests in rows 0..B-1 of the cache, in `self._running` order."""
        # Survivors keep their order, so each moves to a row no later one still occupies.
        for row, running in enumerate(self._running):
            if running.row != row:
                self.cache.move_row(running.row, row)
                running.row = row
