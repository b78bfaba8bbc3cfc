"""Conversion of Qwen (v1) checkpoints to transformers' native `Qwen2ForCausalLM` layout.

    python -m qwen.convert SRC_FOLDER DST_FOLDER [--max-shard-size 5GB] [--dtype auto|float32|bfloat16|float16]

The destination is an ordinary Qwen2 checkpoint folder that transformers (`Qwen2ForCausalLM`, `AutoTokenizer`),
vLLM, TGI and llama.cpp's `convert_hf_to_gguf.py` load without remote code:

- `config.json`: `model_type` qwen2, the source's shapes, dtype (that of the stored weights), rotary base, and
  `max_position_embeddings` = the source's `seq_length`, the length within which both models compute the same thing.
- `generation_config.json`: the source's sampling settings; a chat model stops on `<|im_end|>`, `<|im_start|>` and
  `<|endoftext|>`, as `chat()` does.
- `model*.safetensors` (+ index when sharded): the weights, written shard by shard while the source is read tensor
  by tensor, so a 72B conversion holds about one output shard in memory, never the whole model.
- the tokenizer: `tokenizer.json`, `vocab.json`, `merges.txt` (byte-level BPE derived from the tiktoken ranks by
  transformers' own `TikTokenConverter`), `tokenizer_config.json` with the 208 special tokens at their Qwen ids and
  the ChatML chat template, plus a copy of `qwen.tiktoken` so our own prompt builder can run on the folder. The
  pre-tokenizer regex of Qwen (v1) is the same string as Qwen2's, and the NFC normalization is kept, so the ids equal
  ours (tests/test_convert.py checks this on sample texts and a mixed corpus).

Where the two differ. Qwen2 has neither dynamic NTK scaling of the rotary base nor logn scaling of attention
(`use_dynamic_ntk`, `use_logn_attn` in Qwen (v1) configs), which switch on only past the training length
`seq_length`. Up to `seq_length` tokens the converted model gives the same logits as ours (fp32, to rounding);
past it, the original extrapolates with NTK + logn and the converted model does not, so long inputs give different,
usually worse, outputs. Engines offer their own rope scaling (vLLM: `--hf-overrides` with a `rope_scaling` /
`rope_parameters` of type `dynamic` or `yarn`); none of them is Qwen (v1)'s per-length NTK with logn, so quality past
`seq_length` is not what the released long-context numbers describe. The chat template renders the same text as
our ChatML builder; encoding that text in one piece gives the same ids for ordinary messages, but message text that
contains special-token strings (`<|im_end|>`) becomes special tokens under a plain HF tokenizer, which our builder
never allows. llama.cpp reads the tokenizer but skips its NFC normalizer: text already in NFC (nearly all text) gets
our ids there, text with decomposed accents does not unless normalized first.

Not converted: GPTQ (Int4/Int8) checkpoints, whose packed weights need a different mapping (convert the
full-precision checkpoint and quantize the result), Qwen-VL (a vision tower Qwen2ForCausalLM cannot hold), and
folders whose tokenizer adds an extra vocabulary file.

The tensor mapping itself (`qwen_to_qwen2_state_dict`, `to_qwen2_model`) is also used in memory by the benchmark:
`c_attn` splits into q/k/v projections with their biases, `w2` (the gated input, under SiLU) becomes `gate_proj`,
`w1` becomes `up_proj` and the MLP's `c_proj` becomes `down_proj`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .checkpoint_folder import CheckpointError, WeightFiles
from .configuration_qwen import QWenConfig
from .qwen_generation_utils import reply_end_ids
from .tokenization_qwen import (
    CHATML_TEMPLATE,
    ENDOFTEXT,
    IMEND,
    PAT_STR,
    RELEASED_VOCAB_SIZE,
    SPECIAL_TOKENS,
    VOCAB_FILE_NAME,
    _read_tiktoken_file,
)
from .weight_quant import refuse_weight_quantized

ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
DEFAULT_MAX_SHARD_SIZE = "5GB"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Sampling settings that mean the same thing in the released generation configs and in transformers/vLLM.
# `top_k` 0 means "off" in both transformers and vLLM, as in the released configs.
_SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")
# Kept for our own prompt builder (examples/vllm_wrapper.py reads them); transformers stores unknown generation fields
# without acting on them, and engines ignore them. stop_words_ids and the Aug-2023 fields (max_context_size,
# decay_bound, ...) configured only the released chat(); stopping is expressed through eos_token_id instead.
_QWEN_PROMPT_KEYS = ("chat_format", "max_window_size")


class ConvertError(ValueError):
    """A conversion request the user can fix; the message says what is wrong and what to do."""


# ---------------------------------------------------------------------------------------------------------------------
# Config and tensor mapping


def qwen2_config_dict(config: QWenConfig) -> dict[str, Any]:
    """Keyword arguments for `transformers.Qwen2Config` describing the same network as `config`."""
    if config.rotary_pct != 1.0:
        raise ValueError("Qwen2 rotates every channel of a head; a model with rotary_pct < 1 cannot be converted.")
    if config.kv_channels * config.num_attention_heads != config.hidden_size:
        raise ValueError("Qwen2 needs kv_channels * num_attention_heads == hidden_size.")
    if not config.no_bias:
        raise ValueError("Qwen2's output and MLP projections have no bias; this checkpoint has no_bias=False.")
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size // 2,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        # The length within which Qwen2 computes what Qwen (v1) computes: past it, v1 switches on dynamic NTK and
        # logn, which Qwen2 lacks. Engines take this as their default context limit, which keeps them where the
        # outputs agree unless a user asks for more.
        max_position_embeddings=config.seq_length,
        rms_norm_eps=config.layer_norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rotary_emb_base)},
        tie_word_embeddings=False,
        use_sliding_window=False,
        hidden_act="silu",
        attention_dropout=config.attn_dropout_prob,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=ENDOFTEXT_ID,
    )


def _source_layer_names(index: int) -> list[str]:
    prefix = f"transformer.h.{index}."
    return [prefix + name for name in (
        "ln_1.weight", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "ln_2.weight",
        "mlp.w1.weight", "mlp.w2.weight", "mlp.c_proj.weight",
    )]


def _source_groups(config: QWenConfig) -> list[list[str]]:
    """Source tensor names in the order they are converted: embeddings, each layer, then the final norm and head."""
    return (
        [["transformer.wte.weight"]]
        + [_source_layer_names(i) for i in range(config.num_hidden_layers)]
        + [["transformer.ln_f.weight", "lm_head.weight"]]
    )


def _expected_source_shapes(config: QWenConfig) -> dict[str, tuple[int, ...]]:
    hidden, vocab, projection = config.hidden_size, config.vocab_size, config.kv_channels * config.num_attention_heads
    mlp = config.intermediate_size // 2  # each of w1 and w2 is half of the released `intermediate_size`
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (vocab, hidden),
        "transformer.ln_f.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(config.num_hidden_layers):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (hidden,),
            p + "ln_2.weight": (hidden,),
            p + "attn.c_attn.weight": (3 * projection, hidden),
            p + "attn.c_attn.bias": (3 * projection,),
            p + "attn.c_proj.weight": (hidden, projection),
            p + "mlp.w1.weight": (mlp, hidden),
            p + "mlp.w2.weight": (mlp, hidden),
            p + "mlp.c_proj.weight": (hidden, mlp),
        })
    return shapes


def _map_tensors(tensors: dict[str, torch.Tensor], config: QWenConfig) -> dict[str, torch.Tensor]:
    """Qwen2 names for whichever complete groups of Qwen tensors `tensors` holds (see `_source_groups`)."""
    out: dict[str, torch.Tensor] = {}
    if "transformer.wte.weight" in tensors:
        out["model.embed_tokens.weight"] = tensors["transformer.wte.weight"]
    if "transformer.ln_f.weight" in tensors:
        out["model.norm.weight"] = tensors["transformer.ln_f.weight"]
    if "lm_head.weight" in tensors:
        out["lm_head.weight"] = tensors["lm_head.weight"]
    projection = config.kv_channels * config.num_attention_heads
    for i in range(config.num_hidden_layers):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        if src + "ln_1.weight" not in tensors:
            continue
        for kind in ("weight", "bias"):
            # c_attn's rows are [q; k; v], each `projection` rows, heads in order within each.
            q, k, v = tensors[f"{src}attn.c_attn.{kind}"].split(projection, dim=0)
            out[f"{dst}self_attn.q_proj.{kind}"] = q
            out[f"{dst}self_attn.k_proj.{kind}"] = k
            out[f"{dst}self_attn.v_proj.{kind}"] = v
        out[f"{dst}self_attn.o_proj.weight"] = tensors[f"{src}attn.c_proj.weight"]
        out[f"{dst}input_layernorm.weight"] = tensors[f"{src}ln_1.weight"]
        out[f"{dst}post_attention_layernorm.weight"] = tensors[f"{src}ln_2.weight"]
        out[f"{dst}mlp.gate_proj.weight"] = tensors[f"{src}mlp.w2.weight"]
        out[f"{dst}mlp.up_proj.weight"] = tensors[f"{src}mlp.w1.weight"]
        out[f"{dst}mlp.down_proj.weight"] = tensors[f"{src}mlp.c_proj.weight"]
    return out


def qwen_to_qwen2_state_dict(state_dict: dict[str, torch.Tensor], config: QWenConfig) -> dict[str, torch.Tensor]:
    """Rename and split released Qwen tensors into Qwen2ForCausalLM's names; tensors are views, not copies."""
    return _map_tensors(state_dict, config)


