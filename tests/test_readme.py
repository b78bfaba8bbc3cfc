"""The README's commands and code, run in document order the way a user would, against small checkpoints.

The folder names the README uses for released checkpoints (`Qwen-7B-Chat`, `Qwen-7B`) are tiny random checkpoints
in the released layout here; each Python block runs in a fresh interpreter so that blocks claiming not to need the
`qwen` package really do not import it.

README_CN.md, the Chinese README, carries a subset of README.md's blocks, byte for byte and in the same order. Its
blocks are therefore run once, as README.md's, and a block that drifts from the English one fails the check below.
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

import torch

from support import free_port, stop, wait_until_healthy, wait_until_serving

README = Path(__file__).resolve().parents[1] / "README.md"
README_CN = README.with_name("README_CN.md")
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# Commands that set up the machine (already done for the test run) rather than use the repository.
SET_UP = ("pip install", "sudo apt-get", "python -m qwen.vocab fetch", "python -m pytest", "python bench/",
          "python -m pytest -m slow")


def code_blocks(path: Path) -> list[tuple[str, str]]:
    """The (language, body) of every fenced block of a Markdown file, in order."""
    text = path.read_text(encoding="utf-8")
    blocks = FENCE.findall(text)
    # A fence without a language, or an indented one, would be neither run nor compared.
    fences = sum(1 for line in text.splitlines() if line.lstrip().startswith("```"))
    assert fences == 2 * len(blocks), f"{path.name}: every code block must start at the line's beginning with ```LANG"
    return blocks


def readme_blocks() -> list[tuple[str, str]]:
    """README.md's blocks, after checking that README_CN.md's are among them in the same order, so that running
    these runs both files' code."""
    english, chinese = code_blocks(README), code_blocks(README_CN)
    position = 0
    for number, block in enumerate(chinese, 1):
        assert block in english, (
            f"README_CN.md block {number} is not one of README.md's blocks (they must be byte-identical):\n"
            f"```{block[0]}\n{block[1]}```")
        following = [index for index, candidate in enumerate(english) if candidate == block and index >= position]
        assert following, f"README_CN.md block {number} comes in a different order than in README.md:\n{block[1]}"
        position = following[0] + 1
    return english


def test_readme_cn_blocks_are_the_english_ones_in_order() -> None:
    readme_blocks()
    assert code_blocks(README_CN)


def test_the_two_readmes_link_to_each_other() -> None:
    for path, other in ((README, README_CN), (README_CN, README)):
        first_line = path.read_text(encoding="utf-8").splitlines()[0]
        assert f"]({other.name})" in first_line, f"{path.name} must open with a link to {other.name}: {first_line!r}"
        assert other.is_file()


TEST_REFERENCE = re.compile(r"`(test_\w+\.py)::(test_\w+)`")


