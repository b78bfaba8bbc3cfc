"""One loader for every script: a checkpoint in, a ready model and tokenizer out, or one clear error.

The checkpoint is named as on the command line (`-c`): a folder, a hub id or `demo` (`qwen.checkpoint_folder`
resolves and checks it; its names are importable from here too). The device and dtype policy is here:

- no dtype (the scripts without `--dtype`): the released rule, `inference_dtype`;
- float32, bfloat16, float16: that precision (float16 is refused on the CPU);
- auto: on the CPU, float32 or bfloat16, whichever multiplies one row by a matrix of the model's output-layer shape
  faster on this machine (`fastest_cpu_dtype`, a measurement of well under a second, kept for the process); on a GPU,
  the released rule (bf16 where the GPU has it, else fp16). Never a weight quantization;
- int8, int4: weight-only quantization on load (`qwen.weight_quant`) of the decoder's linear layers and the output
  layer, the rest of the model in the released rule's precision.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from .checkpoint_folder import (
    DEMO_CHECKPOINT,
    CheckpointError,
    LoadError,
    WeightFiles,
    check_checkpoint_folder,
    ensure_demo_checkpoint,
    is_demo_checkpoint,
    read_json_object,
    resolve_checkpoint,
)
from .gptq import check_gptq_checkpoint, require_gptq_stack
from .modeling_qwen import QWenLMHeadModel, places_on_gpu, resolve_dtype
from .tokenization_qwen import QWenTokenizer
from .weight_quant import DEFAULT_GROUP_SIZE, SCHEMES, WeightQuantError, cast_float_parameters, quantize_weights

logger = logging.getLogger(__name__)

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *FLOAT_DTYPES, *SCHEMES)

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
    on_cpu = not places_on_gpu(device_map, torch.cuda.is_available())
    if requested is not None:
        if requested == torch.float16 and on_cpu:
            raise LoadError("float16 matmuls are slow or unsupported on the CPU; use float32 or bfloat16 there.")
        return requested
    flags = {name: bool(read_json_object(folder / "config.json").get(name)) for name in ("bf16", "fp16", "fp32")}
    if on_cpu:
        return torch.bfloat16 if flags["bf16"] else torch.float32
    return resolve_dtype(**flags, device_map=device_map)


# A matrix this large (in fp32) is well beyond any CPU cache, so a product with it is bound by memory as decoding is.
_PROBE_BYTES = 256 * 2**20
_fastest: dict[tuple[int, int, int], tuple[torch.dtype, dict[torch.dtype, float]]] = {}


@torch.inference_mode()
def fastest_cpu_dtype(out_features: int, in_features: int) -> tuple[torch.dtype, dict[torch.dtype, float]]:
    """float32 or bfloat16, whichever multiplies one row by an (out_features, in_features) matrix faster on this CPU
    (best of three after a warm-up; rows beyond 256 MiB of fp32 are left out), with the seconds each took.

    Decoding one token is such products: it reads every weight once, and bf16 halves the bytes but only pays where
    the CPU has bf16 instructions (AVX512-BF16, AMX); elsewhere it converts and is slower. Kept for the process.
    """
    rows = min(out_features, max(1, _PROBE_BYTES // (4 * in_features)))
    key = (rows, in_features, torch.get_num_threads())
    if key not in _fastest:
        seconds = {}
        for dtype in (torch.float32, torch.bfloat16):
            weight = torch.zeros(rows, in_features, dtype=dtype)
            row = torch.randn(1, in_features).to(dtype)
            torch.nn.functional.linear(row, weight)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                torch.nn.functional.linear(row, weight)
                times.append(time.perf_counter() - start)
            seconds[dtype] = min(times)
            del weight
        _fastest[key] = min(seconds, key=seconds.get), seconds
    return _fastest[key]


def _stored_dtype(folder: Path) -> torch.dtype | None:
    """The dtype of the output layer's stored weights, or None when the folder does not say plainly."""
    try:
        files = WeightFiles.find(folder)
        return files.dtype("lm_head.weight") if files is not None and "lm_head.weight" in files else None
    except (CheckpointError, OSError, KeyError, RuntimeError):
        return None


