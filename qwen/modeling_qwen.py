"""Qwen (v1) decoder, readable top to bottom: norm, rotary, attention, MLP, block, model, LM head, chat.

Numerics follow the released checkpoints' code: RMSNorm computed in fp32, rotary embeddings applied in fp32 with the
dynamic-NTK base chosen once per prompt (at prefill) and kept for every decoded token, logn query scaling beyond
`seq_length`, SwiGLU MLP `c_proj(w1(x) * silu(w2(x)))`. Module and parameter names are the released ones
(`transformer.h.N.attn.c_attn` ...) because every checkpoint depends on them.

Differences in structure, not in numbers: the released code kept the NTK alpha on the rotary module between calls;
here it travels with the KV cache of the sequence it belongs to, and everything else is recomputed from positions.

This file is also copied into checkpoint folders for `trust_remote_code=True`: it imports only its sibling files
(relative imports) and pip packages.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import math
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache, StaticLayer
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .chat_turn import chat_turn, context_length
from .configuration_qwen import QWenConfig
from .qwen_generation_utils import DEFAULT_SYSTEM_PROMPT, HistoryType, StopWordsLogitsProcessor, decode_tokens

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# The KV cache's name in transformers' outputs and in generate()'s model kwargs
# --------------------------------------------------------------------------------------------------------------------


def cache_field(output_class: type) -> str:
    """The field under which `output_class` (a transformers ModelOutput dataclass) holds the KV cache: `cache` in
    the transformers releases that renamed it, `past_key_values` in earlier ones (5.17 among them)."""
    names = {field.name for field in dataclasses.fields(output_class)}
    for name in ("cache", "past_key_values"):
        if name in names:
            return name
    raise TypeError(f"{output_class.__name__} has neither a `cache` nor a `past_key_values` field.")


# Read once from the installed transformers. The same release names generate()'s cache keyword (model kwargs, inputs
# for the next step, the returned GenerateOutput) as its model outputs do.
CACHE_KEY = cache_field(CausalLMOutputWithPast)


def with_kv_cache(output_class: type, cache: Cache | None, **fields: Any) -> Any:
    """`output_class(**fields)` with the KV cache under the installed transformers' name for it (`CACHE_KEY`)."""
    return output_class(**fields, **{CACHE_KEY: cache})


def kv_cache_of(output: Any) -> Cache | None:
    """The KV cache of a model output or of `generate(..., return_dict_in_generate=True)`'s result."""
    return getattr(output, CACHE_KEY, None)


# --------------------------------------------------------------------------------------------------------------------
# Projections
# --------------------------------------------------------------------------------------------------------------------

# Up to this many rows the weight-left product wins (by 1.1-1.6x at 200 rows for the wide c_attn, w1 and lm_head);
# for long prompts MKL's usual path is as fast or faster.
_WEIGHT_LEFT_MAX_ROWS = 256


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, computed as `(W @ x^T)^T` for a plain fp32 nn.Linear at inference on the CPU.

    MKL's sgemm for `x @ W^T` with 2 to ~256 rows (decoding a batch, short or batched prompts) is 1.1-2.5x slower on
    x86 CPUs than the same product with the weight as the left operand, and batched decoding is mostly such products:
    a batch of 8 decodes about twice as fast this way (bench/bench_core.py). One row is a matrix-vector product either
    way. Anything else (CUDA, half precision, training, LoRA/GPTQ/bitsandbytes layers, modules with hooks) takes the
    module's own forward.
    """
    if (
        type(layer) is not nn.Linear
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or layer.weight.dtype != torch.float32
        or torch.is_grad_enabled()
        or layer._forward_hooks
        or layer._forward_pre_hooks
        or hasattr(layer, "_hf_hook")
    ):
        return layer(x)
    rows = x.reshape(-1, x.shape[-1])  # (B*T, in)
    if not 2 <= rows.shape[0] <= _WEIGHT_LEFT_MAX_ROWS:
        return layer(x)
    if layer.bias is None:
        out = torch.mm(layer.weight, rows.T)  # (out, B*T)
    else:
        out = torch.addmm(layer.bias[:, None], layer.weight, rows.T)  # (out, B*T)
    return out.T.reshape(*x.shape[:-1], out.shape[0])  # (B, T, out)


# --------------------------------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, then back to the activation dtype before the weight, exactly as the released model.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


# --------------------------------------------------------------------------------------------------------------------
# Rotary embeddings with dynamic NTK, and logn attention scaling
# --------------------------------------------------------------------------------------------------------------------


def ntk_alpha_for_length(true_seq_len: int, seq_length: int) -> float:
    """The released dynamic-NTK rule: alpha = 2^ceil(log2(L / seq_length) + 1) - 1, at least 1."""
    context_value = math.log(true_seq_len / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def rotary_inv_freq(
    dim: int, base: float, ntk_alpha: float | torch.Tensor, device: torch.device | None = None
) -> torch.Tensor:
    """Inverse frequencies for an NTK alpha, the base grown as alpha^(dim/(dim-2)) as released: (dim/2,) for a float,
    (B, dim/2) for a (B,) tensor of alphas. Both give the same float32 numbers: the scaled base is computed in
    float64 and rounded to float32 before the power, as a Python float base is."""
    exponents = torch.arange(0, dim, 2, device=device).float() / dim  # (dim/2,)
    if isinstance(ntk_alpha, torch.Tensor):
        scaled_base = (base * ntk_alpha.to(device=device, dtype=torch.float64) ** (dim / (dim - 2))).float()
        return 1.0 / (scaled_base[:, None] ** exponents)
    scaled_base = base * ntk_alpha ** (dim / (dim - 2))
    return 1.0 / (scaled_base ** exponents)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables in fp32 for `positions` (B, T) and `inv_freq` (B or 1, dim/2) -> each (B, 1, T, dim)."""
    freqs = positions[:, :, None].float() * inv_freq[:, None, :]  # (B, T, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, dim)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` channels of x (B, nh, T, hs) in fp32; the rest pass through."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim].float(), x[..., rot_dim:]
    x_rot = x_rot * cos + _rotate_half(x_rot) * sin
    if x_pass.shape[-1] == 0:
        return x_rot.type_as(x)
    return torch.cat((x_rot.type_as(x), x_pass), dim=-1)


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Per-query factor log_{seq_length}(position + 1) beyond `seq_length`, 1 within it: (B, T) -> (B, 1, T, 1)."""
    one_based = (positions + 1).double()
    scale = torch.where(one_based > seq_length, torch.log(one_based) / math.log(seq_length), torch.ones_like(one_based))
    return scale.float()[:, None, :, None]


# --------------------------------------------------------------------------------------------------------------------
# Attention backends. All take q, k, v as (B, nh, T|S, hs) and return (B, T, nh, hs) plus weights (eager only).
# `allowed` is a boolean mask (B|1, 1, T, S), True where a query may attend; None means plain causal.
# --------------------------------------------------------------------------------------------------------------------


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None,
    dropout_p: float,
    softmax_in_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.matmul(q, k.transpose(-1, -2)) / torch.full([], v.size(-1) ** 0.5, dtype=q.dtype, device=q.device)
    if allowed is None:
        allowed = causal_mask(q.size(-2), k.size(-2), None, q.device)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores.float() if softmax_in_fp32 else scores, dim=-1).type(q.dtype)
    weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v).transpose(1, 2), weights


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, dropout_p: float
) -> torch.Tensor:
    # is_causal is top-left aligned in SDPA, so it is only right when queries and keys are the same positions.
    is_causal = allowed is None and q.size(-2) == k.size(-2) and q.size(-2) > 1
    if allowed is None and q.size(-2) not in (1, k.size(-2)):
        allowed = causal_mask(q.size(-2), k.size(-2), None, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, is_causal=is_causal)
    return out.transpose(1, 2)


_flash_attn_modules: dict[str, Any] | None = None


def _flash_attn() -> dict[str, Any]:
    """flash-attn 2's functions if the package is installed, else an empty dict (looked up once)."""
    global _flash_attn_modules
    if _flash_attn_modules is None:
        _flash_attn_modules = {}
        if importlib.util.find_spec("flash_attn") is not None:
            try:
                from flash_attn import flash_attn_func, flash_attn_varlen_func

                _flash_attn_modules = {"func": flash_attn_func, "varlen": flash_attn_varlen_func}
            except ImportError as error:  # a broken build: say so once, then use SDPA
                logger.warning(f"flash_attn is installed but does not import ({error}); using torch SDPA instead.")
    return _flash_attn_modules


