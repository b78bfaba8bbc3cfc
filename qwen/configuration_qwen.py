"""Configuration of the Qwen (v1) models.

Reads both generations of the released `config.json`: the current field names (Qwen-1.8B/7B/14B/72B after Sept 2023,
e.g. `Qwen-72B/config.json`) and the Aug-2023 ones (`n_embd`, `n_head`, `n_layer`, `ffn_hidden_size`,
`padded_vocab_size`... in the first Qwen-7B-Chat release), which are translated once, here, so that nothing else in
the library has to know about them.

This file is also copied into checkpoint folders for `trust_remote_code=True`: it imports only pip packages.
"""

from __future__ import annotations

import json
import os
import re
import struct

from transformers import PretrainedConfig

# Aug-2023 name -> current name. Values are taken over unchanged (the meaning did not change, only the name).
LEGACY_FIELD_NAMES: dict[str, str] = {
    "n_embd": "hidden_size",
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
    "ffn_hidden_size": "intermediate_size",
    "n_positions": "max_position_embeddings",
    "embd_pdrop": "emb_dropout_prob",
    "attn_pdrop": "attn_dropout_prob",
    "padded_vocab_size": "vocab_size",
}

# Aug-2023 fields describing architecture variants that the released weights never used; anything else is refused.
LEGACY_FIXED_VALUES: dict[str, object] = {
    "activation": "swiglu",
    "pos_emb": "rotary",
    "apply_residual_connection_post_layernorm": False,
}

# Allowed range of each size. The ceilings are far beyond every released model (Qwen-72B: 80 layers, width 8192,
# 152064 tokens, 32768 positions); they stop a mistyped config.json before building the model asks for unbounded
# memory. Within them, the weights in a checkpoint folder have the last word (`QWenConfig.check_against_weights`).
SIZE_RANGES: dict[str, tuple[int, int]] = {
    "num_hidden_layers": (1, 1024),
    "hidden_size": (1, 65536),
    "num_attention_heads": (1, 1024),
    "kv_channels": (1, 1024),
    "intermediate_size": (2, 1 << 20),  # split in two halves, each at least one channel wide
    "vocab_size": (1, 1 << 22),
    "seq_length": (1, 1 << 24),
    "max_position_embeddings": (1, 1 << 24),
}


class QWenConfigError(ValueError):
    """A config value no model can be built with, or one its checkpoint's weights contradict; names the field."""


