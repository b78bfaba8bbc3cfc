"""The benchmark datasets, read from the files and folders their publishers distribute.

Every reader checks the layout first and, when something is missing, raises `DataLayoutError` with the path it looked
at, the layout it expected and where the data comes from, so that `-d` pointing one folder too high or too low is a
one-line fix. Multiple-choice sets accept the folder itself or its parent holding a `data/` folder (what MMLU's
`data.tar` extracts to).
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

CHOICES = ("A", "B", "C", "D")


class DataLayoutError(ValueError):
    """The data folder lacks what the benchmark needs; the message says what was expected and where to get it."""


# --------------------------------------------------------------------------------------------------------------------
# Multiple choice: MMLU, C-Eval, CMMLU
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One four-option question. `answer` is a letter of CHOICES; `where` is `file:row` for messages."""

    text: str
    options: tuple[str, str, str, str]
    answer: str
    where: str


@dataclass(frozen=True)
class Subject:
    name: str
    dev: list[Question]  # the few-shot examples, in file order
    questions: list[Question]  # what is evaluated


@dataclass(frozen=True)
class ChoiceLayout:
    """Where a multiple-choice benchmark keeps its files and how its CSV rows read."""

    name: str
    dev_dir: str
    eval_dir: str
    dev_suffix: str  # file name = subject + suffix
    eval_suffix: str
    # Column names, or None for header-less files whose columns are question, A, B, C, D, answer.
    columns: tuple[str, str, str, str, str, str] | None
    source: str  # where users get it, for error messages

    def describe(self) -> str:
        header = "no header row; columns question,A,B,C,D,answer" if self.columns is None else (
            "a header row with columns " + ",".join(self.columns))
        return (f"{self.dev_dir}/<subject>{self.dev_suffix} (few-shot examples) and "
                f"{self.eval_dir}/<subject>{self.eval_suffix} (questions), CSV files with {header}")


MMLU_LAYOUT = ChoiceLayout(
    name="MMLU", dev_dir="dev", eval_dir="test", dev_suffix="_dev.csv", eval_suffix="_test.csv", columns=None,
    source="https://people.eecs.berkeley.edu/~hendrycks/data.tar (extract it and pass -d with its data/ folder)",
)
# C-Eval publishes no answers for its test split; the Qwen numbers are on val, as the C-Eval authors suggest for
# local evaluation.
CEVAL_LAYOUT = ChoiceLayout(
    name="C-Eval", dev_dir="dev", eval_dir="val", dev_suffix="_dev.csv", eval_suffix="_val.csv",
    columns=("question", "A", "B", "C", "D", "answer"),
    source="https://huggingface.co/datasets/ceval/ceval-exam/resolve/main/ceval-exam.zip (unzip it, pass -d with the "
           "folder holding dev/ val/ test/)",
)
CMMLU_LAYOUT = ChoiceLayout(
    name="CMMLU", dev_dir="dev", eval_dir="test", dev_suffix=".csv", eval_suffix=".csv",
    columns=("Question", "A", "B", "C", "D", "Answer"),
    source="https://huggingface.co/datasets/haonan-li/cmmlu/resolve/main/cmmlu_v1_0_1.zip (unzip it, pass -d with the "
           "folder holding dev/ and test/)",
)


def _layout_root(root: str | Path, layout: ChoiceLayout) -> Path:
    """The folder holding the layout's dev and eval folders: `root` itself or `root/data`."""
    root = Path(root).expanduser()
    for candidate in (root, root / "data"):
        if (candidate / layout.dev_dir).is_dir() and (candidate / layout.eval_dir).is_dir():
            return candidate
    if not root.is_dir():
        raise DataLayoutError(f"{layout.name} data folder {str(root)!r} does not exist. Expected a folder with "
                              f"{layout.describe()}. Get the data from {layout.source}.")
    missing = [name for name in (layout.dev_dir, layout.eval_dir) if not (root / name).is_dir()]
    raise DataLayoutError(f"{root} is not a {layout.name} data folder: it has no {' and no '.join(missing)} folder. "
                          f"Expected {layout.describe()}. Get the data from {layout.source}.")


