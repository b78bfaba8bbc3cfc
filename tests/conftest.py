"""Shared fixtures: the real released vocabulary and small real checkpoints written to disk by the project's own code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def vocab_file() -> Path:
    """The released qwen.tiktoken, verified; `python -m qwen.vocab fetch` puts it in place (README, .ci/run)."""
    from qwen.vocab import find_vocab

    return find_vocab()


@pytest.fixture(scope="session")
def tokenizer_facts() -> dict:
    return json.loads((FIXTURES / "tokenizer_facts.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def released_dir() -> Path:
    """Config, generation config, tokenizer config and weight index files of released checkpoints, unchanged."""
    return FIXTURES / "released"


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, vocab_file) -> Path:
    """A tiny random-weight Qwen chat checkpoint in the released layout, written by `qwen.checkpoint`."""
    from qwen.checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-chat"), size="tiny", chat=True, seed=0)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, vocab_file) -> Path:
    from qwen.checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-base"), size="tiny", chat=False, seed=1)


@pytest.fixture(scope="session")
def tokenizer(vocab_file):
    from qwen import QWenTokenizer

    return QWenTokenizer(str(vocab_file))


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_chat_dir):
    from qwen import QWenLMHeadModel

    return QWenLMHeadModel.from_pretrained(tiny_chat_dir).eval()
