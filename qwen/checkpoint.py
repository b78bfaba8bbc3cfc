"""Random-weight checkpoints in the released layout, and installing our code into a folder for remote-code use.

    python -m qwen.checkpoint make-random FOLDER [--size tiny|mid|1.8B|7B|14B|72B] [--base] [--config-only]
    python -m qwen.checkpoint install-code FOLDER

A folder written by `make-random` holds exactly what a released checkpoint holds (config.json, generation_config.json,
tokenizer_config.json, qwen.tiktoken, model*.safetensors with an index when sharded) and no .py files. Its weights
are random: replies are noise, but every code path runs as with real weights.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from .configuration_qwen import QWenConfig
from .modeling_qwen import QWenLMHeadModel
from .tokenization_qwen import VOCAB_FILE_NAME
from .vocab import find_vocab

# Architecture of each released size, from the released config.json files (Qwen/Qwen-*/config.json, Nov 2023;
# Qwen-72B as in tests/fixtures/released/Qwen-72B/config.json). "tiny" and "mid" are ours, for tests and benchmarks:
# they keep the real vocabulary so the real tokenizer drives them.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, kv_channels=8, intermediate_size=128,
                 vocab_size=151936, seq_length=256, max_position_embeddings=1024),
    "mid": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, kv_channels=64, intermediate_size=5504,
                vocab_size=151936, seq_length=2048, max_position_embeddings=8192),
    "1.8B": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, kv_channels=128,
                 intermediate_size=11008, vocab_size=151936, seq_length=8192, max_position_embeddings=8192),
    "7B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, kv_channels=128,
               intermediate_size=22016, vocab_size=151936, seq_length=8192, max_position_embeddings=8192),
    "14B": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, kv_channels=128,
                intermediate_size=27392, vocab_size=152064, seq_length=2048, max_position_embeddings=8192),
    "72B": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, kv_channels=128,
                intermediate_size=49152, vocab_size=152064, seq_length=8192, max_position_embeddings=8192,
                rotary_emb_base=1000000, use_dynamic_ntk=False, use_logn_attn=False),
}

REMOTE_CODE_FILES = (
    "configuration_qwen.py", "modeling_qwen.py", "tokenization_qwen.py", "qwen_generation_utils.py", "chat_turn.py",
    "react.py",
)
AUTO_MAP_CONFIG = {
    "AutoConfig": "configuration_qwen.QWenConfig",
    "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
}
AUTO_MAP_TOKENIZER = {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}

# generation_config.json of the released -Chat models (chatml) and base models (raw).
CHAT_GENERATION_CONFIG = {
    "chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144,
    "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1,
}
BASE_GENERATION_CONFIG = {
    "chat_format": "raw", "eos_token_id": 151643, "pad_token_id": 151643, "stop_words_ids": [[151643]],
    "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1,
}


# Generic fields that transformers adds to every config; released Qwen configs do not carry them.
_TRANSFORMERS_BOOKKEEPING = (
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "problem_type",
)


def config_for_size(size: str, **overrides: Any) -> QWenConfig:
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; choose one of {', '.join(SIZES)}.")
    return QWenConfig(**{**SIZES[size], **overrides})


def _replace_file(path: Path, data: bytes) -> None:
    """Make `path` a regular file holding `data`, atomically, replacing whatever is there.

    A symbolic link is replaced itself, never written through: in the Hugging Face hub cache every file of a snapshot
    is a link into `blobs/`, where one blob can belong to several snapshots, and a link may point outside the folder.
    """
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(staging, "xb") as handle:
            handle.write(data)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _replace_file(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _released_config_dict(config: QWenConfig, dtype: torch.dtype) -> dict[str, Any]:
    data = config.to_dict()
    for key in ("dtype", "torch_dtype", "transformers_version", "_name_or_path", *_TRANSFORMERS_BOOKKEEPING):
        data.pop(key, None)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # released files name them only when set
        if data.get(key) is None:
            data.pop(key, None)
    data["architectures"] = ["QWenLMHeadModel"]
    data["auto_map"] = dict(AUTO_MAP_CONFIG)
    data["tokenizer_type"] = "QWenTokenizer"
    data["torch_dtype"] = str(dtype).removeprefix("torch.")
    return data


def write_random_checkpoint(
    folder: str | Path,
    size: str = "tiny",
    chat: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    config_only: bool = False,
    max_shard_size: str = "2GB",
    vocab_file: str | Path | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a checkpoint folder in the released layout with seeded random weights (or, with config_only, none)."""
    folder = Path(folder)
    # The vocabulary and the config are checked first: a problem with either stops before any weights (GBs for the
    # released sizes) are written.
    vocab = Path(vocab_file) if vocab_file is not None else find_vocab()
    if not vocab.is_file():
        raise FileNotFoundError(f"The vocabulary file {vocab} does not exist.")
    config = config_for_size(size, **config_overrides)
    folder.mkdir(parents=True, exist_ok=True)
    if not config_only:
        torch.manual_seed(seed)
        model = QWenLMHeadModel(config).to(dtype)
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        for stray in ("generation_config.json",):
            (folder / stray).unlink(missing_ok=True)
    _write_json(folder / "config.json", _released_config_dict(config, dtype))
    _write_json(folder / "generation_config.json", CHAT_GENERATION_CONFIG if chat else BASE_GENERATION_CONFIG)
    _write_json(
        folder / "tokenizer_config.json",
        {"auto_map": AUTO_MAP_TOKENIZER, "clean_up_tokenization_spaces": True,
         "model_max_length": config.seq_length, "tokenizer_class": "QWenTokenizer"},
    )
    _replace_file(folder / VOCAB_FILE_NAME, vocab.read_bytes())
    return folder


