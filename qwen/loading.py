"""One loader for every script: a checkpoint in, a ready model and tokenizer out, or one clear error.

A checkpoint is named the way users name it on the command line (`-c`): a local folder, a Hugging Face hub id such as
`Qwen/Qwen-7B-Chat` (downloaded into the hub cache, or found there offline), or `demo`, a small random-weight chat
checkpoint built once into the user's cache so that every script runs on a fresh machine with no download.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from .configuration_qwen import QWenConfig
from .modeling_qwen import QWenLMHeadModel
from .tokenization_qwen import VOCAB_FILE_NAME, QWenTokenizer


class LoadError(ValueError):
    """A loading request the user can fix; the message says what is wrong and what to do."""


class CheckpointError(LoadError):
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
        settings = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path} is not valid JSON ({error}).") from error
    if not isinstance(settings, dict):
        raise CheckpointError(
            f"{config_path} holds a JSON {type(settings).__name__}, not an object of settings: it is not a model's "
            "config.json."
        )
    model_type = settings.get("model_type")
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
    # Values no model can be built with, or that its weights contradict: named here, before anything is allocated.
    try:
        QWenConfig.from_pretrained(path).check_against_weights(path)
    except (ValueError, NotImplementedError) as error:
        raise CheckpointError(f"{config_path}: {error}") from error
    return path


DEMO_CHECKPOINT = "demo"
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
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def demo_checkpoint_folder() -> Path:
    """Where `-c demo` lives: `$QWEN_DEMO_CHECKPOINT`, else `demo-checkpoint` next to the cached vocabulary."""
    explicit = os.environ.get("QWEN_DEMO_CHECKPOINT")
    if explicit:
        return Path(explicit).expanduser()
    from .vocab import default_vocab_path

    return default_vocab_path().parent / "demo-checkpoint"


def ensure_demo_checkpoint() -> Path:
    """Build the demo checkpoint on first use (about a second, 2 MB of weights) and return its folder."""
    folder = demo_checkpoint_folder()
    if (folder / "config.json").is_file():
        return folder
    from .checkpoint import write_random_checkpoint
    from .vocab import find_vocab

    vocab = find_vocab()  # fails first with the fetch instructions, before anything is written
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written beside its final place and renamed, so that two scripts starting at once never see half a folder.
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=folder.parent))
    try:
        write_random_checkpoint(staging, size="tiny", chat=True, seed=0, vocab_file=vocab)
        # A random model's reply is noise with a nearly flat distribution (so top-p sampling weighs the whole
        # vocabulary at every token): a short one shows the same thing sooner than the released 512 tokens.
        settings_path = staging / "generation_config.json"
        settings = json.loads(settings_path.read_text(encoding="utf-8"))
        settings_path.write_text(json.dumps({**settings, "max_new_tokens": 64}, indent=2), encoding="utf-8")
        try:
            staging.rename(folder)
        except OSError:  # another process finished first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def is_demo_checkpoint(name: str | Path) -> bool:
    """Whether a `-c` value means the random demo model (a folder that happens to be called `demo` does not)."""
    return str(name) == DEMO_CHECKPOINT and not Path(name).is_dir()


def resolve_checkpoint(name: str | Path) -> Path:
    """The local folder for a `-c` value: `demo`, an existing folder, or a hub id; else a CheckpointError."""
    if is_demo_checkpoint(name):
        return ensure_demo_checkpoint()
    path = Path(name).expanduser()
    if path.exists() or not _HUB_ID.match(str(name)):
        return check_checkpoint_folder(path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return check_checkpoint_folder(snapshot_download(str(name)))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        raise CheckpointError(
            f"{str(name)!r} is not a local folder, and it could not be fetched from the Hugging Face hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no details'}). Check the "
            "spelling, or download the checkpoint where there is internet and pass its folder with -c."
        ) from error


def load_model_and_tokenizer(
    folder: str | Path,
    cpu_only: bool = False,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> tuple[QWenLMHeadModel, QWenTokenizer]:
    """Load a checkpoint (a folder, a hub id or `demo`) for inference, with the generation config it ships.

    Without `device_map`, the model goes on the GPU(s) when there are any (`"auto"`) and `cpu_only` is not set, else
    on the CPU. Without `dtype`, the released rule applies: bf16 or fp16 on a GPU, fp32 on the CPU.
    """
    path = resolve_checkpoint(folder)
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise LoadError(f"Unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto.")
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    if device_map is None:
        device_map = "cpu" if cpu_only or not torch.cuda.is_available() else "auto"
    if dtype == torch.float16 and device_map == "cpu":
        raise LoadError("float16 matmuls are slow or unsupported on the CPU; use float32 or bfloat16 there.")
    from .gptq import check_gptq_checkpoint, require_gptq_stack

    if check_gptq_checkpoint(path) is not None:
        require_gptq_stack()
        if dtype is None and device_map == "cpu":
            dtype = torch.float32  # the released -Int4 configs set fp16, which the model would otherwise honour here
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
    "add_model_arguments", "check_checkpoint_folder", "ensure_demo_checkpoint", "is_demo_checkpoint", "load_from_args",
    "load_model_and_tokenizer", "resolve_checkpoint",
]
