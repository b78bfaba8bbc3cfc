"""Weight-only int8 and int4 quantization on load: no calibration data, no extra files.

    from qwen.weight_quant import quantize_weights
    summary = quantize_weights(model, "int8")          # or "int4" (group_size=128 by default)
    print(summary.describe())

or `qwen.loading.load_model_and_tokenizer(folder, dtype="int8")`, or `--dtype int8` / `--dtype int4` in every script.

What is quantized: every linear layer of the decoder blocks (attn.c_attn, attn.c_proj, mlp.w1, mlp.w2, mlp.c_proj)
and the output layer (lm_head). Each is replaced, at the same attribute, by an `Int8Linear` or `Int4Linear` whose
state-dict entries keep the layer's name (`weight` holds the codes, next to `scales` or `scales_and_zeros`); the
embedding, the norms and the KV cache (with or without `use_cache_quantization`) keep their dtype and names.

- int8: symmetric, one scale per output channel: W[o, i] ~ q[o, i] * s[o], q in [-127, 127], s[o] = max_i |W[o, i]| / 127.
- int4: asymmetric groups of `group_size` consecutive input channels, as gpt-fast does: W ~ (q - 8) * s + z with q in
  [0, 15], s = (max - min) / 15 and z = min + 8 s for each group. A layer whose input width is not a multiple of
  `group_size` gets the largest half, quarter, ... of it (at least 32) that divides its width: the MLP's output
  projection of a model with intermediate_size 5504 (2752 inputs) uses groups of 64.

Kernels. The product runs in the fastest kernel the installed torch has for the device, chosen by measurement: once
per process, scheme, device and shape, every candidate multiplies one row by the quantized output layer (the largest
matrix) and the quickest wins for every layer. Candidates: torch's fused `_weight_int8pack_mm`, and for int4
`_weight_int4pack_mm_for_cpu` on the CPU or tinygemm's `_weight_int4pack_mm` on CUDA (bf16 only, compute capability
8.0+), each with activations cast to bf16 and to fp32 (the output is cast back to the input's dtype); and
dequantize-then-matmul, which every device can run. On the CPU that last one is only the fallback where no fused
kernel runs: it was 15-60x slower than the fused kernels there. Measured on one AVX-512 CPU for the 151,936 x 1024
output layer at one row: fp32 22 ms, bf16 16 ms, int8 fused with bf16 activations 10 ms (62 ms with fp32 ones), int4
fused with bf16 activations 6 ms (270 ms with fp32 ones), dequantize-then-matmul 372 ms. Other CPUs differ, hence the
measurement. Packed int4 layouts differ between the CPU and CUDA: a model quantized on one device refuses to run on
the other (quantize after moving it).

Accuracy, measured on the trained test checkpoint (tests/trained_checkpoint.py with its two EXCHANGES, as
tests/test_weight_quant.py and tests/test_kv_quant.py load it: a tiny model, hidden size 32, trained until greedy
decoding writes given replies), over every position of both prompts with their replies: the largest
|logit - fp32 logit| divided by the largest |fp32 logit| of the same position was 0.016 for int8 (0.014 with fp32
activations) and 0.229 for int4 (0.224), in groups of 32 there. The documented bounds, LOGIT_BOUND, are 0.03 for
int8 and 0.35 for int4; int8 greedy replies equal fp32's. tests/test_weight_quant.py checks both. Other
checkpoints differ: measure yours the same way before relying on int4.

Not supported on a quantized model: training (the codes have no gradient), LoRA (`qwen.lora` refuses), conversion to
Qwen2 (`qwen.convert` refuses), and saving (`save_pretrained` refuses: the packed layouts are per device; quantize
again on load instead).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .gptq import QUANTIZED_LINEARS

logger = logging.getLogger(__name__)

SCHEMES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128
GROUP_SIZES = (32, 64, 128, 256)  # what the fused int4 kernels accept
# The bound on max |logit - fp32 logit| / max |fp32 logit| per position (see the module docstring and the tests).
LOGIT_BOUND = {"int8": 0.03, "int4": 0.35}


class WeightQuantError(ValueError):
    """A request the quantizer cannot honour (unknown scheme, a group size or shape the kernels cannot take)."""


@dataclass(frozen=True)
class Kernel:
    """How a quantized layer multiplies: `fused` (torch's kernel on packed codes) or `dequantize` (a float weight
    rebuilt at every call), with activations cast to `activation_dtype`."""

    method: str  # "fused" | "dequantize"
    activation_dtype: torch.dtype

    def describe(self) -> str:
        dtype = str(self.activation_dtype).removeprefix("torch.")
        return f"{self.method} with {dtype} activations"


# --------------------------------------------------------------------------------------------------------------------
# Codes
# --------------------------------------------------------------------------------------------------------------------


# Rows quantized at a time: the temporaries of a 151,936-row output layer would otherwise take several times its size.
_ROWS_PER_CHUNK = 4096


def int8_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (out, in), scales fp32 (out,)) with weight ~ codes * scales[:, None]."""
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], _ROWS_PER_CHUNK):
        rows = weight[start:start + _ROWS_PER_CHUNK].float()
        chunk_scales = rows.abs().amax(dim=1).clamp(min=1e-8) / 127
        codes[start:start + len(rows)] = torch.round(rows / chunk_scales[:, None]).clamp(-127, 127)
        scales[start:start + len(rows)] = chunk_scales
    return codes, scales


