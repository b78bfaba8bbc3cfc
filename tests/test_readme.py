"""The README's commands and code, run in document order the way a user would, against small checkpoints.

The folder names the README uses for released checkpoints (`Qwen-7B-Chat`, `Qwen-7B`) are tiny random checkpoints
in the released layout here; each Python block runs in a fresh interpreter so that blocks claiming not to need the
`qwen` package really do not import it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# Commands that set up the machine (already done for the test run) rather than use the repository.
SET_UP = ("pip install", "python -m qwen.vocab fetch", "python -m pytest", "python bench/")


def readme_blocks() -> list[tuple[str, str]]:
    return [(language, body) for language, body in FENCE.findall(README.read_text(encoding="utf-8"))]


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{shlex.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def test_readme_blocks_run_in_order(tmp_path: Path, tiny_chat_dir: Path, tiny_base_dir: Path) -> None:
    # Released folders carry no code of ours until `install-code` is run on them.
    for name, source in (("Qwen-7B-Chat", tiny_chat_dir), ("Qwen-7B", tiny_base_dir)):
        shutil.copytree(source, tmp_path / name)
        assert not list((tmp_path / name).glob("*.py"))
        # Released configs allow 512 new tokens; the blocks' code path is the same with fewer, and the run shorter.
        generation_config = tmp_path / name / "generation_config.json"
        generation_config.write_text(json.dumps({**json.loads(generation_config.read_text()), "max_new_tokens": 24}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}

    ran = {"bash": 0, "python": 0}
    for language, body in readme_blocks():
        if language == "bash":
            for line in body.splitlines():
                command = line.split("#")[0].strip()
                if not command or command.startswith(SET_UP):
                    continue
                assert command.startswith("python -m qwen."), f"unexpected README command: {command}"
                run([sys.executable, *shlex.split(command)[1:]], tmp_path, env)
                ran["bash"] += 1
        elif language == "python":
            if "import qwen" not in body:
                # Such a block must work on remote code alone.
                body += '\nimport sys\nassert "qwen" not in sys.modules, "this block imported the qwen package"\n'
            run([sys.executable, "-c", body], tmp_path, env)
            ran["python"] += 1
    assert ran["bash"] >= 2 and ran["python"] >= 5, ran
    # install-code ran on the chat folder; the remote-code block above loaded from it.
    assert (tmp_path / "Qwen-7B-Chat" / "modeling_qwen.py").is_file()
    assert any(path.name == "modeling_qwen.py" for path in (tmp_path / "modules").rglob("*.py"))
