"""Comment Python files with Qwen-Chat, leaving every line of code exactly as it was.

    python examples/auto_comments.py --path train.py                  # writes train_comments.py next to it
    python examples/auto_comments.py --path my_project/ --regenerate  # every .py file below the folder, anew
    python examples/auto_comments.py --path train.py --language English -c Qwen/Qwen-7B-Chat

See examples/auto_comments.md for what it does and an example. In short: each file is cut into blocks of whole
top-level statements (about `--max-lines` lines each), the model is asked to comment each block, and only the `#`
comments of its reply are kept: a comment line goes above the line of code it was written above, a comment written at
the end of a line goes at the end of that line. Whatever else the model changed (code, docstrings, blank lines) is
ignored, and the result is checked to hold the same code tokens as the file it came from.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import sys
import tokenize
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qwen.loading import add_model_arguments, load_from_args

SUFFIX = "_comments"
_FENCED = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)


class SourceError(ValueError):
    """A file this script cannot comment (not UTF-8, not valid Python)."""


# --------------------------------------------------------------------------------------------------------------------
# What to ask


def comment_prompt(block: str, language: str) -> str:
    """The chat query for one block of code."""
    return (
        f"```python\n{block.rstrip()}\n```\n\n"
        f"Add comments in {language} to this Python code. Put a comment above every function and class saying what "
        "it does, and explain each step that is not obvious. Do not change, add or remove any code. Reply with the "
        "commented code only."
    )


def code_blocks(source: str, max_lines: int) -> list[str]:
    """`source` cut into consecutive blocks of whole top-level statements, each at most `max_lines` lines unless one
    statement alone is longer. Joined, the blocks are `source` again."""
    lines = source.splitlines(keepends=True)
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        raise SourceError(f"not valid Python (line {error.lineno}: {error.msg})") from None
    # A statement begins at its first decorator; comments and blank lines before it stay with the block before.
    starts = sorted({min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1
                     for node in tree.body})
    cuts = [0, *(start for start in starts if start > 0), len(lines)]
    blocks: list[list[str]] = [[]]
    for begin, end in zip(cuts, cuts[1:]):
        if blocks[-1] and len(blocks[-1]) + end - begin > max_lines:
            blocks.append([])
        blocks[-1].extend(lines[begin:end])
    return ["".join(block) for block in blocks if block]


# --------------------------------------------------------------------------------------------------------------------
# Keeping the comments of the reply, and nothing else


def _reply_code(reply: str) -> list[str]:
    """The lines of the code in a reply: inside its first fenced block if it has one."""
    fenced = _FENCED.search(reply)
    return (fenced.group(1) if fenced else reply).splitlines()


def _comment_slots(source: str) -> tuple[set[int], set[int]]:
    """(lines a comment line may go above, lines a comment may be appended to), 0-based.

    Not above a line that starts inside a string or continues a backslash-continued line; not after a line that ends
    inside a string, ends in a backslash or has a comment already. Anywhere else a comment changes no code.
    """
    lines = source.splitlines()
    above, after = set(range(len(lines))), set(range(len(lines)))
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        first, last = token.start[0] - 1, token.end[0] - 1
        if token.type == tokenize.COMMENT:
            after.discard(first)
        elif last > first:  # a string (or f-string part) over several lines
            above.difference_update(range(first + 1, last + 1))
            after.difference_update(range(first, last))
    for index, line in enumerate(lines):
        if line.endswith("\\") and index in after:  # (a backslash inside a string was excluded above)
            after.discard(index)
            above.discard(index + 1)
    return above, after


def _code_tokens(source: str) -> list[tuple[int, str]]:
    return [(token.type, token.string) for token in tokenize.generate_tokens(io.StringIO(source).readline)
            if token.type not in (tokenize.COMMENT, tokenize.NL)]


def _is_comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def merge_comments(code: str, reply: str) -> str:
    """`code` with the `#` comments of the model's commented version `reply` added; the code itself unchanged.

    Each line of `code` is looked up in the reply, in order. The comment lines directly above its copy there go above
    it (with its indentation), and a comment after its copy goes at its end. Lines the model changed or dropped get no
    comments; comments the file already has are not added twice.
    """
    lines = code.splitlines(keepends=True)
    replied = _reply_code(reply)
    above_ok, after_ok = _comment_slots(code)
    existing = {line.strip() for line in lines if _is_comment(line)}
    merged: list[str] = []
    position = 0  # where in the reply the search for the next line starts
    for index, line in enumerate(lines):
        text = line.strip()
        if not text or _is_comment(line):
            merged.append(line)
            continue
        match = next((k for k in range(position, len(replied)) if _same_code(replied[k], text)), None)
        if match is None:
            merged.append(line)
            continue
        first = match
        while first > position and _is_comment(replied[first - 1]):
            first -= 1
        body = line.rstrip("\r\n")
        ending = line[len(body):] or "\n"  # the last line may have none; a comment above it needs one
        comments = [comment.strip() for comment in replied[first:match] if comment.strip() not in existing]
        if comments and index in above_ok:
            indent = body[:len(body) - len(body.lstrip())]
            merged.extend(f"{indent}{comment}{ending}" for comment in comments)
        trailing = replied[match].strip()[len(text):].strip()
        if trailing.startswith("#") and trailing not in existing and index in after_ok:
            line = f"{body}  {trailing}{line[len(body):]}"
        merged.append(line)
        position = match + 1
    result = "".join(merged)
    if _code_tokens(result) != _code_tokens(code):  # _comment_slots makes this impossible; never write changed code
        raise AssertionError("merging comments changed the code; please report this file")
    return result


def _same_code(candidate: str, text: str) -> bool:
    """Whether a reply line is the code line `text`, possibly followed by a comment."""
    candidate = candidate.strip()
    return candidate == text or (candidate.startswith(text) and candidate[len(text):].lstrip().startswith("#"))


# --------------------------------------------------------------------------------------------------------------------
# Files


def output_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}{SUFFIX}{path.suffix}")


def source_files(path: Path) -> Iterator[Path]:
    """The Python files to comment: `path` itself, or every .py file below it, never one this script wrote."""
    candidates = [path] if path.is_file() else sorted(path.rglob("*.py"))
    for candidate in candidates:
        if candidate.suffix == ".py" and not candidate.stem.endswith(SUFFIX):
            yield candidate


def comment_blocks(blocks: list[str], model: Any, tokenizer: Any, language: str) -> str:
    """The blocks of a file with the comments the model wrote for each, joined."""
    commented = []
    for block in blocks:
        if block.strip():
            reply, _ = model.chat(tokenizer, comment_prompt(block, language), history=None)
            block = merge_comments(block, reply)
        commented.append(block)
    return "".join(commented)


def _read_blocks(path: Path, max_lines: int) -> list[str]:
    try:
        # Bytes, so that line ends come back as they were.
        return code_blocks(path.read_bytes().decode("utf-8"), max_lines)
    except UnicodeDecodeError as error:
        raise SourceError(f"not UTF-8 text ({error.reason} at byte {error.start})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", type=Path, required=True, help="a .py file, or a folder to search for .py files")
    parser.add_argument("--regenerate", action="store_true",
                        help="write FILE_comments.py again where it exists (by default such files are kept)")
    parser.add_argument("--language", default="Chinese", help="language of the comments (default: %(default)s)")
    parser.add_argument("--max-lines", type=int, default=50,
                        help="lines of code per request to the model (default: %(default)s)")
    add_model_arguments(parser)
    args = parser.parse_args(argv)

    if not args.path.exists():
        print(f"error: {args.path} does not exist; give a .py file or a folder.", file=sys.stderr)
        return 1
    if args.path.is_file() and args.path.suffix != ".py":
        print(f"error: {args.path} is not a Python file (.py).", file=sys.stderr)
        return 1
    todo: dict[Path, list[str]] = {}
    for path in source_files(args.path):
        if output_path(path).exists() and not args.regenerate:
            print(f"{output_path(path)} exists, kept (pass --regenerate to write it again).")
            continue
        try:
            todo[path] = _read_blocks(path, args.max_lines)
        except SourceError as error:
            print(f"warning: {path} skipped: {error}.", file=sys.stderr)
    if not todo:
        return 0

    model, tokenizer = load_from_args(args)
    for path, blocks in todo.items():
        output_path(path).write_bytes(comment_blocks(blocks, model, tokenizer, args.language).encode("utf-8"))
        print(f"{path} -> {output_path(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
