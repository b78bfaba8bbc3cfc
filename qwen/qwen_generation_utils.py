"""Prompt building (ChatML and raw), reply decoding and stop words: the one place where Qwen prompts are made.

`make_context` reproduces the released chat prompts token for token (see tests/fixtures/tokenizer_facts.json): each
role name, newline and content is encoded separately, so a content that starts or ends with whitespace tokenizes as
it did for the released model, and content is always encoded as plain text, so a user who types `<|im_end|>` cannot
end a turn. `chatml_ids_for_messages` is the same builder for OpenAI-style message lists; the tokenizer's
`apply_chat_template` and the server use it.

Every public name of the released module keeps its parameters and results (`make_context`, `decode_tokens`,
`get_stop_words_ids`, `StopWordsLogitsProcessor`, the batch helpers `pad_batch`, `get_ltor_masks_and_position_ids`,
`get_batch`, and `top_k_logits`, `switch`), so code written for the released Qwen checkpoints runs unchanged.

Also copied into checkpoint folders for `trust_remote_code=True`: imports only pip packages.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any, Literal, TypedDict

import torch
from transformers.generation.logits_process import LogitsProcessor

HistoryType = list[tuple[str, str]]
TokensType = list[int]
BatchTokensType = list[list[int]]
Role = Literal["system", "user", "assistant"]

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_MAX_WINDOW_SIZE = 6144
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # what the released chat() sends


class Message(TypedDict):
    role: Role
    content: str


class UnknownChatFormatError(ValueError, NotImplementedError):
    """A chat_format other than "chatml" and "raw" (a NotImplementedError too: what the released module raised)."""


def _check_chat_format(chat_format: str) -> None:
    if chat_format not in ("chatml", "raw"):
        raise UnknownChatFormatError(f"Unknown chat_format {chat_format!r}: expected 'chatml' or 'raw'.")


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
    _check_chat_format(chat_format)
    if chat_format == "raw":
        return query, tokenizer.encode(query)
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
    """The released stop sequences: `<|im_end|>` and `<|im_start|>` for ChatML; "Human:" and `<|endoftext|>` for raw.

    `chat()` hands them to `StopWordsLogitsProcessor`. Each is a list of ids, and raw's "Human:" is two tokens, so
    code that needs single stop ids (an engine's stop tokens, a converted checkpoint's eos list) uses `reply_end_ids`.
    """
    _check_chat_format(chat_format)
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    return [tokenizer.encode("Human:"), [tokenizer.eod_id]]


def reply_end_ids(chat_format: str, tokenizer: Any) -> list[int]:
    """The single tokens that end a reply: `<|im_end|>`, `<|im_start|>` and `<|endoftext|>` for ChatML (a chat model
    may close a turn with any of them), `<|endoftext|>` for raw."""
    _check_chat_format(chat_format)
    if chat_format == "chatml":
        return [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]
    return [tokenizer.eod_id]


def _token_list(tokens: torch.Tensor | Sequence[int]) -> list[int]:
    return tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)


def _finish_reply(text: str, end_reason: str, stop_words: Sequence[str], verbose: bool,
                  return_end_reason: bool) -> str | tuple[str, str]:
    if verbose:
        print(f"\nGenerated text: {text!r}\nEnd reason: {end_reason}")
    for stop_word in stop_words:
        text = text.replace(stop_word, "").strip()
    text = text.strip()
    if verbose:
        print(f"Reply: {text!r}")
    return (text, end_reason) if return_end_reason else text


def _decode_chatml(
    tokens: torch.Tensor | Sequence[int],
    *,
    stop_words: Sequence[str],
    eod_token_ids: Sequence[int],
    tokenizer: Any,
    raw_text_len: int | None,
    context_length: int,
    verbose: bool = False,
    return_end_reason: bool = False,
    errors: str = "replace",
) -> str | tuple[str, str]:
    """The reply in `tokens` (prompt, then generated ids): the generated ids before the first of `eod_token_ids`.

    With `raw_text_len`, the reply is the decoded text of everything up to that token, less its first `raw_text_len`
    characters (the prompt text, as the released callers pass it); without it, the generated ids decoded alone. The end
    reason is "Gen '<|im_end|>'" (the token that ended the reply) or, when none did, "Gen length N" with N the length
    of `tokens`. Every generated token is kept when none ends the reply (the released function dropped the last one).
    """
    tokens = _token_list(tokens)
    enders = set(eod_token_ids)
    end = next((index for index in range(context_length, len(tokens)) if tokens[index] in enders), len(tokens))
    if raw_text_len is None:
        text = tokenizer.decode(tokens[context_length:end], errors=errors)
    else:
        text = tokenizer.decode(tokens[:end], errors=errors)[raw_text_len:]
    end_reason = f"Gen {tokenizer.decode([tokens[end]])!r}" if end < len(tokens) else f"Gen length {len(tokens)}"
    return _finish_reply(text, end_reason, stop_words, verbose, return_end_reason)


def _decode_default(
    tokens: torch.Tensor | Sequence[int],
    *,
    stop_words: Sequence[str],
    eod_words: Sequence[str],
    tokenizer: Any,
    raw_text_len: int,
    verbose: bool = False,
    return_end_reason: bool = False,
    errors: str = "replace",
) -> str | tuple[str, str]:
    """The reply as text: `tokens` decoded, less the first `raw_text_len` characters, cut at the first of
    `eod_words` (the end reason then names it, else "Gen length N"), then `stop_words` removed. (The released function
    removed the stop words first; as it passed <|endoftext|> as both, it never cut there and kept the text after.)"""
    tokens = _token_list(tokens)
    text = tokenizer.decode(tokens, errors=errors)[raw_text_len:]
    end_reason = f"Gen length {len(tokens)}"
    found = [(text.index(word), word) for word in eod_words if word in text]
    if found:
        position, word = min(found)
        text, end_reason = text[:position], f"Gen {word!r}"
    return _finish_reply(text, end_reason, stop_words, verbose, return_end_reason)


def decode_tokens(
    tokens: torch.Tensor | Sequence[int],
    tokenizer: Any,
    raw_text_len: int | None = None,
    context_length: int | None = None,
    chat_format: str = "chatml",
    verbose: bool = False,
    return_end_reason: bool = False,
    errors: str = "replace",
    *,
    stop_words: Sequence[str] = (),
) -> str | tuple[str, str]:
    """The reply in `tokens` (the prompt's `context_length` ids, then generated ids), stripped.

    The reply ends before the first token of `reply_end_ids(chat_format)`. The released callers pass
    `raw_text_len=len(prompt_text)` too; see `_decode_chatml` for what it changes. With `return_end_reason`, returns
    (reply, end reason) with the released end reasons: "Gen '<|im_end|>'", "Gen '<|endoftext|>'", ... or
    "Gen length N". `verbose` prints the generated text, the end reason and the reply. Each of `stop_words` (text) is
    removed from the reply.
    """
    if context_length is None:
        raise TypeError("decode_tokens() needs context_length: how many ids at the start of `tokens` are the prompt.")
    return _decode_chatml(
        tokens, stop_words=stop_words, eod_token_ids=reply_end_ids(chat_format, tokenizer), tokenizer=tokenizer,
        raw_text_len=raw_text_len, context_length=context_length, verbose=verbose,
        return_end_reason=return_end_reason, errors=errors,
    )


class StopWordsLogitsProcessor(LogitsProcessor):
    """Force `eos_token_id` right after a sequence ends with one of `stop_words_ids`, as the released model does.

    `stop_words_ids` must be a non-empty list of non-empty lists of token ids (a ValueError otherwise, as released);
    a stop sequence that is `[eos_token_id]` alone is dropped: generation already ends there.
    """

    def __init__(self, stop_words_ids: Sequence[Sequence[int]], eos_token_id: int) -> None:
        if isinstance(stop_words_ids, (str, bytes)) or not isinstance(stop_words_ids, Sequence) or not stop_words_ids:
            raise ValueError(f"`stop_words_ids` must be a non-empty list of token-id lists, got {stop_words_ids!r}.")
        for words in stop_words_ids:
            if (isinstance(words, (str, bytes)) or not isinstance(words, Sequence) or not words
                    or any(isinstance(token, bool) or not isinstance(token, Integral) or token < 0 for token in words)):
                raise ValueError(f"Each entry of `stop_words_ids` must be a non-empty list of token ids (integers "
                                 f"from 0), got {words!r} in {stop_words_ids!r}.")
        self.eos_token_id = int(eos_token_id)
        self.stop_words_ids = [[int(token) for token in words] for words in stop_words_ids
                               if list(words) != [self.eos_token_id]]
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


def pad_batch(batch: BatchTokensType, pad_id: int, seq_length: int) -> BatchTokensType:
    """Right-pad each token list of `batch` with `pad_id` to `seq_length`, in place, and return `batch`; longer lists
    are left as they are."""
    for tokens in batch:
        tokens.extend([pad_id] * (seq_length - len(tokens)))
    return batch


def get_ltor_masks_and_position_ids(
    data: torch.Tensor,
    eod_token: int,
    reset_position_ids: bool,
    reset_attention_mask: bool,
    eod_mask_loss: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-to-right (causal) masks and positions for a [batch, seq] batch of token ids, as Megatron packs documents.

    Returns (attention_mask, loss_mask, position_ids):
    - attention_mask, bool, True where a query may NOT look: [1, 1, seq, seq] causal, or with `reset_attention_mask`
      [batch, 1, seq, seq], where a token also cannot see anything up to and including an earlier `eod_token`;
    - loss_mask, float [batch, seq]: 1, and 0 on `eod_token` positions when `eod_mask_loss`;
    - position_ids [batch, seq]: 0, 1, 2, ..., restarting at 0 after each `eod_token` when `reset_position_ids`.
    """
    batch_size, seq_length = data.shape
    positions = torch.arange(seq_length, device=data.device)
    is_eod = data == eod_token
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool, device=data.device).tril()
    if reset_attention_mask:
        # A token's document is the number of <|endoftext|> before it; a query sees keys of its own document only.
        document = torch.cumsum(is_eod, dim=1) - is_eod.long()
        attention_mask = ~(causal & (document[:, :, None] == document[:, None, :]))[:, None]
    else:
        attention_mask = ~causal[None, None]
    loss_mask = torch.ones(data.shape, dtype=torch.float, device=data.device)
    if eod_mask_loss:
        loss_mask[is_eod] = 0.0
    if reset_position_ids:
        # A document starts one past the latest <|endoftext|> strictly before the token (0 if none).
        starts_from = torch.cummax(torch.where(is_eod, positions + 1, 0), dim=1).values
        document_start = torch.cat([torch.zeros_like(starts_from[:, :1]), starts_from[:, :-1]], dim=1)
        position_ids = positions - document_start
    else:
        position_ids = positions.unsqueeze(0).expand(batch_size, seq_length)
    return attention_mask, loss_mask, position_ids


