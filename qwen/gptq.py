"""GPTQ checkpoints (Int4/Int8): checking a quantized folder before it loads, and quantizing a 16-bit one.

    python -m qwen.gptq check FOLDER      (quantizing: run_gptq.py)

A quantized folder has the layout of the released Qwen-*-Int4 checkpoints, which AutoGPTQ wrote in the GPTQ "v1"
format. Every linear layer of the decoder blocks (attn.c_attn, attn.c_proj, mlp.w1, mlp.w2, mlp.c_proj) is stored as

    qweight  int32 (in * bits / 32, out)     codes, packed along the input dimension, code j at bit j * bits
    qzeros   int32 (groups, out * bits / 32) zero points, packed along the output dimension
    scales   fp16  (groups, out)
    g_idx    int32 (in,)                     the group of each input channel (i // group_size without act-order)
    bias     fp16  (out,)                    zeros where Qwen has no bias: AutoGPTQ stored one for every layer

and the weight is W[:, i] = (q[:, i] - (z + 1)) * scales[g_idx[i]] in v1, or (q - z) * scales in "gptq_v2", which
gptqmodel uses inside and can also write. config.json says which in `quantization_config` (quant_method "gptq",
bits, group_size, desc_act, sym, and `checkpoint_format`, v1 when absent); quantize_config.json repeats the settings.

Loading goes through transformers' own GPTQ support (optimum + gptqmodel), so `QWenLMHeadModel.from_pretrained`,
`AutoModelForCausalLM` and `trust_remote_code` all read these folders. This module adds what transformers does not
check: that the settings, the tensor shapes and the zero-point convention agree, so that a mislabelled folder fails
with a message instead of loading into a model that writes noise. This repository's loader (the scripts' `-c`) and
Q-LoRA run these checks; `python -m qwen.gptq check` runs them for a folder you load in other ways.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .checkpoint_folder import (
    GPTQ_BITS,
    CheckpointError,
    GPTQSettings,
    QuantizationError,
    WeightFiles,
    copy_checkpoint_metadata,
    read_gptq_settings,
    read_json_object,
    resolve_checkpoint,
)
from .configuration_qwen import QWenConfig
from .modeling_qwen import AttentionLayout, QWenBlock, require_gptq_packages
from .sft import load_samples, tokenize_sample
from .tokenization_qwen import QWenTokenizer

# Suffixes of the quantized linear layers inside each block `transformer.h.N`.
QUANTIZED_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
# The settings AutoGPTQ wrote into the released quantize_config.json (Qwen-*-Int4), and that run_gptq.py uses.
RELEASED_SETTINGS = {
    "damp_percent": 0.01, "desc_act": False, "static_groups": False, "sym": True, "true_sequential": True,
    "model_name_or_path": None, "model_file_base_name": "model",
}


def require_gptq_stack() -> None:
    """QuantizationError naming the packages to install unless optimum and gptqmodel are importable."""
    try:
        require_gptq_packages()
    except ImportError as error:
        raise QuantizationError(f"{error} Or install this project's extra: pip install -e .[quant]") from None


# --------------------------------------------------------------------------------------------------------------------
# Checking a quantized folder
# --------------------------------------------------------------------------------------------------------------------


def _quantized_linears(config: Any) -> dict[str, torch.nn.Linear]:
    """The linear layers of one block as the model builds them (on the meta device: shapes and biases, no memory)."""
    with torch.device("meta"):
        block = QWenBlock(config, 0)
    return {suffix: block.get_submodule(suffix) for suffix in QUANTIZED_LINEARS}


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> one code per value along `dim` (0: qweight's rows, 1: qzeros' columns); 2, 4 or 8 bits."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    if dim == 0:
        codes = (packed.unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)  # (rows, 32/bits, cols)
        return codes.reshape(-1, packed.shape[1])
    codes = (packed.unsqueeze(2) >> shifts[None, None, :]) & ((1 << bits) - 1)  # (rows, cols, 32/bits)
    return codes.reshape(packed.shape[0], -1)


def check_gptq_checkpoint(folder: str | Path) -> GPTQSettings | None:
    """Check a folder's GPTQ settings against its weights; return them, or None for an unquantized checkpoint.

    Raises QuantizationError when the weights are quantized but config.json does not say so, when bits or group size
    do not match the tensors' shapes, when a layer lacks one of its tensors, when a bias that Qwen does not have is
    not zero, or when the zero points of a symmetric checkpoint are those of the other format (v1 vs gptq_v2).
    Folders without safetensors files (old .bin checkpoints) get the config checks only.
    """
    folder = Path(folder)
    settings = read_gptq_settings(folder)
    tensors = WeightFiles.find(folder)
    packed = sorted(name for name in (tensors.files if tensors else ()) if name.endswith(".qweight"))
    if settings is None:
        if packed:
            fix = (
                "Its quantize_config.json has the settings: copy them into config.json as \"quantization_config\", "
                "adding \"quant_method\": \"gptq\"."
                if (folder / "quantize_config.json").is_file()
                else "Its quantization settings (bits, group_size, desc_act, sym) are lost: take config.json from the "
                "checkpoint these weights came with."
            )
            raise QuantizationError(
                f"{folder} holds GPTQ-quantized weights ({packed[0]}, ...) but its config.json has no "
                f"quantization_config, so they would load as a model with random weights. {fix}"
            )
        return None
    if tensors is None or not tensors.safetensors:
        return settings
    config = QWenConfig.from_pretrained(folder)
    where = f"{folder}: quantization_config says bits={settings.bits}, group_size={settings.group_size}, but"
    linears = _quantized_linears(config)
    for layer in range(config.num_hidden_layers):
        for suffix, linear in linears.items():
            in_features, out_features = linear.in_features, linear.out_features
            prefix = f"transformer.h.{layer}.{suffix}"
            if f"{prefix}.weight" in tensors:
                raise QuantizationError(
                    f"{folder}: config.json says the model is GPTQ-quantized but {prefix} holds unquantized weights "
                    f"({prefix}.weight). Remove quantization_config from config.json, or quantize with run_gptq.py."
                )
            for part in ("qweight", "qzeros", "scales"):
                if f"{prefix}.{part}" not in tensors:
                    raise QuantizationError(f"{folder} has no {prefix}.{part}: the quantized weights are incomplete.")
            rows, columns = tensors.shape(f"{prefix}.qweight")
            if columns != out_features or (in_features * settings.bits) % 32:
                raise QuantizationError(
                    f"{folder}: {prefix}.qweight has shape {(rows, columns)}, which does not fit a {in_features} -> "
                    f"{out_features} layer of this config (hidden_size, intermediate_size...) with {settings.bits} "
                    "bits."
                )
            if rows * 32 != in_features * settings.bits:
                implied = rows * 32 / in_features
                hint = f"they are packed with {implied:g} bits" if implied in GPTQ_BITS else "they do not fit it"
                raise QuantizationError(
                    f"{where} {prefix}.qweight has {rows} rows for {in_features} inputs: {hint}. Set bits in "
                    "config.json's quantization_config (and quantize_config.json) to the value the weights were "
                    "quantized with."
                )
            groups = settings.groups(in_features)
            scale_shape = tensors.shape(f"{prefix}.scales")
            if scale_shape != (groups, out_features):
                implied = (
                    f" (the weights use group_size {in_features // scale_shape[0]})"
                    if scale_shape[0] and in_features % scale_shape[0] == 0 else ""
                )
                raise QuantizationError(
                    f"{where} {prefix}.scales has shape {scale_shape}, not {(groups, out_features)}{implied}. Set "
                    "group_size in config.json's quantization_config to the value the weights were quantized with."
                )
            zero_shape = tensors.shape(f"{prefix}.qzeros")
            expected_zero_shape = (groups, out_features * settings.bits // 32)
            if zero_shape != expected_zero_shape:
                raise QuantizationError(f"{where} {prefix}.qzeros has shape {zero_shape}, not {expected_zero_shape}.")
            if f"{prefix}.g_idx" in tensors and tensors.shape(f"{prefix}.g_idx") != (in_features,):
                raise QuantizationError(f"{folder}: {prefix}.g_idx has shape {tensors.shape(f'{prefix}.g_idx')}, "
                                        f"not ({in_features},).")
            if linear.bias is None and f"{prefix}.bias" in tensors and bool(tensors.get(f"{prefix}.bias").any()):
                raise QuantizationError(
                    f"{folder}: {prefix}.bias is not zero, but Qwen's {suffix} has no bias (no_bias: true), so the "
                    "model cannot use it. These weights come from a different architecture or a broken conversion."
                )
    _check_zero_points(folder, settings, tensors.get(f"transformer.h.0.{QUANTIZED_LINEARS[0]}.qzeros"))
    return settings


def _check_zero_points(folder: Path, settings: GPTQSettings, qzeros: torch.Tensor) -> None:
    """Tell v1 from gptq_v2 by the zero points, where that is possible.

    Symmetric quantization puts every zero point at the middle code, 2^(bits-1): v1 stores it minus one, v2 as it
    is, so one look at the stored codes says which format the tensors are in. Asymmetric zero points can be anything,
    and 3-bit codes straddle words: those folders are taken at their word.
    """
    if not settings.sym or settings.bits == 3:
        return
    codes = set(unpack_codes(qzeros, settings.bits, dim=1).unique().tolist())
    middle = 1 << (settings.bits - 1)
    stored = {"gptq": middle - 1, "gptq_v2": middle}
    if codes == {stored[settings.checkpoint_format]}:
        return
    other = "gptq_v2" if settings.checkpoint_format == "gptq" else "gptq"
    if codes == {stored[other]}:
        raise QuantizationError(
            f"{folder}: config.json's quantization_config says checkpoint_format={settings.checkpoint_format!r}, but "
            f"the stored zero points ({stored[other]}) are those of {other!r}; loaded as labelled, every weight would "
            f"be off by one step. Set \"checkpoint_format\": \"{other}\" in quantization_config (and in "
            "quantize_config.json)."
        )
    raise QuantizationError(
        f"{folder}: quantization_config says sym=true, but the zero points of transformer.h.0.attn.c_attn are "
        f"{sorted(codes)[:8]}, not the single middle code of symmetric {settings.bits}-bit quantization. Set "
        "\"sym\": false if the checkpoint was quantized asymmetrically."
    )


# --------------------------------------------------------------------------------------------------------------------
# Quantizing (run_gptq.py)
# --------------------------------------------------------------------------------------------------------------------


def _qwen_definition() -> type:
    """gptqmodel's model definition for Qwen (v1), fitted to how our QWenModel calls its blocks.

    gptqmodel records the first block's inputs once and then replays each block with them: the hidden states
    (first positional argument), the keyword arguments, and attention_mask / position_ids / use_cache of its own.
    Our blocks take the rotary tables, logn scale and attention layout positionally and accept nothing else, so they
    are recorded by name here and only the arguments a block takes are replayed. The KV cache is left out: replays
    would append every block's keys to it.
    """
    from gptqmodel.models.definitions.qwen import QwenQModel

    block_arguments = list(inspect.signature(QWenBlock.forward).parameters)[2:]  # after self and the hidden states

    class QwenBlocksByName(QwenQModel):
        def capture_first_layer_input_kwargs(self, args: tuple, kwargs: dict, batch_device: torch.device,
                                             layer_input_kwargs: dict[str, Any]) -> dict[str, Any]:
            recorded = {**dict(zip(block_arguments, args[1:])), **layer_input_kwargs}
            recorded["cache"] = None
            return recorded

        def prepare_layer_replay_kwargs(self, layer: torch.nn.Module, layer_input: list, additional_inputs: dict,
                                        target_device: torch.device) -> dict[str, Any]:
            replay = {name: value for name, value in additional_inputs.items() if name in block_arguments}
            layout = replay.get("layout")
            if isinstance(layout, AttentionLayout) and layout.device != torch.device(target_device):
                # Masks are built lazily on the layout's device: rebuild it where this block runs.
                move = (lambda t: None if t is None else t.to(target_device))
                replay["layout"] = AttentionLayout(layout.q_len, layout.kv_len, move(layout.key_padding),
                                                   move(layout.prepared_mask), layout.backend, target_device)
            return replay

    return QwenBlocksByName


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    # gptqmodel writes its quantization log to ./logs/ of whatever directory the user runs from.
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def calibration_samples(tokenizer: Any, data_path: str | Path, max_len: int) -> list[dict[str, list[int]]]:
    """Fine-tuning conversations as ChatML ids (the prompts chat() builds), cut at max_len tokens."""
    samples = []
    for sample in load_samples(data_path):
        ids = tokenize_sample(tokenizer, sample, max_len).input_ids
        samples.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return samples


def _storage_dtype(source_config: dict[str, Any]) -> torch.dtype:
    # Unquantized tensors (embedding, norms, lm_head) keep a 16-bit source's precision; an fp32 source is stored in
    # fp16 like the released -Int4 checkpoints.
    return torch.bfloat16 if source_config.get("bf16") or source_config.get("torch_dtype") == "bfloat16" \
        else torch.float16


def _released_layout(quantized: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """gptqmodel's v1 tensors with the released folders' dtypes, and an fp16 bias on every quantized layer."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in quantized.items():
        if name.endswith((".scales", ".bias")) and any(f".{s}." in name for s in QUANTIZED_LINEARS):
            tensors[name] = tensor.to(torch.float16)
        elif tensor.is_floating_point():
            tensors[name] = tensor.to(dtype)
        else:
            tensors[name] = tensor
        if name.endswith(".qweight"):
            bias = name.removesuffix("qweight") + "bias"
            if bias not in quantized:
                tensors[bias] = torch.zeros(tensor.shape[1], dtype=torch.float16)
    return tensors


