"""Extend the Qwen vocabulary with new words: learn the BPE merges they need and write them to `qwen_extra.tiktoken`.

    python examples/add_merges.py qwen.tiktoken qwen_extra.tiktoken qwen_extra_vocab.txt
    python examples/add_merges.py words.txt -o qwen_extra.tiktoken                       # the cached vocabulary
    python examples/add_merges.py more.txt -o bigger.tiktoken --extra qwen_extra.tiktoken  # extend an extra file

The word file has one `word<TAB>frequency` line per word (`examples/qwen_extra_vocab.txt` is an example). The
frequencies decide which merges are learnt first and so which ids they get; a word given twice has its frequencies
added up, and a line with no tab is a word of frequency 1. Only the line break is removed, so a line " hello<TAB>5"
adds the word with its leading space, which is how a word usually appears inside English text.

Why merges and not just the words: tiktoken tokenizes by BPE, merging adjacent pieces in rank order, so a token is
only ever produced if two pieces BPE actually reaches concatenate to it. Words the tokenizer's pre-tokenizer splits
(a space inside, digits) can never become one token, and words that already are one need nothing: both are left out
with a warning. The rest are learnt as BPE learns a vocabulary:

1. each word starts as the pieces the current vocabulary gives it;
2. every adjacent pair of pieces is counted, weighted by the word's frequency;
3. the most frequent pair becomes a new token (ties go to the pair whose text has fewer characters, then fewer
   bytes, then the smaller text), every occurrence of it is merged, and words now in one piece drop out;
4. repeat until no word is left.

New tokens get consecutive ids in the order they were learnt, by default from one past the highest id in use (151851
for the released vocabulary, just after the special tokens), so earlier merges take priority, as in BPE, and every
old id keeps its meaning. At the end the file is loaded back and every word must encode to one id, or the script
fails. Load it with

    tokenizer = QWenTokenizer.from_pretrained("Qwen-7B-Chat", extra_vocab_file="qwen_extra.tiktoken")

and `tokenizer.save_pretrained(folder)` writes the new tokens into the saved `qwen.tiktoken`.

A new token needs an embedding row the model has learnt: the released embeddings have 151,936 rows, so ids 151851 to
151935 exist but are untrained, and more ids need `model.resize_token_embeddings`. Fine-tune after adding words.
"""

from __future__ import annotations

import argparse
import os
import sys
import unicodedata
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import regex

from qwen.tokenization_qwen import PAT_STR, QWenTokenizer, serialize_ranks

_PRETOKENIZER = regex.compile(PAT_STR)
# --start_id values the original script read as "right after the vocabulary".
_AUTOMATIC_START = (None, 0, -1)


class MergeError(ValueError):
    """A start id that is already taken, an unreadable word file, or a word that did not become one token."""


@dataclass
class MergePlan:
    added: dict[bytes, int] = field(default_factory=dict)  # new token -> id, in the order learnt
    merges: list[tuple[bytes, bytes, int]] = field(default_factory=list)  # each learnt pair and its weighted count
    words: list[str] = field(default_factory=list)  # the words that become single tokens
    skipped: list[str] = field(default_factory=list)  # one line per word left out, saying why


def bpe_pieces(ranks: Mapping[bytes, int], word: bytes) -> list[bytes]:
    """The pieces byte-level BPE ends with for one pre-tokenized chunk: repeatedly merge the adjacent pair whose
    concatenation has the lowest rank (what tiktoken does), until no adjacent pair is a token."""
    pieces = [bytes([byte]) for byte in word]
    while len(pieces) > 1:
        ranked = [(ranks[pair], index) for index in range(len(pieces) - 1)
                  if (pair := pieces[index] + pieces[index + 1]) in ranks]
        if not ranked:
            break
        _, index = min(ranked)
        pieces[index:index + 2] = [pieces[index] + pieces[index + 1]]
    return pieces


