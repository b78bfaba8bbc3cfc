"""ReAct function calling: prompts identical to the original openai_api.py; replies parsed back, whole or streamed."""

from __future__ import annotations

import random
import re

import pytest

from qwen.react import (
    STOP_WORDS,
    ParsedReply,
    ReActStreamParser,
    build_react_conversation,
    continuation_parts,
    new_tool_call_id,
    normalize_tools,
    parse_react_output,
    stop_words,
)

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}},
                   "required": ["city"]},
}
CALCULATOR = {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
}
FUNCTIONS = [WEATHER, CALCULATOR]
TOOLS = [{"type": "function", "function": spec} for spec in FUNCTIONS]

# The original's REACT_INSTRUCTION filled in by hand for FUNCTIONS: descriptions from TOOL_DESC joined by a blank
# line, parameters as json.dumps(..., ensure_ascii=False) (so 城市名 stays as it is), names joined by ", ".
INSTRUCTION = (
    "Answer the following questions as best you can. You have access to the following APIs:\n"
    "\n"
    "get_weather: Call this tool to interact with the get_weather API. What is the get_weather API useful for? "
    "Get the current weather in a city. Parameters: "
    '{"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}}, "required": ["city"]}\n'
    "\n"
    "calculator: Call this tool to interact with the calculator API. What is the calculator API useful for? "
    'Evaluate an arithmetic expression. Parameters: {"type": "object", "properties": {"expression": {"type": '
    '"string"}}}\n'
    "\n"
    "Use the following format:\n"
    "\n"
    "Question: the input question you must answer\n"
    "Thought: you should always think about what to do\n"
    "Action: the action to take, should be one of [get_weather, calculator]\n"
    "Action Input: the input to the action\n"
    "Observation: the result of the action\n"
    "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
    "Thought: I now know the final answer\n"
    "Final Answer: the final answer to the original input question\n"
    "\n"
    "Begin!"
)
DEFAULT_SYSTEM = "You are a helpful assistant."


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **fields):
    return {"role": "assistant", "content": text, **fields}


def tool_call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# --------------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------------


def test_first_question_gets_the_exact_react_instruction():
    system, history, query = build_react_conversation([user("What's the weather in 北京?")], FUNCTIONS)
    assert system == DEFAULT_SYSTEM
    assert history == []
    assert query == INSTRUCTION + "\n\nQuestion: What's the weather in 北京?"


def test_qwen_specific_names_and_descriptions_are_used_as_the_original_did():
    spec = {"name": "search", "name_for_model": "web_search", "name_for_human": "Web Search",
            "description": "unused", "description_for_model": "Search the web.", "parameters": []}
    _, _, query = build_react_conversation([user("hi")], [spec])
    assert ("web_search: Call this tool to interact with the Web Search API. What is the Web Search API useful for? "
            "Search the web. Parameters: []\n\nUse the following format:") in query
    assert "should be one of [web_search]\n" in query


def test_function_without_parameters_is_described_with_empty_parameters():
    _, _, query = build_react_conversation([user("hi")], [{"name": "now"}])
    assert "What is the now API useful for?  Parameters: {}\n" in query


def test_legacy_functions_and_tools_give_the_same_prompt():
    messages = [{"role": "system", "content": "Be brief."}, user("Weather in Paris?")]
    legacy = build_react_conversation(messages, normalize_tools(functions=FUNCTIONS))
    current = build_react_conversation(messages, normalize_tools(tools=TOOLS))
    assert legacy == current == ("Be brief.", [], INSTRUCTION + "\n\nQuestion: Weather in Paris?")


def test_without_functions_the_conversation_is_plain_chat():
    messages = [{"role": "system", "content": "\nBe kind. \n"}, user("Hi"), assistant("Hello!"), user("\n\nBye  ")]
    assert build_react_conversation(messages, None) == ("Be kind.", [("Hi", "Hello!")], "Bye")
    assert build_react_conversation([user("Hi")], []) == (DEFAULT_SYSTEM, [], "Hi")


