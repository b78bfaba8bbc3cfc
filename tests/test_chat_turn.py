"""One chat turn, one window policy: the library's `chat_turn`/`messages_turn`, and every front end asking the model
through it."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from transformers import GenerationConfig

from qwen import react
from qwen.chat_turn import (
    ContextFullError,
    SamplingParamError,
    SamplingParams,
    chat_stop_token_ids,
    chat_turn,
    context_length,
    history_window,
    messages_turn,
)
from qwen.engine import GenerationEngine
from qwen.qwen_generation_utils import DEFAULT_SYSTEM_PROMPT, make_context, reply_end_ids

REPO = Path(__file__).resolve().parents[1]
# Long enough that the tiny checkpoint's window (1024-token context, 512-token replies) keeps only the last few.
LONG_HISTORY = [(f"Question {i}: " + "tell me more " * 20, f"Answer {i}: " + "here is more " * 20) for i in range(12)]


def test_the_released_chat_config_keeps_room_for_its_reply(released_dir):
    from qwen import QWenConfig
    from transformers import GenerationConfig

    folder = released_dir / "Qwen-7B-Chat-2023-08"
    config, generation = QWenConfig.from_pretrained(folder), GenerationConfig.from_pretrained(folder)
    assert context_length(config) == 6144  # seq_length 2048, stretched by dynamic NTK to its 6144 positions
    # No max_window_size in this file: chat() kept the default 6144 tokens of history, then asked for 512 more.
    # Here the two fit together.
    assert getattr(generation, "max_window_size", None) is None and generation.max_new_tokens == 512
    assert history_window(None, context_length(config), generation.max_new_tokens) == 5632


def test_the_reply_always_has_room():
    assert history_window(6144, 8192, 512) == 6144
    assert history_window(6144, 2048, 512) == 1536  # the window gives way to the reply
    assert history_window(6144, 1024, 4096) == 512  # a reply asking for the whole context gets half
    assert history_window(None, 100_000, 512) == 6144  # no max_window_size: the released default
    assert history_window(10, 10, 100) == 5
    assert history_window(1, 2, 1) == 1


def test_a_long_history_keeps_its_latest_turns_and_leaves_the_reply_room(tokenizer, tiny_chat_model):
    generation = tiny_chat_model.generation_config
    context = context_length(tiny_chat_model.config)
    turn = chat_turn(tokenizer, "And now?", LONG_HISTORY, DEFAULT_SYSTEM_PROMPT, generation, context)
    window = history_window(generation.max_window_size, context, generation.max_new_tokens)
    assert window < context
    expected = make_context(tokenizer, "And now?", LONG_HISTORY, DEFAULT_SYSTEM_PROMPT, max_window_size=window)
    assert (turn.prompt_text, turn.prompt_ids) == expected
    assert "Answer 11" in turn.prompt_text and "Question 0:" not in turn.prompt_text
    assert len(turn.prompt_ids) + turn.max_new_tokens <= context and turn.max_new_tokens == generation.max_new_tokens
    assert list(turn.stop_token_ids) == reply_end_ids("chatml", tokenizer) == sorted(chat_stop_token_ids(tokenizer),
                                                                                     key=list(turn.stop_token_ids).index)


def test_a_short_conversation_is_the_released_prompt(tokenizer, tiny_chat_model, tokenizer_facts):
    # With nothing to trim, the turn is exactly make_context's released prompt.
    turn = chat_turn(tokenizer, "你好", [], DEFAULT_SYSTEM_PROMPT, tiny_chat_model.generation_config,
                     context_length(tiny_chat_model.config))
    assert turn.prompt_ids == make_context(tokenizer, "你好", [], DEFAULT_SYSTEM_PROMPT)[1]
    assert [list(words) for words in turn.stop_words_ids] == [[tokenizer.im_end_id], [tokenizer.im_start_id]]


class _Seen(Exception):
    pass


def _prompt_fed_by_model_chat(model, tokenizer, history) -> list[int]:
    """The ids `model.chat` feeds for "And now?" after `history`, read at its first forward (which then stops)."""
    def capture(module, args, kwargs):
        raise _Seen(kwargs["input_ids"][0].tolist())

    hook = model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with pytest.raises(_Seen) as seen:
            model.chat(tokenizer, "And now?", history=history)
    finally:
        hook.remove()
    return seen.value.args[0]


@pytest.fixture(scope="module")
def engine(tiny_chat_model, tokenizer):
    engine = GenerationEngine(tiny_chat_model, tokenizer, max_batch_size=1)
    yield engine
    engine.close()


def _script(name: str):
    sys.path.insert(0, str(REPO))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO))


def test_every_front_end_trims_a_long_history_the_same_way(tokenizer, tiny_chat_model, engine):
    generation = tiny_chat_model.generation_config
    expected = chat_turn(tokenizer, "And now?", LONG_HISTORY, DEFAULT_SYSTEM_PROMPT, generation,
                         context_length(tiny_chat_model.config)).prompt_ids
    with torch.no_grad():
        assert _prompt_fed_by_model_chat(tiny_chat_model, tokenizer, LONG_HISTORY) == expected

    cli_demo = _script("cli_demo")
    session = cli_demo.ChatSession(engine, tokenizer, generation)
    session.history = list(LONG_HISTORY)
    assert session.turn("And now?").prompt_ids == expected

    web_demo = _script("web_demo")
    chat = web_demo.WebChat(engine, tokenizer, generation)
    messages = [message for question, answer in LONG_HISTORY
                for message in ({"role": "user", "content": question}, {"role": "assistant", "content": answer})]
    assert chat.turn([*messages, {"role": "user", "content": "And now?"}]).prompt_ids == expected
    # An OpenAI-style conversation without tools (the server's and the examples' entry point) is trimmed the same way;
    # its messages are stripped, as the original server stripped them.
    stripped = [(question.strip(), answer.strip()) for question, answer in LONG_HISTORY]
    assert messages_turn(tokenizer, [*messages, {"role": "user", "content": "And now?"}], None, generation,
                         engine.max_context).prompt_ids == chat_turn(tokenizer, "And now?", stripped,
                                                                     DEFAULT_SYSTEM_PROMPT, generation,
                                                                     engine.max_context).prompt_ids


def test_a_long_question_narrows_the_window_so_the_reply_still_fits(tokenizer, tiny_chat_model):
    generation = tiny_chat_model.generation_config
    context = context_length(tiny_chat_model.config)
    question = "Please answer this at length: " + "why " * 150
    turn = chat_turn(tokenizer, question, LONG_HISTORY, DEFAULT_SYSTEM_PROMPT, generation, context,
                     max_new_tokens=300)
    plain = make_context(tokenizer, question, LONG_HISTORY, DEFAULT_SYSTEM_PROMPT,
                         max_window_size=history_window(generation.max_window_size, context, 300))[1]
    assert len(plain) + 300 > context  # the window alone counts no question: the reply would not fit
    assert len(turn.prompt_ids) + 300 <= context and turn.max_new_tokens == 300
    assert "Answer 11" in turn.prompt_text  # only the oldest turns went
    # A question longer than the whole context is left for the engine to refuse; no history is trimmed for nothing.
    huge = chat_turn(tokenizer, "why " * 2000, LONG_HISTORY[:1], DEFAULT_SYSTEM_PROMPT, generation, context)
    assert huge.max_new_tokens == 0 and "Question 0" in huge.prompt_text


def test_the_turn_gives_the_replys_sampling_parameters(tokenizer, tiny_chat_model):
    generation = tiny_chat_model.generation_config  # the released chat settings: top_p 0.8, repetition_penalty 1.1
    context = context_length(tiny_chat_model.config)
    turn = chat_turn(tokenizer, "你好", [], DEFAULT_SYSTEM_PROMPT, generation, context, max_new_tokens=40,
                     stop_strings=["</answer>"])
    params = turn.sampling_params(seed=7, temperature=None)  # None leaves the checkpoint's value
    assert params == SamplingParams(
        max_new_tokens=40, do_sample=True, temperature=1.0, top_p=0.8, top_k=0,
        repetition_penalty=1.1, seed=7, stop_token_ids=chat_stop_token_ids(tokenizer), stop_strings=("</answer>",))
    assert turn.sampling_params(temperature=0.3, top_k=5).temperature == 0.3
    with pytest.raises(SamplingParamError, match="top_p"):
        turn.sampling_params(top_p=0)
    # Without max_new_tokens the generation config's budget applies, cut to what the context has left.
    long_question = "word " * (context - 100)
    cut = chat_turn(tokenizer, long_question, [], DEFAULT_SYSTEM_PROMPT, generation, context)
    assert 0 < cut.max_new_tokens == context - len(cut.prompt_ids) < generation.max_new_tokens
    assert cut.sampling_params().max_new_tokens == cut.max_new_tokens
    full = chat_turn(tokenizer, "word " * context, [], DEFAULT_SYSTEM_PROMPT, generation, context)
    with pytest.raises(ContextFullError, match=f"this model's context holds {context}: no room"):
        full.sampling_params()


WEATHER = [{"name": "get_weather", "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def test_a_turn_with_tools_stops_where_the_tools_result_goes_and_parses_the_call(tokenizer, tiny_chat_model):
    generation = tiny_chat_model.generation_config
    context = context_length(tiny_chat_model.config)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    turn = messages_turn(tokenizer, messages, WEATHER, generation, context, stop_strings=["STOP"])
    assert turn.uses_tools
    assert turn.prompt_ids == react.chat_prompt_ids(tokenizer, messages, WEATHER, generation.max_window_size)
    assert turn.prompt_text == react.chat_prompt(tokenizer, messages, WEATHER, generation.max_window_size)[0]
    assert "get_weather" in turn.prompt_text and turn.prompt_text.endswith("<|im_start|>assistant\n")
    assert turn.sampling_params().stop_strings == ("STOP", *react.STOP_WORDS)
    parsers = [turn.reply_parser(), turn.reply_parser()]
    assert parsers[0] is not parsers[1]  # one per reply: a parser holds its reply's text
    events = parsers[0].feed('Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}')
    events += parsers[0].finish()
    assert [(event.kind, event.name, event.arguments) for event in events if event.kind == "tool_call"] == [
        ("tool_call", "get_weather", '{"city": "Paris"}')]
    plain = messages_turn(tokenizer, messages, None, generation, context)
    assert not plain.uses_tools and plain.reply_parser() is None and plain.sampling_params().stop_strings == ()
    # After the tool's result the model continues its own turn, which the prompt leaves open.
    answered = messages + [
        {"role": "assistant", "content": "I need the weather.", "function_call": {"name": "get_weather",
                                                                                  "arguments": '{"city": "Paris"}'}},
        {"role": "function", "name": "get_weather", "content": "21 C"}]
    follow_up = messages_turn(tokenizer, answered, WEATHER, generation, context)
    assert follow_up.prompt_text.endswith("Observation: 21 C\nThought:")
    assert follow_up.prompt_ids == react.chat_prompt_ids(tokenizer, answered, WEATHER, generation.max_window_size)
    with pytest.raises(ValueError, match="no user message"):
        messages_turn(tokenizer, [{"role": "assistant", "content": "hi"}], None, generation, context)


def test_a_raw_config_turn_is_the_bare_query(tokenizer):
    base = GenerationConfig(chat_format="raw", max_new_tokens=16)
    turn = chat_turn(tokenizer, "The capital of France is", [], "", base, 2048)
    assert turn.prompt_ids == tokenizer.encode("The capital of France is")
    assert turn.stop_token_ids == (tokenizer.eod_id,) and turn.max_new_tokens == 16