def to_qwen2_model(model: torch.nn.Module) -> torch.nn.Module:
    """A `transformers.Qwen2ForCausalLM` holding the same weights as our `QWenLMHeadModel` (shared storage).

    ConvertError for a model whose weights were quantized on load (`qwen.weight_quant`): Qwen2 has no place for them.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    refuse_weight_quantized(model, "Converting to Qwen2", ConvertError)
    config = model.config
    with torch.device("meta"):
        qwen2 = Qwen2ForCausalLM(Qwen2Config(**qwen2_config_dict(config)))
    tensors = qwen_to_qwen2_state_dict(model.state_dict(), config)
    qwen2.load_state_dict(tensors, strict=True, assign=True)
    # Non-persistent buffers (rotary inverse frequencies) were created on meta; rebuild them on the real device.
    qwen2.model.rotary_emb.__init__(qwen2.config)
    return qwen2.to(model.device).eval()


def qwen2_config_json(config: QWenConfig, dtype: torch.dtype, chat: bool) -> dict[str, Any]:
    """config.json of the converted checkpoint: transformers' own serialization plus fields older readers need."""
    from transformers import Qwen2Config

    # The EOS a reader takes from config.json alone is the one that ends a reply: <|im_end|> for a chat model.
    eos = IM_END_ID if chat else ENDOFTEXT_ID
    qwen2 = Qwen2Config(**{**qwen2_config_dict(config), "eos_token_id": eos}, dtype=dtype)
    qwen2.architectures = ["Qwen2ForCausalLM"]
    data = qwen2.to_diff_dict()  # what save_pretrained writes: no generic defaults such as id2label
    # transformers 5 writes the rotary base only inside `rope_parameters`; transformers 4.x (which many vLLM and TGI
    # releases pin) and llama.cpp's converter read `rope_theta`, and would silently fall back to 10000 without it
    # (wrong for Qwen-72B's 1e6). `torch_dtype` is the 4.x name of `dtype`.
    data["rope_theta"] = float(config.rotary_emb_base)
    data["torch_dtype"] = data["dtype"]
    return data