def int4_codes(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int32 (out, in) in [0, 15], scales and zeros fp32 (out, in / group_size)) with
    weight ~ (codes - 8) * scale + zero in each group."""
    out_features, in_features = weight.shape
    codes = torch.empty(weight.shape, dtype=torch.int32, device=weight.device)
    scales = torch.empty(out_features, in_features // group_size, dtype=torch.float32, device=weight.device)
    zeros = torch.empty_like(scales)
    for start in range(0, out_features, _ROWS_PER_CHUNK):
        groups = weight[start:start + _ROWS_PER_CHUNK].float().reshape(-1, in_features // group_size, group_size)
        low, high = groups.amin(dim=2), groups.amax(dim=2)  # (rows, G)
        chunk_scales = (high - low).clamp(min=1e-6) / 15
        rows = slice(start, start + len(groups))
        codes[rows] = torch.round((groups - low[..., None]) / chunk_scales[..., None]).clamp(0, 15).flatten(1)
        scales[rows], zeros[rows] = chunk_scales, low + 8 * chunk_scales
    return codes, scales, zeros


def group_size_for(in_features: int, requested: int) -> int:
    """`requested`, or its largest half, quarter, ... (at least 32) that divides `in_features`."""
    size = requested
    while size >= 32 and in_features % size:
        size //= 2
    if size < 32:
        raise WeightQuantError(f"int4 needs layers whose input width is a multiple of 32; one has {in_features}.")
    return size


def _inner_k_tiles(in_features: int) -> int:
    # tinygemm's tiling of the input dimension: 8 tiles of 16 where the width allows, else 4 or 2.
    return next(tiles for tiles in (8, 4, 2) if in_features % (16 * tiles) == 0)


# --------------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------------


class QuantizedLinear(nn.Module):
    """A linear layer with quantized weights, for inference: the input is cast to the kernel's activation dtype and the
    output back to the input's dtype; the bias (kept in float) is added after that."""

    # Read by QWenPreTrainedModel.save_pretrained: a checkpoint written from these layers would hold device-specific
    # codes under the float weights' names, and load as noise.
    not_saveable_reason = ("holds weights quantized on load (qwen.weight_quant); save the float model instead and "
                           "quantize again when loading it (--dtype int8 / int4)")

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, kernel: Kernel) -> None:
        super().__init__()
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The fused kernels require contiguous rows; a slice of a batch (the last positions of several rows) is not.
        rows = x.reshape(-1, self.in_features).to(self.kernel.activation_dtype).contiguous()  # (N, in)
        out = self._matmul(rows).to(x.dtype)  # (N, out)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kernel={self.kernel.describe()}")