def test_list_content_text_parts_join_with_newlines():
    content = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    assert build_react_conversation([user(content)], None) == (DEFAULT_SYSTEM, [], "first\nsecond")


def test_consecutive_user_messages_become_one_question():
    assert build_react_conversation([user("one"), user("two")], None) == (DEFAULT_SYSTEM, [], "one\n\ntwo")


def test_consecutive_assistant_messages_join_with_a_newline():
    messages = [user("q"), assistant("a"), assistant("b"), user("r")]
    assert build_react_conversation(messages, None) == (DEFAULT_SYSTEM, [("q", "a\nb")], "r")


# --------------------------------------------------------------------------------------------------------------------
# Function results fed back
# --------------------------------------------------------------------------------------------------------------------

CALL_TURN = ('Thought: I need the weather in Paris.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
             "Observation: 18°C, cloudy\nThought:")


def test_tool_result_continues_the_assistant_turn():
    messages = [
        user("Weather in Paris?"),
        assistant("I need the weather in Paris.", tool_calls=[tool_call("call_1", "get_weather", '{"city": "Paris"}')]),
        {"role": "tool", "tool_call_id": "call_1", "content": "18°C, cloudy"},
    ]
    system, history, query = build_react_conversation(messages, FUNCTIONS)
    assert system == DEFAULT_SYSTEM
    assert history == [(INSTRUCTION + "\n\nQuestion: Weather in Paris?", CALL_TURN)]
    assert query is None


def test_legacy_function_result_gives_the_same_conversation():
    messages = [
        user("Weather in Paris?"),
        assistant("Thought: I need the weather in Paris.",
                  function_call={"name": "get_weather", "arguments": '{"city": "Paris"}'}),
        {"role": "function", "name": "get_weather", "content": "18°C, cloudy\n"},
    ]
    assert build_react_conversation(messages, FUNCTIONS) == (
        DEFAULT_SYSTEM, [(INSTRUCTION + "\n\nQuestion: Weather in Paris?", CALL_TURN)], None)


def test_continuation_prompt_is_the_originals_text_completion_prompt(tokenizer):
    from qwen.qwen_generation_utils import make_context

    messages = [user("Weather?"), assistant(None, function_call={"name": "get_weather", "arguments": "{}"}),
                {"role": "function", "content": "sunny"}]
    system, history, query = build_react_conversation(messages, None)
    assert query is None
    earlier, question, partial = continuation_parts(history)
    text, ids = make_context(tokenizer, question, earlier, system)
    # The original: ChatML of system and history, the last <|im_end|> left out.
    assert text + partial == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                              "<|im_start|>user\nWeather?<|im_end|>\n"
                              "<|im_start|>assistant\nThought: \nAction: get_weather\nAction Input: {}\n"
                              "Observation: sunny\nThought:")
    assert tokenizer.decode(ids) == text


def test_instruction_moves_to_the_last_answered_question_as_in_the_original():
    messages = [
        user("Weather in Paris?"),
        assistant(None, tool_calls=[tool_call("a", "get_weather", '{"city": "Paris"}')]),
        {"role": "tool", "tool_call_id": "a", "content": "18°C"},
        assistant("It is 18°C in Paris."),
        user("And 2+2?"),
    ]
    system, history, query = build_react_conversation(messages, FUNCTIONS)
    assert history == [(
        INSTRUCTION + "\n\nQuestion: Weather in Paris?",
        'Thought: \nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: 18°C\n'
        "Thought: I now know the final answer.\nFinal Answer: It is 18°C in Paris.",
    )]
    assert query == "And 2+2?"


def test_earlier_answers_become_final_answers_and_only_the_last_question_gets_the_instruction():
    messages = [user("q1"), assistant("a1"), user("q2"), assistant("a2"), user("q3")]
    _, history, query = build_react_conversation(messages, FUNCTIONS)
    final = "Thought: I now know the final answer.\nFinal Answer: "
    assert history == [("q1", final + "a1"), (INSTRUCTION + "\n\nQuestion: q2", final + "a2")]
    assert query == "q3"


