"""Tokenizer of the Qwen (v1) models: byte-level BPE run by tiktoken over the released `qwen.tiktoken` vocabulary.

This file must keep working when copied into a checkpoint folder (with its sibling `qwen_generation_utils.py`, which
builds chat prompts) and loaded with `AutoTokenizer.from_pretrained(folder, trust_remote_code=True)`, so besides
that sibling it imports only the standard library, `tiktoken` and `transformers`.

Behaviour follows the released Qwen tokenizer: text is NFC-normalized, special-token strings in text become
special tokens unless told otherwise (`allowed_special="all"`), `tokenize()` returns `bytes` for BPE tokens and `str`
for special tokens, and decoding returns exactly what tiktoken decodes.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import inspect
import json
import logging
import os
import unicodedata
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Literal

import tiktoken
from transformers import AddedToken, BatchEncoding, PreTrainedTokenizer
from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

# A sibling module: the two files travel together when copied into a checkpoint folder as remote code.
from .qwen_generation_utils import chatml_ids_for_messages

logger = logging.getLogger(__name__)

VOCAB_FILE_NAME = "qwen.tiktoken"
QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
# The released file: 151,643 `base64(token_bytes) rank` lines, ranks 0 to 151642 in order, 2,561,218 bytes. A file
# that extends the vocabulary (the released tokenizer's save_pretrained wrote its extra tokens into qwen.tiktoken)
# starts with exactly these bytes.
RELEASED_VOCAB_SIZE = 151643
RELEASED_VOCAB_BYTES = 2561218

# The pre-tokenization regex of the released tokenizer, unchanged.
PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRA_SPECIAL_TOKENS = tuple(f"<|extra_{i}|>" for i in range(205))
SPECIAL_TOKENS = (ENDOFTEXT, IMSTART, IMEND) + EXTRA_SPECIAL_TOKENS
# The special tokens take ids 151643 to 151850 in the order above, whatever the vocabulary file holds (the released
# tokenizer fixed them so, for vocabularies extended beyond the released file); added tokens start at 151851.
SPECIAL_START_ID = RELEASED_VOCAB_SIZE

FETCH_HINT = (
    "Fetch the released file once with `python -m qwen.vocab fetch` (from the qwen package) or copy qwen.tiktoken "
    "from a released Qwen checkpoint folder."
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# ChatML exactly as `chat()` lays it out: turns joined by one newline, and the default system prompt of `chat()` when
# the conversation has none. Written with explicit '\\n' strings so Jinja's whitespace handling cannot change it.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' -}}"
    "{%- if not loop.last -%}{{- '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\n<|im_start|>assistant\\n' -}}{%- endif -%}"
)
_CHATML_ROLES = ("system", "user", "assistant")
_ENCODE_OPTION_NAMES = {"allowed_special", "disallowed_special", "split_special_tokens"}


def accepts_keyword(function: Callable[..., Any], name: str) -> bool:
    """Whether `function` declares a parameter `name` (one it would only swallow through **kwargs does not count)."""
    return name in inspect.signature(function).parameters


# transformers' apply_chat_template learned `sanitize_control_tokens` after 5.17; there an unknown keyword goes on to
# the template as a variable, and control-token strings in messages are encoded as control tokens.
TRANSFORMERS_SANITIZES_CONTROL_TOKENS = accepts_keyword(PreTrainedTokenizer.apply_chat_template,
                                                        "sanitize_control_tokens")


@functools.cache
def _warn_unsanitized_chat_template() -> None:
    logger.warning(
        "This transformers release cannot keep control-token strings typed into messages as text outside the default "
        "ChatML template (they become control tokens): upgrade transformers, or leave chat_template unset."
    )

AllowedSpecial = Literal["all"] | Collection[str]
DisallowedSpecial = Literal["all"] | Collection[str]


def _read_tiktoken_file(path: str | os.PathLike, missing_hint: str = FETCH_HINT) -> dict[bytes, int]:
    """Parse a `base64(token_bytes) rank` file.

    A file named `qwen.tiktoken` must hold the released vocabulary: either the released file itself or, as the
    released tokenizer's `save_pretrained` wrote it after an `extra_vocab_file` was loaded, the released entries
    followed by added ones (logged as a warning). A file that changes a released entry is refused. Files of other
    names are custom or extra vocabularies the user chose on purpose and are not compared with the released one.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"The vocabulary file {path} does not exist. {missing_hint}".rstrip()) from None
    if os.path.basename(path) != VOCAB_FILE_NAME:
        return _parse_tiktoken(path, data)

    # Cheap and exact for the released file and for extensions written after it: compare the leading bytes.
    released_bytes = (
        len(data) >= RELEASED_VOCAB_BYTES
        and hashlib.sha256(memoryview(data)[:RELEASED_VOCAB_BYTES]).hexdigest() == QWEN_TIKTOKEN_SHA256
    )
    not_released = f"{path} is damaged or is not the released Qwen vocabulary"
    try:
        ranks = _parse_tiktoken(path, data)
    except _MalformedEntry as error:
        where = f"line {error.line_number}: {error.reason}"
        if released_bytes:  # the released entries are intact: the bad line is one of the tokens added after them
            raise ValueError(f"{not_released} ({where}); its first {RELEASED_VOCAB_SIZE} lines are the released "
                             "ones, so correct or remove that added line.") from None
        raise ValueError(f"{not_released} ({where}). Delete it and get it again. {FETCH_HINT}") from None
    added = {token: rank for token, rank in ranks.items() if rank >= RELEASED_VOCAB_SIZE}
    intact = len(ranks) - len(added) == RELEASED_VOCAB_SIZE and (
        released_bytes
        # The same entries written another way (order, line ends): compare them in the released file's layout.
        or hashlib.sha256(serialize_ranks({t: r for t, r in ranks.items() if r < RELEASED_VOCAB_SIZE})).hexdigest()
        == QWEN_TIKTOKEN_SHA256
    )
    if not intact:
        raise ValueError(
            f"{not_released}: its entries for ids 0 to {RELEASED_VOCAB_SIZE - 1} are not the released ones. Delete it "
            f"and get it again. {FETCH_HINT}"
        )
    if added:
        logger.warning(
            "%s extends the released Qwen vocabulary with %d tokens (ids %d to %d); the model needs trained embedding "
            "rows for them.", path, len(added), min(added.values()), max(added.values()),
        )
    return ranks