class Int8Linear(QuantizedLinear):
    """int8 codes (out, in) with one scale per output channel (stored in the kernel's activation dtype)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, kernel: Kernel) -> None:
        super().__init__(codes.shape[1], codes.shape[0], bias, kernel)
        self.register_buffer("weight", codes)
        self.register_buffer("scales", scales.to(kernel.activation_dtype))

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        if self.kernel.method == "fused":
            return torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
        return F.linear(rows, self.weight.to(rows.dtype) * self.scales[:, None])


class Int4Linear(QuantizedLinear):
    """int4 codes in groups of `group_size` input channels, with a scale and a zero point per group.

    `weight` holds the codes packed for the kernel: the fused CPU and CUDA kernels each have their own layout (made by
    `_convert_weight_to_int4pack_for_cpu` / `_convert_weight_to_int4pack`); for `dequantize` two codes share a byte,
    the even input channel in the high nibble. `scales_and_zeros` is (in / group_size, out, 2), as the fused kernels
    take it."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, kernel: Kernel) -> None:
        super().__init__(codes.shape[1], codes.shape[0], bias, kernel)
        self.group_size = group_size
        self.packed_for = codes.device.type if kernel.method == "fused" else None
        if kernel.method == "dequantize":
            packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # (out, in / 2)
        elif codes.device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack(
                (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), _inner_k_tiles(codes.shape[1]))
        self.register_buffer("weight", packed)
        scales_and_zeros = torch.stack([scales, zeros], dim=2).transpose(0, 1).contiguous()  # (G, out, 2)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(kernel.activation_dtype))

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        if self.kernel.method == "fused":
            if rows.device.type != self.packed_for:
                raise RuntimeError(f"These int4 weights were packed for {self.packed_for} and cannot run on "
                                   f"{rows.device.type}; move the float model there first, then quantize it.")
            if rows.device.type == "cpu":
                return torch.ops.aten._weight_int4pack_mm_for_cpu(
                    rows, self.weight, self.group_size, self.scales_and_zeros)
            return torch.ops.aten._weight_int4pack_mm(rows, self.weight, self.group_size, self.scales_and_zeros)
        codes = torch.stack([self.weight >> 4, self.weight & 15], dim=2).reshape(self.out_features, -1)  # (out, in)
        groups = codes.reshape(self.out_features, -1, self.group_size).to(rows.dtype) - 8  # (out, G, g)
        scales, zeros = self.scales_and_zeros.transpose(0, 1).unbind(dim=2)  # (out, G) each
        weight = (groups * scales[..., None] + zeros[..., None]).reshape(self.out_features, self.in_features)
        return F.linear(rows, weight)


@dataclass
class LayerCodes:
    """One linear layer's quantized weights before packing for a kernel (see `int8_codes`, `int4_codes`)."""

    scheme: str
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    bias: torch.Tensor | None

    @classmethod
    def of(cls, layer: nn.Linear, scheme: str, group_size: int) -> LayerCodes:
        weight = layer.weight.detach()
        if scheme == "int8":
            return cls(scheme, *int8_codes(weight), None, 0, layer.bias)
        size = group_size_for(layer.in_features, group_size)
        return cls(scheme, *int4_codes(weight, size), size, layer.bias)

    def layer(self, kernel: Kernel) -> QuantizedLinear:
        """The quantized layer multiplying with `kernel`, on the codes' device."""
        if self.scheme == "int8":
            return Int8Linear(self.codes, self.scales, self.bias, kernel)
        required = 16 if self.codes.device.type == "cpu" else 8
        if kernel.method == "fused" and self.codes.shape[0] % required:
            raise WeightQuantError(f"The fused int4 kernel needs a multiple of {required} output channels; a layer "
                                   f"has {self.codes.shape[0]}.")
        return Int4Linear(self.codes, self.scales, self.zeros, self.group_size, self.bias, kernel)


# --------------------------------------------------------------------------------------------------------------------
# Choosing the kernel
# --------------------------------------------------------------------------------------------------------------------