def test_parallel_tool_calls_become_consecutive_steps_with_results_in_call_order():
    messages = [
        user("Weather in Paris and Rome?"),
        assistant("Two cities.", tool_calls=[tool_call("p", "get_weather", '{"city": "Paris"}'),
                                             tool_call("r", "get_weather", '{"city": "Rome"}')]),
        {"role": "tool", "tool_call_id": "r", "content": "25°C"},
        {"role": "tool", "tool_call_id": "p", "content": "18°C"},
    ]
    _, history, query = build_react_conversation(messages, FUNCTIONS)
    assert history[0][1] == ('Thought: Two cities.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
                             "Observation: 18°C\n"
                             'Thought: \nAction: get_weather\nAction Input: {"city": "Rome"}\n'
                             "Observation: 25°C\nThought:")
    assert query is None


def test_tool_results_followed_by_a_new_question_have_no_trailing_thought():
    messages = [
        user("Weather?"),
        assistant(None, tool_calls=[tool_call("a", "get_weather", {"city": "Paris"})]),  # decoded arguments
        {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "18°C"}]},
        user("Thanks. 2+2?"),
    ]
    _, history, query = build_react_conversation(messages, FUNCTIONS)
    assert history[0][1] == 'Thought: \nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: 18°C'
    assert query == "Thanks. 2+2?"


def test_conversation_ending_with_an_assistant_message_continues_it():
    system, history, query = build_react_conversation([user("Write a poem"), assistant("Roses are")], None)
    assert (history, query) == ([("Write a poem", "Roses are")], None)
    assert continuation_parts(history) == ([], "Write a poem", "Roses are")


# --------------------------------------------------------------------------------------------------------------------
# Tool choice
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", [None, "auto", "required"])
def test_auto_and_required_offer_every_tool(choice):
    assert normalize_tools(tools=TOOLS, tool_choice=choice) == FUNCTIONS


@pytest.mark.parametrize("choice", [None, "auto"])
def test_legacy_auto_offers_every_function(choice):
    assert normalize_tools(functions=FUNCTIONS, function_call=choice) == FUNCTIONS


def test_none_offers_nothing():
    assert normalize_tools(tools=TOOLS, tool_choice="none") is None
    assert normalize_tools(functions=FUNCTIONS, function_call="none") is None
    assert normalize_tools() is None
    assert normalize_tools(tools=[]) is None
    assert normalize_tools(tool_choice="auto") is None


def test_a_named_choice_keeps_only_that_function():
    named = {"type": "function", "function": {"name": "calculator"}}
    assert normalize_tools(tools=TOOLS, tool_choice=named) == [CALCULATOR]
    assert normalize_tools(functions=FUNCTIONS, function_call={"name": "calculator"}) == [CALCULATOR]
    _, _, query = build_react_conversation([user("2+2?")], normalize_tools(tools=TOOLS, tool_choice=named))
    assert "should be one of [calculator]\n" in query and "get_weather" not in query