def serialize_ranks(ranks: Mapping[bytes, int]) -> bytes:
    """The contents of a `.tiktoken` file for `ranks`: `base64(token_bytes) rank` lines in rank order."""
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    return b"".join(base64.b64encode(token) + b" " + str(rank).encode("ascii") + b"\n" for token, rank in by_rank)


def _parse_tiktoken(path: str, data: bytes) -> dict[bytes, int]:
    try:
        # Fast path for well-formed files; anything odd is re-read below to report the exact line.
        lines = [line for line in data.splitlines() if line]
        ranks = {binascii.a2b_base64(token, strict_mode=True): int(rank) for token, rank in map(bytes.split, lines)}
        if len(ranks) == len(lines) == len(set(ranks.values())) and min(ranks.values(), default=0) >= 0:
            return ranks
    except (ValueError, TypeError):  # binascii.Error is a ValueError
        pass
    return _parse_tiktoken_lines(path, data)


class _MalformedEntry(ValueError):
    def __init__(self, path: str, line_number: int, line: bytes, reason: str) -> None:
        self.line_number, self.reason = line_number, f"{reason} in {line[:80]!r}"
        super().__init__(
            f"{path}, line {line_number}: malformed vocabulary entry {line[:80]!r} ({reason}); each line must be "
            "`base64(token_bytes) rank`."
        )


