"""Reading answers out of model text, and the tool-use metrics. Pure string work: no model, no torch.

Each rule is written out here because the published numbers depend on it; `eval/EVALUATION.md` lists them in words.
Numbers are parsed with `decimal.Decimal`, never `eval()`, and only with its exact operations (construction,
comparison, `copy_negate`, formatting): arithmetic such as `-x` or `normalize()` rounds to the context's 28 digits, and
`int` cannot be turned into a string past 4,300 digits, while a model may write a number of any length.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

CHOICES = ("A", "B", "C", "D")

# --------------------------------------------------------------------------------------------------------------------
# Numbers (GSM8K)
# --------------------------------------------------------------------------------------------------------------------

# A number as people write it: 1,234,567.89 / 1234 / 3.5 / .5, with a minus sign only where it cannot be a hyphen or
# a subtraction ("5-3" is 5 and 3; "-3 degrees" is -3). Currency signs and units around it are simply not part of it.
_NUMBER = re.compile(r"(?<![\w)\]])(?P<sign>-)?(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)|"
                     r"(?P<bare>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)")


def find_numbers(text: str) -> list[Decimal]:
    """Every number in `text`, in order, commas removed."""
    numbers = []
    for match in _NUMBER.finditer(text):
        digits = match.group("digits") or match.group("bare")
        value = Decimal(digits.replace(",", ""))
        numbers.append(value.copy_negate() if match.group("sign") else value)
    return numbers


def parse_reference_answer(solution: str) -> Decimal | None:
    """The number after the last `####` of a GSM8K reference solution, or None."""
    position = solution.rfind("####")
    if position < 0:
        return None
    numbers = find_numbers(solution[position + 4:])
    return numbers[0] if numbers else None


def extract_math_answer(text: str) -> Decimal | None:
    """The answer a model's solution gives: its last number, as the original scripts read it (the exemplars end in
    "The answer is N", and a base model's solution is cut where it would start another question); None when there is
    no number at all."""
    numbers = find_numbers(text)
    return numbers[-1] if numbers else None


def format_number(value: Decimal | None) -> str | None:
    """A number for the results file, every digit kept: "1200" rather than "1.2E+3", "0.5" rather than "0.50"."""
    if value is None:
        return None
    if not value.is_finite():  # cannot come from find_numbers, but stay safe
        return str(value)
    if value.is_zero():
        return "0"
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


# --------------------------------------------------------------------------------------------------------------------
# Letters (chat models answering multiple-choice questions)
# --------------------------------------------------------------------------------------------------------------------

_LETTER = r"([ABCD])(?![A-Za-z0-9])"
_NOT_AFTER = r"(?![^.\n。]{0,15}?(?i:\bincorrect\b|\bwrong\b|\bnot\s+(?:the\s+)?(?:correct|right)\b|不正确|错误))"
# Rules in order of trust; within a rule the first match in the reply wins.
_CHOICE_RULES: list[tuple[str, re.Pattern[str]]] = [
    ("statement", re.compile(
        r"(?i:answer)(?:\s+(?i:is|would\s+be|should\s+be|will\s+be|must\s+be))?\s*[:：]?\s*"
        r"(?i:option\s+|choice\s+)?[(\[（【]?" + _LETTER + "|"
        r"(?i:option|choice)\s+(?i:is|would\s+be|should\s+be|will\s+be|must\s+be)\s*[:：]?\s*[(\[]?" + _LETTER + "|"
        r"(?i:choose|select|pick)\s+(?i:option\s+|choice\s+|answer\s+)?[(\[]?" + _LETTER + "|"
        r"(?:正确答案|正确选项|答案)\s*(?:应该|应|可能)?\s*(?:是|为|选)?\s*[:：]?\s*[(（【]?([ABCD])|"
        r"选项\s*(?:应该|应)?\s*(?:是|为)\s*[:：]?\s*[(（【]?([ABCD])|"
        r"(?:选择|选)\s*[(（【]?([ABCD])")),
    ("is correct", re.compile(
        r"(?<![A-Za-z])[(\[]?([ABCD])[)\]]?\s*(?i:is|seems|would\s+be)\s+(?i:the\s+)?(?i:correct|right|true|best)\b|"
        r"(?i:option|choice)\s+" + _LETTER + _NOT_AFTER + "|"
        r"([ABCD])\s*(?:选项|项)?\s*(?:是)?\s*(?:正确|对|符合)")),
    ("leading letter", re.compile(r"^\s*[(\[（【]?([ABCD])(?:[)\]）】.:：,，、\s]|$)")),
]
# A letter on its own, unless negated ("not A", "不是A").
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z])(?<!(?i:not) )(?<!不是)([ABCD])(?![A-Za-z])")


def _normalized(text: str) -> str:
    return " ".join(text.strip().rstrip(".。").split()).casefold()


def extract_choice(reply: str, options: Sequence[str]) -> tuple[str, str]:
    """The letter a chat reply picks among four `options`, and the name of the rule that found it.

    In order: an answer statement ("The answer is B", "Answer: (B)", "I choose B", "答案是B", "选B"); a letter said to
    be correct ("B is correct", "Option B", "B正确"); a reply that starts with the letter ("B. Paris"); the text of
    one option quoted in the reply (the longest, when several are); the first A-D standing alone and not negated
    ("not A"); and, when the reply
    has none of these, the option whose text is most similar to the reply (difflib), so every reply gets a letter.
    """
    for name, pattern in _CHOICE_RULES:
        match = pattern.search(reply)
        if match:
            return next(group for group in match.groups() if group), name
    folded = _normalized(reply)
    quoted = [(len(_normalized(text)), letter) for letter, text in zip(CHOICES, options, strict=True)
              if len(_normalized(text)) >= 2 and _normalized(text) in folded]
    if quoted:
        return max(quoted)[1], "option text"
    match = _STANDALONE_LETTER.search(reply)
    if match:
        return match.group(1), "standalone letter"
    ratios = [difflib.SequenceMatcher(None, folded, _normalized(text)).ratio() for text in options]
    return CHOICES[ratios.index(max(ratios))], "most similar option"


# --------------------------------------------------------------------------------------------------------------------
# Code (HumanEval)
# --------------------------------------------------------------------------------------------------------------------

# Where a base model's completion of a HumanEval prompt ends. "qwen" is the rule behind the published Qwen numbers
# (the text before the first blank line or "def "); "codex" is the one of the HumanEval paper (Chen et al., 2021).
COMPLETION_STOPS: dict[str, tuple[str, ...]] = {
    "qwen": ("\n\n", "def "),
    "codex": ("\nclass", "\ndef", "\n#", "\nif", "\nprint"),
}


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest of `stops`."""
    end = len(text)
    for stop in stops:
        position = text.find(stop)
        if 0 <= position < end:
            end = position
    return text[:end]


