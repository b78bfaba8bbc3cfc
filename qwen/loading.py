"""One loader for every script: a checkpoint folder in, a ready model and tokenizer out, or one clear error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from .modeling_qwen import QWenLMHeadModel
from .tokenization_qwen import VOCAB_FILE_NAME, QWenTokenizer


class CheckpointError(ValueError):
    """The folder given is not a usable Qwen (v1) checkpoint; the message says what is missing and what to do."""


def check_checkpoint_folder(folder: str | Path) -> Path:
    """Return the folder as a Path if it looks like a Qwen (v1) checkpoint, else raise CheckpointError."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            f"Checkpoint folder {str(folder)!r} does not exist. Pass -c with the folder of a downloaded Qwen "
            "checkpoint, or make a small random one with `python -m qwen.checkpoint make-random FOLDER`."
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} has no config.json, so it is not a model checkpoint folder.")
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path} is not valid JSON ({error}).") from error
    if model_type != "qwen":
        raise CheckpointError(
            f"{path} holds a {model_type!r} model, not a Qwen (v1) one (model_type 'qwen'). This repository runs "
            "Qwen-1.8B/7B/14B/72B and their -Chat versions; newer Qwen generations load with transformers directly."
        )
    if not (path / VOCAB_FILE_NAME).is_file():
        raise CheckpointError(
            f"{path} has no {VOCAB_FILE_NAME}. Copy it from the released checkpoint, or fetch it with "
            "`python -m qwen.vocab fetch` and copy ~/.cache/qwen/qwen.tiktoken into the folder."
        )
    return path


def load_model_and_tokenizer(
    folder: str | Path,
    cpu_only: bool = False,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> tuple[QWenLMHeadModel, QWenTokenizer]:
    """Load a checkpoint folder for inference, with the generation config it ships.

    Without `device_map`, the model goes on the GPU(s) when there are any (`"auto"`) and `cpu_only` is not set, else
    on the CPU. Without `dtype`, the released rule applies: bf16 or fp16 on a GPU, fp32 on the CPU.
    """
    path = check_checkpoint_folder(folder)
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"Unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto.")
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    if device_map is None:
        device_map = "cpu" if cpu_only or not torch.cuda.is_available() else "auto"
    if dtype == torch.float16 and device_map == "cpu":
        raise ValueError("float16 matmuls are slow or unsupported on the CPU; use float32 or bfloat16 there.")
    tokenizer = QWenTokenizer.from_pretrained(path)
    model = QWenLMHeadModel.from_pretrained(path, device_map=device_map, dtype=dtype).eval()
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model, tokenizer


__all__ = ["CheckpointError", "check_checkpoint_folder", "load_model_and_tokenizer"]