def _pair_order(item: tuple[tuple[bytes, bytes], int]) -> tuple[int, int, int, str, bytes]:
    """Most frequent first; among equals the pair whose text is shortest in characters, then in bytes, then smallest."""
    (left, right), count = item
    merged = left + right
    text = merged.decode("utf-8", errors="replace")
    return -count, len(text), len(merged), text, merged


def _merge_pair(pieces: list[bytes], left: bytes, right: bytes) -> list[bytes]:
    """`pieces` with every occurrence of `left` followed by `right` joined, scanning left to right."""
    merged: list[bytes] = []
    index = 0
    while index < len(pieces):
        if index + 1 < len(pieces) and pieces[index] == left and pieces[index + 1] == right:
            merged.append(left + right)
            index += 2
        else:
            merged.append(pieces[index])
            index += 1
    return merged


def plan_extra_vocab(
    tokenizer: QWenTokenizer, frequencies: Mapping[str, int], start_rank: int | None = None
) -> MergePlan:
    """Learn the merges that make every word in `frequencies` (word -> frequency) one token, on top of `tokenizer`'s
    vocabulary (including what an extra vocab file it loaded added).

    Raises MergeError for a `start_rank` at or below an id in use. Words that cannot or need not be added are left
    out and listed in `plan.skipped`.
    """
    ranks = dict(tokenizer.mergeable_ranks)
    owners: dict[int, str] = {rank: f"the token {token!r}" for token, rank in ranks.items()}
    owners.update({index: f"the special token {token}" for token, index in tokenizer.special_tokens.items()})
    next_rank = max(owners) + 1 if start_rank in _AUTOMATIC_START else start_rank
    if next_rank < 0:
        raise MergeError(f"the start id must be >= 0 (or -1 for automatic), got {next_rank}.")

    plan = MergePlan()
    words: dict[str, list[bytes]] = {}  # word -> its current pieces, in file order
    for word in frequencies:
        chunks = _PRETOKENIZER.findall(word)
        if chunks != [word]:
            plan.skipped.append(f"{word!r} can never be one token: the pre-tokenizer splits it into {chunks}")
        elif word.encode("utf-8") in ranks:
            plan.skipped.append(f"{word!r} already is a token (id {ranks[word.encode('utf-8')]})")
        else:
            words[word] = bpe_pieces(ranks, word.encode("utf-8"))
            plan.words.append(word)

    while words:
        counts: Counter[tuple[bytes, bytes]] = Counter()
        for word, pieces in words.items():
            for pair in zip(pieces, pieces[1:]):
                counts[pair] += frequencies[word]
        (left, right), count = min(counts.items(), key=_pair_order)  # min keeps the first of equal keys
        plan.merges.append((left, right, count))
        merged = left + right
        # A merge can rebuild a token that exists already (old, or learnt from another pair); it keeps its id. The
        # original script gave it a new id anyway, leaving a gap its tokenizer then refused to load.
        if merged not in ranks:
            if next_rank in owners:
                raise MergeError(
                    f"id {next_rank} is already the id of {owners[next_rank]}; choose a start id above {max(owners)} "
                    "(the highest id in use)."
                )
            ranks[merged] = plan.added[merged] = next_rank
            owners[next_rank] = f"the new token {merged!r}"
            next_rank += 1
        words = {word: merged_pieces for word, pieces in words.items()
                 if len(merged_pieces := _merge_pair(pieces, left, right)) > 1}
    return plan


def check_extended(vocab_file: str | os.PathLike, extra_file: str | os.PathLike, words: list[str],
                   expected: Mapping[bytes, int]) -> QWenTokenizer:
    """Load the tokenizer with the extra file and confirm each word is one new id that decodes back to the word."""
    extended = QWenTokenizer(vocab_file, extra_vocab_file=extra_file)
    missing = {token: rank for token, rank in expected.items() if extended.extra_vocab.get(token) != rank}
    if missing:
        raise MergeError(f"The tokenizer skipped entries of {extra_file}: {list(missing.items())[:5]}")
    for word in words:
        ids = extended.encode(word)
        if len(ids) != 1 or extended.decode(ids) != word:
            raise MergeError(f"{word!r} encodes to {ids}, not to one new token.")
    return extended


