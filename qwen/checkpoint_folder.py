"""Checkpoint folders: finding one from what a user types, checking it, and reading and copying what it holds.

A checkpoint is named the way users name it on the command line (`-c`): a local folder, a Hugging Face hub id such as
`Qwen/Qwen-7B-Chat` (downloaded into the hub cache, or found there offline), or `demo`, a small random-weight chat
checkpoint built once into the user's cache so that every script runs on a fresh machine with no download.

Everything that looks inside a folder lives here, below the modules that use it (`loading`, `gptq`, `lora`, `convert`
and the scripts): its JSON files, its weight files with or without an index, the files that make it a saved model,
the tokenizer and model files a derived folder copies from its base, and the GPTQ settings of a quantized one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import write_random_checkpoint
from .configuration_qwen import QWenConfig
from .tokenization_qwen import VOCAB_FILE_NAME
from .vocab import default_vocab_path, find_vocab


class LoadError(ValueError):
    """A loading request the user can fix; the message says what is wrong and what to do."""


class CheckpointError(LoadError):
    """The folder given is not a usable Qwen (v1) checkpoint; the message says what is missing and what to do."""


class QuantizationError(CheckpointError):
    """A GPTQ folder or request that cannot work; the message says what is wrong and how to fix it."""


def read_json_object(path: Path, error: type[CheckpointError] = CheckpointError) -> dict[str, Any]:
    """The JSON object in `path`; `error` (one line naming the file) when it is not valid JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as reason:
        raise error(f"{path} is not valid JSON ({reason}).") from None
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, not an object of settings.")
    return data


# --------------------------------------------------------------------------------------------------------------------
# Naming and checking a checkpoint
# --------------------------------------------------------------------------------------------------------------------


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
    model_type = read_json_object(config_path).get("model_type")
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
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def demo_checkpoint_folder() -> Path:
    """Where `-c demo` lives: `$QWEN_DEMO_CHECKPOINT`, else `demo-checkpoint` next to the cached vocabulary."""
    explicit = os.environ.get("QWEN_DEMO_CHECKPOINT")
    if explicit:
        return Path(explicit).expanduser()
    return default_vocab_path().parent / "demo-checkpoint"


def ensure_demo_checkpoint() -> Path:
    """Build the demo checkpoint on first use (about a second; 39 MB of fp32 weights, nearly all of them the
    vocabulary-sized embedding and output layer) and return its folder."""
    folder = demo_checkpoint_folder()
    if (folder / "config.json").is_file():
        return folder
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


# --------------------------------------------------------------------------------------------------------------------
# What a folder holds besides its weights
# --------------------------------------------------------------------------------------------------------------------

# Files that make a folder a saved model or LoRA adapter (Trainer's checkpoint-N subfolders do not).
MODEL_FILE_PATTERNS = (
    "config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json",
    "adapter_config.json", "adapter_model.*",
)
# Files of a checkpoint folder that are not weights and that a fine-tuned folder keeps from its base.
# The tokenizer's remote code imports qwen_generation_utils (for its chat template), so that file goes with it; the
# model's imports chat_turn, which imports react.
TOKENIZER_FILES = (VOCAB_FILE_NAME, "tokenizer_config.json", "tokenization_qwen.py", "qwen_generation_utils.py")
MODEL_FILES = ("generation_config.json", "configuration_qwen.py", "modeling_qwen.py", "chat_turn.py", "react.py")


def model_files_in(folder: str | Path) -> list[str]:
    """The names of the files in `folder` that make it a saved model or adapter; empty for a new or other folder."""
    path = Path(folder)
    if not path.is_dir():
        return []
    return sorted({file.name for pattern in MODEL_FILE_PATTERNS for file in path.glob(pattern) if file.is_file()})


def copy_checkpoint_metadata(base: str | Path, output: str | Path, full: bool) -> None:
    """Give a derived folder (fine-tuned, merged, quantized) the base's tokenizer files and, for a complete model, its
    generation config and model code, so that it loads and chats like the base, with or without remote code."""
    base, output = Path(base), Path(output)
    names = TOKENIZER_FILES + (MODEL_FILES if full else ())
    for name in names:
        if (base / name).is_file():
            shutil.copyfile(base / name, output / name)


# --------------------------------------------------------------------------------------------------------------------
# Weight files
# --------------------------------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


# How a folder's weights are stored: (single file, index of shards), safetensors first, as transformers looks for them.
WEIGHT_LAYOUTS = (("model.safetensors", "model.safetensors.index.json"),
                  ("pytorch_model.bin", "pytorch_model.bin.index.json"))


