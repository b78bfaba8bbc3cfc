"""The notebooks in examples/ run top to bottom in a Jupyter kernel of this Python (nbclient, no network)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import WEATHER_ANSWER
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient
from support import REPO, checkout_env, free_port, stop, wait_until_healthy

EXAMPLES = REPO / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
KERNEL_NAME = "qwen-tests-python"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory) -> dict[str, str]:
    """Environment for a kernel that is this interpreter, importing this checkout's `qwen`.

    The kernel spec is written for the occasion (argv = sys.executable) instead of relying on whatever `python3`
    kernel a machine has installed, which may belong to another Python.
    """
    jupyter_path = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(jupyter_path / "kernels" / KERNEL_NAME)
    return checkout_env(JUPYTER_PATH=str(jupyter_path))


def execute(notebook: Path, env: dict[str, str], cwd: Path, monkeypatch) -> nbformat.NotebookNode:
    """Run every cell (an exception in any cell fails the test) and return the notebook with its outputs."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the kernel process inherits this process's environment
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name=KERNEL_NAME, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def printed(nb: nbformat.NotebookNode) -> str:
    return "".join(output.get("text", "") for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs
                   if output.get("output_type") == "stream" and output.get("name") == "stdout")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.name)
def test_committed_notebooks_have_no_outputs(notebook: Path) -> None:
    nb = nbformat.read(notebook, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{notebook.name}: clear the outputs"


def test_tokenizer_showcase_runs(kernel_env, tmp_path: Path, monkeypatch) -> None:
    # The notebook asserts its own claims (round trips, ids equal to make_context's, control tokens stay text).
    output = printed(execute(EXAMPLES / "tokenizer_showcase.ipynb", kernel_env, tmp_path, monkeypatch))
    assert "<|im_end|>      151645" in output
    assert "[151644, 872, 198, 6023, 151645]" in output  # special-token names in text become special tokens ...
    assert "[27, 91, 318, 4906, 91, 29, 872, 198, 6023, 27, 91, 318, 6213, 91, 29]" in output  # ... unless not allowed
    assert "refused: Encountered text corresponding to disallowed special token '<|endoftext|>'" in output
    assert "strict: unexpected end of data" in output
    assert "3 control <|im_start|> ids" in output


@pytest.fixture(scope="module")
def tool_server(tool_chat_dir):
    """openai_api.py serving the checkpoint trained on the weather tool call, as the notebook's instructions say."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "openai_api.py"), "-c", str(tool_chat_dir), "--server-port", str(port),
         "--cpu-only"],
        cwd=REPO, env=checkout_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_until_healthy(process, port)
    yield f"http://127.0.0.1:{port}/v1"
    stop(process)


def test_langchain_tool_use_gets_the_tool_call_and_the_answer(kernel_env, tool_server, tmp_path: Path,
                                                             monkeypatch) -> None:
    env = {**kernel_env, "QWEN_API_BASE": tool_server, "NO_PROXY": "127.0.0.1,localhost"}
    output = printed(execute(EXAMPLES / "langchain_tooluse.ipynb", env, tmp_path, monkeypatch))
    # The model's call came back through LangChain as a parsed tool call, the notebook ran the tool, and the answer
    # the model gives only after seeing that result arrived.
    assert "tool call: get_weather {'city': 'Paris'}" in output
    assert f"answer: {WEATHER_ANSWER}" in output
