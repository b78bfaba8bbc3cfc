"""Prompt building (ChatML and raw), reply decoding and stop words: the one place where Qwen prompts are made.

`make_context` reproduces the released chat prompts token for token (see tests/fixtures/tokenizer_facts.json): each
role name, newline and content is encoded separately, so a content that starts or ends with whitespace tokenizes as
it did for the released model, and content is always encoded as plain text, so a user who types `<|im_end|>` cannot
end a turn. `chatml_ids_for_messages` is the same builder for OpenAI-style message lists; the tokenizer's
`apply_chat_template` and the server use it.

Also copied into checkpoint folders for `trust_remote_code=True`: imports only pip packages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, TypedDict

import torch
from transformers.generation.logits_process import LogitsProcessor

HistoryType = list[tuple[str, str]]
Role = Literal["system", "user", "assistant"]

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_MAX_WINDOW_SIZE = 6144
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # what the released chat() sends


class Message(TypedDict):
    role: Role
    content: str


def _encode_text(tokenizer: Any, text: str) -> list[int]:
    """Content as plain text: special-token strings inside it stay text."""
    return tokenizer.encode(text, allowed_special=set(), disallowed_special=())


def _turn(tokenizer: Any, role: str, content: str) -> tuple[str, list[int]]:
    """`<|im_start|>role\\ncontent<|im_end|>` as text and as ids, encoded piece by piece like the released model."""
    ids = (
        [tokenizer.im_start_id]
        + _encode_text(tokenizer, role)
        + _encode_text(tokenizer, "\n")
        + _encode_text(tokenizer, content)
        + [tokenizer.im_end_id]
    )
    return f"{IM_START}{role}\n{content}{IM_END}", ids


def make_context(
    tokenizer: Any,
    query: str,
    history: HistoryType | None = None,
    system: str = "",
    max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
    chat_format: str = "chatml",
) -> tuple[str, list[int]]:
    """The prompt for `query` after `history`, as (text, ids).

    ChatML keeps the system turn and as many of the most recent (query, response) pairs as fit, with the system turn,
    in fewer than `max_window_size` tokens; the new query is always kept. "raw" is the query alone (base models).
    """
    if chat_format == "raw":
        return query, tokenizer.encode(query)
    if chat_format != "chatml":
        raise ValueError(f"Unknown chat_format {chat_format!r}: expected 'chatml' or 'raw'.")
    newline = _encode_text(tokenizer, "\n")
    system_text, system_ids = _turn(tokenizer, "system", system)
    kept_text, kept_ids = "", []
    for turn_query, turn_response in reversed(history or []):
        query_text, query_ids = _turn(tokenizer, "user", turn_query)
        response_text, response_ids = _turn(tokenizer, "assistant", turn_response)
        pair_ids = newline + query_ids + newline + response_ids
        if len(system_ids) + len(pair_ids) + len(kept_ids) >= max_window_size:
            break
        kept_ids = pair_ids + kept_ids
        kept_text = f"\n{query_text}\n{response_text}" + kept_text
    query_text, query_ids = _turn(tokenizer, "user", query)
    assistant_start = [tokenizer.im_start_id] + _encode_text(tokenizer, "assistant") + newline
    ids = system_ids + kept_ids + newline + query_ids + newline + assistant_start
    text = f"{system_text}{kept_text}\n{query_text}\n{IM_START}assistant\n"
    return text, ids


def chatml_ids_for_messages(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = True,
    default_system: str | None = DEFAULT_SYSTEM_PROMPT,
) -> tuple[str, list[int]]:
    """ChatML text and ids for OpenAI-style messages, identical to `make_context` for the same conversation.

    Turns are joined by a newline; a conversation without a system message gets `default_system` first (as `chat()`
    does), unless it is None.
    """
    turns: list[tuple[str, list[int]]] = []
    if default_system is not None and (not messages or messages[0].get("role") != "system"):
        turns.append(_turn(tokenizer, "system", default_system))
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"Unsupported role {role!r}: ChatML turns are system, user or assistant.")
        if not isinstance(content, str):
            raise TypeError(f"Message content must be a string, got {type(content).__name__}.")
        turns.append(_turn(tokenizer, role, content))
    newline = _encode_text(tokenizer, "\n")
    text, ids = "", []
    for index, (turn_text, turn_ids) in enumerate(turns):
        if index:
            text, ids = text + "\n", ids + newline
        text, ids = text + turn_text, ids + turn_ids
    if add_generation_prompt:
        if turns:
            text, ids = text + "\n", ids + newline
        text += f"{IM_START}assistant\n"
        ids += [tokenizer.im_start_id] + _encode_text(tokenizer, "assistant") + newline
    return text, ids


def get_stop_words_ids(chat_format: str, tokenizer: Any) -> list[list[int]]:
    """Token sequences that end a reply: `<|im_end|>` / `<|im_start|>` for ChatML, `<|endoftext|>` for raw."""
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    if chat_format == "raw":
        return [[tokenizer.eod_id]]
    raise ValueError(f"Unknown chat_format {chat_format!r}: expected 'chatml' or 'raw'.")


def decode_tokens(
    tokens: torch.Tensor | Sequence[int],
    tokenizer: Any,
    context_length: int,
    chat_format: str = "chatml",
    stop_words: Sequence[str] = (),
    errors: str = "replace",
) -> str:
    """The reply in `tokens` (prompt + generated ids): generated text up to the first end-of-turn token, stripped."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    generated = list(tokens[context_length:])
    if chat_format == "chatml":
        enders = {tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.eod_id}
    elif chat_format == "raw":
        enders = {tokenizer.eod_id}
    else:
        raise ValueError(f"Unknown chat_format {chat_format!r}: expected 'chatml' or 'raw'.")
    for index, token in enumerate(generated):
        if token in enders:
            generated = generated[:index]
            break
    text = tokenizer.decode(generated, errors=errors)
    for stop_word in stop_words:
        text = text.replace(stop_word, "").strip()
    return text.strip()


class StopWordsLogitsProcessor(LogitsProcessor):
    """Force `eos_token_id` right after a sequence ends with one of `stop_words_ids`, as the released model does."""

    def __init__(self, stop_words_ids: Sequence[Sequence[int]], eos_token_id: int) -> None:
        self.stop_words_ids = [list(words) for words in stop_words_ids if len(words) > 0]
        self.eos_token_id = int(eos_token_id)
        self._patterns: dict[tuple[torch.device, int], torch.Tensor] = {}

    def _pattern(self, words: list[int], device: torch.device) -> torch.Tensor:
        key = (device, id(words))
        if key not in self._patterns:
            self._patterns[key] = torch.tensor(words, device=device)
        return self._patterns[key]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ended = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for words in self.stop_words_ids:
            if input_ids.shape[1] >= len(words):
                ended |= (input_ids[:, -len(words) :] == self._pattern(words, input_ids.device)).all(dim=-1)
        if bool(ended.any()):
            scores = scores.clone()
            scores[ended, self.eos_token_id] = float(2**15)
        return scores


__all__ = [
    "HistoryType",
    "Message",
    "Role",
    "StopWordsLogitsProcessor",
    "chatml_ids_for_messages",
    "decode_tokens",
    "get_stop_words_ids",
    "make_context",
]
