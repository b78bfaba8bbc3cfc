"""Answer extraction and tool-use metrics of eval/ on known model outputs, with hand-computed expected values."""

from __future__ import annotations

import sys
from decimal import Decimal
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

from evalkit.scoring import (  # noqa: E402
    CHAT_GSM8K_TOLERANCE,
    COMPLETION_STOPS,
    chat_code_completion,
    extract_choice,
    extract_choice_chinese,
    extract_math_answer,
    format_number,
    normalize_action_input,
    numbers_match,
    parse_reference_answer,
    rouge_l,
    rouge_tokens,
    score_tool_call,
    summarize_tool_use,
    tool_call_of,
    truncate_at_stops,
)

OPTIONS = ("London", "Paris", "Rome", "Berlin")


# --------------------------------------------------------------------------------------------------------------------
# Letters
# --------------------------------------------------------------------------------------------------------------------


# Expected letters are those of the original chat scripts' extraction (checked by running it, outside this
# repository, on each reply; the two agree on 47,000 generated replies too), wrong answers included: "not A" still
# reads as A there.
@pytest.mark.parametrize("reply, letter, rule", [
    ("The answer is B.", "B", "statement"),
    ("Answer: (C)", "C", "statement"),
    ("Let me choose D.", "D", "statement"),
    ("Option C is correct.", "C", "is correct"),
    ("Option A is wrong. C is the right one.", "C", "is correct"),
    ("B", "B", "leading letter"),
    ("D. Berlin is the capital of Germany.", "D", "leading letter"),
    ("(D) Berlin", "D", "standalone letter"),
    ("I think the correct option is A because the others are wrong.", "A", "standalone letter"),
    # Quoted option text becomes its letter before any rule: "Paris" is B here.
    ("The capital of France is Paris.", "B", "standalone letter"),
    ("I think it's Rome, not Paris.", "C", "standalone letter"),
    # A negated statement is no statement; the first letter is read.
    ("The answer is not A; it is C", "A", "standalone letter"),
    ("The answer isn't A. I'd pick C.", "A", "standalone letter"),
    ("Prais", "B", "most similar option"),
])
def test_chat_reply_letter(reply, letter, rule):
    assert extract_choice(reply, OPTIONS) == (letter, rule)


def test_quoted_option_text_is_replaced_longest_first():
    # "New York" contains "York": the longer option is replaced first, so its letter is the one read.
    assert extract_choice("It is in new york, clearly.", ("York", "New York", "Boston", "Albany")) == (
        "B", "standalone letter")


CEVAL_QUESTION = "关于传输层的面向连接服务的特性是____。"
CEVAL_OPTIONS = ("既不保证可靠，也不保证按序交付", "不保证可靠，但保证按序交付", "保证可靠，但不保证按序交付", "既保证可靠，也保证按序交付")


@pytest.mark.parametrize("reply, letter, rule", [
    ("答案是C", "C", "statement"),
    ("答案：D。因为……", "D", "statement"),
    ("选B", "B", "statement"),
    ("我选C", "C", "statement"),
    ("选项A不正确，答案为C", "C", "statement"),
    # The question's words before the blank become "答案是", the option's text its letter.
    ("关于传输层的面向连接服务的特性是既保证可靠，也保证按序交付", "D", "statement"),
    ("A选项正确", "A", "is correct"),
    ("（B）", "B", "leading letter"),
    ("既不保证可靠，也不保证按序交付", "A", "leading letter"),
    ("答案不是A，而是C", "A", "standalone letter"),
    ("面向连接服务保证可靠", "A", "most similar option"),
])
def test_chinese_chat_reply_letter(reply, letter, rule):
    assert extract_choice_chinese(reply, CEVAL_QUESTION, CEVAL_OPTIONS) == (letter, rule)


# --------------------------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("The answer is $1,234.", "1234"),
    ("It costs 18 dollars.", "18"),
    ("She works 3 hours a day, 7.5 hours in total", "7.5"),
    ("so 5-3 = 2 apples", "2"),  # a subtraction, not -3
    ("The temperature fell to -5 degrees", "-5"),
    ("There are 1,000,000 grains", "1000000"),
    ("The answer is 42. Then 7 more are added for fun.", "7"),  # the last number, as the original read it
    ("He makes 20*40=$800 per week\nSo he makes 400*52=$20,800 per year more\nThe answer is 20800", "20800"),
    ("The answer is: 0.50", "0.5"),
    ("答案是 12 个", "12"),
    ("#### 72", "72"),
    ("No number here.", None),
    ("The answer is unknown, but 3 and 4 are candidates", "4"),
])
def test_math_answer(text, expected):
    assert format_number(extract_math_answer(text)) == expected


def test_answers_compare_as_numbers_not_strings():
    assert extract_math_answer("The answer is 18.00.") == parse_reference_answer("Total: 18\n#### 18")
    assert parse_reference_answer("1,000 + 200 = 1,200\n#### 1,200") == Decimal(1200)
    assert parse_reference_answer("no marker") is None