def attention_backend(requested: str | None, use_flash_attn: bool | str, cuda_half: bool,
                      flash_installed: bool | None = None) -> str:
    """"eager", "flash" or "sdpa" for a forward: eager when `attn_implementation="eager"` was asked for; flash-attn 2
    when it was asked for (`attn_implementation="flash_attention_2"`, or the config's `use_flash_attn` true or "auto",
    as released) and the input is fp16/bf16 on CUDA (`cuda_half`) and the package imports (`flash_installed`, looked
    up when None); else torch SDPA. Loading with `attn_implementation="sdpa"` sets `use_flash_attn` false, so an
    explicit SDPA request is kept even where flash-attn is installed."""
    if requested == "eager":
        return "eager"
    wants_flash = requested == "flash_attention_2" or use_flash_attn in (True, "auto")
    if wants_flash and cuda_half:
        if flash_installed if flash_installed is not None else bool(_flash_attn()):
            return "flash"
        if use_flash_attn is True or requested == "flash_attention_2":
            logger.warning_once("use_flash_attn is set but flash-attn is not installed; using torch SDPA.")
    return "sdpa"


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None,
    dropout_p: float,
    window: int | None,
) -> torch.Tensor:
    """flash-attn 2 on CUDA fp16/bf16. `key_padding` (B, S) is True for real tokens; queries are the last T keys."""
    fa = _flash_attn()
    batch, _, q_len, _ = q.shape
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, T|S, nh, hs)
    window_size = (window - 1, 0) if window is not None else (-1, -1)
    if key_padding is None or bool(key_padding.all()):
        return fa["func"](q, k, v, dropout_p=dropout_p, causal=True, window_size=window_size)
    # Variable-length path: drop padded keys/queries, run packed, scatter the real queries back.
    kv_len = k.shape[1]
    q_valid = key_padding[:, kv_len - q_len :]
    k_lens = key_padding.sum(-1, dtype=torch.int32)
    q_lens = q_valid.sum(-1, dtype=torch.int32)
    cu_k = F.pad(torch.cumsum(k_lens, 0, dtype=torch.int32), (1, 0))
    cu_q = F.pad(torch.cumsum(q_lens, 0, dtype=torch.int32), (1, 0))
    packed = fa["varlen"](
        q[q_valid], k[key_padding], v[key_padding], cu_q, cu_k, int(q_lens.max()), int(k_lens.max()),
        dropout_p=dropout_p, causal=True, window_size=window_size,
    )
    out = q.new_zeros(batch, q_len, *q.shape[2:])
    out[q_valid] = packed
    return out


