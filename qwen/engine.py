"""A generation engine that serves many requests at once: continuous batching over a slot KV cache.

The server, the demos and any other concurrent user submit prompts; one background thread runs the model. Each
iteration admits waiting requests (prompts admitted together are prefilled together, in as few right-padded forwards
as their lengths allow), then decodes one token for every running request in a single batched forward, so a request that arrives while others are decoding joins the running batch at the next
step instead of waiting for them to finish. Finished or cancelled requests free their slot at once.

The layout follows gpt-fast: `prefill`, `decode_step` and the sampling functions are small functions; the KV cache
is a preallocated buffer per layer, `(slots, heads, capacity, head_dim)`, where running requests occupy rows 0..B-1
so the batch's cache is a view, never a copy. With `use_cache_quantization` the buffers hold int8 keys and values
packed as `modeling_qwen.quantize_kv` packs them, and each decode step reads them dequantized.

Choosing the next tokens has no loop over rows: penalties, temperature, top-k, top-p and the draw run once over the
step's (rows x vocabulary) logits with each request's parameters as a column (`BatchSampling`), from per-row state
the engine updates in place (ids seen, reply counts, seeds). The host waits on the device a fixed number of times
per step, never once per row: for the chosen ids and, with top-k or top-p, for the sizes of a few small gathers. Text
is then decoded from each new token's bytes alone.
"""

from __future__ import annotations

