"""The released vocabulary fetched on first use: through pip, checked by sha256, written atomically, one error line.

pip is real in every test. The default ones give it a local wheel folder in place of PyPI (PIP_NO_INDEX with
PIP_FIND_LINKS, as a mirror would), holding a wheel laid out as dashscope's with the real qwen.tiktoken inside, so that
they need no network; the slow one fetches from PyPI itself.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qwen.tokenization_qwen import QWEN_TIKTOKEN_SHA256
from qwen.vocab import find_vocab
from qwen.vocab import main as vocab_main
from support import REPO, checkout_env

FETCH_NOTICE = "is not in {folder} yet: fetching it once from PyPI (inside the dashscope wheel), checked by sha256."


def write_wheel(folder: Path, name: str, version: str, member: str, data: bytes) -> Path:
    """A minimal wheel that pip accepts: the member, METADATA, WHEEL and RECORD."""
    folder.mkdir(parents=True, exist_ok=True)
    dist_info = f"{name}-{version}.dist-info"
    files = {
        member: data,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{dist_info}/RECORD,,\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, content in {**files, f"{dist_info}/RECORD": record.encode()}.items():
            archive.writestr(path, content)
    return wheel


def offline_pip_env(wheels: Path, vocab: Path, **extra: str) -> dict[str, str]:
    wheels.mkdir(parents=True, exist_ok=True)
    return checkout_env(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels), QWEN_VOCAB_FILE=str(vocab), **extra)


FIND_VOCAB = "from qwen.vocab import find_vocab; print(find_vocab())"


def test_first_use_fetches_the_vocabulary_and_two_processes_at_once_leave_one_whole_file(tmp_path, vocab_file,
                                                                                          monkeypatch, capsys):
    wheels = tmp_path / "wheels"
    write_wheel(wheels, "dashscope", "99.0.0", "dashscope/resources/qwen.tiktoken", vocab_file.read_bytes())
    target = tmp_path / "cache" / "qwen.tiktoken"
    env = offline_pip_env(wheels, target)
    processes = [subprocess.Popen([sys.executable, "-c", FIND_VOCAB], env=env, cwd=tmp_path, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        assert stdout == f"{target}\n"
        assert f"qwen.tiktoken {FETCH_NOTICE.format(folder=target.parent)}" in stderr.splitlines()
    assert hashlib.sha256(target.read_bytes()).hexdigest() == QWEN_TIKTOKEN_SHA256
    assert [path.name for path in target.parent.iterdir()] == ["qwen.tiktoken"]  # no partial file left behind
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    # Found, not fetched again.
    monkeypatch.setenv("QWEN_VOCAB_FILE", str(target))
    assert find_vocab() == target and capsys.readouterr().err == ""


def test_a_wheel_whose_file_is_not_the_released_one_is_refused(tmp_path, vocab_file, monkeypatch, capsys):
    wheels = tmp_path / "wheels"
    write_wheel(wheels, "dashscope", "99.0.0", "dashscope/resources/qwen.tiktoken", vocab_file.read_bytes() + b"x")
    target = tmp_path / "cache" / "qwen.tiktoken"
    for name, value in offline_pip_env(wheels, target).items():
        monkeypatch.setenv(name, value)
    assert vocab_main(["fetch"]) == 1
    error = capsys.readouterr().err
    assert error == (
        "error: Fetching it from PyPI failed (dashscope-99.0.0-py3-none-any.whl: its dashscope/resources/qwen.tiktoken "
        "is not the released file (sha256 differs)). Run `python -m qwen.vocab fetch` where pip can reach PyPI, or set "
        "QWEN_VOCAB_FILE to a copy of the released qwen.tiktoken (every released checkpoint folder has one).\n"
    )
    assert list(target.parent.iterdir()) == []


def test_first_use_without_a_reachable_index_ends_the_demo_with_one_line(tmp_path):
    target = tmp_path / "cache" / "qwen.tiktoken"
    env = offline_pip_env(tmp_path / "no-wheels", target, QWEN_DEMO_CHECKPOINT=str(tmp_path / "demo"))
    result = subprocess.run([sys.executable, str(REPO / "cli_demo.py"), "-c", "demo", "--query", "Hello"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-2] == f"qwen.tiktoken {FETCH_NOTICE.format(folder=target.parent)}"
    assert lines[-1] == (
        f"error: The Qwen vocabulary file was not found at {target}. Fetching it from PyPI failed (pip download "
        "dashscope: ERROR: No matching distribution found for dashscope). Run `python -m qwen.vocab fetch` where pip "
        "can reach PyPI, or set QWEN_VOCAB_FILE to a copy of the released qwen.tiktoken (every released checkpoint "
        "folder has one)."
    )
    assert not target.exists() and not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_fetch_from_pypi_itself(tmp_path):
    """The real source: the dashscope wheel on PyPI (needs the network)."""
    target = tmp_path / "qwen.tiktoken"
    result = subprocess.run([sys.executable, "-m", "qwen.vocab", "fetch", "--dest", str(target)], cwd=tmp_path,
                            env=checkout_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{target}\n"
    assert hashlib.sha256(target.read_bytes()).hexdigest() == QWEN_TIKTOKEN_SHA256