def test_normalize_tools_does_not_change_its_input():
    tools = [{"type": "function", "function": dict(WEATHER)}]
    specs = normalize_tools(tools=tools)
    specs[0]["name"] = "changed"
    assert tools[0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("kwargs, message", [
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "'nope'"),
    (dict(functions=FUNCTIONS, function_call={"name": "nope"}), "'nope'"),
    (dict(functions=FUNCTIONS, tools=TOOLS), "not both"),
    (dict(functions=FUNCTIONS, tool_choice="auto"), "not both"),
    (dict(tools=TOOLS, function_call="auto"), "not both"),
    (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice must be one of"),
    (dict(functions=FUNCTIONS, function_call="required"), "function_call must be one of"),
    (dict(tools=TOOLS, tool_choice={"name": "calculator"}), "tool_choice must be a string or"),
    (dict(functions=FUNCTIONS, function_call={"function": {"name": "x"}}), "function_call must be a string or"),
    (dict(tool_choice="required"), "needs functions or tools"),
    (dict(tools=[{"type": "retrieval"}]), r"tools\[0\] must look like"),
    (dict(tools=[WEATHER]), r"tools\[0\] must look like"),
    (dict(tools=[{"type": "function", "function": {"description": "x"}}]), r"tools\[0\]\.function needs"),
    (dict(functions=["get_weather"]), r"functions\[0\] must be an object"),
    (dict(functions=[{"name": ""}]), r"functions\[0\] needs a non-empty string 'name'"),
    (dict(functions=[{"name": "f", "parameters": "x"}]), r"functions\[0\]\.parameters must be"),
    (dict(functions=[{"name": "f", "description": 3}]), r"functions\[0\]\.description must be"),
    (dict(functions=[WEATHER, WEATHER]), "repeated: get_weather"),
])
def test_normalize_tools_rejects_bad_requests(kwargs, message):
    with pytest.raises(ValueError, match=message):
        normalize_tools(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Bad conversations
# --------------------------------------------------------------------------------------------------------------------

CALL = assistant(None, tool_calls=[tool_call("a", "get_weather", "{}")])


@pytest.mark.parametrize("messages, message", [
    ([], "messages is empty"),
    ([{"role": "system", "content": "s"}], "no user message"),
    ([user("q"), {"role": "developer", "content": "x"}], r"messages\[1\] has unknown role 'developer'"),
    (["hello"], r"messages\[0\] must be an object"),
    ([user("q"), {"role": "system", "content": "s"}], r"messages\[1\] is a system message"),
    ([assistant("a"), user("q")], r"messages\[0\] is an assistant message before any user"),
    ([{"role": "system", "content": "s"}, assistant("a"), user("q")], r"messages\[1\] is an assistant message"),
    ([user("q"), {"role": "tool", "tool_call_id": "a", "content": "r"}], r"messages\[1\] is a tool result without"),
    ([{"role": "function", "content": "r"}, user("q")], r"messages\[0\] is a function result without"),
    ([user("q"), assistant("a"), {"role": "function", "content": "r"}], r"messages\[2\] is a function result with"),
    ([user("q"), CALL, user("r"), {"role": "tool", "tool_call_id": "a", "content": "x"}],
     r"messages\[1\] calls tool 'a', but no tool message"),
    ([user("q"), CALL, {"role": "tool", "tool_call_id": "b", "content": "r"}],
     r"messages\[2\] answers tool_call_id 'b'"),
    ([user("q"), CALL, {"role": "tool", "content": "r"}], r"messages\[2\] answers tool_call_id None"),
    ([user("q"), CALL, {"role": "tool", "tool_call_id": "a", "content": "r"},
      {"role": "tool", "tool_call_id": "a", "content": "r"}], r"messages\[3\] is a second result"),
    ([user("q"), CALL, {"role": "tool", "tool_call_id": "a", "content": "r"}, {"role": "function", "content": "r"}],
     r"messages\[3\] is a function result, but every call"),
    ([user("q"), CALL], r"messages\[1\] calls tool 'a', but no tool message"),
    ([user(42)], r"messages\[0\]\.content must be a string"),
    ([user({"text": "hi"})], r"messages\[0\]\.content must be a string"),
    ([user([{"type": "image_url", "image_url": {"url": "x"}}])],
     r"messages\[0\] has a content part of type 'image_url'"),
    ([user(["hi"])], r"messages\[0\] has a content part of type 'str'"),
    ([user("q"), assistant(None, function_call={"name": "f", "arguments": "{}"},
                           tool_calls=[tool_call("a", "f", "{}")])], r"messages\[1\] has both"),
    ([user("q"), assistant(None, function_call={"arguments": "{}"})], r"messages\[1\]\.function_call must be"),
    ([user("q"), assistant(None, function_call={"name": "f", "arguments": 3})],
     r"messages\[1\]\.function_call\.arguments must be"),
    ([user("q"), assistant(None, tool_calls=[{"type": "function", "function": {"name": "f"}}])],
     r"messages\[1\]\.tool_calls\[0\] must be"),
    ([user("q"), assistant(None, tool_calls=[tool_call("a", "f", "{}"), tool_call("a", "g", "{}")])],
     r"messages\[1\]\.tool_calls\[1\] repeats the id 'a'"),
])
def test_bad_conversations_are_rejected_with_the_offending_index(messages, message):
    with pytest.raises(ValueError, match=message):
        build_react_conversation(messages, FUNCTIONS)


def test_a_legacy_call_without_its_result_is_accepted_as_in_the_original():
    messages = [user("q"), assistant("t", function_call={"name": "f", "arguments": "{}"}), user("never mind")]
    _, history, query = build_react_conversation(messages, None)
    assert history == [("q", "Thought: t\nAction: f\nAction Input: {}")] and query == "never mind"


# --------------------------------------------------------------------------------------------------------------------
# Parsing replies
# --------------------------------------------------------------------------------------------------------------------


def call(content, name, arguments):
    return ParsedReply(content, name, arguments, "function_call")


@pytest.mark.parametrize("text, expected", [
    # The trained format, cut at the stop word "Observation:" ...
    ('Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\n',
     call("I need the weather.", "get_weather", '{"city": "Paris"}')),
    # ... or with the Observation marker still there, and text after it.
    ('Thought: x\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: made up\nThought: y',
     call("x", "get_weather", '{"city": "Paris"}')),
    # Continuing after "\nThought:": no "Thought: " prefix to remove.
    (" The call failed, try again.\nAction: f\nAction Input: {}", call("The call failed, try again.", "f", "{}")),
    ("Thought: \nAction: f\nAction Input: {}", call(None, "f", "{}")),
    # Weird spacing: names and arguments are trimmed; no space after the colon is fine.
    ("Thought:  spaced  \nAction:get_weather   \nAction Input:   {}  \n\n", call("spaced", "get_weather", "{}")),
    ("Thought: multi\nline\nAction: f\nAction Input: {\n  \"a\": 1\n}", call("multi\nline", "f", '{\n  "a": 1\n}')),
    # Text before "Thought: " is dropped, as the original did.
    ("Sure. Thought: call it\nAction: f\nAction Input: {}", call("call it", "f", "{}")),
    # A reply that starts with the action (the original needed a newline before "Action:").
    ("Action: f\nAction Input: {}", call(None, "f", "{}")),
    # Final answers: the content is what follows the marker, untrimmed.
    ("Thought: I now know the final answer.\nFinal Answer: It is 18°C.", ParsedReply("It is 18°C.")),
    (" I now know the final answer.\nFinal Answer: Two lines\nof answer\n", ParsedReply("Two lines\nof answer\n")),
    ("Final Answer: 4", ParsedReply("4")),
    # Markers inside a final answer are text.
    ("Thought: done\nFinal Answer: use\nAction: x\nAction Input: y", ParsedReply("use\nAction: x\nAction Input: y")),
    ("Thought: done\nFinal Answer: a\nFinal Answer: b", ParsedReply("a\nFinal Answer: b")),
    # No call: a missing name or a missing Action Input; "Final Answer:" needs its space, as in the original.
    ("Thought: x\nAction: \nAction Input: {}", ParsedReply("Thought: x\nAction: \nAction Input: {}")),
    ("Thought: x\nAction: f", ParsedReply("Thought: x\nAction: f")),
    ("Thought: x\nAction: f\nFinal Answer: y", ParsedReply("y")),
    ("Thought: x\nFinal Answer:y", ParsedReply("Thought: x\nFinal Answer:y")),
    # Plain text is the content as it stands.
    ("Hello! How can I help?  ", ParsedReply("Hello! How can I help?  ")),
    ("", ParsedReply("")),
])
def test_parse_react_output(text, expected):
    assert parse_react_output(text) == expected


# --------------------------------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------------------------------

STREAM_TEXTS = [
    'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "北京"}\n',
    "Thought: x\nAction: f\nAction Input: {}\nObservation: y\nFinal Answer: z",
    " The call failed, try again.\nAction: f\nAction Input: {}",
    "Thought: I now know the final answer.\nFinal Answer: It is 18°C.\nNice day.",
    "Thought: done\nFinal Answer: use\nAction: x\nAction Input: y\nFinal Answer: q",
    "Final Answer: 4",
    "Action: f\nAction Input: {}",
    "Thought: x\nAction: \nAction Input: {}\nFinal Answer: y",
    "Thought: x\nAction: f\nFinal Answer: y",
    "Thought: x\nFinal Answer:y",
    "Thought: partial marker at the end\nFinal Answ",
    "Thought: partial\nAction",
    "Hello!\nHow can I help?",
    "\n\nFinal Answer: \n",
    "",
]


def run_stream(pieces):
    """Feed pieces; check each step only sends final content; return (content, tool calls)."""
    parser = ReActStreamParser()
    final = parse_react_output("".join(pieces))
    sent, calls = "", []
    for piece in pieces:
        for event in parser.feed(piece):
            assert event.kind == "content" and event.text
            sent += event.text
            assert (final.content or "").startswith(sent), "sent text that is not part of the final content"
    for event in parser.finish():
        if event.kind == "content":
            sent += event.text
        else:
            calls.append((event.name, event.arguments))
    assert parser.called == bool(calls)
    return sent, calls


def splits(text, rng):
    yield [text]
    for cut in range(len(text) + 1):
        yield [text[:cut], text[cut:]]
    for size in (1, 2, 3):
        for offset in range(size):
            yield [text[:offset]] + [text[i:i + size] for i in range(offset, len(text), size)]
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8))))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_parser_matches_parse_for_every_split(text):
    expected = parse_react_output(text)
    expected_calls = [(expected.function_name, expected.arguments)] if expected.function_name else []
    for pieces in splits(text, random.Random(text)):
        assert run_stream(pieces) == (expected.content or "", expected_calls), pieces


