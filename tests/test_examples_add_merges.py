"""examples/add_merges.py: new words become single tokens through an extra vocab file the tokenizer really loads."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from support import REPO

from qwen import QWenTokenizer
from qwen.tokenization_qwen import EXTRA_VOCAB_FILE_NAME

sys.path.insert(0, str(REPO / "examples"))

import add_merges  # noqa: E402
from add_merges import MergeError, bpe_pieces, plan_extra_vocab  # noqa: E402

# Words of 2, 3 and 6 BPE pieces, one with the leading space it has inside English text, one in Chinese.
WORDS = ["tokenizerish", " tokenizerish", "QwenLM", "通义千问大模型"]


@pytest.fixture(scope="module")
def extended(tmp_path_factory, vocab_file: Path) -> tuple[QWenTokenizer, Path]:
    folder = tmp_path_factory.mktemp("merges")
    words = folder / "words.txt"
    words.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    extra = folder / EXTRA_VOCAB_FILE_NAME
    assert add_merges.main([str(words), "-o", str(extra), "--vocab", str(vocab_file)]) == 0
    return QWenTokenizer(vocab_file, extra_vocab_file=extra), extra


def test_bpe_pieces_is_tiktokens_bpe(tokenizer: QWenTokenizer) -> None:
    for word in ("tokenizerish", "通义千问大模型", " unbelievable", "Ünïcödé"):
        assert bpe_pieces(tokenizer.mergeable_ranks, word.encode()) == tokenizer.tokenize(word), word


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
    assert QWenTokenizer.from_pretrained(tmp_path / "saved").encode("QwenLM") == new.encode("QwenLM")


def test_conflicts_are_clear_errors(tokenizer: QWenTokenizer) -> None:
    with pytest.raises(MergeError, match=r"'hello' is already a token \(id 14990\)"):
        plan_extra_vocab(tokenizer, ["hello"])
    assert plan_extra_vocab(tokenizer, ["hello"], skip_existing=True) == {}
    special = re.escape("Rank 151700 is already the id of the special token <|extra_54|>")
    with pytest.raises(MergeError, match=special):
        plan_extra_vocab(tokenizer, ["tokenizerish"], start_rank=151700)
    with pytest.raises(MergeError, match="Rank 14990 is already the id of the token b'hello'; choose a start rank "
                                         "above 151850"):
        plan_extra_vocab(tokenizer, ["tokenizerish"], start_rank=14990)
    with pytest.raises(MergeError, match=r"can never be one token: .* splits it into \['hello', ' world'\]"):
        plan_extra_vocab(tokenizer, ["hello world"])
    with pytest.raises(MergeError, match=r"splits it into \['Qwen', '2', '0', '2', '4'\]"):
        plan_extra_vocab(tokenizer, ["Qwen2024"])
    # An explicit free start rank is honoured.
    assert plan_extra_vocab(tokenizer, ["tokenizerish"], start_rank=200_000) == {b"tokenizerish": 200_000}


def test_command_line_reports_errors(tmp_path: Path, vocab_file: Path, capsys) -> None:
    words = tmp_path / "words.txt"
    words.write_text("hello\n", encoding="utf-8")
    output = tmp_path / "out.tiktoken"
    assert add_merges.main([str(words), "-o", str(output), "--vocab", str(vocab_file)]) == 1
    assert "error: 'hello' is already a token (id 14990)" in capsys.readouterr().err
    assert not output.exists()
    assert add_merges.main([str(tmp_path / "missing.txt"), "--vocab", str(vocab_file)]) == 1
    assert "missing.txt" in capsys.readouterr().err


def test_the_original_word_frequency_format_and_command_line(tmp_path: Path, vocab_file: Path) -> None:
    # The original script's input: word<TAB>frequency; its command line: vocabulary, output, words, --start_id.
    words = tmp_path / "words.tsv"
    words.write_text("tokenizerish\t10\nQwenLM\t3\n通义千问大模型\t1\nQwenLM\t8\n", encoding="utf-8")
    assert add_merges.read_words(words) == ["QwenLM", "tokenizerish", "通义千问大模型"]  # 11, 10, 1
    output = tmp_path / "qwen_extra.tiktoken"
    assert add_merges.main([str(vocab_file), str(output), str(words), "--start_id", "151851"]) == 0
    new = QWenTokenizer(vocab_file, extra_vocab_file=output)
    ids = [new.encode(word) for word in ("QwenLM", "tokenizerish", "通义千问大模型")]
    assert all(len(word_ids) == 1 for word_ids in ids), ids
    assert min(new.extra_vocab.values()) == 151851
    assert ids[0][0] < ids[1][0] < ids[2][0]  # the more frequent word has the lower new id
    # Our one-word-per-line lines mix in (each counts once) and keep their leading space.
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(" tokenizerish\nQwenLM\t2\n", encoding="utf-8")
    assert add_merges.read_words(mixed) == ["QwenLM", " tokenizerish"]


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