_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.S)
# Where the original script's body of a function ends: at the first line break after which (past any empty lines)
# the text is not indented by two spaces or a tab.
_BODY_END = re.compile(r"\n(?!\n*(?:  |\t))")


def _body_after(header: re.Pattern[str], text: str) -> str | None:
    """The original script's reading of a function body: the text after the first `header` (a `def` up to the first
    colon that ends a line, across lines if need be) until the body ends (`_BODY_END`); None without such a header."""
    match = header.search(text)
    if match is None:
        return None
    end = _BODY_END.search(text, match.end())
    return text[match.end():end.start() if end else len(text)]


def _indented(code: str) -> str:
    """`code` as a function body: each line that is not blank gets four more spaces (what `textwrap.indent` does)."""
    return "".join(("    " + line) if line.strip() else line for line in code.splitlines(keepends=True))


def chat_code_completion(reply: str, entry_point: str) -> str:
    """What to append to a HumanEval prompt to run a chat model's answer, read as the original script read it except
    for fenced code.

    A fenced block that defines `entry_point` is appended whole after the prompt: it replaces the prompt's stub and
    keeps the imports and helpers the model wrote above the function, which the original dropped (it kept only the
    lines after the `def`). Otherwise, as the original: the body of the first `def <entry_point>` in the reply, else
    the body of the first `def` at all (a misnamed function's body serves under the prompt's signature), up to the
    first line that is not indented; a reply with neither is taken as the body and indented by four spaces, except
    that of a fenced reply only the code inside the fences is (the original indented the fences and any prose too,
    which cannot run).
    """
    name = re.escape(entry_point)
    defines = re.compile(rf"^\s*def\s+{name}\s*\(", re.M)
    blocks = _FENCE.findall(reply)
    block = next((block for block in blocks if defines.search(block)), None)
    if block is not None:
        return "\n" + block.strip("\n") + "\n"
    for header in (re.compile(rf"def\s+{name}.*?:\n", re.S), re.compile(r"def.*?:\n", re.S)):
        body = _body_after(header, reply)
        if body is not None:
            return body
    if blocks:
        code = blocks[0].strip("\n")
        first = next((line for line in code.split("\n") if line.strip()), "")
        return (code if first[:1].isspace() else _indented(code)) + "\n"
    return _indented(reply)


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program that checks a completion, assembled as the HumanEval harness does."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


