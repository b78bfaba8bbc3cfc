"""The prompt texts. They are those behind the published Qwen numbers (the scripts of the original Qwen release), since
the scores depend on them; only their assembly is ours."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .data import CHOICES, Question

GSM8K_QUESTION = "\nQuestion: {question}\nLet's think step by step\n"
# Where a base model's GSM8K solution ends: it starts the next exemplar (a blank line, then "Question:").
GSM8K_STOPS = ("\n\n", "Question:")


def _options(question: Question) -> str:
    return "".join(f"\n{letter}. {text}" for letter, text in zip(CHOICES, question.options, strict=True))


def mmlu_base_prompt(subject: str, examples: Sequence[Question], question: Question) -> str:
    """Few-shot MMLU (Hendrycks et al.): a subject line, solved examples, then the question ending in "Answer:"; the
    model's next token is scored as " A" / " B" / " C" / " D"."""
    text = f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"
    for example in examples:
        text += f"Question: {example.text}{_options(example)}\nAnswer: {example.answer}\n\n"
    return text + f"Question: {question.text}{_options(question)}\nAnswer:"


def chinese_base_prompt(subject: str, examples: Sequence[Question], question: Question) -> str:
    """Few-shot C-Eval and CMMLU: solved examples, then the question ending in "答案："; the next token is scored as
    "A" / "B" / "C" / "D" (no space: Chinese text has none)."""
    text = ""
    for example in examples:
        text += f"问题：{example.text}{_options(example)}\n答案：{example.answer}\n\n"
    return text + f"问题：{question.text}{_options(question)}\n答案："


def mmlu_chat_prompt(question: Question) -> str:
    """Zero-shot MMLU for chat models: an instruction, the question and its options, one user turn."""
    return ("The following is a multiple-choice question. Please choose the most suitable one among A, B, C and D as "
            f"the answer to this question.\n\n{question.text}{_options(question)}\n")


def ceval_chat_prompt(question: Question) -> str:
    """Zero-shot C-Eval for chat models: the question, a blank line and its options, one user turn."""
    return f"{question.text}\n{_options(question)}\n"


def gsm8k_base_prompt(exemplars: str, question: str) -> str:
    """The few-shot exemplars (eval/gsm8k_prompt.txt), then the question in the same layout."""
    return exemplars + GSM8K_QUESTION.format(question=question)


# The chat HumanEval prompt of the original script, after HumanEvalPack (Muennighoff et al., 2023): the signature in
# an instruction, the docstring's lines stripped of their indentation, then the whole HumanEval prompt.
_DOCSTRING = re.compile(r"(?:\"\"\"|''')(.*?)(?:\"\"\"|''')", re.S)


def humaneval_chat_prompt(prompt: str, entry_point: str) -> str | None:
    """What a chat model is asked for a HumanEval task; None when `prompt` has no one-line `def <entry_point>(...):`
    or no docstring.

    The signature is the text from the function's name to the colon ending its `def` line; the problem is the first
    docstring of the prompt (as in the original, that of a helper function when the prompt defines one first).
    """
    signature = re.search(rf"def\s+({re.escape(entry_point)}.*?):\s*\n", prompt)
    docstring = _DOCSTRING.search(prompt)
    if signature is None or docstring is None:
        return None
    problem = "\n".join(line.strip() for line in docstring.group(1).split("\n"))
    return (f"Write a Python function `{signature.group(1)}` to solve the following problem:\n{problem}\n"
            f"{prompt}")
