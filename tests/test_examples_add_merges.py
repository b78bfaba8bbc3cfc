"""examples/add_merges.py: BPE merges learnt from word frequencies as the original script learnt them, written to an
extra vocab file the tokenizer really loads."""

from __future__ import annotations

import base64
import re
import sys
from pathlib import Path

import pytest
from support import REPO

from qwen import QWenTokenizer
from qwen.tokenization_qwen import VOCAB_FILE_NAME

sys.path.insert(0, str(REPO / "examples"))

import add_merges  # noqa: E402
from add_merges import MergeError, bpe_pieces, plan_extra_vocab  # noqa: E402

# Words of 2, 3 and 6 BPE pieces, one with the leading space it has inside English text, one in Chinese.
WORDS = ["tokenizerish", " tokenizerish", "QwenLM", "通义千问大模型"]

# The example of the original repository's tokenization note: its word file, what its add_merges.py logged as the
# learnt merges (pair and weighted count, in order) and the qwen_extra.tiktoken it shows as the result.
ORIGINAL_EXAMPLE_WORDS = "我是一只猫\t20\n你是一只猫\t10\n他是一只猫\t5\n一只\t200\n一只猫\t100\n夸张的 比喻手法\t20\n"
ORIGINAL_EXAMPLE_MERGES = [("一只", "猫", 100), ("只", "猫", 35), ("是一", "只猫", 35), ("我", "是一只猫", 20),
                           ("你", "是一只猫", 10), ("他", "是一只猫", 5)]
ORIGINAL_EXAMPLE_IDS = {"一只猫": 151851, "只猫": 151852, "是一只猫": 151853, "我是一只猫": 151854, "你是一只猫": 151855,
                        "他是一只猫": 151856}

# A harder input: ties between equally frequent pairs, runs of one letter, words inside words, accents, and a word
# that already is a token ("banana", "hello"). The ids were produced by running the original examples/add_merges.py
# (QwenLM/Qwen, HEAD of its repository) on this file against the released qwen.tiktoken, outside this repository.
TIES_WORDS = ("tokenizerish\t7\nQwenification\t7\nQwenified\t3\naaaaaaa\t4\nbanana\t9\nbananarama\t2\n通义千问大模型\t5\n"
              "通义千问\t5\n千问大模型\t3\nÜnïcödéword\t2\nzzzyzzzy\t6\nhello\t3\n")
TIES_IDS = {
    "千问": 151851, "zzzy": 151852, "通义": 151853, "Qwen": 151854, "通义千问": 151855, "大模型": 151856,
    "tokenizerish": 151857, "Qwenification": 151858, "zzzyzzzy": 151859, "通义千问大模型": 151860, "aaaaaaa": 151861,
    "千问大模型": 151862, "Qwenified": 151863, "cö": 151864, "nï": 151865, "Ünï": 151866, "cödé": 151867,
    "arama": 151868, "banan": 151869, "Ünïcödé": 151870, "bananarama": 151871, "Ünïcödéword": 151872,
}


def _file_ids(path: Path) -> dict[str, int]:
    lines = [line.split() for line in path.read_bytes().splitlines()]
    return {base64.b64decode(token).decode("utf-8"): int(rank) for token, rank in lines}


@pytest.fixture(scope="module")
def extended(tmp_path_factory, vocab_file: Path) -> tuple[QWenTokenizer, Path]:
    folder = tmp_path_factory.mktemp("merges")
    words = folder / "words.txt"
    words.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    extra = folder / "qwen_extra.tiktoken"
    assert add_merges.main([str(words), "-o", str(extra), "--vocab", str(vocab_file)]) == 0
    return QWenTokenizer(vocab_file, extra_vocab_file=extra), extra


def test_bpe_pieces_is_tiktokens_bpe(tokenizer: QWenTokenizer) -> None:
    for word in ("tokenizerish", "通义千问大模型", " unbelievable", "Ünïcödé"):
        assert bpe_pieces(tokenizer.mergeable_ranks, word.encode()) == tokenizer.tokenize(word), word