def test_every_test_the_docs_name_exists() -> None:
    # DIFFERENCES.md and the other pages back each claim with a test's name; a renamed test must not leave a claim
    # pointing at nothing.
    tests = README.parent / "tests"
    pages = [README, README_CN, *README.parent.glob("*.md"), *README.parent.glob("*/*.md")]
    dangling = []
    for page in sorted(set(pages)):
        for file_name, test_name in TEST_REFERENCE.findall(page.read_text(encoding="utf-8")):
            source = tests / file_name
            defined = set(re.findall(r"^(?:async )?def (test_\w+)", source.read_text(encoding="utf-8"), re.MULTILINE)
                          ) if source.is_file() else set()
            if test_name not in defined:
                dangling.append(f"{page.name}: {file_name}::{test_name}")
    assert dangling == []


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{shlex.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def start_server(command: list[str], cwd: Path, env: dict[str, str], port: int) -> subprocess.Popen:
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until_healthy(process, port)
    return process


def test_readme_blocks_run_in_order(tmp_path: Path, tool_chat_dir: Path, tiny_base_dir: Path) -> None:
    # The chat folder is a tiny checkpoint trained on the README's weather conversation, so that the function-calling
    # example gets a real tool call. Released folders carry no code of ours until `install-code` is run on them.
    for name, source in (("Qwen-7B-Chat", tool_chat_dir), ("Qwen-7B", tiny_base_dir)):
        shutil.copytree(source, tmp_path / name)
        assert not list((tmp_path / name).glob("*.py"))
        # Released configs allow 512 new tokens; 64 runs the same code paths (and fits the tool call) in less time.
        generation_config = tmp_path / name / "generation_config.json"
        generation_config.write_text(json.dumps({**json.loads(generation_config.read_text()), "max_new_tokens": 64}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "QWEN_DEMO_CHECKPOINT": str(tmp_path / "demo-checkpoint"), "GRADIO_ANALYTICS_ENABLED": "False"}

    ran = {"bash": 0, "python": 0}
    servers: list[subprocess.Popen] = []
    port = free_port()
    try:
        for language, body in readme_blocks():
            run_block(language, body, tmp_path, env, port, servers, ran)
    finally:
        for server in servers:
            stop(server)
    assert ran["bash"] >= 3 and ran["python"] >= 7, ran
    # install-code ran on the chat folder; the remote-code block above loaded from it.
    assert (tmp_path / "Qwen-7B-Chat" / "modeling_qwen.py").is_file()
    assert any(path.name == "modeling_qwen.py" for path in (tmp_path / "modules").rglob("*.py"))


def run_demo(command: str, cwd: Path, env: dict[str, str]) -> None:
    """The terminal demo reads no input here (end of input quits it); the web demo must serve its page."""
    argv = shlex.split(command)[1:]
    argv[0] = str(README.parent / argv[0])
    if "web_demo.py" in argv[0]:
        port = free_port()
        argv = [a for a in argv if a != "--inbrowser"] + ["--server-port", str(port), "--cpu-only"]
        process = subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        try:
            wait_until_serving(process, f"http://127.0.0.1:{port}/")
        finally:
            stop(process)
        return
    result = subprocess.run([sys.executable, *argv, "--cpu-only"], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    if "-c demo" in command:
        assert "RANDOM weights" in result.stderr  # a notice: stdout holds the conversation (--query: the reply alone)


def run_block(language: str, body: str, cwd: Path, env: dict[str, str], port: int, servers: list, ran: dict) -> None:
    if language == "bash":
        for line in body.splitlines():
            command = line.split("#")[0].strip()
            if not command or command.startswith(SET_UP):
                continue
            if command.startswith(("python cli_demo.py", "python web_demo.py")):
                run_demo(command, cwd, env)
            elif command.startswith("python finetune.py"):
                # Two steps on the CPU run the same code as a real training run, in seconds.
                argv = shlex.split(command)[1:]
                argv[0] = str(README.parent / argv[0])
                run([sys.executable, *argv, "--use_cpu", "--max_steps", "2", "--report_to", "none",
                     "--save_strategy", "no"], cwd, env)
            elif command.startswith("python openai_api.py"):
                # The server runs in the background on a free port while the client blocks below talk to it.
                argv = shlex.split(command.replace("--server-port 8000", f"--server-port {port}"))[1:]
                argv[0] = str(README.parent / "openai_api.py")
                servers.append(start_server([sys.executable, *argv, "--cpu-only"], cwd, env, port))
            else:
                assert command.startswith("python -m qwen."), f"unexpected README command: {command}"
                run([sys.executable, *shlex.split(command)[1:]], cwd, env)
            ran["bash"] += 1
    elif language == "json" and '"conversations"' in body:
        (cwd / "data.json").write_text(body)  # the fine-tuning section's sample, saved as it tells the reader to
    elif language == "python" and "load_model_on_gpus" in body and torch.cuda.device_count() < 2:
        return  # needs two GPUs; tests/test_device_map.py covers it and says when it is skipped
    elif language == "python" and "-Int4" in body:
        return  # a released Int4 folder from the hub; tests/test_gptq.py loads a run_gptq.py output by both routes
    elif language == "python" and "vllm" in body.lower():
        return  # needs vLLM on CUDA; tests/test_vllm.py covers it there and says why it skipped elsewhere
    elif language == "python":
        body = body.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        if not re.search(r"^(import|from) (qwen|openai)\b", body, re.MULTILINE):
            # Such a block must work on remote code alone.
            body += '\nimport sys\nassert "qwen" not in sys.modules, "this block imported the qwen package"\n'
        result = run([sys.executable, "-c", body], cwd, env)
        if "tools=tools" in body:
            assert "21" in result.stdout, result.stdout  # the answer built from the tool's result
        ran["python"] += 1
