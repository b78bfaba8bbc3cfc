"""Reading answers out of model text, and the tool-use metrics. Pure string work: no model, no torch.

Each rule is written out here because the published numbers depend on it; `eval/EVALUATION.md` lists them in words.
Numbers are parsed with `decimal.Decimal`, never `eval()`, and only with its exact operations (construction,
comparison, `copy_negate`, formatting): arithmetic such as `-x` or `normalize()` rounds to the context's 28 digits, and
`int` cannot be turned into a string past 4,300 digits, while a model may write a number of any length.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from decimal import Decimal, localcontext
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


# The original chat GSM8K script counted a reply right when its number was within this of the reference; its base
# script wanted the very number.
CHAT_GSM8K_TOLERANCE = Decimal("0.0001")


def numbers_match(predicted: Decimal | None, reference: Decimal, tolerance: Decimal = Decimal(0)) -> bool:
    """Whether `predicted` is within `tolerance` of `reference`, computed exactly whatever the numbers' lengths."""
    if predicted is None:
        return False
    if not tolerance:
        return predicted == reference
    numbers = (predicted, reference, tolerance)
    # Enough digits for an exact difference: from the largest number's first digit to the smallest exponent.
    digits = max(n.adjusted() for n in numbers) - min(int(n.as_tuple().exponent) for n in numbers) + 2
    with localcontext() as context:
        context.prec = max(28, digits)
        return abs(predicted - reference) <= tolerance


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

# The rules of the original chat scripts, one set for English (MMLU) and one for Chinese (C-Eval). The reply is first
# rewritten: the text of each option it quotes (the longest option first) becomes that option's letter, and for
# C-Eval the question's own words are taken out; then the first rule that matches gives the letter. `[^ABCD]{0,n}?`
# ("a few characters, none of them a letter") keeps a keyword and its letter close together.
_NO_LETTER = "[^ABCD]"
_ENGLISH_CHOICE_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    # "The answer is B", "Answer: B", "the correct choice would be B", "I choose B"; not "the answer is not B".
    ("statement", re.compile(
        rf"(?:[Cc]hoose|(?:[Aa]nswer|[Cc]hoice)(?!{_NO_LETTER}{{0,20}}?(?:n't|not)){_NO_LETTER}{{0,10}}?"
        rf"\b(?:|is|:|be)\b){_NO_LETTER}{{0,20}}?\b([ABCD])\b")),
    # "B is correct", "B seems right"; not "B is not correct".
    ("is correct", re.compile(
        rf"\b([ABCD])\b(?!{_NO_LETTER}{{0,8}}?(?:n't|not){_NO_LETTER}{{0,5}}?(?:correct|right))"
        rf"{_NO_LETTER}{{0,10}}?\b(?:correct|right)\b")),
    # A reply that is, or starts with, the letter: "B", "B. Paris", "B, since ...".
    ("leading letter", re.compile(r"^([ABCD])(?:[.,:]|$)")),
    # Else the first A-D that is not part of a word.
    ("standalone letter", re.compile(r"(?<![a-zA-Z])([ABCD])(?![a-zA-Z=])")),
)
_CHINESE_IS = "(?:是|选|为|：|:|】)"  # what links 答案 / 选项 to the letter
_CHINESE_RIGHT = "(?:正确|对[的，。：]|符合)"
_CHINESE_CHOICE_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    # "答案是B", "选项为B", "应该选B", "选择：B"; not "答案不是B".
    ("statement", re.compile(
        rf"(?:(?:选|选择|选定)[：:]?\s*|(?:答案|选项)(?!{_NO_LETTER}{{0,10}}?(?:不|非){_NO_LETTER}{{0,10}}?{_CHINESE_IS})"
        rf"{_NO_LETTER}{{0,10}}?{_CHINESE_IS}{_NO_LETTER}{{0,10}}?)([ABCD])(?:选项)?(?:[)。.，,．、ABCD：:）]|$)")),
    # "B选项正确", "B项符合题意"; not "B不正确".
    ("is correct", re.compile(
        rf"([ABCD])(?:选?项)?(?!{_NO_LETTER}{{0,4}}?(?:不|非){_NO_LETTER}{{0,4}}?{_CHINESE_RIGHT})"
        rf"{_NO_LETTER}{{0,4}}?{_CHINESE_RIGHT}")),
    ("leading letter", re.compile(r"^[(（]?([ABCD])(?:[。)）.，,．：:]|$)")),
    ("standalone letter", re.compile(r"(?<![a-zA-Z])([ABCD])(?![a-zA-Z=])")),
)