def test_the_original_example_gives_the_original_tokens_and_ids(tmp_path: Path, vocab_file: Path, capsys) -> None:
    words = tmp_path / "qwen_extra_vocab.txt"
    words.write_text(ORIGINAL_EXAMPLE_WORDS, encoding="utf-8")
    output = tmp_path / "qwen_extra.tiktoken"
    # The original's command line: vocabulary, output, words.
    assert add_merges.main([str(vocab_file), str(output), str(words)]) == 0
    assert _file_ids(output) == ORIGINAL_EXAMPLE_IDS
    assert list(_file_ids(output).values()) == sorted(ORIGINAL_EXAMPLE_IDS.values())  # written in id order

    printed = capsys.readouterr()
    for step, (left, right, count) in enumerate(ORIGINAL_EXAMPLE_MERGES, start=1):
        assert f"merge {step}: {left!r} + {right!r} -> {left + right!r} (frequency {count}, " \
               f"id {ORIGINAL_EXAMPLE_IDS[left + right]})" in printed.out
    assert "warning: '一只' already is a token (id 102292); left out." in printed.err
    assert "warning: '夸张的 比喻手法' can never be one token: the pre-tokenizer splits it into ['夸张的', ' 比喻手法']" \
        in printed.err

    # What the note shows the tokenizer doing with the file.
    tokenizer = QWenTokenizer(vocab_file, extra_vocab_file=output)
    assert len(tokenizer) == 151857
    assert tokenizer("我是一只猫")["input_ids"] == [151854]


def test_ties_and_repeats_are_learnt_as_the_original_learnt_them(tmp_path: Path, vocab_file: Path) -> None:
    words = tmp_path / "words.tsv"
    words.write_text(TIES_WORDS, encoding="utf-8")
    output = tmp_path / "qwen_extra.tiktoken"
    assert add_merges.main([str(vocab_file), str(output), str(words), "--start_id", "151851"]) == 0
    assert _file_ids(output) == TIES_IDS


def test_each_new_word_is_one_new_id_and_decodes_back(extended, tokenizer: QWenTokenizer) -> None:
    new, _ = extended
    ids = [new.encode(word) for word in WORDS]
    assert all(len(word_ids) == 1 and word_ids[0] >= 151851 for word_ids in ids), ids
    assert len({word_ids[0] for word_ids in ids}) == len(WORDS)
    for word, word_ids in zip(WORDS, ids):
        assert len(tokenizer.encode(word)) > 1  # not a token before
        assert new.decode(word_ids) == word
    sentence = "The tokenizerish step of 通义千问大模型 and QwenLM."
    assert new.decode(new.encode(sentence)) == sentence
    assert set(new.encode(sentence)) >= {ids[1][0], ids[3][0]}


def test_old_ids_keep_their_meaning(extended, tokenizer: QWenTokenizer, tokenizer_facts: dict) -> None:
    new, extra = extended
    assert all(new.mergeable_ranks[token] == rank for token, rank in tokenizer.mergeable_ranks.items())
    assert new.special_tokens == tokenizer.special_tokens
    # Every line of the file is an extra token, after all special ids, and the tokenizer kept them all.
    assert len(new.extra_vocab) == len(extra.read_bytes().splitlines()) == len(new) - 151851
    assert min(new.extra_vocab.values()) == 151851
    for text, ids in tokenizer_facts["encode"].items():  # texts without the new words encode as before
        assert new.encode(text) == ids, text


def test_extending_an_existing_extra_file(extended, tmp_path: Path, vocab_file: Path) -> None:
    first, extra = extended
    words = tmp_path / "more.txt"
    words.write_text("moreword\n", encoding="utf-8")
    output = tmp_path / "bigger.tiktoken"
    assert add_merges.main([str(words), "-o", str(output), "--vocab", str(vocab_file), "--extra", str(extra)]) == 0
    bigger = QWenTokenizer(vocab_file, extra_vocab_file=output)
    assert bigger.extra_vocab.items() >= first.extra_vocab.items()  # earlier words keep their ids
    assert bigger.encode("moreword") == [max(first.extra_vocab.values()) + 1]