class QWenConfig(PretrainedConfig):
    """Hyper-parameters of a Qwen (v1) decoder; defaults are those of Qwen-7B (`Qwen-7B/config.json`, Sept 2023)."""

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    # Twice the width of each of `w1` and `w2`: the released MLP splits it between the two input projections.
    intermediate_size: int = 22016
    emb_dropout_prob: float = 0.0
    attn_dropout_prob: float = 0.0
    layer_norm_epsilon: float = 1e-6
    initializer_range: float = 0.02
    max_position_embeddings: int = 8192
    scale_attn_weights: bool = True
    use_cache: bool = True
    # Precision flags of the released `from_pretrained(..., bf16=True)` interface; at most one may be true.
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000
    # Training context length: dynamic NTK and logn scaling start beyond it.
    seq_length: int = 2048
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    # "auto": flash-attn 2 when it is installed and the inputs are fp16/bf16 on CUDA; True/False force it on/off.
    use_flash_attn: bool | str = "auto"
    no_bias: bool = True
    tie_word_embeddings: bool = False
    softmax_in_fp32: bool = False
    # Keys and values cached in 8 bits, with a scale and minimum per token and head (modeling_qwen.quantize_kv).
    use_cache_quantization: bool = False
    # The released CUDA kernels that attended over the int8 cache directly; accepted, and replaced by the torch path
    # (dequantize, then the usual attention), with a warning.
    use_cache_kernel: bool = False
    # Layer-wise window attention (Qwen technical report, long-context section). Off in every released config.
    # `window_size` is one int for all layers or one int per layer; None means `seq_length`.
    use_window_attn: bool = False
    window_size: int | list[int] | None = None
    # Declared, as transformers 4 declared them on every config, so that `from_pretrained(folder, pad_token_id=...)`
    # (the original README's batch inference) sets them on the config instead of reaching the model's constructor.
    # The Aug-2023 config.json sets bos and eos to <|endoftext|>. generate() takes its ids from generation_config.json;
    # these only seed the generation config of a model that has none.
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs) -> None:
        given_as = {}  # current name -> the Aug-2023 name the config used, for error messages
        for legacy, current in LEGACY_FIELD_NAMES.items():
            if legacy in kwargs:
                setattr(self, current, kwargs.pop(legacy))
                given_as[current] = legacy
        for name, supported in LEGACY_FIXED_VALUES.items():
            if name in kwargs and kwargs[name] != supported:
                raise NotImplementedError(
                    f"config.json sets {name}={kwargs[name]!r}; Qwen checkpoints use {supported!r} and this library "
                    "implements only that."
                )
        # Qwen-72B's config repeats the rotary base as `rope_theta`; the released code reads `rotary_emb_base`.
        rope_theta = kwargs.pop("rope_theta", None)
        if rope_theta is not None and self.rotary_emb_base == 10000:
            self.rotary_emb_base = rope_theta
        super().__post_init__(**kwargs)
        if sum(bool(flag) for flag in (self.bf16, self.fp16, self.fp32)) > 1:
            raise ValueError("Only one of bf16=True, fp16=True and fp32=True may be set.")
        self._check_sizes(given_as)
        if self.use_window_attn and isinstance(self.window_size, list) and len(self.window_size) != self.num_hidden_layers:
            raise ValueError(
                f"window_size has {len(self.window_size)} entries but the model has {self.num_hidden_layers} layers; "
                "give one int for all layers or one per layer."
            )

    def _check_sizes(self, given_as: dict[str, str]) -> None:
        def shown(name: str) -> str:
            return f"{given_as[name]} ({name})" if name in given_as else name

        for name, (low, high) in SIZE_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise QWenConfigError(f"{shown(name)}={value!r} is invalid: it must be a whole number from {low} to "
                                      f"{high}.")
        if self.hidden_size % self.num_attention_heads:
            raise QWenConfigError(
                f"{shown('num_attention_heads')}={self.num_attention_heads} does not divide "
                f"{shown('hidden_size')}={self.hidden_size}: every head must get the same share of the width."
            )

    def check_against_weights(self, folder: str | os.PathLike) -> None:
        """Raise QWenConfigError, naming the field, where the weights saved in `folder` disagree with this config.

        Reads only the tensor names of the weight index and the shapes in the safetensors headers, so a config that
        does not fit its weights (more layers than saved, a wider model...) is refused before the model is built: left
        to itself, transformers would allocate the whole model first, then report a size mismatch, or initialize the
        missing layers at random without a word. A folder without weights (a config only) passes.
        """
        projection = self.num_attention_heads * self.kv_channels
        hidden = (self.hidden_size, ("hidden_size",))
        expected = {  # tensor -> each dimension: (its size under this config, the fields that decide it)
            "transformer.wte.weight": ((self.vocab_size, ("vocab_size",)), hidden),
            "lm_head.weight": ((self.vocab_size, ("vocab_size",)), hidden),
            "transformer.h.0.attn.c_attn.weight": ((3 * projection, ("num_attention_heads", "kv_channels")), hidden),
            "transformer.h.0.mlp.w1.weight": ((self.intermediate_size // 2, ("intermediate_size",)), hidden),
        }
        names, shapes = _saved_tensors(os.fspath(folder), wanted=set(expected))
        layers = {int(match.group(1)) for name in names if (match := _LAYER_NAME.match(name))}
        if layers and len(layers) != self.num_hidden_layers:
            raise QWenConfigError(
                f"num_hidden_layers={self.num_hidden_layers} does not match the weights in {folder}, which hold "
                f"{len(layers)} layers."
            )
        for tensor, dimensions in expected.items():
            shape = shapes.get(tensor)
            if shape is None:  # not saved under this name (tied, or quantized: GPTQ packs it into qweight)
                continue
            for size, (wanted, fields) in zip(shape, dimensions):
                if size != wanted:
                    values = ", ".join(f"{name}={getattr(self, name)}" for name in fields)
                    raise QWenConfigError(
                        f"{values} {'do' if len(fields) > 1 else 'does'} not match the weights in {folder}: {tensor} "
                        f"has shape {list(shape)}."
                    )

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that rotary embeddings rotate (the rest pass through unchanged)."""
        if self.rotary_pct == 1.0:
            return self.kv_channels
        return int(self.kv_channels * self.rotary_pct)

    def layer_window(self, layer_idx: int) -> int | None:
        """How many most recent keys layer `layer_idx` attends to, or None for unlimited (causal) attention."""
        if not self.use_window_attn:
            return None
        size = self.window_size[layer_idx] if isinstance(self.window_size, list) else self.window_size
        return int(size) if size is not None else self.seq_length


_LAYER_NAME = re.compile(r"^transformer\.h\.(\d+)\.")
_MAX_SAFETENSORS_HEADER = 100 << 20  # bytes; real headers are a few hundred KB


def _safetensors_shapes(path: str) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors file's header (8 bytes of length, then JSON), without reading the tensors.

    A file that is missing or does not parse gives nothing: loading it will report that problem itself.
    """
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > _MAX_SAFETENSORS_HEADER:
                return {}
            header = json.loads(handle.read(length))
        return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}
    except (OSError, struct.error, ValueError, TypeError, KeyError):
        return {}


def _saved_tensors(folder: str, wanted: set[str]) -> tuple[list[str], dict[str, list[int]]]:
    """Names of the tensors a checkpoint folder saves, and the shapes in safetensors files (of the shards holding a
    `wanted` tensor, when sharded).

    The layouts transformers loads: `model.safetensors`, sharded safetensors with their index, and the sharded
    `pytorch_model*.bin` of the Aug-2023 releases (names from the index; reading shapes would mean loading them).
    """
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        shapes = _safetensors_shapes(single)
        return list(shapes), shapes
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        try:
            with open(os.path.join(folder, index_name), encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not isinstance(weight_map, dict):
            continue
        shapes = {}
        if index_name.endswith(".safetensors.index.json"):
            for shard in sorted({str(weight_map[name]) for name in wanted if name in weight_map}):
                shapes.update(_safetensors_shapes(os.path.join(folder, shard)))
        return list(weight_map), shapes
    return [], {}


__all__ = ["QWenConfig", "QWenConfigError"]