def _by_length(options: Sequence[str]) -> list[tuple[str, str]]:
    """(letter, option text), the longest text first (a stable sort: equal lengths keep A-D order)."""
    return sorted(zip(CHOICES, options, strict=True), key=lambda pair: len(pair[1]), reverse=True)


def _first_rule(text: str, rules: Sequence[tuple[str, re.Pattern[str]]], options: Sequence[str]) -> tuple[str, str]:
    for name, pattern in rules:
        match = pattern.search(text)
        if match:
            return match.group(1), name
    from thefuzz import process  # the original's fuzzy matcher; imported only for the rare reply that needs it

    best, _ = process.extractOne(text, list(options))  # the first of equally similar options
    return CHOICES[list(options).index(best)], "most similar option"


def extract_choice(reply: str, options: Sequence[str]) -> tuple[str, str]:
    """The letter an English chat reply (MMLU) picks among four `options`, and the rule that found it, as the original
    chat MMLU script read it: each option's text quoted in the reply (without a final period, in any case) becomes
    its letter, then the first of an answer statement, a letter said to be correct, a leading letter and a standalone
    letter; else the option most similar to the reply (thefuzz)."""
    text = reply
    for letter, option in _by_length(options):
        if option.rstrip("."):  # an empty option would match everywhere
            text = re.sub(re.escape(option.rstrip(".")), letter, text, flags=re.IGNORECASE)
    return _first_rule(text, _ENGLISH_CHOICE_RULES, options)


def extract_choice_chinese(reply: str, question: str, options: Sequence[str]) -> tuple[str, str]:
    """The letter a Chinese chat reply (C-Eval) picks, as the original chat C-Eval script read it: the question's last
    sentence, split at its blank (`____`), is taken out of the reply (its first part, when longer than four
    characters, becomes "答案是"; its last part, when longer than four, is removed); each option's text quoted in the
    reply (without a final "。") becomes its letter; then the first of the rules for an answer statement ("答案是B",
    "选B"), a letter said to be right ("B正确"), a leading letter and a standalone letter; else the most similar
    option (thefuzz)."""
    text = reply
    parts = question.rstrip("。").split("。")[-1].split("_")
    if len(parts[0].strip()) > 4:
        text = text.replace(parts[0], "答案是")
    if len(parts[-1].strip()) > 4:
        text = text.replace(parts[-1], "")
    for letter, option in _by_length(options):
        if option.rstrip("。"):
            text = text.replace(option.rstrip("。"), letter)
    return _first_rule(text, _CHINESE_CHOICE_RULES, options)


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


# The original evaluation's reading of a ReAct reply, not the server's parser: a reply calls a tool when it holds
# "\nAction: "; the tool is the text between the first "Action:" and the first "Action Input:", its input the text
# between the first "Action Input:" and the first "Observation:". A missing marker counts as found at the last
# character, as the original's `str.find` (-1) made it.
_CALL_MARK = "\nAction: "


def _between(text: str, start_marker: str, end_marker: str) -> str:
    return text[text.find(start_marker) + len(start_marker):text.find(end_marker)].strip()


def tool_call_of(text: str) -> tuple[str, str] | None:
    """(tool name, action input) when a ReAct reply calls a tool, as the original evaluation read it; else None."""
    if _CALL_MARK not in text:
        return None
    text += "\n"  # so that a missing end marker cuts this character only (the original's "not-find" fix)
    return _between(text, "Action:", "Action Input:"), _between(text, "Action Input:", "Observation:")


def rouge_tokens(tokenizer: Any, text: str) -> list[str]:
    """The units the original evaluation compared action inputs in: each Qwen token's text (bytes decoded on their
    own, with U+FFFD for an incomplete character), joined with spaces and split on whitespace."""
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(text))
    return " ".join(piece.decode("utf-8", errors="replace") if isinstance(piece, bytes) else piece
                    for piece in pieces).split()


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
    """How a reply to a sample that needs a tool compares with the reference call, as the original evaluation scored it.

    `selected`: the reply calls the reference's tool (names compared without case or surrounding space).
    `rouge_l`: ROUGE-L between the two action inputs, each normalized to canonical JSON and split by `tokenize`
    (`rouge_tokens` for the original's units); a reply that calls no tool has its input read all the same, as the
    original did, which almost always leaves it empty (0).
    """
    expected = tool_call_of(reference)
    if expected is None:
        raise ValueError(f"The reference {reference[:80]!r} calls no tool; positive samples must.")
    called = tool_call_of(reply)
    arguments = _between(reply + "\n", "Action Input:", "Observation:")
    return {
        "tool": called[0] if called is not None else None,
        "reference_tool": expected[0],
        "selected": called is not None and called[0].lower() == expected[0].lower(),
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
