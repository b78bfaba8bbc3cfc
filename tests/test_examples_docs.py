"""The code in examples/*.md runs as written, against a small checkpoint under the folder name the page uses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from support import REPO, checkout_env

FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def fenced_blocks(path: Path) -> list[tuple[str, str]]:
    return FENCE.findall(path.read_text(encoding="utf-8"))


def run_python_blocks(page: Path, cwd: Path) -> str:
    """All Python blocks of a page, in order, as one script (they build on each other); returns its stdout."""
    script = "\n".join(body for language, body in fenced_blocks(page) if language == "python")
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=checkout_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{page.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def test_system_prompt_page_runs(tiny_chat_dir: Path, tmp_path: Path) -> None:
    page = REPO / "examples" / "system_prompt.md"
    folder = tmp_path / "Qwen-1_8B-Chat"  # the folder name the page uses
    shutil.copytree(tiny_chat_dir, folder)
    # The random-weight model's replies are noise; two tokens run the same code as a long reply, and each costs
    # 0.4-0.8 s on two cores: transformers' SuppressTokensLogitsProcessor (padding rows) calls torch.isin every step.
    config = folder / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_new_tokens": 2}))
    output = run_python_blocks(page, tmp_path)

    blocks = fenced_blocks(page)
    printed_prompt = next(body for language, body in blocks if language == "text")
    assert printed_prompt in output  # the prompt shown on the page is what make_context prints
    assert output.count("[") >= 3  # one line per style