# --------------------------------------------------------------------------------------------------------------------
# Tool use (ReAct)
# --------------------------------------------------------------------------------------------------------------------


def tool_call_of(text: str) -> tuple[str, str] | None:
    """(tool name, action input) when a ReAct reply calls a tool, as the server's parser reads it; else None."""
    from qwen.react import parse_react_output  # the one ReAct parser: the server uses the same rules

    parsed = parse_react_output(text)
    if parsed.finish_reason != "function_call" or parsed.function_name is None:
        return None
    return parsed.function_name, parsed.arguments or ""


def normalize_action_input(text: str | None) -> str:
    """Arguments as canonical JSON (keys sorted), read leniently with json5 as the original evaluation did; "" when
    they do not parse, which then scores 0."""
    if not text:
        return ""
    import json5

    try:
        return json.dumps(json5.loads(text), ensure_ascii=False, sort_keys=True)
    except (ValueError, TypeError, RecursionError):
        return ""


def rouge_l(reference: Sequence[Any], candidate: Sequence[Any]) -> float:
    """ROUGE-L F1 of two token sequences: 2PR / (P + R) with P, R = LCS / len(candidate), LCS / len(reference)."""
    if not reference or not candidate:
        return 0.0
    previous = [0] * (len(candidate) + 1)
    for token in reference:
        current = [0]
        for index, other in enumerate(candidate):
            current.append(previous[index] + 1 if token == other else max(previous[index + 1], current[index]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def score_tool_call(reply: str, reference: str, tokenize: Callable[[str], Sequence[Any]]) -> dict[str, Any]:
    """How a reply to a sample that needs a tool compares with the reference call.

    `selected`: the reply calls the reference's tool (names compared without case or surrounding space).
    `rouge_l`: ROUGE-L between the two action inputs, each normalized to canonical JSON and tokenized by `tokenize`.
    """
    expected = tool_call_of(reference)
    if expected is None:
        raise ValueError(f"The reference {reference[:80]!r} calls no tool; positive samples must.")
    called = tool_call_of(reply)
    name, arguments = called if called is not None else (None, None)
    return {
        "tool": name,
        "reference_tool": expected[0],
        "selected": name is not None and name.strip().lower() == expected[0].strip().lower(),
        "rouge_l": rouge_l(tokenize(normalize_action_input(expected[1])), tokenize(normalize_action_input(arguments))),
    }


def summarize_tool_use(positive: Sequence[dict[str, Any]], negative: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The three published numbers, in percent: tool selection accuracy and action-input ROUGE-L over the positive
    samples, and the share of negative samples where the model called a tool anyway (false positives)."""
    result: dict[str, Any] = {}
    if positive:
        result["tool_selection_accuracy"] = 100 * sum(item["selected"] for item in positive) / len(positive)
        result["action_input_rouge_l"] = 100 * sum(item["rouge_l"] for item in positive) / len(positive)
        result["positive_samples"] = len(positive)
    if negative:
        result["false_positive_rate"] = 100 * sum(item["tool"] is not None for item in negative) / len(negative)
        result["negative_samples"] = len(negative)
    return result
