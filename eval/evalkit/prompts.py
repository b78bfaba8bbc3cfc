"""The prompt texts. They are those behind the published Qwen numbers (the scripts of the original Qwen release), since
the scores depend on them; only their assembly is ours."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence

from .data import CHOICES, GSM8K_TRAIN_SOURCE, DataLayoutError, Question

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
    """The few-shot exemplars (`gsm8k_exemplars`, or a --prompt-file), then the question in the same layout."""
    return exemplars + GSM8K_QUESTION.format(question=question)


# The original scripts' GSM8K exemplars are problems of GSM8K's train split, so they are rebuilt here from the user's
# train.jsonl rather than shipped: each is named by its line in the official file (counted from 0) and the SHA-256 of
# the exemplar text it gives (`gsm8k_exemplar`), which also finds it in a copy whose lines come in another order.
# The base script's eight (the original's eval/gsm8k_prompt.txt, which they rebuild byte for byte):
GSM8K_BASE_EXEMPLARS: tuple[tuple[int, str], ...] = (
    (4997, "d8ee3e890659c5c65ec6d7369008db3d8286e1fd4094e93f3239a455d8184b52"),
    (4280, "2a99de7dd583ef7670f61660cff66e31a997013ae9207582b43b32d55a1d248a"),
    (3996, "7abfbb1774545dc5924386df66b76763ee11fb57007dda5c8624f8c43bed68a5"),
    (1344, "08782aa66ce43929d91c028260112a81e37e6322926eecce0ce82cb7635ae211"),
    (6011, "2f66478090ba813429352c13f57f9af58b38a9d21478ca9e7f598e67c880ea06"),
    (328, "f3661ea0b218eaf35c129acb449457e3b96068f4a144bef45726b32cb716d69a"),
    (3809, "e165bd7745d4221823d6bb33c0fe83da58772ac41e237377676707c170939c2e"),
    (2053, "af2145427b204a3e8f3f36d64c62db790e891fa1cc127b7ea391c74716a1b2b3"),
)
# The chat script's four, for --use-fewshot (written into the original chat script):
GSM8K_CHAT_EXEMPLARS: tuple[tuple[int, str], ...] = (
    (7364, "1cbfb832032e76c0c18c259dbd292d4b7fbbdd1dd36f1bc787a51ced66148cb7"),
    (1708, "d60e6cf4e58d581046ec285acafe54595666d47e0ddfb3ed4c881511de80a61e"),
    (669, "0c36d75435c657fa06a74adbfee171e2fb9fa8ec8b920ca3bceddcda4a1b7b99"),
    (6724, "61ea2bd27b156ecc7465346a5f01cae02f8d4dcac1754014162dd04246534c70"),
)
_CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")


def gsm8k_exemplar(question: str, solution: str) -> str:
    """A solved GSM8K problem in the exemplar layout: `Question: ...`, `Let's think step by step`, the reference
    solution without its calculator annotations (`<<48/2=24>>`), and its final `#### N` line as `The answer is N`."""
    steps, _, answer = _CALCULATOR_ANNOTATION.sub("", solution).rpartition("\n#### ")
    return f"Question: {question}\nLet's think step by step\n{steps}\nThe answer is {answer}"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def gsm8k_exemplars(records: Sequence[Mapping[str, str]], picks: Sequence[tuple[int, str]], source: str) -> str:
    """The exemplars `picks` names, rebuilt from the records of GSM8K's train.jsonl (`source` names the file in
    errors), separated by blank lines and ending in a line break: what `gsm8k_base_prompt` puts first."""
    exemplars = []
    by_digest: dict[str, str] | None = None  # every record's exemplar, built only for a file in another order
    for number, (line, digest) in enumerate(picks, start=1):
        text = gsm8k_exemplar(records[line]["question"], records[line]["answer"]) if line < len(records) else ""
        if _sha256(text) != digest:
            if by_digest is None:
                by_digest = {_sha256(built): built for built in
                             (gsm8k_exemplar(record["question"], record["answer"]) for record in records)}
            if digest not in by_digest:
                raise DataLayoutError(
                    f"{source} is not GSM8K's train split as published: it lacks the problem on line {line + 1} of "
                    f"the official file, exemplar {number} of the {len(picks)} of the original prompt. Get "
                    f"{GSM8K_TRAIN_SOURCE}, or pass --prompt-file with exemplars of your own.")
            text = by_digest[digest]
        exemplars.append(text)
    return "\n\n".join(exemplars) + "\n"


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