def _read_csv(path: Path, layout: ChoiceLayout) -> list[Question]:
    questions = []
    try:
        # utf-8-sig: some of these files start with a byte-order mark, which would otherwise stick to the first header.
        with path.open(encoding="utf-8-sig", newline="") as handle:
            rows: Iterator[Sequence[str]] = csv.reader(handle)
            first_row = 1
            if layout.columns is not None:
                header = next(rows, None)
                if header is None:
                    raise DataLayoutError(f"{path} is empty; expected a header row and questions.")
                positions = []
                for column in layout.columns:
                    if column not in header:
                        raise DataLayoutError(f"{path} has no {column!r} column (its header is {','.join(header)!r}); "
                                              f"{layout.name} files have {','.join(layout.columns)}.")
                    positions.append(header.index(column))
                first_row = 2
            else:
                positions = list(range(6))
            for number, row in enumerate(rows, start=first_row):
                if not any(cell.strip() for cell in row):
                    continue
                where = f"{path}:{number}"
                if len(row) <= max(positions):
                    raise DataLayoutError(f"{where}: expected {max(positions) + 1} columns, found {len(row)}.")
                text, a, b, c, d, answer = (row[i] for i in positions)
                answer = answer.strip().upper()
                if answer not in CHOICES:
                    hint = (" (C-Eval's test split has no public answers; the scripts evaluate on val)"
                            if not answer else "")
                    raise DataLayoutError(f"{where}: the answer must be one of A, B, C, D, got {answer!r}{hint}.")
                questions.append(Question(text, (a, b, c, d), answer, where))
    except UnicodeDecodeError as error:
        raise DataLayoutError(f"{path} is not UTF-8 text ({error}).") from error
    except csv.Error as error:
        raise DataLayoutError(f"{path} is not a readable CSV file ({error}).") from error
    return questions


def read_choice_subjects(
    root: str | Path, layout: ChoiceLayout, subjects: Sequence[str] | None = None, limit: int | None = None
) -> list[Subject]:
    """Every subject (or the named ones) of a multiple-choice benchmark, sorted by name.

    `limit` keeps the first questions of each subject (the few-shot examples are never cut).
    """
    base = _layout_root(root, layout)
    eval_dir, dev_dir = base / layout.eval_dir, base / layout.dev_dir
    found = {path.name[: -len(layout.eval_suffix)]: path for path in eval_dir.glob("*" + layout.eval_suffix)}
    if not found:
        raise DataLayoutError(f"{eval_dir} has no *{layout.eval_suffix} files. Expected {layout.describe()}. "
                              f"Get the data from {layout.source}.")
    names = sorted(found)
    if subjects:
        unknown = [name for name in subjects if name not in found]
        if unknown:
            raise DataLayoutError(f"No {layout.name} subject {', '.join(map(repr, unknown))} in {eval_dir}; "
                                  f"the subjects there are: {', '.join(names)}.")
        names = [name for name in names if name in set(subjects)]
    result = []
    for name in names:
        dev_path = dev_dir / f"{name}{layout.dev_suffix}"
        if not dev_path.is_file():
            raise DataLayoutError(f"{dev_path} is missing: subject {name!r} has questions in {eval_dir} but no "
                                  f"few-shot examples. Expected {layout.describe()}.")
        questions = _read_csv(found[name], layout)
        if limit is not None:
            questions = questions[:limit]
        result.append(Subject(name, _read_csv(dev_path, layout), questions))
    return result


# --------------------------------------------------------------------------------------------------------------------
# JSON lines: GSM8K, HumanEval, tool use
# --------------------------------------------------------------------------------------------------------------------