def qwen2_generation_config(source: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json for the converted checkpoint from the released one (chat_format decides the stops)."""
    chat_format = source.get("chat_format", "raw")
    # The ids that end a reply (<|endoftext|>, which ends documents, among them).
    eos = reply_end_ids(chat_format, _SpecialIds)
    out: dict[str, Any] = {"bos_token_id": ENDOFTEXT_ID, "eos_token_id": eos if len(eos) > 1 else eos[0],
                           "pad_token_id": source.get("pad_token_id", ENDOFTEXT_ID)}
    out.update({key: source[key] for key in _SAMPLING_KEYS + _QWEN_PROMPT_KEYS if key in source})
    out["chat_format"] = chat_format
    return out


class _SpecialIds:
    """The three ids `reply_end_ids` reads from a tokenizer, without building one."""

    eod_id, im_start_id, im_end_id = ENDOFTEXT_ID, IM_START_ID, IM_END_ID


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


# sha256 of a vocabulary file -> its tokenizer.json text. Deriving the merges takes seconds, and every conversion of
# the released vocabulary gives the same file, so a process converting several checkpoints derives them once.
_TOKENIZER_JSON_CACHE: dict[str, str] = {}


def _tokenizer_json(vocab_path: str) -> str:
    """tokenizer.json text for the tiktoken vocabulary at `vocab_path`."""
    with open(vocab_path, "rb") as handle:
        sha = hashlib.sha256(handle.read()).hexdigest()
    if sha not in _TOKENIZER_JSON_CACHE:
        _TOKENIZER_JSON_CACHE.clear()  # one vocabulary at a time: the text is 8 MB
        _TOKENIZER_JSON_CACHE[sha] = _build_tokenizer_json(vocab_path)
    return _TOKENIZER_JSON_CACHE[sha]


def _build_tokenizer_json(vocab_path: str) -> str:
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = _read_tiktoken_file(vocab_path)

    class _Converter(TikTokenConverter):
        # transformers' converter reads the file through tiktoken.load, which caches local files by path name in a
        # temp folder: a changed file at a reused path would be read stale. Feed it the ranks we read and verified.
        def load_tiktoken_bpe(self, tiktoken_url: str) -> dict[bytes, int]:
            return ranks

    # TikTokenConverter derives the merges from the ranks: every split (a, b) of a token whose parts and whole are
    # in the vocabulary, ordered by the rank of the whole, which is tiktoken's own merge priority. Its default regex
    # splits digits in runs of up to 3 (cl100k); Qwen splits single digits, so pass ours.
    backend = _Converter(vocab_file=vocab_path, pattern=PAT_STR, extra_special_tokens=list(SPECIAL_TOKENS)).converted()
    # The converter sets `ignore_merges` (a piece that is a token is taken whole, as tiktoken does). Readers that
    # rebuild the BPE from vocab and merges without it (transformers' Qwen2Tokenizer class, llama.cpp) get the same
    # ids because every Qwen token is reached by its own merges; tests/test_convert.py checks every token.
    backend.normalizer = normalizers.NFC()  # QWenTokenizer NFC-normalizes text before tiktoken sees it
    for offset, token in enumerate(SPECIAL_TOKENS):
        if backend.token_to_id(token) != len(ranks) + offset:
            raise AssertionError(f"{token} got id {backend.token_to_id(token)}, expected {len(ranks) + offset}")
    return backend.to_str()


def write_tokenizer(vocab_file: str | os.PathLike, folder: str | os.PathLike, chat: bool, model_max_length: int
                    ) -> list[Path]:
    """Write the Qwen2 tokenizer files for the tiktoken vocabulary `vocab_file` into `folder`."""
    folder = Path(folder)
    vocab_file = os.fspath(vocab_file)
    text = _tokenizer_json(vocab_file)
    tokenizer = json.loads(text)
    (folder / "tokenizer.json").write_text(text, encoding="utf-8")

    # vocab.json and merges.txt carry the same BPE for readers that build Qwen2Tokenizer from them (transformers'
    # slow path, older engines); special tokens live in the configs, as in released Qwen2 folders.
    vocab = tokenizer["model"]["vocab"]
    _write_json(folder / "vocab.json", vocab, indent=None)
    merges = tokenizer["model"]["merges"]
    with open(folder / "merges.txt", "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n")
        handle.writelines(f"{left} {right}\n" for left, right in merges)

    added = {
        str(entry["id"]): {key: entry[key] for key in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                       "special")}
        for entry in tokenizer["added_tokens"]
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        # Qwen never prepends a BOS token or appends an EOS token; said explicitly for llama.cpp, whose converter
        # otherwise applies its own default for BPE vocabularies.
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        # A chat model ends its turn with <|im_end|>; engines that stop on the tokenizer's EOS stop there.
        "eos_token": IMEND if chat else ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": model_max_length,
        "split_special_tokens": False,
    }
    _write_json(folder / "tokenizer_config.json", config)
    shutil.copyfile(vocab_file, folder / VOCAB_FILE_NAME)
    return [folder / name for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                                       VOCAB_FILE_NAME)]


# ---------------------------------------------------------------------------------------------------------------------
# Reading the source


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConvertError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path} does not hold a JSON object.")
    return data


def inspect_source(src: str | os.PathLike) -> tuple[QWenConfig, dict[str, Any], WeightFiles]:
    """Check that `src` is a convertible Qwen (v1) checkpoint; return its config, generation config and weights."""
    src = Path(src)
    if not src.is_dir():
        raise ConvertError(f"{src} is not a folder; pass the folder of a Qwen (v1) checkpoint.")
    if not (src / "config.json").is_file():
        raise ConvertError(f"{src} has no config.json, so it is not a checkpoint folder.")
    raw = _read_json(src / "config.json")
    model_type = raw.get("model_type")
    if model_type == "qwen2":
        raise ConvertError(f"{src} is already in the Qwen2 layout (model_type 'qwen2'); nothing to convert.")
    if model_type != "qwen":
        raise ConvertError(f"{src} holds a {model_type!r} model, not a Qwen (v1) one (model_type 'qwen').")
    if "quantization_config" in raw or (src / "quantize_config.json").is_file():
        method = (raw.get("quantization_config") or {}).get("quant_method", "gptq")
        raise ConvertError(
            f"{src} is a {method.upper()}-quantized checkpoint (an -Int4/-Int8 release); its packed weights cannot be "
            "converted. Convert the full-precision checkpoint instead and quantize the Qwen2 result (transformers, "
            "vLLM and llama.cpp all quantize Qwen2 models)."
        )
    if "visual" in raw:
        raise ConvertError(f"{src} is a Qwen-VL checkpoint; its vision tower has no place in Qwen2ForCausalLM.")
    try:
        config = QWenConfig(**{key: value for key, value in raw.items() if key not in ("architectures", "auto_map")})
        qwen2_config_dict(config)
    except (ValueError, TypeError, NotImplementedError) as error:
        raise ConvertError(f"{src / 'config.json'}: {error}") from None

    if not (src / VOCAB_FILE_NAME).is_file():
        raise ConvertError(f"{src} has no {VOCAB_FILE_NAME}; copy it from the released checkpoint.")
    # Refuses a damaged file; one that extends the released vocabulary loads, but its extra tokens are not converted.
    if len(_read_tiktoken_file(src / VOCAB_FILE_NAME)) != RELEASED_VOCAB_SIZE:
        raise ConvertError(f"{src / VOCAB_FILE_NAME} extends the released vocabulary; converting extra vocabularies "
                           "is not supported.")
    tokenizer_config = (
        _read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    )
    if tokenizer_config.get("extra_vocab_file"):
        raise ConvertError(
            f"{src} extends the vocabulary with {tokenizer_config['extra_vocab_file']}; converting extra vocabularies "
            "is not supported."
        )
    generation = (
        _read_json(src / "generation_config.json") if (src / "generation_config.json").is_file() else {}
    )

    try:
        weights = WeightFiles(src)
    except CheckpointError as error:  # one kind of error from this module
        raise ConvertError(str(error)) from None
    expected = _expected_source_shapes(config)
    stored = set(weights.files)
    missing = sorted(set(expected) - stored, key=_natural_key)
    if missing:
        raise ConvertError(
            f"{src} lacks {len(missing)} tensors the config calls for, e.g. {', '.join(missing[:3])} (an incomplete "
            "download, or a config that does not match the weights?)."
        )
    unexpected = sorted(stored - set(expected), key=_natural_key)
    if unexpected:
        raise ConvertError(
            f"{src} holds tensors a Qwen (v1) model does not have, e.g. {', '.join(unexpected[:3])}; this converter "
            "handles the released full-precision layout only."
        )
    # Shapes come from file headers, so a config that does not match the weights fails before anything is written.
    for name, shape in expected.items():
        if weights.shape(name) != shape:
            raise ConvertError(
                f"{name} has shape {weights.shape(name)} in {src} but config.json implies {shape}; the config does not "
                "describe these weights."
            )
    return config, generation, weights


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in name.split(".")]


# ---------------------------------------------------------------------------------------------------------------------
# Writing the destination


def _write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def _parse_size(size: int | str) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        # transformers reads "5GB" or an int; a plain number on the command line arrives as a string of digits.
        value = int(size) if isinstance(size, str) and size.strip().isdigit() else convert_file_size_to_int(size)
    except (ValueError, TypeError):
        raise ConvertError(f"max shard size {size!r} is not a size; write it like 5GB, 500MB or 1000000.") from None
    if value <= 0:
        raise ConvertError(f"max shard size {size!r} must be positive.")
    return value


def _write_shards(
    tensors: Iterator[tuple[str, torch.Tensor]], folder: Path, max_shard_bytes: int,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Write (name, tensor) pairs into safetensors shards of at most `max_shard_bytes` (a larger tensor gets a shard
    of its own) as they arrive, holding one shard in memory. Returns the temporary file names in order and the file
    of each tensor."""
    from safetensors.torch import save_file

    files: list[str] = []
    file_of: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        name = f"shard-{len(files) + 1:05d}.tmp"
        # "format: pt" is what transformers checks before it trusts a safetensors file.
        save_file(shard, folder / name, metadata={"format": "pt"})
        files.append(name)
        file_of.update(dict.fromkeys(shard, name))
        if progress:
            progress(f"wrote shard {len(files)}: {len(shard)} tensors, {size / 2**30:.2f} GiB")
        shard, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor
        size += nbytes
    if shard:
        flush()
    return files, file_of


def _finalize_shards(folder: Path, files: list[str], file_of: dict[str, str], total_size: int) -> None:
    """Give the shards their final names (`model.safetensors`, or `model-0000i-of-0000n.safetensors` + index)."""
    if len(files) == 1:
        (folder / files[0]).rename(folder / "model.safetensors")
        return
    final = {temp: f"model-{i:05d}-of-{len(files):05d}.safetensors" for i, temp in enumerate(files, start=1)}
    for temp, name in final.items():
        (folder / temp).rename(folder / name)
    weight_map = {name: final[file_of[name]] for name in sorted(file_of, key=_natural_key)}
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total_size},
                                                          "weight_map": weight_map})


