"""One loader for every script: a checkpoint in, a ready model and tokenizer out, or one clear error.

The checkpoint is named as on the command line (`-c`): a folder, a hub id or `demo` (`qwen.checkpoint_folder`
resolves and checks it; its names are importable from here too). The device and dtype policy is here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from .checkpoint_folder import (
    DEMO_CHECKPOINT,
    CheckpointError,
    LoadError,
    check_checkpoint_folder,
    ensure_demo_checkpoint,
    is_demo_checkpoint,
    read_json_object,
    resolve_checkpoint,
)
from .gptq import check_gptq_checkpoint, require_gptq_stack
from .modeling_qwen import QWenLMHeadModel, resolve_dtype
from .tokenization_qwen import QWenTokenizer

# What `-c` means when it is not given, as in the original cli_demo.py, web_demo.py and openai_api.py.
DEFAULT_CHAT_CHECKPOINT = "Qwen/Qwen-7B-Chat"
DEMO_NOTICE = (
    "Using the demo checkpoint: a tiny model with RANDOM weights, so its replies are noise. It shows that everything "
    "runs; pass -c with a real Qwen checkpoint (a folder or a hub id such as Qwen/Qwen-7B-Chat) to chat for real."
)
# The license and harmful-content notice both demos show, as the original's did (in our words).
USAGE_NOTICE = (
    "Note: this demo is used under the license of the Qwen model it runs. Please do not use it to create harmful "
    "content on purpose, nor let others do so: hate speech, violence, pornography, fraud and the like.\n"
    "（提示：使用本演示须遵守所运行的 Qwen 模型的许可协议。请勿借助它故意生成有害内容，也不要让他人这样做，"
    "例如仇恨言论、暴力、色情、欺诈等。）"
)


def inference_dtype(folder: Path, requested: torch.dtype | None, device_map: str | dict[str, Any]) -> torch.dtype:
    """The precision every script loads a checkpoint in: the one requested, else the released rule for the config's
    bf16/fp16/fp32 flags (`modeling_qwen.resolve_dtype`: bf16 where the GPU has it, else fp16, fp32 on the CPU).

    On the CPU, fp16 is refused when requested, and a config's fp16 flag (every released -Int4 config sets it) gives
    fp32: CPU kernels for fp16 matmuls are slow or missing. `QWenLMHeadModel.from_pretrained` on its own keeps the
    released behaviour there (fp16, with a warning), as code written for the released model expects.
    """
    on_cpu = device_map in ("cpu", {"": "cpu"})
    if requested is not None:
        if requested == torch.float16 and on_cpu:
            raise LoadError("float16 matmuls are slow or unsupported on the CPU; use float32 or bfloat16 there.")
        return requested
    flags = {name: bool(read_json_object(folder / "config.json").get(name)) for name in ("bf16", "fp16", "fp32")}
    if on_cpu:
        return torch.bfloat16 if flags["bf16"] else torch.float32
    return resolve_dtype(**flags, device_map=device_map)


def load_model_and_tokenizer(
    folder: str | Path,
    cpu_only: bool = False,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> tuple[QWenLMHeadModel, QWenTokenizer]:
    """Load a checkpoint (a folder, a hub id or `demo`) for inference, with the generation config it ships.

    Without `device_map`, the model goes on the GPU(s) when there are any (`"auto"`) and `cpu_only` is not set, else
    on the CPU. The precision is `inference_dtype`'s.
    """
    path = resolve_checkpoint(folder)
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise LoadError(f"Unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto.")
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    if device_map is None:
        device_map = "cpu" if cpu_only or not torch.cuda.is_available() else "auto"
    dtype = inference_dtype(path, dtype, device_map)
    if check_gptq_checkpoint(path) is not None:
        require_gptq_stack()
    tokenizer = QWenTokenizer.from_pretrained(path)
    model = QWenLMHeadModel.from_pretrained(path, device_map=device_map, dtype=dtype).eval()
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model, tokenizer


def add_model_arguments(parser: argparse.ArgumentParser, default_checkpoint: str | None = DEFAULT_CHAT_CHECKPOINT
                        ) -> None:
    """The loading options every script shares: `-c`, `--cpu-only`, `--dtype`.

    `-c` defaults to `default_checkpoint`, the released chat model as in the original scripts; None makes it required.
    """
    checkpoint_help = "checkpoint folder, Hugging Face hub id, or 'demo' for a tiny random-weight model"
    parser.add_argument(
        "-c", "--checkpoint-path", default=default_checkpoint, required=default_checkpoint is None,
        # %(default)s rather than the value itself, so that ArgumentDefaultsHelpFormatter does not add it a second time
        help=checkpoint_help + (" (default: %(default)s)" if default_checkpoint is not None
                                else " (required; e.g. Qwen/Qwen-7B-Chat)"),
    )
    parser.add_argument("--cpu-only", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument(
        "--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
        help="weights' precision; auto is bf16 (or fp16) on a GPU and fp32 on the CPU, as the released model chose "
             "(default: auto)",
    )


def load_from_args(args: argparse.Namespace) -> tuple[QWenLMHeadModel, QWenTokenizer]:
    """Load what `add_model_arguments` described, saying so on stderr when it is the random demo model.

    A problem the user can fix (wrong path, not a Qwen checkpoint, missing vocabulary, a dtype the device cannot run)
    ends the script with its one-line message instead of a traceback.
    """
    try:
        model, tokenizer = load_model_and_tokenizer(args.checkpoint_path, cpu_only=args.cpu_only, dtype=args.dtype)
    except (LoadError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    if is_demo_checkpoint(args.checkpoint_path):
        print(DEMO_NOTICE, file=sys.stderr, flush=True)  # a notice: stdout is the program's output
    return model, tokenizer


__all__ = [
    "DEFAULT_CHAT_CHECKPOINT", "DEMO_CHECKPOINT", "DEMO_NOTICE", "USAGE_NOTICE", "CheckpointError", "LoadError",
    "add_model_arguments", "check_checkpoint_folder", "ensure_demo_checkpoint", "inference_dtype", "is_demo_checkpoint",
    "load_from_args", "load_model_and_tokenizer", "resolve_checkpoint",
]