def read_jsonl(path: Path, required: Sequence[str], what: str) -> list[dict[str, Any]]:
    """Objects of a JSON-lines file (gzip-compressed when the name ends in .gz), each checked for `required` keys."""
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataLayoutError(f"{path}:{number} is not JSON ({error}).") from error
                if not isinstance(record, dict):
                    raise DataLayoutError(f"{path}:{number} is not a JSON object.")
                missing = [key for key in required if not isinstance(record.get(key), str)]
                if missing:
                    raise DataLayoutError(f"{path}:{number} has no text field {', '.join(map(repr, missing))}; "
                                          f"{what} lines have {', '.join(required)}.")
                records.append(record)
    except (UnicodeDecodeError, OSError, EOFError) as error:
        raise DataLayoutError(f"{path} could not be read ({type(error).__name__}: {error}).") from error
    if not records:
        raise DataLayoutError(f"{path} holds no {what} lines.")
    return records


def _find_file(root: str | Path, names: Sequence[str], what: str, source: str) -> Path:
    """`root` when it is a file, else the first of `names` inside it."""
    root = Path(root).expanduser()
    if root.is_file():
        return root
    for name in names:
        if (root / name).is_file():
            return root / name
    where = f"{root} has no {' or '.join(names)}" if root.is_dir() else f"{str(root)!r} does not exist"
    raise DataLayoutError(f"{what} not found: {where}. Pass -d with the folder holding {names[0]} (or the file "
                          f"itself). Get it from {source}.")


@dataclass(frozen=True)
class MathProblem:
    question: str
    solution: str  # the reference solution, ending in "#### <answer>"
    answer: Decimal


GSM8K_SOURCE = "https://github.com/openai/grade-school-math (grade_school_math/data/test.jsonl)"
GSM8K_TRAIN_SOURCE = ("https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/"
                      "train.jsonl")


def read_gsm8k(root: str | Path, limit: int | None = None) -> list[MathProblem]:
    """GSM8K's test.jsonl: lines with "question" and "answer", the answer's last line being `#### <number>`."""
    from .scoring import parse_reference_answer  # scoring imports nothing from here; no cycle at import time

    path = _find_file(root, ["test.jsonl"], "GSM8K test set", GSM8K_SOURCE)
    problems = []
    for number, record in enumerate(read_jsonl(path, ["question", "answer"], "GSM8K"), start=1):
        answer = parse_reference_answer(record["answer"])
        if answer is None:
            raise DataLayoutError(f"{path}: problem {number} has no '#### <number>' line in its answer.")
        problems.append(MathProblem(record["question"], record["answer"], answer))
    return problems[:limit] if limit is not None else problems


def find_gsm8k_train(root: str | Path, train_file: str | Path | None = None) -> Path:
    """GSM8K's train.jsonl, where the few-shot exemplars come from: `train_file`, else next to the test set (in the
    folder `root`, or beside the file `root`)."""
    if train_file is not None:
        path = Path(train_file).expanduser()
        if not path.is_file():
            raise DataLayoutError(f"GSM8K train set {str(path)!r} (--train-file) does not exist. Get it from "
                                  f"{GSM8K_TRAIN_SOURCE}.")
        return path
    root = Path(root).expanduser()
    folder = root.parent if root.is_file() else root
    if not (folder / "train.jsonl").is_file():
        raise DataLayoutError(
            f"GSM8K train set not found: {folder} has no train.jsonl. The few-shot exemplars are problems of it, as "
            f"in the original scripts: put it next to test.jsonl (from {GSM8K_TRAIN_SOURCE}), pass --train-file, or "
            "pass --prompt-file with exemplars of your own.")
    return folder / "train.jsonl"


@dataclass(frozen=True)
class CodingTask:
    task_id: str
    prompt: str  # signature and docstring; the model completes the body
    canonical_solution: str
    test: str  # defines check(candidate)
    entry_point: str


HUMANEVAL_SOURCE = "https://github.com/openai/human-eval (data/HumanEval.jsonl.gz)"