import codecs
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
from .chat_turn import SamplingParams, context_length

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "error"]
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

    `fixed_shape=True` makes `update` return all `capacity` positions of rows 0..B-1 instead, so that its shapes do
    not depend on the lengths (a compiled decode step, `decode_one_token`, sees the same shapes until the capacity
    doubles); the step's mask must then hide every row's positions past its length.
    """

    def __init__(self, num_layers: int, slots: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 quantized: bool = False, fixed_shape: bool = False):
        super().__init__(layers=[])
        self.num_layers, self.slots, self.heads, self.head_dim = num_layers, slots, heads, head_dim
        self.dtype, self.device = dtype, device  # dtype: what attention reads
        self.quantized = quantized
        self.fixed_shape = fixed_shape
        self.storage_dtype = torch.uint8 if quantized else dtype
        self.storage_width = head_dim + KV_PARAMS_BYTES if quantized else head_dim
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths = torch.zeros(0, dtype=torch.long)  # tokens cached in each running row (see set_lengths)
        # The same lengths on the device, in one buffer that is written in place: where `update` writes each row's
        # new key, read by a compiled step without a copy from the host at every layer.
        self._write_positions = torch.zeros(slots, dtype=torch.long, device=device)

    @property
    def is_compileable(self) -> bool:
        return self.fixed_shape

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
        self._write_positions[: len(lengths)].copy_(lengths)

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
        positions = self._write_positions[:batch]
        self.keys[layer_idx][rows, :, positions] = key_states[:, :, 0]
        self.values[layer_idx][rows, :, positions] = value_states[:, :, 0]
        if self.fixed_shape:
            keys, values = self.keys[layer_idx][:batch], self.values[layer_idx][:batch]  # (B, nh, capacity, hs)
        else:
            kv_len = self.get_seq_length() + 1
            keys, values = self.keys[layer_idx][:batch, :, :kv_len], self.values[layer_idx][:batch, :, :kv_len]
        if self.quantized:
            return dequantize_kv(keys, self.dtype), dequantize_kv(values, self.dtype)  # (B, nh, S, hs)
        return keys, values


def decode_one_token(
    model: Any, cache: SlotKVCache, tokens: torch.Tensor, positions: torch.Tensor, ntk_alphas: torch.Tensor
) -> torch.Tensor:
    """One decode step over a fixed-shape `cache` (rows 0..B-1, after `set_lengths`): fp32 logits (B, vocab) of the
    tokens (B, 1) at `positions` (B, 1), each row with its NTK alpha (B,) float64.

    Every shape depends only on the batch and the cache's capacity, and nothing is read back to the host, so
    `torch.compile(decode_one_token, fullgraph=True)` traces it whole and reuses the graph at every position (gpt-fast's
    `decode_one_token`). Each row attends to the keys at and before its position in the whole buffer.
    """
    capacity = cache.keys[0].shape[2]
    allowed = torch.arange(capacity, device=tokens.device)[None, :] <= positions  # (B, S)
    return model.logits_at(
        tokens,
        torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device),
        cache=cache,
        attention_mask=allowed[:, None, None, :],  # (B, 1, 1, S)
        position_ids=positions,
        ntk_alphas=ntk_alphas,
    )


# --------------------------------------------------------------------------------------------------------------------
# Sampling: one batched pass for every row of a step, per-row parameters as tensors
# --------------------------------------------------------------------------------------------------------------------

# The nucleus (top-p) cut is found without sorting the vocabulary: probabilities are bucketed by log-probability
# below the row's largest, the bucket where the mass reaches top_p is located from the bucket sums, and only that
# bucket's members are sorted. A sort of 150k probabilities per row per token cost more than the model's decode step
# on a CPU for the flat distributions of small or random checkpoints.
NUCLEUS_BUCKETS = 4096
NUCLEUS_SPAN = 16.0  # nats below the largest log-probability covered by the buckets; the rest share the last one

_SPLITMIX_GAMMA = 0x9E3779B97F4A7C15 - 2**64  # SplitMix64's constants as the signed int64 values torch holds
_SPLITMIX_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_SPLITMIX_MIX2 = 0x94D049BB133111EB - 2**64


def seed_as_int64(seed: int) -> int:
    """A seed from SEED_RANGE as the int64 with the same 64 bits (seeds equal modulo 2**64 are the same stream)."""
    seed %= 2**64
    return seed - 2**64 if seed >= 2**63 else seed


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 keeps the sign; SplitMix64 shifts zeros in.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def seeded_uniforms(seeds: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """For each row, the `draws`-th number of the SplitMix64 stream started at its seed, as a float32 in [0, 1).

    A request's random numbers depend on its seed and on how many it has drawn, never on the requests decoding
    beside it, and every row of a step gets its number in one vectorized pass (int64 arithmetic wraps as C does).
    """
    z = seeds + (draws + 1) * _SPLITMIX_GAMMA
    z = (z ^ _shift_right(z, 30)) * _SPLITMIX_MIX1
    z = (z ^ _shift_right(z, 27)) * _SPLITMIX_MIX2
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 40).to(torch.float32) * 2.0**-24  # 24 bits: every value exact in float32, below 1


@dataclass(frozen=True)
class BatchSampling:
    """The SamplingParams of a batch's rows as (B,) tensors, and which stages any row needs (known on the host, so a
    step skips a stage no row uses without asking the device)."""

    greedy: torch.Tensor  # bool
    temperature: torch.Tensor  # float32; 1 for greedy rows
    top_k: torch.Tensor  # int64; 0 = no cut
    top_p: torch.Tensor  # float32
    repetition_penalty: torch.Tensor  # float32
    presence_penalty: torch.Tensor  # float32
    frequency_penalty: torch.Tensor  # float32
    any_sampled: bool
    any_greedy: bool
    any_temperature: bool  # a sampled row's temperature is not 1
    max_top_k: int
    any_top_p: bool
    any_uncut: bool  # a sampled row has top_p 1
    any_repetition_penalty: bool
    any_presence_or_frequency: bool

    @classmethod
    def of(cls, params: list[SamplingParams], device: torch.device) -> BatchSampling:
        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        sampled = [not p.greedy for p in params]
        return cls(
            greedy=column([p.greedy for p in params], torch.bool),
            temperature=column([1.0 if p.greedy else p.temperature for p in params], torch.float32),
            top_k=column([0 if p.greedy else p.top_k for p in params], torch.int64),
            top_p=column([1.0 if p.greedy else p.top_p for p in params], torch.float32),
            repetition_penalty=column([p.repetition_penalty for p in params], torch.float32),
            presence_penalty=column([p.presence_penalty for p in params], torch.float32),
            frequency_penalty=column([p.frequency_penalty for p in params], torch.float32),
            any_sampled=any(sampled),
            any_greedy=not all(sampled),
            any_temperature=any(s and p.temperature != 1.0 for p, s in zip(params, sampled)),
            max_top_k=max((p.top_k for p, s in zip(params, sampled) if s), default=0),
            any_top_p=any(s and p.top_p < 1.0 for p, s in zip(params, sampled)),
            any_uncut=any(s and p.top_p == 1.0 for p, s in zip(params, sampled)),
            any_repetition_penalty=any(p.repetition_penalty != 1.0 for p in params),
            any_presence_or_frequency=any(p.presence_penalty or p.frequency_penalty for p in params),
        )


def apply_penalties(logits: torch.Tensor, batch: BatchSampling, history: torch.Tensor,
                    generated_counts: torch.Tensor) -> torch.Tensor:
    """Penalise fp32 `logits` (B, V) in place: the repetition penalty on every id in `history` (B, L), the prompt and
    the reply so far (as transformers does; ids may repeat), then presence and frequency penalties from
    `generated_counts` (B, V), the reply's own tokens (as OpenAI defines them)."""
    if batch.any_repetition_penalty:
        chosen = logits.gather(1, history)
        penalty = batch.repetition_penalty[:, None]
        # A repeated id writes the same value each time, so duplicates in `history` are harmless.
        logits.scatter_(1, history, torch.where(chosen < 0, chosen * penalty, chosen / penalty))
    if batch.any_presence_or_frequency:
        penalty = generated_counts * batch.frequency_penalty[:, None] + batch.presence_penalty[:, None]
        logits -= torch.where(generated_counts > 0, penalty, 0.0)
    return logits


