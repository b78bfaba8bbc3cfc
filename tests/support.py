"""Helpers several test files share: greedy reference decoding and starting a server process on a free port."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import httpx
import torch

STOP_IDS = frozenset({151643, 151644, 151645})  # <|endoftext|>, <|im_start|>, <|im_end|>
REPO = Path(__file__).resolve().parents[1]


def checkout_env(**extra: str) -> dict[str, str]:
    """The environment for a child process that must import this checkout's `qwen`, offline.

    A script outside the repository root (examples/, a notebook kernel) does not have the root on its import path, so
    it would import whatever copy of the package is installed.
    """
    paths = [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(paths), **extra}


def greedy_reference(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, repetition_penalty: float = 1.0
                     ) -> list[int]:
    """Greedy tokens from transformers' generate() for one prompt, cut before the first stop id."""
    out = model.generate(
        torch.tensor([prompt_ids], device=model.device), max_new_tokens=max_new_tokens, do_sample=False,
        repetition_penalty=repetition_penalty, top_p=None, top_k=None,
        suppress_tokens=list(range(len(tokenizer), model.config.vocab_size)),
    )[0, len(prompt_ids):].tolist()
    for index, token in enumerate(out):
        if token in STOP_IDS:
            return out[:index]
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(
    process: subprocess.Popen, url: str, timeout: float = 120, output: Callable[[], str] | None = None
) -> None:
    """Block until `url` answers 200; fail with the process's output (`output()`, else its stdout pipe) if it exits
    or never answers."""

    def tail() -> str:
        text = output() if output is not None else (process.stdout.read() if process.stdout else "")
        return text[-4000:]

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the process exited (code {process.returncode}):\n{tail()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"nothing answered {url} within {timeout:.0f} s:\n{tail()}")


def start_openai_api(folder: Path, log: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`openai_api.py -c folder --cpu-only *args` on a free port, and its base URL once /health answers. Its output goes
    to `log`: a pipe nobody reads fills up with access-log lines and then blocks the server."""
    port = free_port()
    command = [sys.executable, str(REPO / "openai_api.py"), "-c", str(folder), "--server-port", str(port),
               "--cpu-only", *args]
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wait_until_serving(process, f"http://127.0.0.1:{port}/health", output=log.read_text)
    return process, f"http://127.0.0.1:{port}"


def wait_until_healthy(process: subprocess.Popen, port: int, timeout: float = 120) -> None:
    """Block until the server on `port` answers /health."""
    wait_until_serving(process, f"http://127.0.0.1:{port}/health", timeout)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


# One token of the vocabulary, for `nan_embedding_checkpoint`: no test prompt or reply holds it otherwise.
POISONED_WORD = " poisoned"


def nan_embedding_checkpoint(source: Path, folder: Path, token_id: int) -> Path:
    """A copy of the one-file checkpoint `source` whose input embedding of `token_id` is NaN, as an fp16 overflow in
    training can leave a row.

    A prompt holding that token gets NaN logits, and sampling from them fails inside the engine (greedy decoding
    does not fail: argmax takes the NaN); a prompt without it decodes exactly as it does from `source`.
    """
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    weights = load_file(source / "model.safetensors")
    weights["transformer.wte.weight"][token_id] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def import_script(path: Path) -> ModuleType:
    """A script at the repository root (cli_demo.py, web_demo.py), imported as a module of its file's name."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def options_hiding_their_default(parser: argparse.ArgumentParser) -> list[str]:
    """The options of `parser` whose help does not say "default <value>" (or its repr), leaving out the shared
    loading options (qwen/loading.py's add_model_arguments), flags that are off, and options without a default."""
    from qwen.loading import add_model_arguments

    shared = argparse.ArgumentParser()
    add_model_arguments(shared)
    shared_options = {option for action in shared._actions for option in action.option_strings}
    return [
        action.option_strings[-1] for action in parser._actions
        if action.option_strings and not set(action.option_strings) & shared_options
        and action.default not in (None, False, argparse.SUPPRESS)
        and f"default {action.default}" not in action.help and f"default {action.default!r}" not in action.help
    ]