def install_code(folder: str | Path) -> list[Path]:
    """Copy our model files into `folder` and point its `auto_map` at them, for `trust_remote_code=True` loading.

    Files that are symbolic links (every file of a hub cache snapshot is one) become regular files; what they point
    to is left as it was.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: it is not a checkpoint folder.")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "qwen":
        raise ValueError(f"{config_path} has model_type={model_type!r}; this command is for Qwen (v1).")
    source = Path(__file__).parent
    written = []
    for name in REMOTE_CODE_FILES:
        _replace_file(folder / name, (source / name).read_bytes())
        written.append(folder / name)
    config["auto_map"] = dict(AUTO_MAP_CONFIG)
    _write_json(config_path, config)
    tokenizer_config_path = folder / "tokenizer_config.json"
    tokenizer_config = (
        json.loads(tokenizer_config_path.read_text(encoding="utf-8")) if tokenizer_config_path.is_file() else {}
    )
    tokenizer_config["auto_map"] = dict(AUTO_MAP_TOKENIZER)
    tokenizer_config.setdefault("tokenizer_class", "QWenTokenizer")
    _write_json(tokenizer_config_path, tokenizer_config)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen.checkpoint", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-random", help="write a random-weight checkpoint in the released layout")
    make.add_argument("folder", type=Path)
    make.add_argument("--size", default="tiny", choices=list(SIZES))
    make.add_argument("--base", action="store_true", help="a base model (chat_format raw) instead of a chat model")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    make.add_argument("--config-only", action="store_true", help="config and tokenizer files only, no weights")
    install = sub.add_parser("install-code", help="copy the model code into a checkpoint for trust_remote_code=True")
    install.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.command == "make-random":
        try:
            folder = write_random_checkpoint(
                args.folder, size=args.size, chat=not args.base, seed=args.seed, dtype=getattr(torch, args.dtype),
                config_only=args.config_only,
            )
        except (FileNotFoundError, ValueError) as error:  # no (or a damaged) vocabulary file
            parser.exit(1, f"error: {error}\n")
        print(f"wrote a random-weight {args.size} checkpoint to {folder} (its replies are noise)")
    else:
        try:
            written = install_code(args.folder)
        except (FileNotFoundError, ValueError) as error:  # not a (Qwen) checkpoint folder
            parser.exit(1, f"error: {error}\n")
        for path in written:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