def load_model_and_tokenizer(
    folder: str | Path,
    cpu_only: bool = False,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    report: Callable[[str], None] | None = None,
) -> tuple[QWenLMHeadModel, QWenTokenizer]:
    """Load a checkpoint (a folder, a hub id or `demo`) for inference, with the generation config it ships.

    Without `device_map`, the model goes on the GPU(s) when there are any (`"auto"`) and `cpu_only` is not set, else
    on the CPU. `dtype`: a torch dtype, None (the released rule, `inference_dtype`), or one of `DTYPE_CHOICES` as the
    module docstring says; int4 uses groups of `group_size`. What was chosen by measurement (the dtype for "auto" on
    the CPU, the kernel for int8/int4) is passed to `report` as one line (default: logged at INFO).
    """
    report = report or logger.info
    path = resolve_checkpoint(folder)
    if device_map is None:
        device_map = "cpu" if cpu_only or not torch.cuda.is_available() else "auto"
    on_cpu = not places_on_gpu(device_map, torch.cuda.is_available())
    scheme = None
    if isinstance(dtype, str):
        if dtype not in DTYPE_CHOICES:
            raise LoadError(f"Unknown dtype {dtype!r}; use {', '.join(DTYPE_CHOICES)}.")
        if dtype in SCHEMES:
            scheme, dtype = dtype, None
        elif dtype == "auto" and on_cpu:
            config = read_json_object(path / "config.json")
            shape = (int(config.get("vocab_size", 151936)), int(config.get("hidden_size", 4096)))
            dtype, seconds = fastest_cpu_dtype(*shape)
            timings = ", ".join(f"{str(key).removeprefix('torch.')} {value * 1e3:.1f} ms" for key, value in
                                seconds.items())
            report(f"--dtype auto: {str(dtype).removeprefix('torch.')}, the faster on this CPU for one row through "
                   f"the {shape[0]} x {shape[1]} output layer ({timings})")
        else:
            dtype = None if dtype == "auto" else getattr(torch, dtype)
    dtype = inference_dtype(path, dtype, device_map)
    gptq = check_gptq_checkpoint(path)
    if gptq is not None:
        if scheme is not None:
            raise LoadError(f"{path} is GPTQ-quantized already ({gptq.bits}-bit); load it without --dtype {scheme}.")
        require_gptq_stack()
    tokenizer = QWenTokenizer.from_pretrained(path)
    # Weights stored in 16 bits load as they are when they are about to be quantized: the codes are the same, and
    # the model never takes its full fp32 size in memory. The rest is cast to `dtype` afterwards.
    stored = _stored_dtype(path) if scheme is not None else None
    load_dtype = stored if stored in (torch.bfloat16, torch.float16) and dtype == torch.float32 else dtype
    model = QWenLMHeadModel.from_pretrained(path, device_map=device_map, dtype=load_dtype).eval()
    if scheme is not None:
        try:
            summary = quantize_weights(model, scheme, group_size)
        except WeightQuantError as error:
            raise LoadError(str(error)) from None
        cast_float_parameters(model, dtype)
        report(summary.describe())
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
        "--dtype", choices=DTYPE_CHOICES, default=None,
        help="weights' precision. Unset: as the released model chose (bf16 or fp16 on a GPU, fp32 on the CPU); auto: "
             "on the CPU, whichever of float32 and bfloat16 a short measurement finds faster here; int8 / int4: "
             "weight-only quantization on load of the linear layers (int4 in groups of 128)",
    )


def load_from_args(args: argparse.Namespace) -> tuple[QWenLMHeadModel, QWenTokenizer]:
    """Load what `add_model_arguments` described, saying so on stderr when it is the random demo model.

    A problem the user can fix (wrong path, not a Qwen checkpoint, missing vocabulary, a dtype the device cannot run)
    ends the script with its one-line message instead of a traceback. What a measurement chose (`--dtype auto`, the
    int8/int4 kernel) is said on stderr.
    """
    try:
        model, tokenizer = load_model_and_tokenizer(
            args.checkpoint_path, cpu_only=args.cpu_only, dtype=args.dtype,
            report=lambda line: print(line, file=sys.stderr, flush=True))
    except (LoadError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    if is_demo_checkpoint(args.checkpoint_path):
        print(DEMO_NOTICE, file=sys.stderr, flush=True)  # a notice: stdout is the program's output
    return model, tokenizer


__all__ = [
    "DEFAULT_CHAT_CHECKPOINT", "DEMO_CHECKPOINT", "DEMO_NOTICE", "DTYPE_CHOICES", "USAGE_NOTICE", "CheckpointError",
    "LoadError", "add_model_arguments", "check_checkpoint_folder", "ensure_demo_checkpoint", "fastest_cpu_dtype",
    "inference_dtype", "is_demo_checkpoint",
    "load_from_args", "load_model_and_tokenizer", "resolve_checkpoint",
]
