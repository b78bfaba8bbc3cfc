"""Result files: per-item records written as they are computed (so a run resumes where it stopped), the summary JSON
and the printed table.

An output folder holds:

- `run.json`: the checkpoint and the settings that change answers (shots, prompt file, lengths, ...). A rerun with
  different ones stops with an error instead of mixing two runs' answers; `--overwrite` starts afresh.
- `items/<subject>.jsonl`: one JSON object per evaluated question, appended as soon as it is scored. A rerun skips
  every question found there, so a subject whose file is complete costs nothing.
- `results.json`: the scores (per subject, per category, overall), rewritten at the end of every run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal


class ResultsMismatchError(ValueError):
    """The output folder holds results of a run with other settings."""


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(data, out, ensure_ascii=False, indent=2)
        out.write("\n")
    os.replace(temporary, path)


class ResultStore:
    """Per-item records of one run under `folder`, keyed by group (a subject) and item id."""

    def __init__(self, folder: str | Path, manifest: Mapping[str, Any], overwrite: bool = False) -> None:
        self.folder = Path(folder)
        self.items = self.folder / "items"
        manifest = json.loads(json.dumps(manifest))  # as it will read back: tuples become lists
        run_file = self.folder / "run.json"
        if overwrite:
            shutil.rmtree(self.items, ignore_errors=True)
            (self.folder / "results.json").unlink(missing_ok=True)
        elif run_file.is_file():
            try:
                previous = json.loads(run_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                previous = None
            if previous != manifest:
                changed = sorted(key for key in set(manifest) | set(previous or {})
                                 if (previous or {}).get(key) != manifest.get(key))
                raise ResultsMismatchError(
                    f"{self.folder} holds results of another run (different {', '.join(changed) or 'run.json'}). "
                    "Pass --overwrite to replace them, or -o with another folder.")
        write_json(run_file, manifest)

    def _path(self, group: str) -> Path:
        return self.items / (re.sub(r"[^\w.-]", "_", group) + ".jsonl")

    def load(self, group: str) -> dict[str, dict[str, Any]]:
        """The records already written for `group`, by id. A last line cut short by a crash is dropped."""
        path = self._path(group)
        if not path.is_file():
            return {}
        records: dict[str, dict[str, Any]] = {}
        good = 0
        with path.open("rb") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    break
                records[str(record["id"])] = record
                good += len(line)
        if good != path.stat().st_size:  # keep the file appendable: cut the broken tail
            with path.open("r+b") as handle:
                handle.truncate(good)
        return records

    def append(self, group: str, record: Mapping[str, Any]) -> None:
        path = self._path(group)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def path_of(self, group: str) -> Path:
        return self._path(group)


# --------------------------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------------------------


def _score(correct: int, total: int) -> dict[str, Any]:
    return {"correct": correct, "total": total, "accuracy": 100 * correct / total if total else 0.0}


def accuracy_summary(
    records: Mapping[str, Sequence[Mapping[str, Any]]],
    average: Literal["micro", "macro"],
    categories: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Accuracy (in percent) per group, per category and overall, from records with a boolean "correct".

    "micro" counts every question alike (MMLU's convention); "macro" averages the groups' accuracies (C-Eval's and
    CMMLU's), so a small subject weighs as much as a large one.
    """
    groups = {name: _score(sum(bool(r["correct"]) for r in items), len(items))
              for name, items in records.items() if items}

    def combine(names: Sequence[str]) -> dict[str, Any] | None:
        present = [groups[name] for name in names if name in groups]
        if not present:
            return None
        score = _score(sum(g["correct"] for g in present), sum(g["total"] for g in present))
        if average == "macro":
            score["accuracy"] = sum(g["accuracy"] for g in present) / len(present)
        score["subjects"] = len(present)
        return score

    summary: dict[str, Any] = {"average": average, "subjects": groups}
    if categories:
        summary["categories"] = {name: score for name, members in categories.items()
                                 if (score := combine(members)) is not None}
    summary["overall"] = combine(list(groups)) or _score(0, 0)
    return summary


def format_table(title: str, summary: Mapping[str, Any]) -> str:
    """The summary as a text table: subjects, then categories, then the overall score."""
    rows: list[tuple[str, str, str, str]] = [("", "correct", "total", "accuracy %")]
    for name, score in summary.get("subjects", {}).items():
        rows.append((name, str(score["correct"]), str(score["total"]), f"{score['accuracy']:.2f}"))
    categories = summary.get("categories", {})
    if categories:
        rows.append(("", "", "", ""))
        for name, score in categories.items():
            rows.append((f"[{name}]", str(score["correct"]), str(score["total"]), f"{score['accuracy']:.2f}"))
    overall = summary["overall"]
    rows.append(("", "", "", ""))
    label = f"overall ({summary['average']} average)" if "average" in summary else "overall"
    rows.append((label, str(overall["correct"]), str(overall["total"]), f"{overall['accuracy']:.2f}"))
    width = max(len(row[0]) for row in rows)
    lines = [title, "=" * len(title)]
    lines += [f"{row[0]:<{width}}  {row[1]:>8}  {row[2]:>7}  {row[3]:>10}".rstrip() for row in rows]
    return "\n".join(lines)
