"""One chat turn: what every front end asks a Qwen chat model with, decided in one place.

`chat_turn` (a question after a history) and `messages_turn` (an OpenAI-style message list, with tools written as
the ReAct transcript of `react`) give a `ChatTurn`: the prompt ids, the reply's token budget, the tokens and strings
that end the reply, the sampling parameters (`ChatTurn.sampling_params`) and, for a turn with tools, the parser of the
model's ReAct reply (`ChatTurn.reply_parser`). `model.chat`/`chat_stream`, the CLI and web demos, the OpenAI server,
eval's chat tasks and the examples all build their prompts here, so one window policy holds everywhere:

- the history kept is what fits in `history_window` tokens: the checkpoint's `max_window_size` (6144 when unset),
  narrowed so that the reply's `max_new_tokens` (at most half the context) still fits in the model's context;
- a long question narrows that window further (`prompt_within_window`), so the reply keeps its room;
- the reply's budget is what was asked for (else the generation config's, else 512), cut to what the context has
  left.

Also copied into checkpoint folders for `trust_remote_code=True` (with `react.py` and `qwen_generation_utils.py`):
imports only pip packages and those two siblings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .qwen_generation_utils import (
    DEFAULT_MAX_WINDOW_SIZE,
    HistoryType,
    get_stop_words_ids,
    make_context,
    reply_end_ids,
)
from .react import ReActStreamParser, chat_prompt, stop_words

# What a reply may take when neither the caller nor the generation config says.
DEFAULT_MAX_NEW_TOKENS = 512

# --------------------------------------------------------------------------------------------------------------------
# How a reply is sampled
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
    greedy. Every value is checked against the bounds above at construction: SamplingParamError names the field.

    `seed` fixes the request's random numbers: token n is drawn with the n-th number of the SplitMix64 stream of the
    seed (the engine's `seeded_uniforms`), whatever else decodes beside it. Without a seed, one is taken from torch's global
    generator when the request starts.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
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
        defaults = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                    "repetition_penalty": 1.0}
        values: dict[str, Any] = {}
        for name, default in defaults.items():
            # `is None`, not `or`: a configured 0 (greedy temperature, an invalid top_p) must reach the checks.
            value = getattr(generation_config, name, None)
            values[name] = default if value is None else value
        values["do_sample"] = bool(values["do_sample"])
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)


# --------------------------------------------------------------------------------------------------------------------
# The window policy
# --------------------------------------------------------------------------------------------------------------------


def context_length(config: Any) -> int:
    """Longest prompt + reply a model takes: `seq_length`, or `max_position_embeddings` when dynamic NTK stretches the
    rotary positions past it (the released 7B/14B/72B chat configs)."""
    if getattr(config, "use_dynamic_ntk", False):
        return max(config.seq_length, getattr(config, "max_position_embeddings", 0) or 0)
    return config.seq_length


def history_window(max_window_size: int | None, context: int, max_new_tokens: int) -> int:
    """How many prompt tokens the system turn and the kept history may fill (`make_context`'s `max_window_size`).

    The checkpoint's `max_window_size` (6144 when unset), but never so much that the reply would not fit: room is kept
    for `max_new_tokens`, at most half the context, so a long conversation drops its oldest turns instead of leaving
    the reply no room. The released chat() trimmed to `max_window_size` alone: with the August 2023 Qwen-7B-Chat
    (window 6144, 6144 positions, 512 new tokens) the window here is 5632, so that prompt and reply fit together.
    """
    window = max_window_size or DEFAULT_MAX_WINDOW_SIZE
    return max(1, min(window, context - min(max_new_tokens, context // 2)))


def prompt_within_window(
    build: Callable[[int], tuple[str, list[int]]], max_window_size: int | None, context: int, max_new_tokens: int
) -> tuple[str, list[int]]:
    """`build(window)` (a prompt whose history is trimmed to `window`, as `make_context` trims it) with the window of
    `history_window`, narrowed further when the new question's own turn would still leave the reply less room than
    that policy promises: the window counts the system turn and history, the question comes on top."""
    window = history_window(max_window_size, context, max_new_tokens)
    limit = context - min(max_new_tokens, context // 2)
    text, ids = build(window)
    while len(ids) > limit:  # rare: a long question; each pass narrows the window
        overflow = len(ids) - limit
        if overflow >= window:  # the question alone is too long: no trimming of the history makes room
            break
        window -= overflow
        text, ids = build(window)
    return text, ids


class ContextFullError(ValueError):
    """A prompt that leaves no room in the model's context for a single reply token."""

    def __init__(self, prompt_tokens: int, context: int) -> None:
        super().__init__(f"The prompt has {prompt_tokens} tokens and this model's context holds {context}: no room is "
                         "left for a reply. Shorten the question or the conversation.")
        self.prompt_tokens, self.context = prompt_tokens, context


def wanted_new_tokens(max_new_tokens: int | None, generation_config: Any) -> int:
    """How many tokens a reply asks for: `max_new_tokens`, else the generation config's, else 512."""
    return max_new_tokens or getattr(generation_config, "max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS


def reply_budget(wanted: int, prompt_tokens: int, context: int) -> int:
    """The tokens a reply may take: `wanted`, cut to what the context has left after the prompt (0 when nothing)."""
    return max(0, min(wanted, context - prompt_tokens))


def chat_stop_token_ids(tokenizer: Any) -> frozenset[int]:
    """The ids that end a ChatML reply (`reply_end_ids`), as the set a request's stop ids are."""
    return frozenset(reply_end_ids("chatml", tokenizer))


# --------------------------------------------------------------------------------------------------------------------
# The turn
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTurn:
    """The prompt of one chat turn, how its reply is decoded and what ends it."""

    prompt_text: str
    prompt_ids: list[int]
    max_new_tokens: int  # `reply_budget` of what was asked (`wanted_new_tokens`); 0 when the context has no room
    stop_token_ids: tuple[int, ...]  # the single tokens that end a reply (`reply_end_ids`)
    stop_words_ids: tuple[tuple[int, ...], ...]  # the released stop sequences, for `StopWordsLogitsProcessor`
    stop_strings: tuple[str, ...]  # the caller's, then `Observation:` for a turn with tools
    uses_tools: bool
    context: int  # the model's context the turn was fitted to
    generation_config: Any = field(repr=False)  # the checkpoint's sampling defaults

    def sampling_params(self, **overrides: Any) -> SamplingParams:
        """The reply's `SamplingParams`: the generation config's settings, with every override that is not None on
        top (temperature, top_p, seed, ...), this turn's budget and stops. Raises ContextFullError when the prompt
        left no room, SamplingParamError for a value out of bounds."""
        if self.max_new_tokens < 1:
            raise ContextFullError(len(self.prompt_ids), self.context)
        return SamplingParams.from_generation_config(
            self.generation_config, **overrides, max_new_tokens=self.max_new_tokens,
            stop_token_ids=frozenset(self.stop_token_ids), stop_strings=self.stop_strings,
        )

    def reply_parser(self) -> ReActStreamParser | None:
        """A fresh parser of one reply's ReAct text when the turn offers tools (one per reply), else None."""
        return ReActStreamParser() if self.uses_tools else None


def _turn(
    tokenizer: Any,
    build: Callable[[int], tuple[str, list[int]]],
    chat_format: str,
    generation_config: Any,
    context: int,
    max_new_tokens: int | None,
    max_window_size: int | None,
    stop_strings: Sequence[str],
    uses_tools: bool,
) -> ChatTurn:
    wanted = wanted_new_tokens(max_new_tokens, generation_config)
    window = max_window_size or getattr(generation_config, "max_window_size", None)
    text, ids = prompt_within_window(build, window, context, wanted)
    return ChatTurn(
        prompt_text=text,
        prompt_ids=ids,
        max_new_tokens=reply_budget(wanted, len(ids), context),
        stop_token_ids=tuple(reply_end_ids(chat_format, tokenizer)),
        stop_words_ids=tuple(tuple(words) for words in get_stop_words_ids(chat_format, tokenizer)),
        stop_strings=tuple(stop_strings),
        uses_tools=uses_tools,
        context=context,
        generation_config=generation_config,
    )


def chat_turn(
    tokenizer: Any,
    query: str,
    history: HistoryType | None,
    system: str,
    generation_config: Any,
    context: int,
    max_new_tokens: int | None = None,
    max_window_size: int | None = None,
    stop_strings: Sequence[str] = (),
) -> ChatTurn:
    """The turn that answers `query` after `history` (the released `chat()`'s arguments), in the generation config's
    `chat_format` (ChatML, or the bare query for "raw").

    `generation_config` is any object with the fields of `generation_config.json` (missing ones take their defaults);
    `context` is what the model holds (`context_length(model.config)`). `max_new_tokens` and `max_window_size`
    override the config's, as `chat(..., max_window_size=)` did; `stop_strings` end the reply too.
    """
    chat_format = getattr(generation_config, "chat_format", None) or "chatml"

    def build(window: int) -> tuple[str, list[int]]:
        return make_context(tokenizer, query, history=history, system=system, max_window_size=window,
                            chat_format=chat_format)

    return _turn(tokenizer, build, chat_format, generation_config, context, max_new_tokens, max_window_size,
                 stop_strings, uses_tools=False)


def messages_turn(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    functions: Sequence[Mapping[str, Any]] | None,
    generation_config: Any,
    context: int,
    max_new_tokens: int | None = None,
    max_window_size: int | None = None,
    stop_strings: Sequence[str] = (),
) -> ChatTurn:
    """The turn that answers OpenAI-style `messages` in ChatML, with `functions` (as `react.normalize_tools` gives
    them) written as the ReAct transcript; a conversation ending in a tool result continues the assistant's turn.

    Raises ValueError (naming the message) for a conversation that cannot be written as a prompt.
    """
    def build(window: int) -> tuple[str, list[int]]:
        return chat_prompt(tokenizer, list(messages), list(functions) if functions else None, window)

    # Always ChatML (as the OpenAI-style server always prompted), so its reply ends as a ChatML turn does.
    return _turn(tokenizer, build, "chatml", generation_config, context, max_new_tokens, max_window_size,
                 tuple(stop_strings) + tuple(stop_words(functions)), uses_tools=bool(functions))


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "GREEDY_BELOW_TEMPERATURE",
    "PRESENCE_FREQUENCY_RANGE",
    "REPETITION_PENALTY_RANGE",
    "SEED_RANGE",
    "ChatTurn",
    "ContextFullError",
    "SamplingParamError",
    "SamplingParams",
    "chat_stop_token_ids",
    "chat_turn",
    "context_length",
    "history_window",
    "messages_turn",
    "prompt_within_window",
    "reply_budget",
    "wanted_new_tokens",
]
