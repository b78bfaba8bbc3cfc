"""Extend the Qwen vocabulary with new words, written as extra BPE merges into a `qwen_extra.tiktoken` file.

    python examples/add_merges.py words.txt -o qwen_extra.tiktoken
    python examples/add_merges.py more_words.txt -o qwen_extra.tiktoken --extra qwen_extra.tiktoken   # extend it

`words.txt` holds one word per line, UTF-8; only the line break is removed, so a line " tokenizerish" adds the word
with its leading space, which is how a word usually appears in running English text (`hello` and ` hello` are two
different tokens). A line may also be `word<TAB>frequency`, the original repository's format: more frequent words get
the lower new ids (a repeated word's frequencies add up; a line without a frequency counts once). The original's
command line works too:

    python examples/add_merges.py qwen.tiktoken qwen_extra.tiktoken words.tsv --start_id 151851

The tokenizer then loads the file next to the released vocabulary:

    tokenizer = QWenTokenizer.from_pretrained("Qwen-7B-Chat", extra_vocab_file="qwen_extra.tiktoken")

and `tokenizer.save_pretrained(folder)` keeps it (as `qwen_extra.tiktoken`, named in tokenizer_config.json).

Why merges and not just the word: tiktoken tokenizes by BPE, merging adjacent pieces in rank order, so a token is only
ever produced if two pieces that BPE actually reaches concatenate to it. For each word this script runs BPE with the
current vocabulary, then adds the left-to-right merges that join the resulting pieces (`ab`, `abc`, ... up to the
word), with ranks after every id in use. New ranks are higher than all old ones, so they apply only after every
original merge, and old ids keep their meaning. Text changes its ids only where a new merge applies: in the words, and
in chunks equal to a prefix added on the way (adding `QwenLM` also makes `Qwen` one token), so a word of n pieces costs
n - 1 ids. At the end the file is loaded back and every word must encode to one new id, or the script fails.

A new token needs an embedding row the model has learned: the released embeddings have 151,936 rows, so ids 151851 to
151935 exist but are untrained, and more ids need `model.resize_token_embeddings`. Fine-tune after adding words.
"""

from __future__ import annotations

import argparse
import os
import sys
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path

import regex

from qwen.tokenization_qwen import PAT_STR, QWenTokenizer, serialize_ranks

_PRETOKENIZER = regex.compile(PAT_STR)


class MergeError(ValueError):
    """A word that cannot be added, or a rank that is already taken."""


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


def plan_extra_vocab(
    tokenizer: QWenTokenizer, words: Iterable[str], start_rank: int | None = None, skip_existing: bool = False
) -> dict[bytes, int]:
    """The new tokens (bytes → rank) that make every word a single token, on top of `tokenizer`'s vocabulary.

    Raises MergeError for a word the tokenizer splits before BPE (it can never be one token), a word that already is
    a token (unless `skip_existing`), and a `start_rank` that would reuse an id.
    """
    ranks = dict(tokenizer.mergeable_ranks)  # includes tokens of an extra vocab file the tokenizer loaded
    owners: dict[int, str] = {rank: f"the token {token!r}" for token, rank in ranks.items()}
    owners.update({index: f"the special token {token}" for token, index in tokenizer.special_tokens.items()})
    next_rank = max(owners) + 1 if start_rank is None else start_rank
    if next_rank < 0:
        raise MergeError(f"start_rank must be >= 0, got {next_rank}.")

    added: dict[bytes, int] = {}
    for word in dict.fromkeys(words):  # unique, in order
        # The tokenizer NFC-normalizes text before encoding, so the token must be the normalized form.
        word = unicodedata.normalize("NFC", word)
        if not word:
            continue
        chunks = _PRETOKENIZER.findall(word)
        if chunks != [word]:
            raise MergeError(
                f"{word!r} can never be one token: the tokenizer's pre-tokenizer splits it into {chunks} before BPE "
                "(digits always stand alone, and letters, spaces and punctuation form separate chunks)."
            )
        data = word.encode("utf-8")
        if data in ranks:
            if skip_existing:
                continue
            raise MergeError(f"{word!r} is already a token (id {ranks[data]}); remove it from the word list.")
        pieces = bpe_pieces(ranks, data)
        merged = pieces[0]
        for piece in pieces[1:]:
            merged += piece
            if merged in ranks:  # a token that BPE could not reach before becomes reachable; it keeps its id
                continue
            if next_rank in owners:
                raise MergeError(
                    f"Rank {next_rank} is already the id of {owners[next_rank]}; choose a start rank above "
                    f"{max(owners)} (the highest id in use)."
                )
            ranks[merged] = added[merged] = next_rank
            owners[next_rank] = f"the new token {merged!r}"
            next_rank += 1
    return added