def causal_mask(
    q_len: int, kv_len: int, window: int | None, device: torch.device, key_padding: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean (B|1, 1, T, S) mask: query i (at key index S-T+i) sees keys j <= its index within `window`."""
    q_index = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_index = torch.arange(kv_len, device=device)[None, :]
    allowed = k_index <= q_index
    if window is not None:
        allowed &= k_index > q_index - window
    allowed = allowed[None, None]
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :]
        # A left-padding query sees no key at all; let it see everything so softmax stays finite (its output is unused).
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed


# --------------------------------------------------------------------------------------------------------------------
# KV-cache quantization (`use_cache_quantization`)
#
# Each cached key and value vector (one token, one head) is stored as `head_dim` uint8 codes plus its own fp32 scale
# and minimum: x ~= minimum + code * scale, with scale = (max - min) / 255, so every element is within scale / 2 of its
# float value. The released model quantized the same way (asymmetric uint8, a scale and zero point per head), with two
# differences: it truncated instead of rounding (up to a whole step off), and it shared one scale per head across the
# tokens of a prefill chunk; here every token has its own. The codes and their two fp32 numbers live in one uint8
# tensor per layer, (B, nh, T, head_dim + 8), so that transformers' cache operations (cat, crop, beam reorder,
# batch selection, offload) apply to all of them at once without knowing about quantization.
# Attention reads the cache dequantized to the activation dtype, one layer at a time: the float copy is transient.
# --------------------------------------------------------------------------------------------------------------------

KV_CODE_MAX = 255
KV_PARAMS_BYTES = 8  # fp32 scale and fp32 minimum per vector


def quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """Keys or values (B, nh, T, hs) -> packed uint8 (B, nh, T, hs + 8): per-vector codes, scale and minimum."""
    x32 = x.float()
    minimum = x32.amin(dim=-1, keepdim=True)  # (B, nh, T, 1)
    scale = (x32.amax(dim=-1, keepdim=True) - minimum) / KV_CODE_MAX  # (B, nh, T, 1); 0 for a constant vector
    # A constant vector has x - minimum == 0 everywhere: any non-zero divisor gives code 0 and the exact value back.
    codes = torch.round((x32 - minimum) / scale.clamp(min=torch.finfo(torch.float32).tiny))
    codes = codes.clamp_(0, KV_CODE_MAX).to(torch.uint8)  # (B, nh, T, hs)
    params = torch.cat((scale, minimum), dim=-1).view(torch.uint8)  # (B, nh, T, 2) fp32 -> (B, nh, T, 8) bytes
    return torch.cat((codes, params), dim=-1)  # (B, nh, T, hs + 8)


def dequantize_kv(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed uint8 (B, nh, T, hs + 8) -> keys or values (B, nh, T, hs) in `dtype`."""
    head_dim = packed.shape[-1] - KV_PARAMS_BYTES
    # The 8 bytes are a slice of each row: copy them out so that they can be read as two aligned fp32 numbers.
    params = packed[..., head_dim:].contiguous().view(torch.float32)  # (B, nh, T, 2)
    scale, minimum = params[..., :1], params[..., 1:]  # (B, nh, T, 1) each
    return torch.addcmul(minimum, packed[..., :head_dim].float(), scale).to(dtype)  # (B, nh, T, hs)


class QuantizedKVLayer(DynamicLayer):
    """One layer's keys and values, stored packed by `quantize_kv` and returned dequantized by `update`."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype  # what attention gets back
        self.keys = self.keys.to(torch.uint8)
        self.values = self.values.to(torch.uint8)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, quantize_kv(key_states)], dim=-2)  # (B, nh, S, hs + 8)
        self.values = torch.cat([self.values, quantize_kv(value_states)], dim=-2)
        # New tokens are read back through the quantized cache as well, as in the released model: attention sees
        # exactly what is stored, at prefill and at every decoded token.
        return dequantize_kv(self.keys, self.dtype), dequantize_kv(self.values, self.dtype)


class QuantizedKVCache(Cache):
    """A transformers Cache holding keys and values in 8 bits (see `quantize_kv`), for `use_cache_quantization`.

    With `head_dim` 128 (every released size) a token costs 136 bytes per head and per keys/values instead of 256 in
    bf16/fp16 or 512 in fp32. Works wherever a DynamicCache does (`generate`, `chat`, beam search, our engine).
    """

    def __init__(self, config: PretrainedConfig | None = None) -> None:
        super().__init__(layer_class_to_replicate=QuantizedKVLayer)


class QuantizedStaticLayer(StaticLayer):
    """One layer of a preallocated int8 cache: transformers' StaticLayer buffers, holding `quantize_kv`'s packed
    bytes (B, nh, max_cache_len, hs + 8). `update` returns the whole buffer dequantized, as StaticLayer returns its
    whole buffer; positions not written yet read as zeros and the caller's mask hides them."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            # What attention gets back. Not StaticLayer's `dtype`: transformers 5.17 sets that to the buffers' (uint8).
            self.attention_dtype = key_states.dtype
        keys, values = super().update(quantize_kv(key_states), quantize_kv(value_states))
        return dequantize_kv(keys, self.attention_dtype), dequantize_kv(values, self.attention_dtype)


class QuantizedStaticCache(Cache):
    """The int8 counterpart of transformers' StaticCache (fixed shapes, for torch.compile), which `generate()` uses
    with `cache_implementation="static"` when `use_cache_quantization` is set."""

    def __init__(self, config: PretrainedConfig, max_cache_len: int) -> None:
        super().__init__(layers=[QuantizedStaticLayer(max_cache_len) for _ in range(config.num_hidden_layers)])


def new_kv_cache(config: PretrainedConfig) -> Cache:
    """The cache a fresh sequence gets: int8 (`QuantizedKVCache`) when `config.use_cache_quantization`, else float."""
    if getattr(config, "use_cache_quantization", False):
        return QuantizedKVCache(config)
    return DynamicCache(config=config)


# --------------------------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------------------------


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.projection_size = config.kv_channels * config.num_attention_heads
        self.c_attn = nn.Linear(config.hidden_size, 3 * self.projection_size)
        self.c_proj = nn.Linear(self.projection_size, config.hidden_size, bias=not config.no_bias)

    @property
    def window(self) -> int | None:
        # Read from the config at every call, like use_dynamic_ntk and use_logn_attn, so that switching window
        # attention on a loaded model (as eval/evaluate_long_ppl.py does per option) takes effect.
        return self.config.layer_window(self.layer_idx)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        logn: torch.Tensor | None,
        layout: AttentionLayout,
        cache: Cache | None,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, q_len, _ = x.shape
        q, k, v = project(self.c_attn, x).split(self.projection_size, dim=2)
        q = q.view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
            if k.size(-2) > layout.kv_len:  # preallocated caches return their whole buffer
                k, v = k[:, :, : layout.kv_len], v[:, :, : layout.kv_len]
        if logn is not None:
            q = q * logn.type_as(q)

        dropout_p = self.config.attn_dropout_prob if self.training else 0.0
        weights = None
        backend = layout.backend
        if output_attentions:
            backend = "eager"
        if backend == "flash" and layout.prepared_mask is None:
            out = flash_attention(q, k, v, layout.key_padding, dropout_p, self.window)
        elif backend == "eager":
            out, weights = eager_attention(q, k, v, layout.mask(self.window), dropout_p, self.config.softmax_in_fp32)
        else:
            out = sdpa_attention(q, k, v, layout.mask(self.window), dropout_p)
        out = out.reshape(batch, q_len, self.projection_size)  # (B, T, nh*hs)
        return project(self.c_proj, out), weights


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig) -> None:
        super().__init__()
        ff_dim = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, ff_dim, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, ff_dim, bias=not config.no_bias)
        self.c_proj = nn.Linear(ff_dim, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(self.c_proj, project(self.w1, x) * F.silu(project(self.w2, x)))


class QWenBlock(GradientCheckpointingLayer):
    def __init__(self, config: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        logn: torch.Tensor | None = None,
        layout: AttentionLayout | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, weights = self.attn(self.ln_1(x), rotary, logn, layout, cache, output_attentions)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, weights


class AttentionLayout:
    """What every layer of one forward call needs to know about which keys each query may see.

    Masks are built lazily, once per distinct window size, and only when plain causal attention is not enough
    (padding, windows, or queries that are not the last `T` keys with `T == S`).
    """

    def __init__(
        self,
        q_len: int,
        kv_len: int,
        key_padding: torch.Tensor | None,
        prepared_mask: torch.Tensor | None,
        backend: str,
        device: torch.device,
    ) -> None:
        self.q_len, self.kv_len = q_len, kv_len
        self.key_padding = key_padding  # (B, S) bool, True = real token; None when nothing is padded
        self.prepared_mask = prepared_mask  # (B|1, 1, T, S) bool from the caller (e.g. generate with a static cache)
        self.backend = backend
        self.device = device
        self._masks: dict[int | None, torch.Tensor | None] = {}

    def mask(self, window: int | None) -> torch.Tensor | None:
        if window is not None and window >= self.kv_len:
            window = None  # a window longer than the sequence changes nothing
        if window not in self._masks:
            if self.prepared_mask is not None:
                mask = self.prepared_mask
                if window is not None:
                    mask = mask & causal_mask(self.q_len, self.kv_len, window, self.device)
            elif self.key_padding is None and window is None:
                mask = None
            else:
                mask = causal_mask(self.q_len, self.kv_len, window, self.device, self.key_padding)
            self._masks[window] = mask
        return self._masks[window]


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    config: QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock"]
    # AutoGPTQ, which wrote the released -Int4 checkpoints, stored a bias for every quantized linear layer, zeros for
    # the ones Qwen has without (no_bias); they carry nothing, and qwen/gptq.py checks that they are zero.
    _keys_to_ignore_on_load_unexpected = [r"\.(attn\.c_proj|mlp\.w1|mlp\.w2|mlp\.c_proj)\.bias$"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _can_compile_fullgraph = True  # at decode steps over a preallocated cache: see QWenModel._is_fixed_shape_step

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """transformers' `save_pretrained`, refused (ValueError, nothing written) for a model with a layer whose
        weights cannot be written as checkpoint weights: a module that says why in `not_saveable_reason` (the layers
        `qwen.weight_quant` quantizes on load)."""
        for name, module in self.named_modules():
            reason = getattr(module, "not_saveable_reason", None)
            if reason:
                raise ValueError(f"Cannot save this model: {name} {reason}.")
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        # Output projections get the depth-scaled init of the released model (GPT-2 style).
        if isinstance(module, (QWenAttention, QWenMLP)):
            init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config: QWenConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList(QWenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        # The NTK alpha each cache's sequences were prefilled with, kept here rather than written onto the cache: any
        # transformers Cache works (DynamicCache, StaticCache, a caller's own), and an entry goes with its cache.
        self._prefill_ntk_alphas: weakref.WeakKeyDictionary[Cache, list[float]] = weakref.WeakKeyDictionary()
        if config.use_cache_quantization and config.use_cache_kernel:
            # The released model compiled CUDA kernels (cache_autogptq_cuda_256) that read the int8 cache directly.
            logger.warning_once(
                "use_cache_kernel=True: the released CUDA kernels for the quantized KV cache are not part of this "
                "implementation; the int8 cache is dequantized with torch before attention instead (same stored "
                "values, any device)."
            )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def ntk_alphas_of(self, cache: Cache) -> list[float] | None:
        """The dynamic-NTK alpha of each sequence in `cache`, chosen at its prefill (None: not prefilled here)."""
        return self._prefill_ntk_alphas.get(cache)

    def _ntk_alphas(
        self, cache: Cache | None, past_len: int, kv_len: int, key_padding_2d: torch.Tensor | None, batch: int,
        given: Sequence[float] | torch.Tensor | None,
    ) -> list[float] | torch.Tensor:
        """NTK alpha per sequence: `given` by a caller that tracks its sequences itself (floats, or a (1|B,) tensor
        for a compiled step), else chosen from the prompt's length at prefill and kept (per cache) for every decoded
        token."""
        if given is not None:
            if len(given) not in (1, batch):
                raise ValueError(f"ntk_alphas has {len(given)} values for a batch of {batch}; give one or one per row.")
            return given if isinstance(given, torch.Tensor) else list(given)
        if self.training or not self.config.use_dynamic_ntk:
            return [1.0]
        stored = self._prefill_ntk_alphas.get(cache) if cache is not None else None
        if past_len > 0 and stored is not None:
            if len(stored) not in (1, batch):
                raise ValueError(
                    f"The KV cache was prefilled for {len(stored)} sequences but this call has {batch}; "
                    "start a new cache after changing the batch."
                )
            return stored
        seq_length = self.config.seq_length
        if key_padding_2d is not None and kv_len > seq_length:
            alphas = [ntk_alpha_for_length(int(n), seq_length) for n in key_padding_2d.sum(-1).tolist()]
        else:
            alphas = [ntk_alpha_for_length(kv_len, seq_length)]
        if cache is not None:
            self._prefill_ntk_alphas[cache] = alphas
        return alphas

    def _is_fixed_shape_step(
        self,
        cache: Cache | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        ntk_alphas: Sequence[float] | torch.Tensor | None,
    ) -> bool:
        """Whether this call is a fixed-shape step, one `torch.compile` traces without a graph break: a preallocated
        cache (`is_compileable`: transformers' StaticCache, QuantizedStaticCache, a fixed-shape SlotKVCache) read
        whole, with the caller's 4D mask over all its positions, the positions, and (with dynamic NTK) the alphas
        given, so that nothing is read back from the device. generate() gives all of them at each decode step
        (`prepare_inputs_for_generation`); a prefill, which chooses the alphas, takes the ordinary path. Window
        attention's mask depends on where the query is in the cache, so it takes the ordinary path as well."""
        return (
            cache is not None
            and getattr(cache, "is_compileable", False)
            and attention_mask is not None
            and attention_mask.dim() == 4
            and position_ids is not None
            and (ntk_alphas is not None or self.training or not self.config.use_dynamic_ntk)
            and not self.config.use_window_attn
        )

    def _backend(self, x: torch.Tensor) -> str:
        return attention_backend(getattr(self.config, "_attn_implementation", None), self.config.use_flash_attn,
                                 x.is_cuda and x.dtype in (torch.float16, torch.bfloat16), flash_installed=None)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        ntk_alphas: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """The decoder. `ntk_alphas` (one, or one per row) overrides the dynamic-NTK alpha the model would choose, for
        callers that keep their sequences' alphas themselves (the batching engine's slot cache)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError("The KV cache must be a transformers Cache (e.g. DynamicCache), not legacy tuples.")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False
        if use_cache and cache is None:
            cache = new_kv_cache(self.config)
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )

        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        batch, q_len = x.shape[:2]
        fixed_shape = self._is_fixed_shape_step(cache, attention_mask, position_ids, ntk_alphas)
        if fixed_shape:
            # The cache returns its whole buffer and the caller's mask says which positions hold keys: nothing here
            # depends on how many tokens are cached, so the step has the same shapes and graph at every position.
            past_len, kv_len = None, attention_mask.shape[-1]
        else:
            past_len = int(cache.get_seq_length()) if cache is not None else 0
            kv_len = past_len + q_len

        key_padding_2d, prepared_mask = None, None
        if attention_mask is not None and attention_mask.dim() == 4:
            prepared = attention_mask[..., -q_len:, :kv_len]
            prepared_mask = prepared if prepared.dtype == torch.bool else prepared > torch.finfo(prepared.dtype).min / 2
        elif attention_mask is not None:
            key_padding_2d = attention_mask[:, -kv_len:].bool()
        if position_ids is None:
            position_ids = torch.arange(past_len, kv_len, device=x.device).unsqueeze(0).expand(batch, -1)
        key_padding = None if key_padding_2d is None or bool(key_padding_2d.all()) else key_padding_2d
        layout = AttentionLayout(q_len, kv_len, key_padding, prepared_mask, self._backend(x), x.device)

        alphas = self._ntk_alphas(cache, past_len or 0, kv_len, key_padding_2d, batch, ntk_alphas)
        if isinstance(alphas, torch.Tensor):
            inv_freq = rotary_inv_freq(self.config.rotary_dim, self.config.rotary_emb_base, alphas, x.device)
        else:
            inv_freq = torch.stack(
                [rotary_inv_freq(self.config.rotary_dim, self.config.rotary_emb_base, a, x.device) for a in alphas]
            )  # (1|B, rotary_dim/2)
        rotary = rotary_cos_sin(position_ids, inv_freq)
        logn = None
        # logn_scale is exactly 1 up to seq_length, so a fixed-shape step applies it without asking where it is.
        if self.config.use_logn_attn and not self.training and (
            fixed_shape or int(position_ids.max()) + 1 > self.config.seq_length
        ):
            logn = logn_scale(position_ids, self.config.seq_length)

        x = self.drop(x)
        all_hidden = [] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        for block in self.h:
            if all_hidden is not None:
                all_hidden.append(x)
            x, weights = block(x, rotary, logn, layout, cache if use_cache else None, output_attentions)
            if all_attn is not None:
                all_attn.append(weights)
        x = self.ln_f(x)
        if all_hidden is not None:
            all_hidden.append(x)
        return with_kv_cache(
            BaseModelOutputWithPast,
            cache if use_cache else None,
            last_hidden_state=x,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=tuple(all_attn) if all_attn is not None else None,
        )


# `chat(stream=...)` was refused by the released model as well; any value, even None, is refused here.
_NOT_GIVEN: Any = object()


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    def __init__(self, config: QWenConfig) -> None:
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> QWenLMHeadModel:
        """transformers' `from_pretrained`, plus the released precision flags `bf16=True` / `fp16=True` / `fp32=True`,
        and `attn_implementation="sdpa"` kept as asked (`attention_backend`).

        Without a flag or `dtype`, the precision is chosen like the released model: bf16 on a CUDA GPU that supports
        it natively, else fp16 on CUDA; a model left on the CPU (no `device_map`, `device_map="cpu"`, or no GPU) runs in
        fp32.
        """
        config = kwargs.get("config")
        # Not isinstance(QWenConfig): under trust_remote_code the config class comes from another module copy.
        if not isinstance(config, PretrainedConfig):
            config = QWenConfig.from_pretrained(
                pretrained_model_name_or_path,
                **{k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs},
            )
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            # A config that its saved weights contradict is refused before transformers builds the model.
            folder = pretrained_model_name_or_path
            if kwargs.get("subfolder"):
                folder = os.path.join(folder, kwargs["subfolder"])
            if os.path.isdir(folder):
                config.check_against_weights(folder)
        if _is_gptq(getattr(config, "quantization_config", None)) or _is_gptq(kwargs.get("quantization_config")):
            require_gptq_packages()
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            flags = {name: kwargs.get(name) for name in ("bf16", "fp16", "fp32")}
            if not any(flags.values()):
                flags = {name: getattr(config, name, False) for name in ("bf16", "fp16", "fp32")}
            kwargs["dtype"] = resolve_dtype(**flags, device_map=kwargs.get("device_map"))
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if kwargs.get("output_loading_info") else loaded  # (model, loading_info) when asked
        if kwargs.get("attn_implementation") == "sdpa":
            # transformers records "sdpa" whether it was asked for or chosen by default; only the request says that
            # the released config's use_flash_attn "auto" must not pick flash-attn.
            model.config.use_flash_attn = False
        model.config.bf16 = model.dtype == torch.bfloat16
        model.config.fp16 = model.dtype == torch.float16
        model.config.fp32 = model.dtype == torch.float32
        return loaded

    def _prepare_cache_for_generation(
        self, generation_config: GenerationConfig, model_kwargs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> None:
        """transformers' choice of cache for `generate()`, except that its default float DynamicCache becomes a
        QuantizedKVCache when `use_cache_quantization` is set. A cache passed by the caller is used as it is."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(CACHE_KEY)
        if not self.config.use_cache_quantization or getattr(cache, "_is_user_defined", False):
            return
        if type(cache) is DynamicCache and generation_config.cache_implementation in (None, "dynamic"):
            model_kwargs[CACHE_KEY] = QuantizedKVCache(self.config)
        elif type(cache) is StaticCache and generation_config.cache_implementation == "static":
            model_kwargs[CACHE_KEY] = QuantizedStaticCache(self.config, cache.layers[0].max_cache_len)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """transformers' inputs for the next forward, plus the sequences' NTK alphas at a decode step over a
        preallocated cache: with them, the 4D mask and the positions transformers gives, the step is a fixed-shape
        one (`QWenModel._is_fixed_shape_step`), which compiles without graph breaks."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        cache = inputs.get(CACHE_KEY)
        if not kwargs.get("is_first_iteration") and getattr(cache, "is_compileable", False) \
                and inputs.get("ntk_alphas") is None:
            stored = self.transformer.ntk_alphas_of(cache)
            if stored is not None:
                inputs["ntk_alphas"] = torch.tensor(stored, dtype=torch.float64, device=input_ids.device)
        return inputs

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        ntk_alphas: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            ntk_alphas=ntk_alphas,
        )
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = project(self.lm_head, hidden)
        loss = None
        if labels is not None:
            # Next-token cross entropy in fp32; -100 marks positions without a target. The labels move left, not the
            # logits: slicing the (B, T, vocab) logits would copy them, and its backward would fill another such
            # tensor with zeros (5% of a LoRA step on the CPU with the 151,936-token vocabulary).
            shift_logits = logits.float().reshape(-1, logits.size(-1))  # (B*T, vocab)
            shift_labels = F.pad(labels.to(logits.device), (0, 1), value=-100)[..., 1:].reshape(-1)  # (B*T,)
            num_items = kwargs.get("num_items_in_batch")
            if num_items is None:
                loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
            else:
                # Trainer passes the target count of the whole optimizer step (every accumulated micro-batch, every
                # rank) because it accepts **kwargs here, and then neither divides by the accumulation steps nor
                # undoes its multiplication by the world size: a per-micro-batch mean would make the loss and its
                # gradient that many times too large. Summing and dividing by that count gives the mean over every
                # target token of the step, however the batch is split.
                loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum") / num_items
        result = with_kv_cache(
            CausalLMOutputWithPast,
            kv_cache_of(outputs),
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        if return_dict is False:
            return result.to_tuple()
        return result

    def logits_at(
        self,
        input_ids: torch.LongTensor,
        positions: torch.Tensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        ntk_alphas: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """fp32 logits (B, vocab) of one token per row, `positions[b]` indexing row b's tokens in this call: a
        right-padded prefill scores each prompt's last token, a decode step its only one. The LM head runs on those
        rows alone (a (B, T, vocab) tensor would be 151,936 floats per prompt token). `cache` is updated in place."""
        hidden = self.transformer(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            use_cache=cache is not None, ntk_alphas=ntk_alphas,
        ).last_hidden_state  # (B, T, C)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return project(self.lm_head, hidden[rows, positions.to(hidden.device)]).float()

    # ----------------------------------------------------------------------------------------------------------------
    # Generation with stop words, and the chat interface of the original README
    # ----------------------------------------------------------------------------------------------------------------

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        *args: Any,
        stop_words_ids: list[list[int]] | None = None,
        **kwargs: Any,
    ) -> Any:
        """transformers' `generate`, plus the released `stop_words_ids` (keyword or generation_config field).

        When a generated sequence ends with one of the stop sequences, its next token is forced to `eos_token_id`,
        as the released model does, so outputs are token-for-token those of the original code. Positional arguments
        after `logits_processor` (`stopping_criteria`, `prefix_allowed_tokens_fn`, ...) go to transformers' `generate`
        in its order, which is also the released model's.
        """
        if CACHE_KEY != "cache" and "cache" in kwargs:
            # The caller's cache under this model's name for it, on a transformers release that calls it otherwise.
            kwargs[CACHE_KEY] = kwargs.pop("cache")
        # Generation arguments given next to a config (as `chat(..., top_p=0.5)` does) override a copy of it.
        generation_config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        kwargs = generation_config.update(**kwargs)
        compile_config = generation_config.compile_config
        if compile_config is not None and compile_config._compile_all_devices is None:
            # A compile_config asks for the compiled decode step; transformers would compile only on accelerators.
            # A copy: the caller's may have come as a keyword and be used again elsewhere.
            compile_config = generation_config.compile_config = copy.copy(compile_config)
            compile_config._compile_all_devices = True
        if stop_words_ids is None:
            stop_words_ids = getattr(generation_config, "stop_words_ids", None)
        if stop_words_ids:
            eos = generation_config.eos_token_id
            if isinstance(eos, (list, tuple)):
                eos = eos[0]
            processors = LogitsProcessorList(logits_processor or [])
            processors.append(StopWordsLogitsProcessor(stop_words_ids=stop_words_ids, eos_token_id=eos))
            logits_processor = processors
        return super().generate(inputs, generation_config, logits_processor, *args, **kwargs)

    def _chat_inputs(
        self,
        tokenizer: Any,
        query: str,
        history: HistoryType | None,
        system: str,
        stop_words_ids: list[list[int]] | None,
        generation_config: GenerationConfig | None,
        logits_processor: LogitsProcessorList | None,
        kwargs: dict[str, Any],
    ) -> tuple[GenerationConfig, torch.Tensor, list[list[int]], LogitsProcessorList]:
        generation_config = generation_config if generation_config is not None else self.generation_config
        chat_format = getattr(generation_config, "chat_format", "chatml")
        if chat_format != "chatml":
            raise ValueError(
                f"chat() needs a chat model: this checkpoint's generation_config.json has chat_format={chat_format!r}, "
                "which marks a base (pretrained) model. Use a -Chat checkpoint, or call generate() on a base model."
            )
        turn = chat_turn(
            tokenizer, query, history or [], system, generation_config, context_length(self.config),
            max_new_tokens=kwargs.get("max_new_tokens"), max_window_size=kwargs.pop("max_window_size", None),
        )
        stop_words_ids = list(stop_words_ids or []) + [list(words) for words in turn.stop_words_ids]
        input_ids = torch.tensor([turn.prompt_ids], device=self.device)
        # The embedding is padded past the tokenizer's last id (151936 rows for 151851 ids). A trained model never
        # picks those rows, but a reply must always be decodable, so they are ruled out rather than left to chance.
        processors = LogitsProcessorList(logits_processor or [])
        if len(tokenizer) < self.config.vocab_size:
            processors.append(_SuppressIdsFrom(len(tokenizer)))
        return generation_config, input_ids, stop_words_ids, processors

    def chat(
        self,
        tokenizer: Any,
        query: str,
        history: HistoryType | None = None,
        system: str = DEFAULT_SYSTEM_PROMPT,
        stream: Any = _NOT_GIVEN,
        stop_words_ids: list[list[int]] | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        append_history: bool = True,
        **kwargs: Any,
    ) -> tuple[str, HistoryType]:
        """One chat turn: returns the reply and the history with (query, reply) appended.

        The positional order is the released one, whose fifth parameter, `stream`, only existed to refuse streaming.
        """
        if stream is not _NOT_GIVEN:
            raise TypeError(
                "chat() does not stream (its 5th positional argument is `stream`, refused by the released model too): "
                "use chat_stream(...) to stream, and pass append_history=, stop_words_ids= and generation_config= "
                "by keyword."
            )
        # A new list: the caller's history is left as it was, as in the released model.
        history = [] if history is None else list(history)
        generation_config, input_ids, stop_words_ids, logits_processor = self._chat_inputs(
            tokenizer, query, history, system, stop_words_ids, generation_config, kwargs.pop("logits_processor", None),
            kwargs,
        )
        outputs = self.generate(
            input_ids, generation_config=generation_config, stop_words_ids=stop_words_ids,
            logits_processor=logits_processor, **kwargs,
        )
        response = decode_tokens(
            outputs[0], tokenizer, context_length=input_ids.shape[1], chat_format="chatml", errors="replace"
        )
        if append_history:
            history.append((query, response))
        return response, history

    def chat_stream(
        self,
        tokenizer: Any,
        query: str,
        history: HistoryType | None = None,
        system: str = DEFAULT_SYSTEM_PROMPT,
        stop_words_ids: list[list[int]] | None = None,
        logits_processor: LogitsProcessorList | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> Iterator[str]:
        """Yield the reply as it grows (each item is the whole reply so far), like the released `chat_stream`.

        Generation runs in a background thread feeding a transformers streamer; closing the iterator early stops it.
        """
        generation_config, input_ids, stop_words_ids, logits_processor = self._chat_inputs(
            tokenizer, query, history, system, stop_words_ids, generation_config, logits_processor, kwargs
        )
        streamer = TokenQueueStreamer()
        stop_event = threading.Event()
        stopping = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        stopping.append(_EventStoppingCriteria(stop_event))
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.generate(
                    input_ids, generation_config=generation_config, stop_words_ids=stop_words_ids,
                    logits_processor=logits_processor, stopping_criteria=stopping, streamer=streamer, **kwargs,
                )
            except BaseException as error:  # re-raised in the consumer's thread below
                failure.append(error)
            finally:
                streamer.end()

        worker = threading.Thread(target=run, name="qwen-chat-stream", daemon=True)
        worker.start()
        stop_ids = {tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.eod_id}
        generated: list[int] = []
        try:
            last = ""
            for token_ids in streamer:
                if any(t in stop_ids for t in token_ids):
                    generated.extend(t for t in token_ids if t not in stop_ids)
                    stop_event.set()
                else:
                    generated.extend(token_ids)
                # errors="ignore" holds back a character until all of its UTF-8 bytes have arrived.
                text = tokenizer.decode(generated, skip_special_tokens=True, errors="ignore")
                if text != last:
                    last = text
                    yield text
                if stop_event.is_set():
                    break
        finally:
            stop_event.set()
            worker.join()
        if failure:
            raise failure[0]


class _SuppressIdsFrom(LogitsProcessor):
    """Rules out every id from `first_id` on. transformers' SuppressTokensLogitsProcessor does the same for any set
    of ids with `torch.isin` over the whole vocabulary, which costs about 0.1 s per token on a CPU; a slice is free."""

    def __init__(self, first_id: int):
        self.first_id = first_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.first_id:] = -float("inf")
        return scores


class TokenQueueStreamer(BaseStreamer):
    """A transformers streamer that hands newly generated token ids to another thread; the prompt is skipped."""

    _END = object()

    def __init__(self) -> None:
        import queue

        self._queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self._queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self._queue.put(self._END)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            yield item


class _EventStoppingCriteria(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _is_gptq(quantization_config: Any) -> bool:
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method")
    else:
        method = getattr(quantization_config, "quant_method", None)
    return str(getattr(method, "value", method)).lower() == "gptq"


def require_gptq_packages() -> None:
    """Raise ImportError naming what to install when transformers' GPTQ support (optimum + gptqmodel) is missing.

    transformers asks for one package at a time, and with optimum alone fails with a NameError (or, on a machine
    without a GPU, says a GPU is required), none of which tells the user what to install.
    """
    missing = [name for name in ("optimum", "gptqmodel") if importlib.util.find_spec(name) is None]
    if missing:
        torch_version = torch.__version__.split("+")[0]
        raise ImportError(
            f"This checkpoint is GPTQ-quantized (Int4/Int8); loading it needs optimum and gptqmodel, and "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed. Install them with "
            f"`pip install torch=={torch_version} optimum gptqmodel` (naming your torch version keeps pip from "
            "replacing it)."
        )


def places_on_gpu(device_map: Any, cuda_available: bool) -> bool:
    """Whether `from_pretrained(..., device_map=device_map)` puts any weights on a CUDA GPU. Without a device map
    the model stays on the CPU; "cpu" (and "disk", for offloaded modules) are not GPUs."""
    if device_map is None or not cuda_available:
        return False
    targets = device_map.values() if isinstance(device_map, dict) else [device_map]
    return any(str(target) not in ("cpu", "disk") for target in targets)


def choose_dtype(
    bf16: bool | None, fp16: bool | None, fp32: bool | None, device_map: Any, *, cuda_available: bool,
    native_bf16: bool,
) -> torch.dtype:
    """The torch dtype for the released precision flags (at most one set), like the released model: without a flag,
    bf16 on a GPU that computes in bf16 natively (`native_bf16`: compute capability 8.0 on), else fp16 on a GPU,
    else fp32 (the CPU). Emulated bf16 (V100, T4) does not count: there the released model chose fp16."""
    if sum(bool(flag) for flag in (bf16, fp16, fp32)) > 1:
        raise ValueError("Pass only one of bf16=True, fp16=True, fp32=True.")
    on_gpu = places_on_gpu(device_map, cuda_available)
    if bf16:
        if on_gpu and not native_bf16:
            logger.warning("This GPU has no native bf16 (it is emulated and slow); prefer fp16=True on it.")
        return torch.bfloat16
    if fp16:
        if not on_gpu:
            logger.warning("fp16 on the CPU is slow and some kernels lack it; prefer bf16=True or fp32=True there.")
        return torch.float16
    if fp32 or not on_gpu:
        return torch.float32
    return torch.bfloat16 if native_bf16 else torch.float16


def _gpu_has_native_bf16() -> bool:
    # torch's default also counts bf16 emulated on older GPUs; older torch releases had no such argument.
    if "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.is_bf16_supported()


def resolve_dtype(
    bf16: bool | None = None, fp16: bool | None = None, fp32: bool | None = None, device_map: Any = None
) -> torch.dtype:
    """`choose_dtype` for this machine's GPU, if any; at most one flag may be set."""
    cuda_available = torch.cuda.is_available()
    return choose_dtype(
        bf16, fp16, fp32, device_map, cuda_available=cuda_available,
        native_bf16=cuda_available and _gpu_has_native_bf16(),
    )


__all__ = [
    "CACHE_KEY", "QWenLMHeadModel", "QWenModel", "QWenPreTrainedModel", "QuantizedKVCache", "RMSNorm", "cache_field",
    "choose_dtype", "dequantize_kv", "kv_cache_of", "new_kv_cache", "places_on_gpu", "quantize_kv",
    "require_gptq_packages", "resolve_dtype", "with_kv_cache",
]