class WeightFiles:
    """The tensors of a folder's weight files, read one at a time and never whole: safetensors or PyTorch `.bin`,
    one file or shards named by an index. Names and shapes come from the headers (safetensors) or a memory map."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._handles: dict[Path, Any] = {}
        for single, index in WEIGHT_LAYOUTS:
            if (folder / index).is_file():
                weight_map = read_json_object(folder / index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise CheckpointError(f"{folder / index} is not a weight index: it has no weight_map.")
                self.safetensors = single == "model.safetensors"
                self.files = {name: folder / file for name, file in weight_map.items()}
                break
            if (folder / single).is_file():
                self.safetensors = single == "model.safetensors"
                self.files = {name: folder / single for name in self._open(folder / single).keys()}
                break
        else:
            raise CheckpointError(
                f"{folder} has no weights: expected model.safetensors, model.safetensors.index.json, "
                "pytorch_model.bin or pytorch_model.bin.index.json."
            )
        missing_files = sorted({path.name for path in self.files.values() if not path.is_file()})
        if missing_files:
            raise CheckpointError(
                f"{folder} lacks weight files its index names: {', '.join(missing_files[:5])}"
                f"{' ...' if len(missing_files) > 5 else ''} (an incomplete download?)."
            )

    @classmethod
    def find(cls, folder: Path) -> WeightFiles | None:
        """The folder's weight files, or None when it holds none (a config-only folder); CheckpointError for an index
        that is damaged or names missing files."""
        return cls(folder) if any((folder / name).is_file() for layout in WEIGHT_LAYOUTS for name in layout) else None

    def _open(self, path: Path) -> Any:
        if path not in self._handles:
            if self.safetensors:
                from safetensors import safe_open

                self._handles[path] = safe_open(path, framework="pt")
            else:
                # mmap: tensors are read from disk when touched, so a shard is never loaded whole.
                self._handles[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._handles[path]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._open(self.files[name])
        if self.safetensors:
            return tuple(handle.get_slice(name).get_shape())
        return tuple(handle[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        handle = self._open(self.files[name])
        if self.safetensors:
            code = handle.get_slice(name).get_dtype()
            if code not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{name} in {self.files[name]} is stored as {code}, which PyTorch cannot read.")
            return _SAFETENSORS_DTYPES[code]
        return handle[name].dtype

    def get(self, name: str) -> torch.Tensor:
        handle = self._open(self.files[name])
        if self.safetensors:
            return handle.get_tensor(name)
        # A copy, so the result owns its memory and the mmap'd storage is not pinned by whoever keeps it.
        return handle[name].clone()


# --------------------------------------------------------------------------------------------------------------------
# GPTQ settings of a quantized folder
# --------------------------------------------------------------------------------------------------------------------

GPTQ_FORMATS = ("gptq", "gptq_v2")
GPTQ_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class GPTQSettings:
    bits: int
    group_size: int  # -1: one group spanning all input channels
    desc_act: bool
    sym: bool
    checkpoint_format: str  # "gptq" (v1: zero points stored minus one) or "gptq_v2"

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)


def _gptq_settings_from(fields: dict[str, Any], where: str) -> GPTQSettings:
    bits = fields.get("bits")
    if bits not in GPTQ_BITS:
        raise QuantizationError(f"{where} has bits={bits!r}; GPTQ checkpoints use one of {GPTQ_BITS}.")
    group_size = fields.get("group_size", 128)
    if not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise QuantizationError(f"{where} has group_size={group_size!r}; use a positive number of channels or -1.")
    formats = {fields[key] for key in ("checkpoint_format", "format") if fields.get(key) is not None}
    if len(formats) > 1:
        raise QuantizationError(f"{where} gives both checkpoint_format and format, with different values {formats}.")
    checkpoint_format = str(formats.pop() if formats else "gptq").lower()
    if checkpoint_format not in GPTQ_FORMATS:
        raise QuantizationError(
            f"{where} has checkpoint_format={checkpoint_format!r}; GPTQ checkpoints are 'gptq' (v1, as released) or "
            "'gptq_v2'."
        )
    return GPTQSettings(bits=bits, group_size=group_size, desc_act=bool(fields.get("desc_act", False)),
                        sym=bool(fields.get("sym", True)), checkpoint_format=checkpoint_format)


def read_gptq_settings(folder: str | Path) -> GPTQSettings | None:
    """The GPTQ settings in config.json's `quantization_config`, None for a checkpoint that is not GPTQ-quantized."""
    folder = Path(folder)
    config = read_json_object(folder / "config.json", QuantizationError)
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict) or str(quantization.get("quant_method", "")).lower() != "gptq":
        return None
    settings = _gptq_settings_from(quantization, f"{folder / 'config.json'} (quantization_config)")
    side_file = folder / "quantize_config.json"
    if side_file.is_file():
        side = read_json_object(side_file, QuantizationError)
        for key in ("bits", "group_size", "desc_act", "sym"):
            if key in side and side[key] != quantization.get(key, side[key]):
                raise QuantizationError(
                    f"{folder}: quantize_config.json says {key}={side[key]!r} but config.json's quantization_config "
                    f"says {quantization[key]!r}. One of them was edited by hand; make them agree (the weights' "
                    "shapes tell which is right)."
                )
    return settings


__all__ = [
    "DEMO_CHECKPOINT", "GPTQ_BITS", "GPTQ_FORMATS", "MODEL_FILES", "MODEL_FILE_PATTERNS", "TOKENIZER_FILES",
    "CheckpointError", "GPTQSettings", "LoadError", "QuantizationError", "WeightFiles",
    "check_checkpoint_folder", "copy_checkpoint_metadata", "demo_checkpoint_folder", "ensure_demo_checkpoint",
    "is_demo_checkpoint", "model_files_in", "read_gptq_settings", "read_json_object", "resolve_checkpoint",
]