def check_extended(vocab_file: str | os.PathLike, extra_file: str | os.PathLike, words: Iterable[str],
                   expected: Mapping[bytes, int]) -> QWenTokenizer:
    """Load the tokenizer with the extra file and confirm each word is one new id that decodes back to the word."""
    extended = QWenTokenizer(vocab_file, extra_vocab_file=extra_file)
    missing = {token: rank for token, rank in expected.items() if extended.extra_vocab.get(token) != rank}
    if missing:
        raise MergeError(f"The tokenizer skipped entries of {extra_file}: {list(missing.items())[:5]}")
    for word in words:
        word = unicodedata.normalize("NFC", word)
        ids = extended.encode(word)
        if len(ids) != 1 or extended.decode(ids) != word:
            raise MergeError(f"{word!r} encodes to {ids}, not to one new token.")
    return extended


def read_words(path: Path) -> list[str]:
    """The words of a word list, most frequent first (file order among equals).

    A line is a word, or `word<TAB>frequency`. Only the line break is removed: a leading space is part of the word.
    """
    frequencies: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        word, tab, count = line.rstrip("\r\n").rpartition("\t")
        if not tab:
            word, count = count, "1"
        try:
            frequency = int(count)
        except ValueError:
            raise MergeError(f"{path}, line {number}: the frequency after the tab must be a whole number, got "
                             f"{count!r}.") from None
        frequencies[word] = frequencies.get(word, 0) + frequency
    return sorted(frequencies, key=lambda word: -frequencies[word])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", type=Path, nargs="+", metavar="WORDS",
                        help="UTF-8 file, one word (or word<TAB>frequency) per line; or, as in the original script, "
                             "three paths: the vocabulary, the output file and the word file")
    parser.add_argument("-o", "--output", type=Path, default=None, help="default: qwen_extra.tiktoken")
    parser.add_argument("--vocab", type=Path, default=None,
                        help="the released qwen.tiktoken (default: the one `python -m qwen.vocab fetch` stored)")
    parser.add_argument("--extra", type=Path, default=None,
                        help="an extra vocab file to extend: its tokens are kept and the new ones come after them")
    parser.add_argument("--start-rank", "--start_id", type=int, default=None,
                        help="first id to give a new token (default: one past the highest id in use)")
    parser.add_argument("--skip-existing", action="store_true", help="ignore words that already are tokens")
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
        words = read_words(args.words)
        tokenizer = QWenTokenizer(args.vocab, extra_vocab_file=args.extra)
        before = {word: tokenizer.encode(word) for word in words}
        added = plan_extra_vocab(tokenizer, words, args.start_rank, args.skip_existing)
        if not added:
            print("Nothing to add: every word already is a token.")
            return 0
        everything = {**tokenizer.extra_vocab, **added}
        args.output.write_bytes(serialize_ranks(everything))
        extended = check_extended(args.vocab, args.output, words, everything)
    except (MergeError, FileNotFoundError, UnicodeDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for word in words:
        print(f"{word!r}: {before[word]} -> {extended.encode(word)}")
    print(f"Wrote {len(everything)} extra tokens ({len(added)} new, ids {min(added.values())} to "
          f"{max(added.values())}) to {args.output}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
