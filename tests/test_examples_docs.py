"""The code in examples/*.md runs as written, against a small checkpoint under the folder name the page uses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, checkout_env, free_port, stop, wait_until_healthy

FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def fenced_blocks(path: Path) -> list[tuple[str, str]]:
    return FENCE.findall(path.read_text(encoding="utf-8"))


def run_python_blocks(page: Path, cwd: Path, **env: str) -> str:
    """All Python blocks of a page, in order, as one script (they build on each other); returns its stdout.

    The script is a file, not `python -c`: smolagents' @tool reads the source of the function it wraps.
    """
    script = cwd / f"{page.stem}.py"
    script.write_text("\n".join(body for language, body in fenced_blocks(page) if language == "python"))
    done = subprocess.run([sys.executable, str(script)], cwd=cwd, env=checkout_env(**env), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{page.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def test_system_prompt_page_runs(tiny_chat_dir: Path, tmp_path: Path) -> None:
    page = REPO / "examples" / "system_prompt.md"
    folder = tmp_path / "Qwen-1_8B-Chat"  # the folder name the page uses
    shutil.copytree(tiny_chat_dir, folder)
    # The random-weight model's replies are noise; one token runs the same code as a long reply, and each costs
    # 0.4-0.8 s on two cores: transformers' SuppressTokensLogitsProcessor (padding rows) calls torch.isin every step.
    config = folder / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_new_tokens": 1}))
    output = run_python_blocks(page, tmp_path)

    blocks = fenced_blocks(page)
    printed_prompt = next(body for language, body in blocks if language == "text")
    assert printed_prompt in output  # the prompt shown on the page is what make_context prints
    for style in ("telegram", "classical Chinese", "children"):  # one line per style, each under its own name
        assert re.search(rf"^\[{style}\] ", output, re.MULTILINE), (style, output)


@pytest.mark.slow
def test_transformers_agent_page_runs_smolagents_against_the_server(tmp_path: Path) -> None:
    # The page's smolagents code, as written, against openai_api.py. A random-weight model never writes the code
    # CodeAgent asks for, so every step fails to parse and the run ends at max_steps with a (noise) final answer; what
    # this checks is that the current smolagents API is the one the page uses and that it can talk to the server
    # (its prompts are ~2,100 tokens: the checkpoint gets a 4,096-token context).
    from qwen.checkpoint import write_random_checkpoint

    folder = write_random_checkpoint(tmp_path / "Qwen-7B-Chat", size="tiny", chat=True, seed=0, seq_length=4096)
    config = folder / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_new_tokens": 8}))
    port = free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "openai_api.py"), "-c", str(folder), "--server-port",
                               str(port), "--cpu-only"], cwd=REPO, env=checkout_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(server, port)
        output = run_python_blocks(REPO / "examples" / "transformers_agent.md", tmp_path,
                                   QWEN_API_BASE=f"http://127.0.0.1:{port}/v1")
    finally:
        stop(server)
    assert "Reached max steps." in output
