"""Shared fixtures: the real released vocabulary and small real checkpoints written to disk by the project's own code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def vocab_file() -> Path:
    """The released qwen.tiktoken, verified; fetched on first use (qwen.vocab.find_vocab) if no script has yet."""
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


# A weather tool conversation in Qwen's ReAct format, used by the server tests and the README's function-calling
# example: the README's code must run against a model that really writes these replies.
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
WEATHER_QUESTION = "What is the weather in Paris?"
WEATHER_THOUGHT = "I should look up the weather."
WEATHER_ARGUMENTS = '{"city": "Paris"}'
WEATHER_RESULT = '{"temp_c": 21}'
WEATHER_ANSWER = "It is 21 °C in Paris."
WEATHER_CALL_REPLY = f"Thought: {WEATHER_THOUGHT}\nAction: get_weather\nAction Input: {WEATHER_ARGUMENTS}\nObservation:"
WEATHER_FINAL_REPLY = f" I now know the final answer.\nFinal Answer: {WEATHER_ANSWER}"


def weather_messages(with_result: bool) -> list[dict]:
    messages = [{"role": "user", "content": WEATHER_QUESTION}]
    if with_result:
        call = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": WEATHER_ARGUMENTS}}
        messages += [
            {"role": "assistant", "content": WEATHER_THOUGHT, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "content": WEATHER_RESULT},
        ]
    return messages


@pytest.fixture(scope="session")
def tool_chat_dir(tmp_path_factory, tokenizer, vocab_file) -> Path:
    """A tiny chat checkpoint trained to call get_weather for WEATHER_QUESTION, then answer from the result."""
    from qwen.react import normalize_tools
    from qwen.react import chat_prompt_ids
    from trained_checkpoint import memorizing_checkpoint_cached

    functions = normalize_tools(tools=WEATHER_TOOLS)
    conversations = []
    for with_result, reply in ((False, WEATHER_CALL_REPLY), (True, WEATHER_FINAL_REPLY)):
        prompt_ids = chat_prompt_ids(tokenizer, weather_messages(with_result), functions, 6144)
        reply_ids = tokenizer.encode(reply, allowed_special=set(), disallowed_special=()) + [tokenizer.im_end_id]
        conversations.append((prompt_ids, reply_ids))
    return memorizing_checkpoint_cached(tmp_path_factory.getbasetemp() / "memorized", conversations,
                                       vocab_file=vocab_file, seq_length=512)