def _save_tensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_size: str) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for file, names in split.filename_to_tensors.items():
        save_file({name: tensors[name].contiguous() for name in names}, folder / file, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _check_group_size(config: Any, group_size: int) -> None:
    """Refuse a group size that leaves a partial group at the end of some layer's inputs.

    gptqmodel quantizes and saves such a model, but most of its kernels need every group whole: on the CPU, torch's
    int4 matmul stops at the first forward ("expect K to be divisible by qGroupSize"). Every released size divides by
    128; a custom intermediate_size may not (the benchmark's mid-size model: 2752 = 21.5 x 128).
    """
    if group_size == -1:
        return
    widths = {suffix: linear.in_features for suffix, linear in _quantized_linears(config).items()}
    uneven = {suffix: width for suffix, width in widths.items() if width % group_size}
    if uneven:
        fitting = [size for size in (128, 64, 32, 16, 8) if all(width % size == 0 for width in widths.values())]
        layers = ", ".join(f"{suffix} has {width}" for suffix, width in uneven.items())
        suggestion = fitting[0] if fitting else -1
        raise QuantizationError(
            f"--group-size {group_size} does not divide the input channels of every layer ({layers}); the GPTQ "
            f"kernels need whole groups (on the CPU the first forward would fail). Use --group-size {suggestion}."
        )


def quantize_checkpoint(
    model_path: str | Path,
    data_path: str | Path,
    out_path: str | Path,
    bits: int = 4,
    group_size: int = 128,
    max_len: int = 8192,
    max_shard_size: str = "4GB",
) -> Path:
    """Quantize a 16-bit (or fp32) Qwen checkpoint with GPTQ and write it in the released -Int4 layout.

    Calibration data are fine-tuning conversations (qwen/sft.py's format), rendered as the ChatML prompts chat()
    builds. The model is quantized on the GPU when there is one (fast), else on the CPU (slow; fine for small models).
    """
    if bits not in (4, 8):
        raise QuantizationError(f"--bits {bits} is not supported; use 4 (as the released -Int4 models) or 8.")
    if group_size != -1 and (group_size <= 0 or group_size % 8):
        raise QuantizationError(f"--group-size {group_size}: use a positive multiple of 8 (128 as released) or -1.")
    source = resolve_checkpoint(model_path).resolve()
    if read_gptq_settings(source) is not None:
        raise QuantizationError(f"{source} is already GPTQ-quantized; quantize the 16-bit checkpoint it came from.")
    _check_group_size(QWenConfig.from_pretrained(source), group_size)
    out_path = Path(out_path).resolve()
    if out_path.exists() and any(out_path.iterdir()):
        raise QuantizationError(f"--out_path {out_path} is not empty; give a new folder (or remove this one).")
    require_gptq_stack()
    tokenizer = QWenTokenizer.from_pretrained(source)
    calibration = calibration_samples(tokenizer, data_path, max_len)

    out_path.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gptq-", dir=out_path.parent)).resolve()
    on_gpu = torch.cuda.is_available()
    # gptqmodel sizes its CPU worker pool from this; unset on a 2-core machine it asks for more workers than it
    # allows itself and stops.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
    try:
        from gptqmodel import QuantizeConfig

        config = QuantizeConfig(
            bits=bits, group_size=group_size, desc_act=RELEASED_SETTINGS["desc_act"], sym=RELEASED_SETTINGS["sym"],
            damp_percent=RELEASED_SETTINGS["damp_percent"], true_sequential=RELEASED_SETTINGS["true_sequential"],
            offload_to_disk_path=str(staging / "offload"),
            # The default packer compiles a C++ extension first (half a minute); on the CPU the plain one is enough.
            **({} if on_gpu else {"pack_impl": "original"}),
        )
        with _working_directory(staging):
            model = _qwen_definition().from_pretrained(
                str(source), config, dtype=None if on_gpu else torch.float32,
            )
            model.quantize(calibration, batch_size=1)
            model.tokenizer = None  # our tokenizer files are copied below, unchanged
            model.save(str(staging / "quantized"))
        _write_released_folder(source, staging / "quantized", out_path, bits, group_size, max_shard_size)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    copy_checkpoint_metadata(source, out_path, full=True)
    check_gptq_checkpoint(out_path)
    return out_path


def _write_released_folder(source: Path, quantized: Path, output: Path, bits: int, group_size: int,
                           max_shard_size: str) -> None:
    from safetensors.torch import load_file

    source_config = read_json_object(source / "config.json", QuantizationError)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(quantized.glob("*.safetensors")):
        tensors.update(load_file(file))
    written = read_json_object(quantized / "config.json", QuantizationError)["quantization_config"]
    checkpoint_format = written.get("checkpoint_format", written.get("format"))
    if checkpoint_format != "gptq":  # the released layout is v1; gptqmodel.save converts to it
        raise QuantizationError(f"gptqmodel wrote checkpoint_format={checkpoint_format!r}, expected 'gptq' (v1).")
    dtype = _storage_dtype(source_config)
    _save_tensors(_released_layout(tensors, dtype), output, max_shard_size)

    settings = {"bits": bits, "group_size": group_size, **RELEASED_SETTINGS, "checkpoint_format": "gptq"}
    config = dict(source_config)
    config.update(
        quantization_config={**settings, "quant_method": "gptq"}, torch_dtype=str(dtype).removeprefix("torch."),
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, fp32=False,
    )
    (output / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (output / "quantize_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qwen.gptq", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="check a GPTQ folder's settings against its weights")
    check.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    try:
        settings = check_gptq_checkpoint(args.folder)
    except (CheckpointError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    if settings is None:
        print(f"{args.folder} is not GPTQ-quantized")
    else:
        print(f"{args.folder}: GPTQ {settings.bits}-bit, group size {settings.group_size}, "
              f"{'symmetric' if settings.sym else 'asymmetric'}, checkpoint_format {settings.checkpoint_format}: OK")


if __name__ == "__main__":
    main()


__all__ = [
    "GPTQSettings", "QUANTIZED_LINEARS", "QuantizationError", "calibration_samples", "check_gptq_checkpoint",
    "quantize_checkpoint", "read_gptq_settings", "require_gptq_stack", "unpack_codes",
]