def test_chat_answers_may_differ_by_a_ten_thousandth_as_in_the_original():
    reference = parse_reference_answer("#### 18")
    assert numbers_match(Decimal("18.0001"), reference, CHAT_GSM8K_TOLERANCE)
    assert not numbers_match(Decimal("18.00011"), reference, CHAT_GSM8K_TOLERANCE)
    assert not numbers_match(Decimal("18.0001"), reference)  # base: the very number
    assert not numbers_match(None, reference, CHAT_GSM8K_TOLERANCE)
    # Exact for any length: a 5,000-digit difference of one is seen.
    big = Decimal("9" * 5000)
    assert not numbers_match(big, Decimal("9" * 4999 + "8"), CHAT_GSM8K_TOLERANCE)
    assert numbers_match(big, Decimal("9" * 5000), CHAT_GSM8K_TOLERANCE)


def test_numbers_of_any_length_are_read_compared_and_written_exactly():
    # 5,000 digits: past Python's 4,300-digit limit for int <-> str, and far past Decimal's 28-digit context, which
    # rounds any arithmetic (-x, normalize) and would make two different long answers compare equal.
    digits = "9" * 4999 + "8"
    reference = parse_reference_answer(f"Multiply it out.\n#### -{digits}")
    assert format_number(reference) == f"-{digits}"
    assert extract_math_answer(f"The answer is -{digits}.") == reference
    assert extract_math_answer(f"The answer is -{'9' * 5000}.") != reference  # differs in the last digit only
    long_fraction = extract_math_answer(f"The answer is {digits}.2500 apples")
    assert format_number(long_fraction) == f"{digits}.25"
    grouped = ",".join(["123"] * 1700)  # 5,100 digits written with thousands separators
    assert format_number(extract_math_answer(f"#### {grouped}")) == "123" * 1700
    assert [format_number(extract_math_answer(t)) for t in ("The answer is -0", "The answer is 0.000")] == ["0", "0"]


def test_math_text_is_never_evaluated():
    # eval("2**10") would give 1024; the text is only read: its numbers are 2 and 10, and the last is the answer.
    assert extract_math_answer("The answer is 2**10") == Decimal(10)
    assert extract_math_answer("The answer is __import__('os').getcwd()") is None


# --------------------------------------------------------------------------------------------------------------------
# Code
# --------------------------------------------------------------------------------------------------------------------


def test_base_completion_ends_where_the_published_runs_cut_it():
    text = "    return a + b\n\n\ndef other():\n    pass"
    assert truncate_at_stops(text, COMPLETION_STOPS["qwen"]) == "    return a + b"
    qwen, codex = COMPLETION_STOPS["qwen"], COMPLETION_STOPS["codex"]
    assert truncate_at_stops("    x = 1\n    return x\ndef g(): pass", qwen) == "    x = 1\n    return x\n"
    assert truncate_at_stops("    x = 1\n\n    return x\nprint(f())", codex) == "    x = 1\n\n    return x"


def test_chat_code_is_taken_from_the_fenced_block_that_defines_the_function():
    reply = ("Here is a helper first:\n```python\nprint('not this')\n```\nAnd the solution:\n"
             "```python\nimport math\n\ndef half(x):\n    return x / 2\n\n"
             "def area(r):\n    return half(2) * math.pi * r * r\n```"
             "\nThis works.")
    completion = chat_code_completion(reply, "area")
    assert completion.startswith("\nimport math\n") and "def half(x)" in completion
    assert "not this" not in completion and "This works" not in completion


# Replies without a fenced block that defines the function, read as the original script's extract_code reads them
# (each expected value was checked against that function, run outside this repository).
@pytest.mark.parametrize("reply, completion", [
    # The body of `def double`, up to the first line that is not indented, blank lines inside kept.
    ("Sure:\ndef double(x):\n    y = x * 2\n\n    return y\nThis doubles x.", "    y = x * 2\n\n    return y"),
    ("Sure! Here it is:\ndef double(x):\n    return x * 2", "    return x * 2"),
    ("def double(x) -> int:\n\treturn x*2\n\n\nprint(double(2))", "\treturn x*2"),
    # A misnamed function, fenced or not: its body serves under the prompt's signature.
    ("def twice(x):\n    return x * 2\n", "    return x * 2"),
    ("```python\ndef twice(x):\n    return x * 2\n```", "    return x * 2"),
    # Any "def" counts, even inside a word, as in the original.
    ("We define it as follows:\n    return x * 2\nDone.", "    return x * 2"),
    # No def at all: the whole reply is the body, indented by four more spaces.
    ("return x * 2", "    return x * 2"),
    ("x = 1\n\ny = 2", "    x = 1\n\n    y = 2"),
    ("    return x * 2", "        return x * 2"),
])
def test_chat_code_without_a_fenced_definition_is_read_as_the_original_read_it(reply, completion):
    assert chat_code_completion(reply, "double") == completion