def _parse_tiktoken_lines(path: str, data: bytes) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    owners: dict[int, bytes] = {}
    for line_number, line in enumerate(data.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 2:
                raise ValueError(f"expected 2 fields, found {len(fields)}")
            token = base64.b64decode(fields[0], validate=True)
            rank = int(fields[1])
            if rank < 0:
                raise ValueError("the rank is negative")
            if token in ranks:
                raise ValueError(f"the token {token!r} already appeared with rank {ranks[token]}")
            if rank in owners:
                # tiktoken would abort with a Rust panic, which no `except Exception` catches.
                raise ValueError(f"the rank {rank} already belongs to the token {owners[rank]!r}")
        except ValueError as error:
            raise _MalformedEntry(path, line_number, line, str(error)) from None
        ranks[token] = rank
        owners[rank] = token
    return ranks


class QWenTokenizer(PreTrainedTokenizer):
    """Qwen (v1) tokenizer backed by tiktoken.

    Args:
        vocab_file: the released `qwen.tiktoken`, or one that extends it (the released entries, then added tokens).
        errors: how undecodable UTF-8 is handled when decoding (`"replace"`, `"ignore"`, `"strict"`).
        extra_vocab_file: optional second file in the same format, as written by `examples/add_merges.py`; each entry
            keeps the id it has there and is added unless its token or its id is already taken (special tokens
            included). `save_pretrained` writes the added tokens into the saved `qwen.tiktoken`.
        **kwargs: passed to `transformers.PreTrainedTokenizer` (`pad_token`, `padding_side`, `model_max_length`, ...).
            `pad_token` defaults to `<|endoftext|>`, since the released configs define none.
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE_NAME}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike | None,
        errors: str = "replace",
        extra_vocab_file: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        if vocab_file is None:
            where = kwargs.get("name_or_path") or "the given location"
            raise FileNotFoundError(f"No {VOCAB_FILE_NAME} was found in {where}. {FETCH_HINT}")

        self.errors = errors
        self.mergeable_ranks = _read_tiktoken_file(vocab_file)
        self.special_tokens = {token: index for index, token in enumerate(SPECIAL_TOKENS, start=SPECIAL_START_ID)}
        special_names = {index: token for token, index in self.special_tokens.items()}
        for token, rank in self.mergeable_ranks.items():
            if rank in special_names:  # tiktoken would accept it and then decode that id as the wrong thing
                raise ValueError(
                    f"{vocab_file}: the token {token!r} has id {rank}, which is the id of the special token "
                    f"{special_names[rank]}; added tokens take ids from {SPECIAL_START_ID + len(SPECIAL_TOKENS)} up."
                )

        # Tokens beyond the released vocabulary, from the vocabulary file itself or from the extra file.
        self._extra_ranks = {token: rank for token, rank in self.mergeable_ranks.items() if rank >= SPECIAL_START_ID}
        if extra_vocab_file is not None:
            self._extra_ranks.update(
                self._merge_extra_vocab(self._resolve_extra_vocab_file(extra_vocab_file, vocab_file))
            )

        self.tokenizer = tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )
        # id -> token (bytes, or str for the special tokens), public under the released tokenizer's name.
        self.decoder: dict[int, bytes | str] = {rank: token for token, rank in self.mergeable_ranks.items()}
        self.decoder.update({index: token for token, index in self.special_tokens.items()})
        self._extra_ids = frozenset(self._extra_ranks.values())

        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IMSTART]
        self.im_end_id = self.special_tokens[IMEND]

        # Registering the special tokens as added tokens lets transformers' generic code see them (get_added_vocab,
        # apply_chat_template(sanitize_control_tokens=True)); encoding never goes through the added-token trie.
        self._check_saved_added_tokens(kwargs.pop("added_tokens_decoder", None) or {})
        self._added_tokens_decoder = {
            index: AddedToken(token, lstrip=False, rstrip=False, normalized=False, special=True)
            for token, index in self.special_tokens.items()
        }

        # The released configs define no pad token; without one `padding=True` fails, so borrow <|endoftext|> as the
        # released training code did. An explicit `pad_token=None` is respected.
        kwargs.setdefault("pad_token", ENDOFTEXT)
        if not kwargs.get("chat_template"):
            kwargs["chat_template"] = CHATML_TEMPLATE
        super().__init__(errors=errors, **kwargs)

        # save_vocabulary writes the extra tokens into qwen.tiktoken, so a saved config must not name the extra file
        # again: the released tokenizer kept the path it was given there, and its saved folders failed to load
        # wherever that path did not resolve.
        self.init_kwargs.pop("extra_vocab_file", None)

    @staticmethod
    def _resolve_extra_vocab_file(extra_vocab_file: str | os.PathLike, vocab_file: str | os.PathLike) -> str:
        extra_vocab_file = os.fspath(extra_vocab_file)
        if not os.path.isabs(extra_vocab_file):
            # A config written by save_pretrained names the file next to qwen.tiktoken.
            sibling = os.path.join(os.path.dirname(os.fspath(vocab_file)), extra_vocab_file)
            if os.path.isfile(sibling):
                return sibling
        return extra_vocab_file

    def _merge_extra_vocab(self, extra_vocab_file: str) -> dict[bytes, int]:
        used_ranks = set(self.mergeable_ranks.values()) | set(self.special_tokens.values())
        accepted: dict[bytes, int] = {}
        for token, rank in _read_tiktoken_file(extra_vocab_file, missing_hint="").items():
            if self.mergeable_ranks.get(token) == rank:
                continue  # already there with this id (the file was loaded before and saved into qwen.tiktoken)
            # Skipped as the released tokenizer did, so its extra files load the same; but said loudly, since ids
            # the user expected to exist are missing and their embeddings would be trained for nothing.
            if token in self.mergeable_ranks:
                logger.warning(
                    "%s: extra token %r is already in the vocabulary (id %d), skipping it", extra_vocab_file, token,
                    self.mergeable_ranks[token],
                )
                continue
            if rank in used_ranks:
                logger.warning(
                    "%s: extra token %r has rank %d, which is already an id, skipping it", extra_vocab_file, token, rank
                )
                continue
            self.mergeable_ranks[token] = rank
            used_ranks.add(rank)
            accepted[token] = rank
        return accepted

    def _check_saved_added_tokens(self, added_tokens_decoder: dict[int, Any]) -> None:
        """A saved config may list added tokens; only the built-in special tokens at their own ids can be honoured."""
        for index, token in added_tokens_decoder.items():
            content = token.get("content") if isinstance(token, dict) else str(token)
            if self.special_tokens.get(content) != int(index):
                raise ValueError(
                    f"The tokenizer config adds the token {content!r} with id {index}, but QWenTokenizer cannot add "
                    "tokens: its vocabulary is fixed by qwen.tiktoken and the model's embeddings. Remove it from "
                    "`added_tokens_decoder` in tokenizer_config.json."
                )

    @classmethod
    def _from_pretrained(cls, resolved_vocab_files, pretrained_model_name_or_path, *args, **kwargs):
        # transformers turns any OSError raised by __init__ into a generic "Unable to load vocabulary" message, which
        # would hide which file is missing and how to get it.
        vocab_file = kwargs.get("vocab_file") or resolved_vocab_files.get("vocab_file")
        if vocab_file is None:
            raise FileNotFoundError(f"No {VOCAB_FILE_NAME} was found in {pretrained_model_name_or_path}. {FETCH_HINT}")
        config_file = resolved_vocab_files.get("tokenizer_config_file")
        if kwargs.get("extra_vocab_file") is not None:
            extra = kwargs["extra_vocab_file"]
            if not os.path.isfile(cls._resolve_extra_vocab_file(extra, vocab_file)):
                raise FileNotFoundError(
                    f"The extra vocabulary file {extra} does not exist (looked for it next to {vocab_file} and from "
                    f"the working directory {os.getcwd()})."
                )
        elif "extra_vocab_file" not in kwargs and config_file is not None:
            with open(config_file, encoding="utf-8") as handle:
                saved_extra = json.load(handle).get("extra_vocab_file")
            # Folders saved by the released tokenizer name the extra file they were built with (a path that only
            # resolved where that run happened) although their qwen.tiktoken already holds its tokens.
            if saved_extra and not os.path.isfile(cls._resolve_extra_vocab_file(saved_extra, vocab_file)):
                logger.warning(
                    "%s names extra_vocab_file %r, which does not exist; using only the tokens of %s (the released "
                    "tokenizer saved the extra tokens there).", config_file, saved_extra, vocab_file,
                )
                kwargs["extra_vocab_file"] = None
        return super()._from_pretrained(resolved_vocab_files, pretrained_model_name_or_path, *args, **kwargs)

    # ----------------------------------------------------------------------------------------------------------------
    # Vocabulary

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_vocab

    def __len__(self) -> int:
        return self.tokenizer.n_vocab

    def _update_total_vocab_size(self) -> None:
        # The base class would count get_vocab() every time tokens are registered; the size is fixed here.
        self.total_vocab_size = self.tokenizer.n_vocab

    @property
    def extra_vocab(self) -> dict[bytes, int]:
        """Token → id of the tokens beyond the released vocabulary: those an extended `qwen.tiktoken` holds and those
        an `extra_vocab_file` added (entries it skipped are not here). Empty for the released vocabulary."""
        return dict(self._extra_ranks)

    def get_vocab(self) -> dict[bytes | str, int]:
        """Token → id, keyed like `tokenize()` output: `bytes` for BPE tokens, `str` for special tokens."""
        vocab: dict[bytes | str, int] = dict(self.mergeable_ranks)
        vocab.update(self.special_tokens)
        return vocab

    def _reject_new_tokens(self, tokens: Iterable[str | AddedToken]) -> None:
        for token in tokens:
            if str(token) not in self.special_tokens:
                raise ValueError(
                    f"Cannot add the token {str(token)!r}: QWenTokenizer's vocabulary is fixed by qwen.tiktoken and "
                    "the model's embeddings. Use one of its reserved special tokens instead (<|extra_0|> ... "
                    "<|extra_204|>)."
                )

    def _add_tokens(self, new_tokens: Iterable[str | AddedToken] | None, special_tokens: bool = False) -> int:
        self._reject_new_tokens(new_tokens or ())
        # Every special token string already has its id, so "adding" one changes nothing.
        return 0

    def add_special_tokens(self, special_tokens_dict: dict[str, Any], replace_extra_special_tokens: bool = True) -> int:
        # The base class assigns pad_token & co. before adding the tokens; checking first keeps a refused call from
        # leaving the tokenizer pointing at a token it does not have.
        for value in (special_tokens_dict or {}).values():
            self._reject_new_tokens(value if isinstance(value, (list, tuple)) else [value])
        return super().add_special_tokens(special_tokens_dict, replace_extra_special_tokens)

    def convert_tokens_to_ids(self, tokens: bytes | str | Iterable[bytes | str]) -> int | list[int]:
        if isinstance(tokens, (bytes, str)):
            return self._convert_token_to_id(tokens)
        return [self._convert_token_to_id(token) for token in tokens]

    def _convert_token_to_id(self, token: bytes | str) -> int:
        if isinstance(token, str):
            if token in self.special_tokens:
                return self.special_tokens[token]
            token_bytes = token.encode("utf-8")
        else:
            token_bytes = token
        rank = self.mergeable_ranks.get(token_bytes)
        if rank is None:
            raise ValueError(f"{token!r} is not a token of the Qwen vocabulary.")
        return rank

    def convert_ids_to_tokens(
        self, ids: int | Iterable[int], skip_special_tokens: bool = False
    ) -> bytes | str | list[bytes | str]:
        """`bytes` for BPE ids, `str` for special-token ids, as `tokenize()` returns them."""
        if not isinstance(ids, Iterable):
            return self._convert_id_to_token(int(ids))
        ids = [int(index) for index in ids]
        if skip_special_tokens:
            ids = self._drop_special_ids(ids)
        return [self._convert_id_to_token(index) for index in ids]

    def _convert_id_to_token(self, index: int) -> bytes | str:
        token = self.decoder.get(index)
        if token is None:
            raise ValueError(
                f"{index} is not a token id of the Qwen vocabulary (valid ids: 0 to {self.vocab_size - 1})."
            )
        return token

    def convert_tokens_to_string(self, tokens: Iterable[bytes | str]) -> str:
        # Tokens are byte pieces that may split a UTF-8 character, so join bytes first and decode once.
        joined = b"".join(token.encode("utf-8") if isinstance(token, str) else token for token in tokens)
        return joined.decode("utf-8", errors=self.errors)

    # ----------------------------------------------------------------------------------------------------------------
    # Encoding

    def _text_to_ids(
        self,
        text: str,
        allowed_special: AllowedSpecial = "all",
        disallowed_special: DisallowedSpecial = (),
        split_special_tokens: bool = False,
    ) -> list[int]:
        if split_special_tokens:
            allowed_special, disallowed_special = set(), ()
        # The check is far cheaper than normalize() on the common, already normalized input.
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        return self.tokenizer.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)

    def tokenize(
        self,
        text: str,
        allowed_special: AllowedSpecial = "all",
        disallowed_special: DisallowedSpecial = (),
        **kwargs: Any,
    ) -> list[bytes | str]:
        """Split `text` into tokens: `bytes` for BPE tokens, `str` for special tokens.

        `allowed_special` / `disallowed_special` have tiktoken's meaning; the default turns special-token strings in
        the text into special tokens, as the released tokenizer did. `split_special_tokens=True` encodes them as text.
        """
        split_special_tokens = bool(kwargs.get("split_special_tokens", self.split_special_tokens))
        ids = self._text_to_ids(text, allowed_special, disallowed_special, split_special_tokens)
        return [self.decoder[index] for index in ids]

    def _encode_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {
            "allowed_special": kwargs.get("allowed_special", "all"),
            "disallowed_special": kwargs.get("disallowed_special", ()),
            "split_special_tokens": bool(kwargs.get("split_special_tokens", self.split_special_tokens)),
        }

    def encode(
        self,
        text: Any,
        text_pair: Any = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> Any:
        # Plain `encode(text)` is the hot path of data pipelines: hand tiktoken's ids back directly instead of building
        # and unpacking a BatchEncoding. Qwen adds no special tokens, so add_special_tokens changes nothing here.
        if (
            isinstance(text, str)
            and text_pair is None
            and not (padding or truncation or max_length or return_tensors)
            and kwargs.keys() <= _ENCODE_OPTION_NAMES
        ):
            ids = self._text_to_ids(text, **self._encode_options(kwargs))
            self._eventual_warn_about_too_long_sequence(ids, None, True)
            return ids
        return super().encode(
            text, text_pair, add_special_tokens, padding, truncation, max_length, stride, padding_side,
            return_tensors, **kwargs,
        )

    def _encode_plus(
        self,
        text: Any,
        text_pair: Any = None,
        add_special_tokens: bool = True,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        truncation_strategy: TruncationStrategy = TruncationStrategy.DO_NOT_TRUNCATE,
        max_length: int | None = None,
        is_split_into_words: bool = False,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        verbose: bool = True,
        **kwargs: Any,
    ) -> BatchEncoding:
        # The base class would go text -> tokenize() -> token bytes -> convert_tokens_to_ids() -> prepare_for_model()
        # -> pad(). For one plain text with nothing to pad or truncate, build the result from tiktoken's ids directly;
        # everything else gets the ids (not the text) and goes through the base class.
        # Empty strings are left to the base class, which would read an empty id list as an empty batch.
        plain = not is_split_into_words and not kwargs.get("sanitize_control_tokens")
        if plain:
            options = self._encode_options(kwargs)
            extras = ("return_overflowing_tokens", "return_special_tokens_mask", "return_length")
            if (
                isinstance(text, str)
                and text
                and text_pair is None
                and padding_strategy == PaddingStrategy.DO_NOT_PAD
                and truncation_strategy == TruncationStrategy.DO_NOT_TRUNCATE
                and not return_token_type_ids
                and not any(kwargs.get(name) for name in extras)
            ):
                ids = self._text_to_ids(text, **options)
                self._eventual_warn_about_too_long_sequence(ids, max_length, verbose)
                encoded: dict[str, list[int]] = {"input_ids": ids}
                if return_attention_mask or (return_attention_mask is None and "attention_mask" in self.model_input_names):
                    encoded["attention_mask"] = [1] * len(ids)
                return BatchEncoding(encoded, tensor_type=return_tensors, prepend_batch_axis=return_tensors is not None)
            if isinstance(text, str) and text:
                text = self._text_to_ids(text, **options)
            if isinstance(text_pair, str) and text_pair:
                text_pair = self._text_to_ids(text_pair, **options)
        return super()._encode_plus(
            text,
            text_pair=text_pair,
            add_special_tokens=add_special_tokens,
            padding_strategy=padding_strategy,
            truncation_strategy=truncation_strategy,
            max_length=max_length,
            is_split_into_words=is_split_into_words,
            return_tensors=return_tensors,
            return_token_type_ids=return_token_type_ids,
            return_attention_mask=return_attention_mask,
            verbose=verbose,
            **kwargs,
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Chat

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]] | list[list[dict[str, Any]]],
        tools: list[Any] | None = None,
        documents: list[dict[str, str]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        sanitize_control_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = True,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """transformers' `apply_chat_template`, with two Qwen guarantees.

        Control-token strings typed into messages stay text (`sanitize_control_tokens` defaults to True). With the
        default ChatML template, the ids are built turn by turn exactly as `chat()` builds them, so both give the same
        ids even where encoding the joined text would merge tokens across a turn boundary.
        """
        conversations = conversation if conversation and isinstance(conversation[0], (list, tuple)) else [conversation]
        plain_chatml = (
            tokenize
            and sanitize_control_tokens
            and (chat_template is None or chat_template == CHATML_TEMPLATE)
            and self.chat_template == CHATML_TEMPLATE
            and not (tools or documents or continue_final_message or return_assistant_tokens_mask or kwargs)
            and all(
                isinstance(message, dict)
                and message.get("role") in _CHATML_ROLES
                and isinstance(message.get("content"), str)
                for messages in conversations
                for message in messages
            )
        )
        if not plain_chatml:
            sanitize = sanitize_control_tokens and tokenize and not return_assistant_tokens_mask
            if TRANSFORMERS_SANITIZES_CONTROL_TOKENS:
                # transformers refuses sanitizing where there is nothing to encode.
                kwargs["sanitize_control_tokens"] = sanitize
            elif sanitize:
                _warn_unsanitized_chat_template()
            return super().apply_chat_template(
                conversation,
                tools=tools,
                documents=documents,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=tokenize,
                padding=padding,
                truncation=truncation,
                max_length=max_length,
                return_tensors=return_tensors,
                return_dict=return_dict,
                return_assistant_tokens_mask=return_assistant_tokens_mask,
                tokenizer_kwargs=tokenizer_kwargs,
                **kwargs,
            )

        batch = [
            chatml_ids_for_messages(self, messages, add_generation_prompt, default_system=DEFAULT_SYSTEM_PROMPT)[1]
            for messages in conversations
        ]
        if truncation and max_length is not None:
            batch = [ids[-max_length:] if self.truncation_side == "left" else ids[:max_length] for ids in batch]
        encoded = self.pad(
            {"input_ids": batch, "attention_mask": [[1] * len(ids) for ids in batch]},
            padding=padding,
            max_length=max_length,
            return_tensors=return_tensors,
        )
        if conversations is not conversation and not return_tensors:
            encoded = BatchEncoding({key: value[0] for key, value in encoded.items()})
        return encoded if return_dict else encoded["input_ids"]

    # ----------------------------------------------------------------------------------------------------------------
    # Decoding

    def _drop_special_ids(self, ids: list[int]) -> list[int]:
        # Ids from eod_id up are special tokens, padding rows of the embedding or tokens an extra vocab file added;
        # only the last kind is text.
        return [index for index in ids if index < self.eod_id or index in self._extra_ids]

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        errors: str | None = None,
        **kwargs: Any,
    ) -> str:
        # `clean_up_tokenization_spaces` (set true in the released Qwen-72B config) is deliberately ignored: it edits
        # spaces before punctuation, so "Hello , world" would not decode to what was encoded.
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if skip_special_tokens:
            token_ids = self._drop_special_ids(token_ids)
        try:
            return self.tokenizer.decode(token_ids, errors=errors or self.errors)
        except (KeyError, OverflowError):
            unknown = [index for index in token_ids if index not in self.decoder]
            raise ValueError(
                f"Cannot decode ids that are not in the Qwen vocabulary: {unknown[:10]} "
                f"(valid ids: 0 to {self.vocab_size - 1})."
            ) from None

    # ----------------------------------------------------------------------------------------------------------------
    # Saving

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Write `qwen.tiktoken` with every BPE token in id order: the released file's bytes, then any added tokens."""
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        vocab_path = os.path.join(save_directory, prefix + VOCAB_FILE_NAME)
        with open(vocab_path, "wb") as handle:
            handle.write(serialize_ranks(self.mergeable_ranks))
        return (vocab_path,)