def read_humaneval(root: str | Path, limit: int | None = None) -> list[CodingTask]:
    """HumanEval.jsonl (or the .jsonl.gz it is distributed as)."""
    path = _find_file(root, ["HumanEval.jsonl", "HumanEval.jsonl.gz"], "HumanEval problems", HUMANEVAL_SOURCE)
    fields = ["task_id", "prompt", "canonical_solution", "test", "entry_point"]
    tasks = [CodingTask(*(record[key] for key in fields)) for record in read_jsonl(path, fields, "HumanEval")]
    return tasks[:limit] if limit is not None else tasks


@dataclass(frozen=True)
class ToolUseSample:
    prompt: str  # the user turn: the ReAct instruction with the tool list, then "Question: ..."
    reference: str  # the reference reply ("Thought: ...\nAction: ...\nAction Input: ..."), or a plain answer


PLUGIN_SOURCE = ("https://qianwen-res.oss-cn-beijing.aliyuncs.com/opensource_data/exam_plugin_v20231206/ "
                 "(exam_plugin_v20231206_react_positive.jsonl and ..._negative.jsonl; see eval/EVALUATION.md)")


def read_tool_use(root: str | Path, file_name: str, limit: int | None = None) -> list[ToolUseSample]:
    """`root/file_name`, a ReAct evaluation file of the original Qwen release: JSON lines with "prompt" and "response".

    The positive file's references call a tool; the negative file's prompts offer tools that the question does not
    need, so a good model answers without calling any.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataLayoutError(f"Tool-use data folder {str(root)!r} does not exist. Pass -d with the folder holding "
                              f"the positive and negative files. Get them from {PLUGIN_SOURCE}.")
    path = _find_file(root, [file_name], f"Tool-use file {file_name}", PLUGIN_SOURCE)
    samples = [ToolUseSample(record["prompt"], record["response"])
               for record in read_jsonl(path, ["prompt", "response"], "tool-use")]
    return samples[:limit] if limit is not None else samples


# --------------------------------------------------------------------------------------------------------------------
# Long documents: perplexity at long context lengths
# --------------------------------------------------------------------------------------------------------------------

_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
# What a folder given to -d contributes: plain text files and JSON-lines collections; anything else is left alone.
_DOCUMENT_SUFFIXES = (".txt", ".md", ".tex", *_JSONL_SUFFIXES)


@dataclass(frozen=True)
class Document:
    text: str
    where: str  # the file, plus `:line` for a JSON-lines record


def _documents_of(path: Path) -> list[Document]:
    if path.name.endswith(_JSONL_SUFFIXES):
        return [Document(record["text"], f"{path}:{number}")
                for number, record in enumerate(read_jsonl(path, ["text"], "document"), start=1)]
    try:
        return [Document(path.read_text(encoding="utf-8"), str(path))]
    except UnicodeDecodeError as error:
        raise DataLayoutError(f"{path} is not UTF-8 text ({error}); -d takes text files, folders of them, or "
                              "JSON-lines files with a \"text\" field.") from error
    except OSError as error:
        raise DataLayoutError(f"{path} could not be read ({type(error).__name__}: {error}).") from error


def read_documents(paths: Sequence[str | Path]) -> list[Document]:
    """The documents of `-d`, in the order given: a text file is one document, each line of a `.jsonl` (or
    `.jsonl.gz`) file one document (its "text" field, as arXiv dumps such as RedPajama's and proof-pile's store
    them), and a folder contributes its `.txt`, `.md`, `.tex` and JSON-lines files, searched recursively, by name."""
    documents: list[Document] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_DOCUMENT_SUFFIXES))
            if not files:
                raise DataLayoutError(f"{path} holds no {', '.join(_DOCUMENT_SUFFIXES)} files to read documents from.")
        elif path.is_file():
            files = [path]
        else:
            raise DataLayoutError(f"{str(given)!r} does not exist; -d takes text files, folders of them, or JSON-lines "
                                  "files with a \"text\" field.")
        for file in files:
            documents.extend(document for document in _documents_of(file) if document.text.strip())
    if not documents:
        raise DataLayoutError(f"{', '.join(map(str, paths))}: no text to evaluate (every document is empty).")
    return documents