def test_fenced_code_without_a_definition_is_the_body_without_its_fences():
    # The original indented the whole reply, fences included, which cannot run; the fenced code is the body here.
    assert chat_code_completion("```\nreturn x * 2\n```", "double") == "    return x * 2\n"
    assert chat_code_completion("Try:\n```python\n    return x * 2\n```", "double") == "    return x * 2\n"


# --------------------------------------------------------------------------------------------------------------------
# Tool use
# --------------------------------------------------------------------------------------------------------------------

CALL = 'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris", "unit": "C"}\nObservation:'


def test_tool_calls_are_read_as_the_original_evaluation_read_them():
    # A call is a line starting with "Action: "; the name runs to the first "Action Input:", the input to the first
    # "Observation:" (each to the end when missing). Checked against the original's functions on 30,000 generated
    # replies, outside this repository.
    assert tool_call_of(CALL) == ("get_weather", '{"city": "Paris", "unit": "C"}')
    assert tool_call_of("Thought: hmm\nAction: get_weather") == ("get_weather", "Action: get_weather")
    assert tool_call_of("Action: get_weather\nAction Input: {}") is None  # no line break before "Action: "
    assert tool_call_of("Thought: hmm\nAction:get_weather\nAction Input: {}") is None  # no space after it
    assert tool_call_of("Thought: I now know the final answer.\nFinal Answer: 21 °C") is None


def test_action_inputs_are_compared_in_the_original_units(tokenizer):
    # Each token's text, joined with spaces and split on whitespace: a token's leading space disappears, and a token
    # holding part of a character reads as U+FFFD.
    ids = tokenizer.encode('{"city": "Paris"}')
    assert "".join(rouge_tokens(tokenizer, '{"city": "Paris"}')) == '{"city":"Paris"}'
    assert len(rouge_tokens(tokenizer, '{"city": "Paris"}')) == len(ids)
    rare = "𝔘"  # four UTF-8 bytes, more than one token
    assert len(tokenizer.encode(rare)) > 1 and set(rouge_tokens(tokenizer, rare)) == {"\ufffd"}
    assert rouge_tokens(tokenizer, rare) == rouge_tokens(tokenizer, "𝔙")  # two characters, the same units


def test_action_inputs_are_normalized_leniently():
    assert normalize_action_input("{'b': 1, a: 2,}") == '{"a": 2, "b": 1}'  # json5: quotes, bare keys, comma
    assert normalize_action_input("Paris") == ""
    assert normalize_action_input(None) == ""


def test_rouge_l_hand_computed():
    # LCS of "a b c d" and "a c d e" is "a c d": P = R = 3/4, F1 = 3/4.
    assert rouge_l("a b c d".split(), "a c d e".split()) == pytest.approx(0.75)
    # LCS 1 of 4 reference and 2 candidate tokens: P = 1/2, R = 1/4, F1 = 2 * 1/8 / (3/4) = 1/3.
    assert rouge_l(["w", "x", "y", "z"], ["x", "q"]) == pytest.approx(1 / 3)
    assert rouge_l(["a"], ["a"]) == 1.0
    assert rouge_l([], ["a"]) == 0.0 and rouge_l(["a"], []) == 0.0 and rouge_l(["a"], ["b"]) == 0.0


def test_tool_call_scores_hand_computed():
    reply = "Thought: weather\nAction: Get_Weather \nAction Input: {'city': 'Paris'}\n"
    score = score_tool_call(reply, CALL, str.split)
    # Names match without case and spaces. Inputs as canonical JSON, split on spaces:
    # reference '{"city": "Paris", "unit": "C"}' -> 4 tokens, reply '{"city": "Paris"}' -> 2 tokens, and only
    # '{"city":' is shared ('"Paris",' is not '"Paris"}'): F1 = 1/3 as above.
    assert score == {"tool": "Get_Weather", "reference_tool": "get_weather", "selected": True,
                     "rouge_l": pytest.approx(1 / 3)}
    no_call = score_tool_call("Final Answer: sunny", CALL, str.split)
    assert no_call["selected"] is False and no_call["tool"] is None and no_call["rouge_l"] == 0.0
    with pytest.raises(ValueError, match="calls no tool"):
        score_tool_call(reply, "Final Answer: no tool needed", str.split)


def test_tool_use_summary_hand_computed():
    positive = [{"selected": True, "rouge_l": 1.0}, {"selected": False, "rouge_l": 0.5},
                {"selected": True, "rouge_l": 0.0}]
    negative = [{"tool": None}, {"tool": "get_weather"}, {"tool": None}, {"tool": None}]
    summary = summarize_tool_use(positive, negative)
    assert summary["tool_selection_accuracy"] == pytest.approx(200 / 3)
    assert summary["action_input_rouge_l"] == pytest.approx(50.0)
    assert summary["false_positive_rate"] == pytest.approx(25.0)
    assert (summary["positive_samples"], summary["negative_samples"]) == (3, 4)