def candidate_kernels(scheme: str, device: torch.device, float_dtype: torch.dtype) -> list[Kernel]:
    """The kernels worth measuring for `scheme` on `device`: fused ones first, then dequantize-then-matmul (in the
    model's float dtype, bf16 on the CPU where that is the float dtype's fast sibling)."""
    if device.type == "cpu":
        fused = [Kernel("fused", torch.bfloat16), Kernel("fused", torch.float32)]
    elif scheme == "int4":
        fused = [Kernel("fused", torch.bfloat16)]  # tinygemm takes bf16 only
    else:
        fused = [Kernel("fused", dtype) for dtype in (torch.bfloat16, torch.float16, torch.float32)]
    return fused + [Kernel("dequantize", float_dtype)]


def _seconds(layer: QuantizedLinear, row: torch.Tensor, repeats: int) -> float:
    def once() -> float:
        start = time.perf_counter()
        layer(row)
        if row.device.type == "cuda":
            torch.cuda.synchronize(row.device)
        return time.perf_counter() - start

    return min(once() for _ in range(repeats))


_chosen: dict[tuple[str, str, tuple[int, ...], int, torch.dtype], tuple[Kernel, dict[Kernel, float]]] = {}


@torch.inference_mode()
def choose_kernel(codes: LayerCodes, float_dtype: torch.dtype) -> tuple[Kernel, dict[Kernel, float]]:
    """The fastest kernel for one row through the layer of `codes` on its device, and the seconds each candidate took.

    Each candidate gets a warm-up call; one more than three times slower than the best warm-up so far stops there,
    the others take the best of three more calls. On the CPU, dequantize-then-matmul is measured only when no fused
    kernel runs. The answer is kept for the process (per scheme, device, shape, group size and float dtype).
    """
    device = codes.codes.device
    key = (codes.scheme, str(device), tuple(codes.codes.shape), codes.group_size, float_dtype)
    if key in _chosen:
        return _chosen[key]
    row = torch.randn(1, codes.codes.shape[1], device=device, dtype=float_dtype)
    seconds: dict[Kernel, float] = {}
    failures: list[str] = []
    for kernel in candidate_kernels(codes.scheme, device, float_dtype):
        if kernel.method == "dequantize" and device.type == "cpu" and seconds:
            continue
        try:
            candidate = codes.layer(kernel)
            warm = _seconds(candidate, row, 1)  # first call: lazy initialization, page faults
        except (RuntimeError, NotImplementedError, WeightQuantError) as error:  # the kernel is missing on this device
            failures.append(f"{kernel.describe()}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
            continue
        best = min(seconds.values(), default=warm)
        seconds[kernel] = warm if warm > 3 * best else _seconds(candidate, row, 3)
        del candidate
    if not seconds:
        raise WeightQuantError(f"No {codes.scheme} kernel runs on {device}: " + "; ".join(failures))
    _chosen[key] = min(seconds, key=seconds.get), seconds
    return _chosen[key]


# --------------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class QuantizationSummary:
    """What `quantize_weights` did: the kernel it chose (and the seconds each candidate took for one row through the
    output layer), the layers it replaced, and their bytes before (float) and after (codes, scales, biases)."""

    scheme: str
    group_size: int
    kernel: Kernel
    seconds: dict[Kernel, float]
    layers: list[str] = field(default_factory=list)
    float_bytes: int = 0
    quantized_bytes: int = 0

    def describe(self) -> str:
        timings = ", ".join(f"{kernel.describe()} {value * 1e3:.1f} ms" for kernel, value in
                            sorted(self.seconds.items(), key=lambda item: item[1]))
        group = f" (groups of up to {self.group_size})" if self.scheme == "int4" else ""
        chosen = f"measured on one row through the largest layer: {timings}" if timings else "as asked"
        return (f"{self.scheme} weights{group} in {len(self.layers)} layers, {self.quantized_bytes / 2**20:.0f} MiB "
                f"instead of {self.float_bytes / 2**20:.0f} MiB; kernel: {self.kernel.describe()} ({chosen})")


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (codes, scales and biases for a quantized layer)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def is_weight_quantized(model: nn.Module) -> bool:
    return any(isinstance(module, QuantizedLinear) for module in model.modules())


def quantized_layer_names(model: nn.Module) -> list[str]:
    """The layers `quantize_weights` replaces: the five linears of every decoder block, and lm_head."""
    blocks = model.transformer.h if hasattr(model, "transformer") else model.h
    prefix = "transformer.h" if hasattr(model, "transformer") else "h"
    names = [f"{prefix}.{index}.{suffix}" for index in range(len(blocks)) for suffix in QUANTIZED_LINEARS]
    return names + (["lm_head"] if hasattr(model, "lm_head") else [])


@torch.inference_mode()
def quantize_weights(model: nn.Module, scheme: str, group_size: int = DEFAULT_GROUP_SIZE,
                     kernel: Kernel | None = None) -> QuantizationSummary:
    """Replace the decoder's linear layers and the output layer of a loaded `QWenLMHeadModel` (or `QWenModel`) by
    int8 or int4 layers, in place, each on the device it is on, and say what was done. See the module docstring.

    `kernel` fixes the kernel instead of measuring which is fastest (`choose_kernel`), e.g. to compare them.
    """
    if scheme not in SCHEMES:
        raise WeightQuantError(f"Unknown weight quantization {scheme!r}; use {' or '.join(SCHEMES)}.")
    if group_size not in GROUP_SIZES:
        raise WeightQuantError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}; got {group_size}.")
    if is_weight_quantized(model):
        raise WeightQuantError("This model's weights are already quantized; load it again to quantize differently.")
    layers = {name: model.get_submodule(name) for name in quantized_layer_names(model)}
    for name, layer in layers.items():
        if type(layer) is not nn.Linear:
            raise WeightQuantError(f"{name} is a {type(layer).__name__}, not a float nn.Linear (a GPTQ or "
                                   "bitsandbytes model is quantized already); load the float checkpoint instead.")
    # The largest layer first: the kernel is measured on it, from the codes it keeps.
    order = sorted(layers, key=lambda name: -layers[name].weight.numel())
    summary = None
    for name in order:
        layer = layers[name]
        codes = LayerCodes.of(layer, scheme, group_size)
        if summary is None:
            seconds: dict[Kernel, float] = {}
            if kernel is None:
                kernel, seconds = choose_kernel(codes, layer.weight.dtype)
            summary = QuantizationSummary(scheme, group_size, kernel, seconds, layers=list(layers))
        replacement = codes.layer(kernel)
        summary.float_bytes += module_bytes(layer)
        summary.quantized_bytes += module_bytes(replacement)
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attribute, replacement)
        del codes, layer
    logger.info(summary.describe())
    return summary


def cast_float_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every float parameter (embedding, norms, biases) to `dtype`, leaving quantized layers' codes and scales
    as their kernel needs them (`model.to(dtype)` would cast the scales too)."""
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


def refuse_weight_quantized(model: Any, what: str, error: type[Exception] = WeightQuantError) -> None:
    """Raise `error` saying that `what` cannot be done when `model` holds quantized linear layers."""
    if isinstance(model, nn.Module) and is_weight_quantized(model):
        raise error(
            f"{what} needs float weights, and this model's are int8/int4 (weight quantization on load): load the "
            "checkpoint in float32 or bfloat16 for this, and quantize only for inference.")


__all__ = [
    "DEFAULT_GROUP_SIZE", "LOGIT_BOUND", "SCHEMES", "Int4Linear", "Int8Linear", "Kernel", "QuantizationSummary",
    "LayerCodes", "QuantizedLinear", "WeightQuantError", "cast_float_parameters", "choose_kernel", "group_size_for", "int4_codes", "int8_codes",
    "is_weight_quantized", "module_bytes", "quantize_weights", "quantized_layer_names", "refuse_weight_quantized",
]