def test_loads_through_from_pretrained_and_survives_save(extended, tiny_chat_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    new, extra = extended
    loaded = AutoTokenizer.from_pretrained(tiny_chat_dir, extra_vocab_file=str(extra))
    assert loaded.encode("QwenLM") == new.encode("QwenLM")
    loaded.save_pretrained(tmp_path / "saved")
    # The new tokens are now part of the saved qwen.tiktoken, after the released entries.
    assert (tmp_path / "saved" / VOCAB_FILE_NAME).read_bytes().endswith(extra.read_bytes())
    assert QWenTokenizer.from_pretrained(tmp_path / "saved").encode("QwenLM") == new.encode("QwenLM")


def test_words_that_cannot_or_need_not_be_added_are_left_out(tokenizer: QWenTokenizer) -> None:
    plan = plan_extra_vocab(tokenizer, {"hello": 5, "hello world": 3, "Qwen2024": 2, "tokenizerish": 1})
    assert plan.words == ["tokenizerish"] and plan.added == {b"tokenizerish": 151851}
    assert plan.skipped == [
        "'hello' already is a token (id 14990)",
        "'hello world' can never be one token: the pre-tokenizer splits it into ['hello', ' world']",
        "'Qwen2024' can never be one token: the pre-tokenizer splits it into ['Qwen', '2', '0', '2', '4']",
    ]
    assert plan_extra_vocab(tokenizer, {"hello": 5}).added == {}


def test_start_ids_that_are_taken_are_clear_errors(tokenizer: QWenTokenizer) -> None:
    # The original moved a too small start id to 151643, the id of <|endoftext|>; here it is refused.
    special = re.escape("id 151700 is already the id of the special token <|extra_54|>")
    with pytest.raises(MergeError, match=special):
        plan_extra_vocab(tokenizer, {"tokenizerish": 1}, start_rank=151700)
    with pytest.raises(MergeError, match="id 14990 is already the id of the token b'hello'; choose a start id above "
                                         "151850"):
        plan_extra_vocab(tokenizer, {"tokenizerish": 1}, start_rank=14990)
    # An explicit free start id is honoured; -1 means automatic, as in the original.
    assert plan_extra_vocab(tokenizer, {"tokenizerish": 1}, start_rank=200_000).added == {b"tokenizerish": 200_000}
    assert plan_extra_vocab(tokenizer, {"tokenizerish": 1}, start_rank=-1).added == {b"tokenizerish": 151851}


def test_nothing_to_add_writes_nothing(tmp_path: Path, vocab_file: Path, capsys) -> None:
    words = tmp_path / "words.txt"
    words.write_text("hello\t3\n", encoding="utf-8")
    output = tmp_path / "out.tiktoken"
    assert add_merges.main([str(words), "-o", str(output), "--vocab", str(vocab_file)]) == 0
    printed = capsys.readouterr()
    assert "warning: 'hello' already is a token (id 14990); left out." in printed.err
    assert "Nothing to add" in printed.out and not output.exists()
    assert add_merges.main([str(tmp_path / "missing.txt"), "--vocab", str(vocab_file)]) == 1
    assert "missing.txt" in capsys.readouterr().err


def test_word_file_format(tmp_path: Path) -> None:
    words = tmp_path / "words.tsv"
    # Frequencies of a repeated word add up; a line without a tab counts once and keeps its leading space; the
    # tokenizer's NFC normalization applies (a decomposed "é" is the composed one).
    words.write_text("QwenLM\t3\n tokenizerish\nQwenLM\t8\ncafe\u0301\t2\n", encoding="utf-8")
    assert add_merges.read_words(words) == {"QwenLM": 11, " tokenizerish": 1, "café": 2}


def test_word_list_and_command_line_errors(tmp_path: Path, vocab_file: Path, capsys) -> None:
    words = tmp_path / "words.tsv"
    words.write_text("QwenLM\t3\ntokenizerish\tmany\n", encoding="utf-8")
    assert add_merges.main([str(words), "--vocab", str(vocab_file), "-o", str(tmp_path / "out.tiktoken")]) == 1
    assert "line 2: the frequency after the tab must be a whole number, got 'many'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        add_merges.main([str(vocab_file), str(words)])
    assert exit_.value.code == 2 and "got 2 paths" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        add_merges.main([str(vocab_file), str(tmp_path / "out.tiktoken"), str(words), "-o", str(tmp_path / "x")])
    assert "either as the original's three paths or with --vocab and -o" in capsys.readouterr().err


def test_the_example_extra_vocabulary_is_what_add_merges_makes_of_the_example_words(
    tmp_path: Path, vocab_file: Path, tokenizer: QWenTokenizer, capsys
) -> None:
    # examples/qwen_extra.tiktoken is generated, not written by hand: the committed file must be what the script
    # writes from the committed word list today.
    examples = REPO / "examples"
    output = tmp_path / "qwen_extra.tiktoken"
    assert add_merges.main([str(vocab_file), str(output), str(examples / "qwen_extra_vocab.txt")]) == 0
    assert output.read_bytes() == (examples / "qwen_extra.tiktoken").read_bytes()
    assert "'Qwen 7B' can never be one token" in capsys.readouterr().err  # the word the example shows left out

    extended = QWenTokenizer(vocab_file, extra_vocab_file=examples / "qwen_extra.tiktoken")
    words = [word for word in add_merges.read_words(examples / "qwen_extra_vocab.txt") if word != "Qwen 7B"]
    assert " tokenizerish" in words  # the leading space is part of the word
    for word in words:
        assert len(tokenizer.encode(word)) > 1 and len(extended.encode(word)) == 1, word
