"""Helpers several test files share: greedy reference decoding and starting a server process on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

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
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
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


def wait_until_healthy(process: subprocess.Popen, port: int, timeout: float = 120) -> None:
    """Block until the server on `port` answers /health."""
    wait_until_serving(process, f"http://127.0.0.1:{port}/health", timeout)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
