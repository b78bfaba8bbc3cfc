"""examples/function_call_finetune_examples.py: function-calling samples that finetune.py reads and that hold exactly
the prompts the API server builds for the same conversations."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from support import REPO

from qwen import QWenTokenizer
from qwen.react import parse_react_output
from qwen.react import chat_prompt_ids
from qwen.sft import load_samples, tokenize_sample

sys.path.insert(0, str(REPO / "examples"))

import function_call_finetune_examples as examples  # noqa: E402


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("function-call") / "samples.json"
    assert examples.main(["-o", str(path)]) == 0
    return path


def test_finetune_reads_every_sample(written: Path) -> None:
    samples = load_samples(written)  # the reader finetune.py uses; it checks every sample
    assert [sample["id"] for sample in samples] == [f"function_call_{i}" for i in range(len(examples.EXAMPLES))]
    assert samples[1]["system"] == examples.EXAMPLES[1][0]["content"]
    assert all("system" not in sample for index, sample in enumerate(samples) if index != 1)


def test_each_sample_starts_with_the_servers_prompt(written: Path, tokenizer: QWenTokenizer) -> None:
    for sample, messages in zip(load_samples(written), examples.EXAMPLES):
        last_question = max(i for i, message in enumerate(messages) if message["role"] == "user")
        prompt = chat_prompt_ids(tokenizer, messages[:last_question + 1], examples.FUNCTIONS, max_window_size=1 << 20)
        ids = tokenize_sample(tokenizer, sample).input_ids
        assert ids[:len(prompt)] == prompt, sample["id"]
        # What follows is the reply the model learns, closed as a chat turn is.
        reply = sample["conversations"][-1]["value"]
        assert tokenizer.decode(ids[len(prompt):]) == f"{reply}<|im_end|>\n"


def test_the_replies_parse_back_into_the_calls_and_answers(written: Path) -> None:
    for sample, messages in zip(load_samples(written), examples.EXAMPLES):
        reply = sample["conversations"][-1]["value"]
        last_question = max(i for i, message in enumerate(messages) if message["role"] == "user")
        calls = [call for message in messages[last_question:] for call in message.get("tool_calls", [])]
        parsed = parse_react_output(reply)
        if calls:  # the server's parser reads the first call of the round from the text
            assert (parsed.function_name, parsed.arguments) == (calls[0]["function"]["name"],
                                                                calls[0]["function"]["arguments"])
            for call, message in zip(calls, (m for m in messages[last_question:] if m["role"] == "tool")):
                assert f"Action: {call['function']['name']}\nAction Input: {call['function']['arguments']}\n" \
                       f"Observation: {message['content']}" in reply
        assert reply.endswith(f"\nFinal Answer: {messages[-1]['content']}")


def test_an_existing_file_is_kept_unless_overwrite(written: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "mine.json"
    path.write_text("[]", encoding="utf-8")
    assert examples.main(["-o", str(path)]) == 1
    assert capsys.readouterr().err == f"error: {path} exists; pass --overwrite to replace it.\n"
    assert path.read_text(encoding="utf-8") == "[]"
    assert examples.main(["-o", str(path), "--overwrite"]) == 0
    assert json.loads(path.read_text(encoding="utf-8")) == json.loads(written.read_text(encoding="utf-8"))


def test_a_conversation_without_a_final_reply_is_refused() -> None:
    with pytest.raises(ValueError, match="must end with the assistant's reply to a question"):
        examples.training_sample([{"role": "user", "content": "hi"}], examples.FUNCTIONS, "x")
