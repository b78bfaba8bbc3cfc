"""Setting the project up: the README's install and test commands, .ci/run, and the requirement files pip reads.

The pip checks run pip itself with `--dry-run --no-index`: it resolves the files against what is installed here (the
suite's own environment, installed by those commands), so they need no network and change nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

from support import REPO

FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_section_commands(title: str) -> list[str]:
    """The command lines of the ```bash blocks in README.md's `## title` section, without their comments."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else None]
    lines = [line for language, body in FENCE.findall(section) if language == "bash" for line in body.splitlines()]
    return [command for command in (line.split(" #")[0].strip() for line in lines) if command]


def ci_commands() -> list[str]:
    """The commands .ci/run runs after its set-up lines."""
    script = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    commands = script.split("# README.md's commands:\n", 1)[1]
    return [line.strip() for line in commands.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def requirements_in(path: Path) -> set[str]:
    """The requirements a pip requirements file stands for, following its `-r` includes."""
    found: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split(" #")[0].strip()
        if line.startswith("-r "):
            found |= requirements_in(path.parent / line[3:].strip())
        elif line and not line.startswith("#"):
            found.add(str(Requirement(line)))
    return found


def pip_dry_run(*args: str, report: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", *args]
    if report is not None:
        command += ["--report", str(report)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ci_runs_exactly_the_readme_install_and_test_commands():
    install = readme_section_commands("Install")
    assert install == [
        'pip install -e ".[test]"',
        "sudo apt-get update && sudo apt-get install -y --no-upgrade chromium bubblewrap",
    ]  # one install command for the package; the vocabulary needs none (it is fetched on first use)
    assert ci_commands() == install + readme_section_commands("Test")


def test_the_test_extra_installs_the_package_with_all_that_requirements_test_txt_lists(tmp_path):
    """`pip install -e ".[test]"`: setuptools reads the extra's files itself (it does not follow pip's `-r`), so the
    extra must come out as the same list as the pip file, with torch pinned as requirements.txt pins it."""
    report = tmp_path / "report.json"
    result = pip_dry_run("--no-build-isolation", "-e", ".[test]", report=report)
    assert result.returncode == 0 and "does not provide the extra" not in result.stderr, result.stderr
    [package] = json.loads(report.read_text())["install"]  # everything else is already installed here
    metadata = package["metadata"]
    assert metadata["name"] == "qwen"
    by_extra: dict[str, set[str]] = {}
    for line in metadata["requires_dist"]:
        requirement = Requirement(line)
        extra = re.fullmatch(r'extra == "(\w+)"', str(requirement.marker)) if requirement.marker else None
        requirement.marker = None
        by_extra.setdefault(extra.group(1) if extra else "", set()).add(str(requirement))
    assert by_extra["test"] == requirements_in(REPO / "requirements-test.txt")
    assert by_extra[""] == requirements_in(REPO / "requirements.txt")
    assert "torch==2.13.0" in by_extra[""]


def test_the_original_web_demo_requirements_file_installs_the_web_demo_requirements():
    """`pip install -r requirements_web_demo.txt`, as the original README printed it."""
    assert requirements_in(REPO / "requirements_web_demo.txt") == requirements_in(REPO / "requirements-web.txt")
    result = pip_dry_run("-r", "requirements_web_demo.txt")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^Requirement already satisfied: gradio<7,>=6 ", result.stdout, re.MULTILINE), result.stdout