@dataclass(frozen=True)
class _Nucleus:
    """Where each row's top-p cut falls, in terms of log-probability buckets (see NUCLEUS_BUCKETS)."""

    bucket: torch.Tensor  # (B, V) int32: row r's bucket b is number r * NUCLEUS_BUCKETS + b; 0 holds the likeliest
    first_bucket: torch.Tensor  # (B,) int64: r * NUCLEUS_BUCKETS
    through: torch.Tensor  # (B, NUCLEUS_BUCKETS) float64: the mass of buckets 0..b
    before: torch.Tensor  # (B,) float64: the mass of the buckets before the one where the mass reaches top_p
    threshold: torch.Tensor  # (B,): the smallest weight kept; 0 for rows without a cut
    member_ids: torch.Tensor  # (B, W) ids in the crossing bucket, heaviest first
    kept_weights: torch.Tensor  # (B, W) float64: their weights where kept, else 0


def _rows_block(row: torch.Tensor, column: torch.Tensor, values: torch.Tensor, rows: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.nonzero`'s (row, column) pairs and a value for each, as (rows, widest) blocks of ids and values, each
    row's in its order of `column`; padded with id -1 and value -1. Each row is then worked on alone, so no
    rounding of one row's sums reaches another's."""
    per_row = torch.bincount(row, minlength=rows)
    slot = torch.arange(row.numel(), device=row.device) - (per_row.cumsum(dim=0) - per_row)[row]
    width = int(per_row.max())
    ids = torch.full((rows, width), -1, dtype=torch.long, device=row.device)
    ids[row, slot] = column
    block = torch.full((rows, width), -1.0, dtype=values.dtype, device=values.device)
    block[row, slot] = values
    return ids, block


def _nucleus(shifted: torch.Tensor, weights: torch.Tensor, top_p: torch.Tensor) -> _Nucleus | None:
    """The nucleus of every row with top_p < 1: the tokens whose likelier tokens hold less than `top_p` of the row's
    mass (the token that crosses top_p included; tokens of equal weight are in or out together). None when no row
    cuts. `shifted` is the rows' logits minus their largest (<= 0; overwritten here) and `weights` their exp."""
    rows = weights.shape[0]
    # One flat int32 index (a float converts to int32 several times faster than to int64 on a CPU) sums every
    # row's buckets at once. The row's offset is added after the conversion, so that a row's buckets never depend
    # on its place in the batch.
    first_bucket = torch.arange(rows, device=weights.device, dtype=torch.int32) * NUCLEUS_BUCKETS
    bucket = shifted.mul_(-NUCLEUS_BUCKETS / NUCLEUS_SPAN).clamp_(max=NUCLEUS_BUCKETS - 1).int()
    bucket += first_bucket[:, None]
    mass = torch.zeros(rows * NUCLEUS_BUCKETS, dtype=weights.dtype, device=weights.device)
    mass.index_add_(0, bucket.reshape(-1), weights.reshape(-1))
    through = mass.view(rows, NUCLEUS_BUCKETS).double().cumsum(dim=-1)
    wanted = (top_p.double() * through[:, -1])[:, None]
    cuts = top_p < 1.0
    crossing = torch.where(cuts, (through < wanted).sum(dim=-1).clamp_(max=NUCLEUS_BUCKETS - 1), -1)
    before = torch.where(crossing > 0, through.gather(1, (crossing - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    first_bucket = first_bucket.long()
    # The crossing bucket's members, gathered into a (B, W) block and sorted there: a few hundred ids at most, where
    # a top-k over the whole vocabulary would cost a pass of its own.
    row, column = torch.nonzero(bucket == (crossing + first_bucket).int()[:, None], as_tuple=True)
    if row.numel() == 0:  # the step's one look at the device for top-p: this nonzero
        return None
    member_ids, member_weights = _rows_block(row, column, weights[row, column], rows)
    member_weights, order = member_weights.sort(dim=-1, descending=True)  # -1 pads sort last
    member_ids = member_ids.gather(1, order).clamp_(min=0)
    exact = member_weights.clamp(min=0).double()
    exclusive = before[:, None] + exact.cumsum(dim=-1) - exact  # the mass of the likelier tokens
    kept = ((exclusive < wanted) & (member_weights >= 0)).sum(dim=-1).clamp_(min=1)
    threshold = torch.where(cuts, member_weights.gather(1, (kept - 1)[:, None])[:, 0], 0.0)
    kept_weights = torch.where((member_weights >= threshold[:, None]) & cuts[:, None], exact, 0.0)
    return _Nucleus(bucket, first_bucket, through, before, threshold, member_ids, kept_weights)


def _shifted_weights(logits: torch.Tensor, batch: BatchSampling) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits minus each row's largest, after temperature and top-k; their exp; whether each row was usable)."""
    row_max = logits.amax(dim=-1)
    usable = torch.isfinite(row_max)
    # Shifted by the row's largest logit, the exp cannot overflow; this is softmax without its division.
    shifted = (logits - torch.where(usable, row_max, 0.0)[:, None]).nan_to_num_(nan=0.0, posinf=0.0, neginf=-math.inf)
    if batch.any_temperature:
        shifted /= batch.temperature[:, None]
    if batch.max_top_k:
        k = batch.top_k.clamp(max=min(batch.max_top_k, shifted.shape[-1]))
        kth = torch.topk(shifted, int(k.max()), dim=-1).values.gather(1, (k - 1).clamp(min=0)[:, None])
        shifted.masked_fill_((batch.top_k > 0)[:, None] & (shifted < kth), -math.inf)
    return shifted, shifted.exp(), usable


def sampling_weights(logits: torch.Tensor, batch: BatchSampling) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, V) unnormalised probabilities each row samples from (temperature, then top-k, then top-p, the order
    transformers applies them; zero outside the cut) and whether each row's logits were usable (no NaN, no +inf,
    not all -inf). An unusable row gets harmless stand-in values, so it cannot disturb the others.

    `next_tokens` samples from exactly these weights without writing them out: the same `_nucleus` decides the cut.
    """
    shifted, weights, usable = _shifted_weights(logits, batch)
    nucleus = _nucleus(shifted, weights, batch.top_p) if batch.any_top_p else None
    if nucleus is not None:
        weights = torch.where(weights >= nucleus.threshold[:, None], weights, 0.0)
    return weights, usable


def _pick_in_nucleus(weights: torch.Tensor, nucleus: _Nucleus, uniforms: torch.Tensor) -> torch.Tensor:
    """One id per row drawn from the nucleus by inverse CDF, taking the buckets in order (inside an earlier bucket
    the ids go in vocabulary order, inside the crossing bucket heaviest first): only two buckets' members are ever
    looked at one by one, never the whole vocabulary."""
    rows = weights.shape[0]
    total = nucleus.before + nucleus.kept_weights.sum(dim=-1)
    target = torch.minimum(uniforms.double() * total, torch.nextafter(total, torch.zeros_like(total)))
    in_crossing = target >= nucleus.before
    # Inside the crossing bucket.
    running = nucleus.kept_weights.cumsum(dim=-1)
    slot = torch.searchsorted(running, (target - nucleus.before).clamp(min=0)[:, None], right=True)
    crossing_ids = nucleus.member_ids.gather(1, slot.clamp_(max=running.shape[-1] - 1))[:, 0]
    # Inside an earlier bucket: the first whose running mass passes the target.
    earlier = torch.searchsorted(nucleus.through, target[:, None], right=True)[:, 0]
    earlier = torch.where(in_crossing, -1, earlier.clamp_(max=NUCLEUS_BUCKETS - 1))
    remainder = target - torch.where(earlier > 0, nucleus.through.gather(1, (earlier - 1).clamp(min=0)[:, None])[:, 0],
                                     0.0)
    row, column = torch.nonzero(nucleus.bucket == (earlier + nucleus.first_bucket).int()[:, None], as_tuple=True)
    if row.numel() == 0:
        return crossing_ids
    ids, block = _rows_block(row, column, weights[row, column].double(), rows)  # in vocabulary order
    running = block.clamp(min=0).cumsum(dim=-1)
    slot = torch.searchsorted(running, remainder[:, None], right=True)
    # Rounding (bucket sums are float32) can leave the target past a bucket's last id: that id, then.
    last = (ids >= 0).sum(dim=-1, keepdim=True) - 1
    earlier_ids = ids.gather(1, torch.minimum(slot, last).clamp_(min=0))[:, 0]
    return torch.where(in_crossing, crossing_ids, earlier_ids.clamp(min=0))


PICK_CHUNK = 128


def pick(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One id per row of (B, V) unnormalised `weights`: the first whose running sum in vocabulary order passes
    `uniforms` (B,) times the row's total (inverse-CDF sampling, one uniform number per row).

    The running sum is taken in two levels, over chunks of PICK_CHUNK ids and then inside the chosen chunk, in
    float64: one float32 cumsum over a vocabulary of 150k ids would be off by about a percent of a token's weight.
    """
    rows, vocab = weights.shape
    whole = vocab // PICK_CHUNK * PICK_CHUNK
    chunk_sums = weights[:, :whole].reshape(rows, -1, PICK_CHUNK).sum(dim=-1)
    if whole < vocab:
        chunk_sums = torch.cat([chunk_sums, weights[:, whole:].sum(dim=-1, keepdim=True)], dim=-1)
    through = chunk_sums.double().cumsum(dim=-1)
    total = through[:, -1:]
    # A product that rounds up to the total would point past the last id with any weight.
    target = torch.minimum(uniforms.double()[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    chunk = torch.searchsorted(through, target, right=True).clamp_(max=through.shape[-1] - 1)  # (B, 1)
    remainder = target - torch.where(chunk > 0, through.gather(1, (chunk - 1).clamp(min=0)), 0.0)
    ids = chunk * PICK_CHUNK + torch.arange(PICK_CHUNK, device=weights.device)  # (B, PICK_CHUNK)
    inside = weights.gather(1, ids.clamp(max=vocab - 1)).masked_fill(ids >= vocab, 0.0).double().cumsum(dim=-1)
    remainder = torch.minimum(remainder, torch.nextafter(inside[:, -1:], torch.zeros_like(remainder)))
    position = torch.searchsorted(inside, remainder, right=True).clamp_(max=PICK_CHUNK - 1)
    return ids.gather(1, position)[:, 0].clamp_(max=vocab - 1)  # a row with no weight at all still gets an id


def next_tokens(
    logits: torch.Tensor, batch: BatchSampling, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next id of every row of penalised fp32 `logits` (B, V): greedy rows take the argmax, the others sample
    with their uniform number. Also returns which rows' logits were usable (see `sampling_weights`)."""
    if not batch.any_sampled:
        return logits.argmax(dim=-1), torch.isfinite(logits.amax(dim=-1))
    shifted, weights, usable = _shifted_weights(logits, batch)
    nucleus = _nucleus(shifted, weights, batch.top_p) if batch.any_top_p else None
    if nucleus is None:
        sampled = pick(weights, uniforms)
    else:
        sampled = _pick_in_nucleus(weights, nucleus, uniforms)
        if batch.any_uncut:
            sampled = torch.where(batch.top_p < 1.0, sampled, pick(weights, uniforms))
    return (torch.where(batch.greedy, logits.argmax(dim=-1), sampled) if batch.any_greedy else sampled), usable


# --------------------------------------------------------------------------------------------------------------------
# Text assembly: stop strings and partial UTF-8 never reach the client
# --------------------------------------------------------------------------------------------------------------------


class TextAssembler:
    """Turns token ids, one at a time, into safe text deltas, decoding only the new token's bytes.

    An incremental UTF-8 decoder keeps the bytes of a partial character until the rest arrives; decoded text is held
    back while it ends in what may become a stop string, and a stop string ends the reply before it. The text given
    out (deltas, then `flush`) is the tokenizer's `decode(ids, skip_special_tokens=True, errors="replace")` of the
    whole reply, cut before the first stop string.
    """

    def __init__(self, tokenizer: Any, stop_strings: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._unsent = ""  # decoded, not given out yet: the tail that may begin a stop string

    def _token_bytes(self, token_id: int) -> bytes:
        pieces = self.tokenizer.convert_ids_to_tokens([token_id], skip_special_tokens=True)
        return b"".join(p.encode("utf-8") if isinstance(p, str) else p for p in pieces)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; return (new safe text, whether a stop string was reached)."""
        self._unsent += self._bytes.decode(self._token_bytes(token_id))
        # Text already given out never ends in the start of a stop string, so a stop can only begin in the unsent part.
        for stop in self.stop_strings:
            position = self._unsent.find(stop)
            if position != -1:
                text, self._unsent = self._unsent[:position], ""
                return text, True
        held = max((self._partial_stop_length(self._unsent, stop) for stop in self.stop_strings), default=0)
        text, self._unsent = self._unsent[: len(self._unsent) - held], self._unsent[len(self._unsent) - held:]
        return text, False

    def flush(self) -> str:
        """The rest of the text at the end of a reply (a held-back stop-string prefix was not a stop after all)."""
        text, self._unsent = self._unsent + self._bytes.decode(b"", final=True), ""
        return text

    @staticmethod
    def _partial_stop_length(text: str, stop: str) -> int:
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:length]):
                return length
        return 0


# --------------------------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Running:
    handle: RequestHandle
    assembler: TextAssembler
    length: int  # tokens in the KV cache
    next_token: int  # sampled, not yet fed to the model
    row: int  # its row in the slot cache and in the engine's per-row sampling state
    ntk_alpha: float  # chosen at prefill, kept while decoding (as the released model does)
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
        compile: decode with `torch.compile(decode_one_token, fullgraph=True)` over a fixed-shape slot cache instead
            of the eager step. The same tokens; the first steps at a new batch size or cache capacity wait for a
            compilation (tens of seconds on a CPU), later ones reuse it.
    """

    def __init__(self, model: Any, tokenizer: Any, max_batch_size: int = 8, max_context: int | None = None,
                 compile: bool = False) -> None:
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
            quantized=bool(getattr(config, "use_cache_quantization", False)), fixed_shape=compile,
        )
        self._compiled_decode = torch.compile(decode_one_token, fullgraph=True) if compile else None
        # Per-row sampling state, in the cache's row order: prompt + reply ids (what the repetition penalty sees;
        # past a row's length they repeat its first prompt id), how many there are, how often each id occurs in the
        # reply (presence and frequency penalties), and each request's seed and count of random numbers drawn.
        slots, vocab = max_batch_size, config.vocab_size
        self._history = torch.zeros(slots, self.max_context + 1, dtype=torch.long, device=self.device)
        self._history_lengths = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._generated_counts = torch.zeros(slots, vocab, dtype=torch.float32, device=self.device)
        self._seeds = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._draws = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._batch_sampling: tuple[tuple[SamplingParams, ...], BatchSampling] | None = None
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
        started: list[_Running] = []
        kept_rows: list[int] = []
        for index, (handle, length) in enumerate(zip(handles, lengths)):
            row = len(self._running)
            try:
                self.cache.store(row, prefilled, index, length)
                self._start_row(row, handle)
            except Exception as error:  # this request's own setup: the others of the group go on
                logger.exception("starting a request failed")
                handle._emit(GenerationEvent(finish_reason="error", error=f"{type(error).__name__}: {error}",
                                             prompt_tokens=length))
                continue
            running = _Running(handle=handle, assembler=TextAssembler(self.tokenizer, handle.params.stop_strings),
                               length=length, next_token=-1, row=row, ntk_alpha=ntk_alpha)
            self._running.append(running)
            started.append(running)
            kept_rows.append(index)
        if started:
            if len(kept_rows) != len(handles):
                logits = logits[torch.tensor(kept_rows, device=logits.device)]
            self._accept(started, logits)
        self._running = [r for r in self._running if not r.handle.finished.is_set()]
        self._compact()

    def _start_row(self, row: int, handle: RequestHandle) -> None:
        """Set row `row`'s sampling state for a request that starts there."""
        prompt = torch.tensor(handle.prompt_ids, dtype=torch.long, device=self.device)
        self._history[row] = prompt[0]
        self._history[row, : len(prompt)] = prompt
        self._history_lengths[row] = len(prompt)
        self._generated_counts[row] = 0
        seed = handle.params.seed
        if seed is None:  # from torch's global generator, so torch.manual_seed makes unseeded runs repeatable
            seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.long))
        self._seeds[row] = seed_as_int64(seed)
        self._draws[row] = 0

    @torch.inference_mode()
    def _decode_step(self) -> None:
        done = self._counters
        self._counters = replace(done, decode_steps=done.decode_steps + 1,
                                 decoded_tokens=done.decoded_tokens + len(self._running))
        lengths = torch.tensor([r.length for r in self._running], dtype=torch.long)
        self.cache.set_lengths(lengths)
        tokens = torch.tensor([[r.next_token] for r in self._running], device=self.device)  # (B, 1)
        positions = lengths.to(self.device)[:, None]  # (B, 1)
        if self._compiled_decode is not None:
            alphas = torch.tensor([r.ntk_alpha for r in self._running], dtype=torch.float64, device=self.device)
            logits = self._compiled_decode(self.model, self.cache, tokens, positions, alphas)
        else:
            kv_len = int(lengths.max()) + 1
            allowed = torch.arange(kv_len, device=self.device)[None, :] <= positions  # (B, S)
            logits = self.model.logits_at(
                tokens,
                torch.zeros(len(self._running), dtype=torch.long),
                cache=self.cache,
                attention_mask=allowed[:, None, None, :],  # (B, 1, 1, S)
                position_ids=positions,
                ntk_alphas=[r.ntk_alpha for r in self._running],
            )
        for running in self._running:
            running.length += 1
        self._accept(list(self._running), logits)
        self._running = [r for r in self._running if not r.handle.finished.is_set()]
        self._compact()

    def _sampling_for(self, rows: list[_Running]) -> BatchSampling:
        """The batch's parameters as tensors, made again only when the batch's requests change."""
        params = tuple(running.handle.params for running in rows)
        if self._batch_sampling is None or self._batch_sampling[0] != params:
            self._batch_sampling = (params, BatchSampling.of(list(params), self.device))
        return self._batch_sampling[1]

    def _accept(self, rows: list[_Running], logits: torch.Tensor) -> None:
        """Choose the next token of `rows` (consecutive rows of the cache; `logits` (B, V) is theirs, changed in
        place) in one batched pass, then stream each request's text and finish those that are due.

        A row whose logits are unusable (NaN or infinite) ends alone with an error, as does one whose text or
        callback fails; the rows decoding beside it are untouched.
        """
        first = rows[0].row
        batch = slice(first, first + len(rows))
        history = self._history[batch, : int(max(len(r.handle.prompt_ids) + r.completion_tokens for r in rows))]
        # A prefill's projection can come back transposed in memory; every pass below walks rows.
        logits = apply_penalties(logits.contiguous(), self._sampling_for(rows), history,
                                 self._generated_counts[batch])
        # Ids past the tokenizer (embedding padding) have no text; a reply must always decode.
        logits[:, len(self.tokenizer):] = -math.inf
        uniforms = seeded_uniforms(self._seeds[batch], self._draws[batch])
        tokens, usable = next_tokens(logits, self._sampling_for(rows), uniforms)
        # The per-row state advances for every row at once; a row that finishes now is reset when reused.
        positions = torch.arange(first, first + len(rows), device=self.device)
        self._history[positions, self._history_lengths[batch]] = tokens
        self._history_lengths[batch] += 1
        self._generated_counts[positions, tokens] += 1
        self._draws[batch] += 1
        for running, token, ok in zip(rows, tokens.tolist(), usable.tolist()):  # the step's one copy to the host
            try:
                if not ok:
                    raise FloatingPointError("the logits hold NaN or infinite values; no token can be chosen")
                self._emit_token(running, token)
            except Exception as error:
                logger.exception("choosing or streaming a request's next token failed")
                self._finish(running, "error", error=f"{type(error).__name__}: {error}")

    def _emit_token(self, running: _Running, token: int) -> None:
        params = running.handle.params
        if token in params.stop_token_ids:
            self._finish(running, "stop")
            return
        running.completion_tokens += 1
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
        """Keep running requests in rows 0..B-1 of the cache and of the sampling state, in `self._running` order."""
        # Survivors keep their order, so each moves to a row no later one still occupies.
        for row, running in enumerate(self._running):
            if running.row != row:
                self.cache.move_row(running.row, row)
                for state in (self._history, self._history_lengths, self._generated_counts, self._seeds, self._draws):
                    state[row] = state[running.row]
                running.row = row
