"""Fine-tuning data: conversation files in, ChatML token ids and their labels out.

The file format is the one of the original fine-tuning script: a JSON list (or JSON Lines, one sample per line) of

    {"id": "identity_0", "system": "optional system prompt",
     "conversations": [{"from": "user", "value": "你好"}, {"from": "assistant", "value": "我是通义千问..."}]}

(`system` is ours: the original script gave every sample the default system prompt.) A conversation that opens with
an assistant turn (a greeting, in data converted from chat logs) loses that one turn, as in the original script: it is
neither fed nor learned, and training starts at the turn after it (`trained_turns`). Each sample becomes the ids
`model.chat()` would feed for the same conversation, every turn followed by its newline (built by the same turn
encoder as `make_context`, so a fine-tuned model is trained on exactly the prompts it later sees). Labels are -100
where nothing is learned; which tokens are learned is the label mask's choice (`LABEL_MASKS`):

- "original" (the default), as the original script's `preprocess`: each assistant reply, and the `<|im_start|>`,
  `<|im_end|>` and closing newline of every turn, system and user turns included. Role names, the newline after them
  and the system and user text are masked.
- "assistant_only": each assistant reply and the `<|im_end|>` that closes it, nothing else: the model learns to answer
  and to stop, not to write turn markers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from .qwen_generation_utils import DEFAULT_SYSTEM_PROMPT, _encode_text, _turn

IGNORE_INDEX = -100
ROLES = ("user", "assistant")
LabelMask = Literal["original", "assistant_only"]
LABEL_MASKS: tuple[str, ...] = get_args(LabelMask)
DEFAULT_LABEL_MASK: LabelMask = "original"


class DataError(ValueError):
    """A sample the fine-tuning data cannot use; the message names the sample and what is wrong."""


@dataclass(frozen=True)
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]


def load_samples(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON list or a JSON Lines file of samples, checking every one (see `check_sample`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file {str(path)!r} does not exist.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some Windows editors write, is not part of the data
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); save the "
            "file as UTF-8."
        ) from None
    if text.lstrip().startswith("["):
        try:
            samples = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} is not valid JSON ({error}).") from error
    else:
        samples = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: not valid JSON ({error}).") from error
    if not samples:
        raise DataError(f"{path} holds no samples.")
    for index, sample in enumerate(samples):
        check_sample(sample, index)
    return samples


def sample_name(sample: Any, index: int) -> str:
    identifier = sample.get("id") if isinstance(sample, dict) else None
    return f"sample {identifier!r} (#{index})" if identifier is not None else f"sample #{index}"


def check_sample(sample: Any, index: int) -> None:
    """Raise DataError, naming the sample, unless it is a usable conversation."""
    name = sample_name(sample, index)
    if not isinstance(sample, dict):
        raise DataError(f"{name} is a {type(sample).__name__}, not an object with 'conversations'.")
    turns = sample.get("conversations")
    if not isinstance(turns, list):
        raise DataError(f"{name} has no 'conversations' list.")
    if not turns:
        raise DataError(f"{name} has an empty conversation.")
    system = sample.get("system", DEFAULT_SYSTEM_PROMPT)
    if not isinstance(system, str):
        raise DataError(f"{name}: 'system' must be a string.")
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{name}, turn {position}: each turn needs 'from' and 'value'.")
        if turn["from"] not in ROLES:
            raise DataError(f"{name}, turn {position}: unknown role {turn['from']!r}; use 'user' or 'assistant'.")
        if not isinstance(turn["value"], str):
            raise DataError(f"{name}, turn {position}: 'value' must be a string.")
    if not any(turn["from"] == "assistant" for turn in trained_turns(sample)):
        where = " after its opening one, which is not trained on" if turns[0]["from"] == "assistant" else ""
        raise DataError(f"{name} has no assistant turn{where}, so there is nothing to learn from it.")


def trained_turns(sample: dict[str, Any]) -> list[dict[str, Any]]:
    """The turns of a checked sample that are fed and learned: all but an opening assistant turn, which the original
    script left out (a conversation is trained from the user's side on). Only that one turn goes: an assistant turn
    right after it stays."""
    turns = sample["conversations"]
    return turns[1:] if turns[0]["from"] == "assistant" else turns


def _turn_labels(ids: list[int], role: str, header: int, newline: int, label_mask: LabelMask) -> list[int]:
    """Labels of one turn's ids: `<|im_start|>role\\n` (`header` tokens), the content, `<|im_end|>`, the newline."""
    end = len(ids) - newline - 1  # where <|im_end|> is
    reply = ids[header:end] if role == "assistant" else [IGNORE_INDEX] * (end - header)
    if label_mask == "original":
        return [ids[0]] + [IGNORE_INDEX] * (header - 1) + reply + ids[end:]
    if label_mask == "assistant_only":
        closing = [ids[end]] if role == "assistant" else [IGNORE_INDEX]
        return [IGNORE_INDEX] * header + reply + closing + [IGNORE_INDEX] * newline
    raise ValueError(f"Unknown label mask {label_mask!r}; use one of {', '.join(LABEL_MASKS)}.")


def _encoded_pieces(
    tokenizer: Any, sample: dict[str, Any], label_mask: LabelMask
) -> Iterator[tuple[list[int], list[int]]]:
    """(ids, labels) of a checked sample, turn by turn in order, the system turn first; each ends with a newline."""
    newline = _encode_text(tokenizer, "\n")
    turns = [("system", sample.get("system", DEFAULT_SYSTEM_PROMPT))]
    turns += [(turn["from"], turn["value"]) for turn in trained_turns(sample)]
    for role, content in turns:
        _, ids = _turn(tokenizer, role, content)
        ids += newline
        header = 1 + len(_encode_text(tokenizer, role)) + len(newline)  # <|im_start|>role\n
        yield ids, _turn_labels(ids, role, header, len(newline), label_mask)


def tokenize_sample(tokenizer: Any, sample: dict[str, Any], max_length: int | None = None,
                    label_mask: LabelMask = DEFAULT_LABEL_MASK) -> TokenizedSample:
    """ChatML ids of one checked sample and its labels (-100 where `label_mask` learns nothing, see the module doc).

    Longer samples are cut at `max_length` tokens.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, piece_labels in _encoded_pieces(tokenizer, sample, label_mask):
        input_ids += ids
        labels += piece_labels
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return TokenizedSample(input_ids, labels)


def first_label_position(tokenizer: Any, sample: dict[str, Any], label_mask: LabelMask = DEFAULT_LABEL_MASK) -> int:
    """Where the first token the model learns to predict is in a checked sample, in tokens.

    That is the first label past position 0: the label of the very first token (the original mask keeps its
    `<|im_start|>`) is never a target, as no token comes before it. A sample cut at a length at or below this
    position has nothing left to learn. Only the turns up to that label are tokenized, so checking a big file costs
    little more than its prompts under the assistant-only mask, and one turn under the original one.
    """
    position = 0
    for ids, labels in _encoded_pieces(tokenizer, sample, label_mask):
        for offset, label in enumerate(labels):
            if label != IGNORE_INDEX and position + offset > 0:
                return position + offset
        position += len(ids)
    raise DataError("The sample has no assistant turn, so there is nothing to learn from it.")


@dataclass(frozen=True)
class LeftOutSample:
    """A sample whose every target (every label past its first token) lies beyond the length samples are cut at."""

    index: int
    name: str
    length: int  # tokens of the whole sample
    first_label: int  # where its first target is (`first_label_position`)


class ConversationDataset(torch.utils.data.Dataset):
    """Samples tokenized up front, or (`lazy=True`) each time one is read, for files too big to tokenize at once.

    `label_mask` chooses the tokens learned (see the module doc). Samples whose first target (`first_label_position`)
    is at or beyond `max_length` are left out and listed in `left_out`: cut there, all their labels would be masked,
    and a step of such samples has a loss of 0 and no gradient, yet counts as a step, drags the logged loss down and
    still moves the weights (the optimizer's momentum and weight decay). Under the original mask that takes a
    `max_length` shorter than the system turn; under the assistant-only one, a prompt that fills `max_length`.
    """

    def __init__(self, samples: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, lazy: bool = False,
                 label_mask: LabelMask = DEFAULT_LABEL_MASK) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.lazy = lazy
        self.label_mask = label_mask
        self.samples: list[dict[str, Any]] = []
        self.left_out: list[LeftOutSample] = []
        for index, sample in enumerate(samples):
            first_label = first_label_position(tokenizer, sample, label_mask)
            if first_label < max_length:
                self.samples.append(sample)
            else:
                length = len(tokenize_sample(tokenizer, sample, label_mask=label_mask).input_ids)
                self.left_out.append(LeftOutSample(index, sample_name(sample, index), length, first_label))
        self._tokenized = None if lazy else [
            tokenize_sample(tokenizer, s, max_length, label_mask) for s in self.samples
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        item = self._tokenized[index] if self._tokenized is not None else tokenize_sample(
            self.tokenizer, self.samples[index], self.max_length, self.label_mask
        )
        return {"input_ids": item.input_ids, "labels": item.labels}


@dataclass
class PadToLongest:
    """Collate samples into a batch padded to its own longest sample (not to the model's maximum length)."""

    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.tensor(feature["input_ids"])
            labels[row, :length] = torch.tensor(feature["labels"])
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


__all__ = [
    "DEFAULT_LABEL_MASK", "IGNORE_INDEX", "LABEL_MASKS", "ConversationDataset", "DataError", "LabelMask",
    "LeftOutSample", "PadToLongest", "TokenizedSample",
    "check_sample", "first_label_position", "load_samples", "tokenize_sample", "trained_turns",
]