def _check_destination(dst: Path) -> None:
    if dst.exists() and not dst.is_dir():
        raise ConvertError(f"{dst} exists and is not a folder; choose a new folder for the converted checkpoint.")
    if dst.is_dir() and any(dst.iterdir()):
        raise ConvertError(f"{dst} exists and is not empty; choose a new or empty folder (nothing was overwritten).")


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Convert the Qwen (v1) checkpoint folder `src` into a `Qwen2ForCausalLM` checkpoint folder `dst`.

    `dst` must not exist or be empty. The folder is assembled beside `dst` and renamed into place at the end, so an
    interrupted conversion never leaves a half-written checkpoint under the final name. `dtype` None keeps the
    stored precision.
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    _check_destination(dst)
    max_shard_bytes = _parse_size(max_shard_size)
    config, generation, weights = inspect_source(src)
    stored_dtype = weights.dtype("transformer.wte.weight")
    if stored_dtype not in _DTYPES.values():
        raise ConvertError(f"transformer.wte.weight is stored as {stored_dtype}; expected float32, bfloat16 or float16 "
                           "weights.")
    out_dtype = dtype or stored_dtype
    total_size = 0

    def converted() -> Iterator[tuple[str, torch.Tensor]]:
        # One group (embeddings, a layer, the head) of source tensors in memory at a time.
        nonlocal total_size
        for group in _source_groups(config):
            for name, tensor in _map_tensors({name: weights.get(name) for name in group}, config).items():
                tensor = tensor.to(out_dtype)
                nbytes = tensor.numel() * tensor.element_size()
                # q/k/v are views into one c_attn tensor, and safetensors refuses tensors that share memory; copy
                # only those, since copying every tensor would double the peak for the 2.5 GB embeddings of 72B.
                if tensor.untyped_storage().nbytes() != nbytes or not tensor.is_contiguous():
                    tensor = tensor.clone(memory_format=torch.contiguous_format)
                total_size += nbytes
                yield name, tensor

    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        files, file_of = _write_shards(converted(), staging, max_shard_bytes, progress)
        _finalize_shards(staging, files, file_of, total_size)
        # Chat or base is read from the released generation config, never guessed from the folder name.
        chat = generation.get("chat_format") == "chatml"
        _write_json(staging / "config.json", qwen2_config_json(config, out_dtype, chat))
        _write_json(staging / "generation_config.json", qwen2_generation_config(generation))
        write_tokenizer(src / VOCAB_FILE_NAME, staging, chat=chat, model_max_length=config.seq_length)
        # mkdtemp (and safetensors) create owner-only files; give the checkpoint the modes a plain copy would get.
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        for path in staging.iterdir():
            path.chmod(0o666 & ~umask)
        if dst.is_dir():
            dst.rmdir()  # checked empty above; a rename cannot replace a folder
        staging.rename(dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwen.convert", description=__doc__.splitlines()[0],
        epilog="The converted model's outputs equal the original's up to seq_length tokens. Past that, the original's "
               "dynamic NTK and logn scaling have no Qwen2 counterpart, so outputs differ there.",
    )
    parser.add_argument("src", type=Path, help="a Qwen (v1) checkpoint folder (e.g. a download of Qwen/Qwen-7B-Chat)")
    parser.add_argument("dst", type=Path, help="a new or empty folder for the Qwen2ForCausalLM checkpoint")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help=f"largest weight file to write (default {DEFAULT_MAX_SHARD_SIZE}); about the memory used")
    parser.add_argument("--dtype", choices=("auto", *_DTYPES), default="auto",
                        help="precision of the written weights; auto keeps the source's")
    args = parser.parse_args(argv)
    try:
        dst = convert_checkpoint(args.src, args.dst, max_shard_size=args.max_shard_size,
                                 dtype=None if args.dtype == "auto" else _DTYPES[args.dtype], progress=print)
    # ConvertError, and the shared readers' ValueError for a damaged qwen.tiktoken
    except (ValueError, FileNotFoundError) as error:
        parser.exit(1, f"error: {error}\n")
    except OSError as error:  # a full disk, a read-only destination: the user's to fix, not a bug to trace
        parser.exit(1, f"error: {error.strerror or error} ({error.filename or args.dst})\n")
    print(f"wrote a Qwen2ForCausalLM checkpoint to {dst}; outputs match the original up to seq_length tokens")
    return 0


__all__ = [
    "ConvertError", "convert_checkpoint", "inspect_source", "main", "qwen2_config_dict", "qwen2_config_json",
    "qwen2_generation_config", "qwen_to_qwen2_state_dict", "to_qwen2_model", "write_tokenizer",
]


if __name__ == "__main__":
    raise SystemExit(main())
