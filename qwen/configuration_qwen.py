"""Configuration of the Qwen (v1) models.

Reads both generations of the released `config.json`: the current field names (Qwen-1.8B/7B/14B/72B after Sept 2023,
e.g. `Qwen-72B/config.json`) and the Aug-2023 ones (`n_embd`, `n_head`, `n_layer`, `ffn_hidden_size`,
`padded_vocab_size`... in the first Qwen-7B-Chat release), which are translated once, here, so that nothing else in
the library has to know about them.

This file is also copied into checkpoint folders for `trust_remote_code=True`: it imports only pip packages.
"""

from __future__ import annotations

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

    def __post_init__(self, **kwargs) -> None:
        for legacy, current in LEGACY_FIELD_NAMES.items():
            if legacy in kwargs:
                setattr(self, current, kwargs.pop(legacy))
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
        if self.use_window_attn and isinstance(self.window_size, list) and len(self.window_size) != self.num_hidden_layers:
            raise ValueError(
                f"window_size has {len(self.window_size)} entries but the model has {self.num_hidden_layers} layers; "
                "give one int for all layers or one per layer."
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


__all__ = ["QWenConfig"]