def read_words(path: Path) -> dict[str, int]:
    """Word -> frequency from a word file, in file order (NFC-normalized, as the tokenizer sees text).

    A line is `word<TAB>frequency`, or a word alone (frequency 1). Only the line break is removed: a leading space is
    part of the word.
    """
    frequencies: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        word, tab, count = line.rpartition("\t")
        if not tab:
            word, count = count, "1"
        try:
            frequency = int(count)
        except ValueError:
            # The original counted such a line once without a word; a typo in a frequency should not pass unseen.
            raise MergeError(f"{path}, line {number}: the frequency after the tab must be a whole number, got "
                             f"{count!r}.") from None
        word = unicodedata.normalize("NFC", word)
        frequencies[word] = frequencies.get(word, 0) + frequency
    return frequencies


def _text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", type=Path, nargs="+", metavar="PATH",
                        help="as in the original script, three paths: the vocabulary (qwen.tiktoken), the output file "
                             "and the word file; or only the word file (then see --vocab and -o)")
    parser.add_argument("-o", "--output", type=Path, default=None, help="default: qwen_extra.tiktoken")
    parser.add_argument("--vocab", type=Path, default=None,
                        help="the released qwen.tiktoken (default: the one `python -m qwen.vocab fetch` stored)")
    parser.add_argument("--extra", type=Path, default=None,
                        help="an extra vocab file to extend: its tokens are kept and the new ones come after them")
    parser.add_argument("--start_id", "--start-id", type=int, default=None,
                        help="first id to give a new token (default, or -1: one past the highest id in use, 151851 "
                             "for the released vocabulary)")
    args = parser.parse_args(argv)
    if len(args.paths) == 3:
        if args.output is not None or args.vocab is not None:
            parser.error("give the vocabulary and output either as the original's three paths or with --vocab and -o")
        args.vocab, args.output, args.words = args.paths
    elif len(args.paths) == 1:
        args.words = args.paths[0]
        args.output = args.output or Path("qwen_extra.tiktoken")
    else:
        parser.error(f"expected the word file (or vocabulary, output and word file), got {len(args.paths)} paths")

    try:
        if args.vocab is None:
            from qwen.vocab import find_vocab

            args.vocab = find_vocab()
        frequencies = read_words(args.words)
        tokenizer = QWenTokenizer(args.vocab, extra_vocab_file=args.extra)
        plan = plan_extra_vocab(tokenizer, frequencies, args.start_id)
        for reason in plan.skipped:
            print(f"warning: {reason}; left out.", file=sys.stderr)
        for step, (left, right, count) in enumerate(plan.merges, start=1):
            token = left + right
            rank = plan.added.get(token)
            where = f"id {rank}" if rank is not None else f"already id {tokenizer.mergeable_ranks[token]}"
            print(f"merge {step}: {_text(left)!r} + {_text(right)!r} -> {_text(token)!r} (frequency {count}, {where})")
        if not plan.added:
            print("Nothing to add: no word needs a new token.")
            return 0
        everything = {**tokenizer.extra_vocab, **plan.added}
        args.output.write_bytes(serialize_ranks(everything))
        extended = check_extended(args.vocab, args.output, plan.words, everything)
    except (MergeError, FileNotFoundError, UnicodeDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for word in plan.words:
        print(f"{word!r}: {tokenizer.encode(word)} -> {extended.encode(word)}")
    print(f"Wrote {len(everything)} extra tokens ({len(plan.added)} new, ids {min(plan.added.values())} to "
          f"{max(plan.added.values())}) to {args.output}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