def get_batch(context_tokens: torch.Tensor, eod_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, causal attention_mask, position_ids) for a [batch, seq] prompt, nothing reset at `eod_id`."""
    tokens = context_tokens.contiguous()
    attention_mask, _, position_ids = get_ltor_masks_and_position_ids(
        tokens, eod_id, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False
    )
    return tokens, attention_mask, position_ids


def top_k_logits(
    logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0, filter_value: float = -float("Inf")
) -> torch.Tensor:
    """Set to `filter_value`, in place, the logits outside the `top_k` largest (when top_k > 0), then those outside the
    smallest set of most likely tokens whose probability exceeds `top_p` (when top_p > 0); returns `logits`."""
    if top_k > 0:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth_largest, filter_value)
    if top_p > 0.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # A token goes once the tokens more likely than it already hold more than top_p; the most likely always stays.
        drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
        drop_sorted[..., 1:] = cumulative[..., :-1] > top_p
        logits.masked_fill_(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), filter_value)
    return logits


def switch(val1: torch.Tensor, val2: torch.Tensor, boolean: torch.Tensor) -> torch.Tensor:
    """`val2` where `boolean` is 1, `val1` where it is 0 (weighted in between), in `val1`'s dtype."""
    weight = boolean.type_as(val1)
    return (1 - weight) * val1 + weight * val2


__all__ = [
    "BatchTokensType",
    "HistoryType",
    "Message",
    "Role",
    "StopWordsLogitsProcessor",
    "TokensType",
    "UnknownChatFormatError",
    "chatml_ids_for_messages",
    "decode_tokens",
    "get_batch",
    "get_ltor_masks_and_position_ids",
    "get_stop_words_ids",
    "make_context",
    "pad_batch",
    "reply_end_ids",
    "switch",
    "top_k_logits",
]