def test_stream_shows_a_final_answer_while_it_is_written():
    parser = ReActStreamParser()
    assert parser.feed("Thought: I now know the final answer.\nFinal Ans") == []
    assert [e.text for e in parser.feed("wer: It is")] == ["It is"]
    assert [e.text for e in parser.feed(" 18°C.")] == [" 18°C."]
    assert parser.finish() == [] and not parser.called


def test_stream_sends_the_thought_once_the_call_is_certain_and_the_call_at_the_end():
    parser = ReActStreamParser()
    assert parser.feed("Thought: I need the weather.\nAction: get_weather\nAction") == []
    assert [e.text for e in parser.feed(" Input: {")] == ["I need the weather."]
    assert parser.feed('"city": "Paris"}') == []
    [event] = parser.finish()
    assert (event.kind, event.name, event.arguments) == ("tool_call", "get_weather", '{"city": "Paris"}')
    assert parser.called
    with pytest.raises(RuntimeError):
        parser.feed("more")


# --------------------------------------------------------------------------------------------------------------------
# Stop words and ids
# --------------------------------------------------------------------------------------------------------------------


def test_stop_words_only_with_functions():
    assert STOP_WORDS == ["Observation:", "Observation:\n"]
    assert stop_words(FUNCTIONS) == STOP_WORDS
    assert stop_words(None) == [] and stop_words([]) == []
    stop_words(FUNCTIONS).append("changed")
    assert STOP_WORDS == ["Observation:", "Observation:\n"]


def test_tool_call_ids_are_random_call_hex():
    ids = {new_tool_call_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", call_id) for call_id in ids)
