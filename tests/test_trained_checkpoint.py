"""Memorizing checkpoints: a real tiny model trained until chat() writes given replies, saved in the released layout."""

from __future__ import annotations

import json
import os

import pytest
import torch

from qwen import QWenLMHeadModel
from qwen.checkpoint import write_random_checkpoint
from trained_checkpoint import (
    DEFAULT_CONFIG_OVERRIDES,
    EXCHANGES,
    RELEASED_METADATA,
    WEATHER,
    MemorizationError,
    chat_turn,
    memorizing_checkpoint_cached,
    write_memorizing_checkpoint,
)

GREEDY = dict(do_sample=False, repetition_penalty=1.0, top_p=None, top_k=None)


@pytest.fixture(scope="module")
def conversations(tokenizer):
    return [chat_turn(tokenizer, query, reply) for query, reply in EXCHANGES]


@pytest.fixture(scope="module")
def memorized_dir(tmp_path_factory, conversations):
    return memorizing_checkpoint_cached(tmp_path_factory.getbasetemp() / "memorized", conversations)


@pytest.fixture(scope="module")
def memorized_model(memorized_dir):
    return QWenLMHeadModel.from_pretrained(memorized_dir).eval()


def test_chat_turn_is_the_chat_prompt_and_the_reply_with_im_end(tokenizer, conversations):
    prompt, reply = conversations[0]
    assert tokenizer.decode(prompt) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{WEATHER[0]}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert reply[-1] == tokenizer.im_end_id == 151645
    assert tokenizer.decode(reply[:-1]) == WEATHER[1]


def test_reloaded_checkpoint_chats_the_memorized_replies(memorized_model, tokenizer):
    for query, reply in EXCHANGES:
        response, history = memorized_model.chat(tokenizer, query, history=None, **GREEDY)
        assert response == reply
        assert history == [(query, reply)]


def test_chat_stream_ends_with_the_memorized_reply(memorized_model, tokenizer):
    *_, last = memorized_model.chat_stream(tokenizer, WEATHER[0], history=None, **GREEDY)
    assert last == WEATHER[1]


def test_default_sampling_settings_give_the_memorized_reply(memorized_model, tokenizer):
    # Every reply token is trained to probability >= 0.99, so top_p=0.8 keeps only it, even after the folder's
    # repetition_penalty=1.1: a server using generation_config.json as it is gets the reply too.
    assert memorized_model.generation_config.do_sample and memorized_model.generation_config.top_p == 0.8
    for seed in range(3):
        torch.manual_seed(seed)
        assert memorized_model.chat(tokenizer, WEATHER[0], history=None)[0] == WEATHER[1]


def test_folder_holds_the_released_layout_with_released_metadata(memorized_dir, tmp_path):
    assert sorted(os.listdir(memorized_dir)) == sorted([*RELEASED_METADATA, "model.safetensors"])
    reference = write_random_checkpoint(
        tmp_path / "reference", size="tiny", config_only=True, **DEFAULT_CONFIG_OVERRIDES
    )
    for name in RELEASED_METADATA:
        assert (memorized_dir / name).read_bytes() == (reference / name).read_bytes(), name
    config = json.loads((memorized_dir / "config.json").read_text())
    assert config["architectures"] == ["QWenLMHeadModel"] and "auto_map" in config


def test_the_reply_comes_from_training(tmp_path, tokenizer):
    # The same checkpoint before training (same size, overrides and seed) writes noise, not the tool call.
    random_dir = write_random_checkpoint(tmp_path / "random", size="tiny", seed=0, **DEFAULT_CONFIG_OVERRIDES)
    random_model = QWenLMHeadModel.from_pretrained(random_dir).eval()
    response, _ = random_model.chat(tokenizer, WEATHER[0], history=None, max_new_tokens=40, **GREEDY)
    assert "Action" not in response


def test_cache_returns_the_same_folder_without_training(memorized_dir, tmp_path_factory, conversations, monkeypatch):
    import trained_checkpoint

    def no_training(*args, **kwargs):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(trained_checkpoint, "write_memorizing_checkpoint", no_training)
    root = tmp_path_factory.getbasetemp() / "memorized"
    assert memorizing_checkpoint_cached(root, conversations) == memorized_dir
    assert memorizing_checkpoint_cached(root, conversations, seed=0, size="tiny") == memorized_dir
    assert not list(root.glob("*.partial"))
    with pytest.raises(AssertionError, match="reused"):
        memorizing_checkpoint_cached(root, conversations, seed=1)


def test_running_out_of_steps_is_a_clear_error(tmp_path, conversations):
    with pytest.raises(MemorizationError, match="not memorized in 3 steps"):
        write_memorizing_checkpoint(tmp_path / "short", conversations, steps=3)


def test_contradictory_conversations_are_refused(tmp_path, tokenizer):
    same_prompt = [chat_turn(tokenizer, "Hi", "Hello."), chat_turn(tokenizer, "Hi", "Bye.")]
    with pytest.raises(ValueError, match="continue the same"):
        write_memorizing_checkpoint(tmp_path / "contradiction", same_prompt)


def test_conversations_longer_than_seq_length_are_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="seq_length"):
        write_memorizing_checkpoint(tmp_path / "long", [chat_turn(tokenizer, "Hi", "word " * 300 + "end")])
