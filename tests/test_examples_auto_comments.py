"""examples/auto_comments.py: the model's comments go into a copy of the file, and the code stays exactly as it was."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, checkout_env

from qwen import QWenTokenizer

sys.path.insert(0, str(REPO / "examples"))

import auto_comments  # noqa: E402
from auto_comments import code_blocks, merge_comments  # noqa: E402

CODE = '''import math


def area(radius):
    return math.pi * radius ** 2


HELP = """Usage:
    area R
"""
total = area(1) + \\
    area(2)
'''

# A reply with a comment everywhere a model might put one, including places where a comment would change the program.
REPLY = '''Here is the commented code:
```python
# Import the math module
import math


# Area of a circle
def area(radius):
    # pi times the radius squared
    return math.pi * radius ** 2  # in square units


HELP = """Usage:
    # inside the string: not a comment
    area R
"""  # the help text
# the sum of two areas
total = area(1) + \\
    # between continued lines: impossible
    area(2)  # the second area
```'''

COMMENTED = '''# Import the math module
import math


# Area of a circle
def area(radius):
    # pi times the radius squared
    return math.pi * radius ** 2  # in square units


HELP = """Usage:
    area R
"""  # the help text
# the sum of two areas
total = area(1) + \\
    area(2)  # the second area
'''


def test_comments_go_where_the_model_wrote_them_and_nowhere_they_change_the_code() -> None:
    assert merge_comments(CODE, REPLY) == COMMENTED
    # Without a fence the whole reply is the code; Windows line ends stay.
    crlf = CODE.replace("\n", "\r\n")
    assert merge_comments(crlf, REPLY.split("```python\n")[1].rstrip("`")) == COMMENTED.replace("\n", "\r\n")


def test_changed_lines_get_no_comments_and_existing_comments_are_not_repeated() -> None:
    code = "# Existing note\nx = compute()\ny = x + 1\nprint(y)\n"
    reply = ("# Existing note\n# what x is\nx = compute()  # Existing note\n# changed below\ny = x + 2  # wrong\n"
             "# show it\nprint(y)\nextra_code_the_model_added()\n")
    assert merge_comments(code, reply) == (
        "# Existing note\n# what x is\nx = compute()\ny = x + 1\n# show it\nprint(y)\n"
    )
    assert merge_comments(code, "I cannot help with that.") == code


def test_blocks_are_whole_top_level_statements() -> None:
    source = "import os\n\n@decorator\ndef first():\n    return 1\n\n\nclass Second:\n    a = 1\n    b = 2\n\nrun()\n"
    blocks = code_blocks(source, max_lines=4)
    assert "".join(blocks) == source
    assert blocks == ["import os\n\n", "@decorator\ndef first():\n    return 1\n\n\n",
                      "class Second:\n    a = 1\n    b = 2\n\n", "run()\n"]
    assert code_blocks(source, max_lines=50) == [source]
    with pytest.raises(auto_comments.SourceError, match=r"not valid Python \(line 1"):
        code_blocks("def broken(:\n", 50)


def test_the_illustration_of_the_guide_is_what_the_script_does() -> None:
    guide = (REPO / "examples" / "auto_comments.md").read_text(encoding="utf-8")
    illustration = guide[guide.index("## An illustration"):]
    reply_block = re.search(r"^````text\n(.*?)^````$", illustration, flags=re.DOTALL | re.MULTILINE)
    illustration = illustration.replace(reply_block.group(0), "")
    given, commented = re.findall(r"^```python\n(.*?)^```$", illustration, flags=re.DOTALL | re.MULTILINE)
    reply = reply_block.group(1)
    assert merge_comments(given, reply) == commented


def test_what_it_leaves_alone(tmp_path: Path, capsys) -> None:
    # None of these need the model, so a checkpoint that does not exist is never loaded.
    no_model = ["-c", str(tmp_path / "no-such-checkpoint")]
    assert auto_comments.main(["--path", str(tmp_path / "missing.py"), *no_model]) == 1
    assert f"error: {tmp_path / 'missing.py'} does not exist" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("hello\n")
    assert auto_comments.main(["--path", str(tmp_path / "notes.txt"), *no_model]) == 1
    assert "is not a Python file (.py)" in capsys.readouterr().err

    project = tmp_path / "project"
    (project / "pkg").mkdir(parents=True)
    (project / "pkg" / "done.py").write_text("x = 1\n")
    (project / "pkg" / "done_comments.py").write_text("# mine\nx = 1\n")
    (project / "broken.py").write_text("def broken(:\n")
    (project / "latin1.py").write_bytes("s = 'café'\n".encode("latin-1"))
    assert auto_comments.main(["--path", str(project), *no_model]) == 0
    printed = capsys.readouterr()
    assert f"{project / 'pkg' / 'done_comments.py'} exists, kept (pass --regenerate to write it again)." in printed.out
    assert f"warning: {project / 'broken.py'} skipped: not valid Python (line 1" in printed.err
    assert f"warning: {project / 'latin1.py'} skipped: not UTF-8 text" in printed.err
    assert (project / "pkg" / "done_comments.py").read_text() == "# mine\nx = 1\n"
    assert sorted(path.name for path in project.rglob("*_comments.py")) == ["done_comments.py"]


SOURCE = "def mean(values):\n    total = sum(values)\n    return total / len(values)\n"
MODEL_REPLY = ("```python\n# Average of a list\ndef mean(values):\n    total = sum(values)  # add them up\n"
               "    return total / len(values)\n```")


@pytest.mark.slow
def test_command_line_with_a_model_trained_to_comment(tmp_path_factory, tmp_path: Path, tokenizer: QWenTokenizer,
                                                      vocab_file: Path, capsys) -> None:
    # A tiny checkpoint trained to answer the script's own request for this file with MODEL_REPLY.
    from trained_checkpoint import chat_turn, memorizing_checkpoint_cached

    prompt = auto_comments.comment_prompt(SOURCE, "English")
    folder = memorizing_checkpoint_cached(tmp_path_factory.getbasetemp() / "memorized",
                                          [chat_turn(tokenizer, prompt, MODEL_REPLY)], vocab_file=vocab_file)
    source = tmp_path / "stats.py"
    source.write_text(SOURCE)
    arguments = ["--path", str(source), "--language", "English", "-c", str(folder), "--cpu-only"]
    done = subprocess.run([sys.executable, str(REPO / "examples" / "auto_comments.py"), *arguments],
                          capture_output=True, text=True, timeout=300, env=checkout_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == f"{source} -> {tmp_path / 'stats_comments.py'}\n"
    assert (tmp_path / "stats_comments.py").read_text() == (
        "# Average of a list\ndef mean(values):\n    total = sum(values)  # add them up\n"
        "    return total / len(values)\n"
    )
    assert source.read_text() == SOURCE

    # A second run keeps the copy (it may have been edited since) unless told to write it again.
    (tmp_path / "stats_comments.py").write_text("edited\n")
    assert auto_comments.main(arguments) == 0 and "exists, kept" in capsys.readouterr().out
    assert (tmp_path / "stats_comments.py").read_text() == "edited\n"
    assert auto_comments.main([*arguments, "--regenerate"]) == 0
    assert (tmp_path / "stats_comments.py").read_text().startswith("# Average of a list\n")
