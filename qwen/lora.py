"""LoRA and Q-LoRA on Qwen checkpoints with peft: building the trainable model, saving, merging an adapter back.

    python -m qwen.lora merge ADAPTER_DIR OUTPUT_DIR [--max-shard-size 2GB] [--overwrite]

writes a complete checkpoint folder (weights with the adapter merged in, config, generation config and tokenizer
files of the base) that loads like a released one; a model already in OUTPUT_DIR is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint_folder import (
    LoadError,
    copy_checkpoint_metadata,
    model_files_in,
    read_gptq_settings,
    resolve_checkpoint,
)
from .gptq import check_gptq_checkpoint, require_gptq_stack
from .modeling_qwen import QWenLMHeadModel
from .weight_quant import SCHEMES


@dataclass
class LoraSettings:
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "w1", "w2"])
    bias: str = "none"
    modules_to_save: list[str] | None = None  # None: `default_modules_to_save`
    weight_path: str | None = None  # continue training this adapter
    q_lora: bool = False


def is_chat_checkpoint(folder: str | Path) -> bool:
    """A chat model writes ChatML; its generation_config.json says so (`chat_format`), base models say `raw`."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return True
    return json.loads(path.read_text(encoding="utf-8")).get("chat_format", "chatml") != "raw"


def default_modules_to_save(chat: bool, q_lora: bool = False) -> list[str]:
    # A base model has never seen <|im_start|> / <|im_end|> in use: their embedding and output rows must learn too.
    # Not under Q-LoRA, as in the original script: its point is memory, and these two layers and their optimizer
    # state would take more than the 4-bit model.
    return [] if chat or q_lora else ["wte", "lm_head"]


def prepare_lora_model(
    folder: str | Path,
    settings: LoraSettings,
    dtype: torch.dtype | str = torch.float32,
    chat: bool = True,
    gradient_checkpointing: bool = False,
    quantized_device_map: str | dict[str, Any] | None = None,
) -> Any:
    """The checkpoint in `folder` with a trainable LoRA adapter.

    Q-LoRA trains on 4-bit weights: a GPTQ checkpoint (a released -Int4 model, or run_gptq.py's output) is loaded as
    it is, as the original Q-LoRA scripts did; a 16-bit checkpoint is loaded in 4-bit NF4 with bitsandbytes.
    `quantized_device_map` places such a 4-bit load (`{"": "cpu"}` to train on the CPU): without one, bitsandbytes
    puts the weights on the current GPU whenever there is one.

    `dtype` "int8" / "int4" (weight quantization on load, `qwen.weight_quant`) is refused with a LoadError: those
    layers have no gradient and peft cannot wrap them (`get_peft_model` on such a model fails too). Q-LoRA is the
    4-bit way to train.
    """
    if dtype in SCHEMES:
        raise LoadError(f"LoRA cannot train on {dtype} weights quantized on load; train in float32 or bfloat16, or "
                        "use Q-LoRA (q_lora=True, --q_lora) for 4-bit training.")
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    gptq = check_gptq_checkpoint(folder)
    quantization = None
    if gptq is not None:
        require_gptq_stack()
        from transformers import GPTQConfig

        # Only the loading options of this config count (transformers keeps the checkpoint's own settings): ask for
        # a kernel that can backpropagate, since the fastest inference kernels on a GPU cannot.
        quantization = GPTQConfig(bits=gptq.bits, backend="auto_trainable")
    elif settings.q_lora:
        quantization = nf4_config(dtype)
    placement = {"device_map": quantized_device_map} if quantization is not None and quantized_device_map else {}
    model = QWenLMHeadModel.from_pretrained(folder, dtype=dtype, quantization_config=quantization, **placement)
    if quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        keep_4bit_weights_trainable_on_cpu(model)
    if settings.weight_path:
        model = PeftModel.from_pretrained(model, settings.weight_path, is_trainable=True)
    else:
        modules_to_save = (
            settings.modules_to_save if settings.modules_to_save is not None
            else default_modules_to_save(chat, settings.q_lora)
        )
        config = LoraConfig(
            r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
            target_modules=settings.target_modules, bias=settings.bias, task_type="CAUSAL_LM",
            modules_to_save=modules_to_save or None,
        )
        model = get_peft_model(model, config)
    if dtype == torch.float16:
        # fp16 training scales the loss, and the scaler refuses fp16 parameters: the adapters (which peft already
        # keeps in fp32) and any fully trained module (modules_to_save copies wte / lm_head in the base's dtype).
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    if gradient_checkpointing:
        # Checkpointed blocks need an input that requires grad, or no gradient reaches the adapters inside them.
        model.enable_input_require_grads()
    return model


def nf4_config(compute_dtype: torch.dtype) -> Any:
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise LoadError("Q-LoRA on a 16-bit checkpoint loads it in 4-bit NF4 with bitsandbytes: "
                        "pip install bitsandbytes") from error
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def keep_4bit_weights_trainable_on_cpu(model: Any) -> None:
    """Stop bitsandbytes repacking 4-bit weights for inference on CPUs with AVX512-BF16.

    The repack happens at the first no-grad forward (an evaluation before training, say) and breaks every training
    step after it ("a view of a leaf Variable ... in-place operation").

    gptqmodel's CPU kernels have the same habit: their first no-grad forward repacks the GPTQ weights for torch's
    int4 matmul, which runs without autograd, so the training steps after it would silently get no gradient through
    the quantized layers to the adapters below them. Fixing their mode to "train" before anything runs keeps them
    on the dequantize-and-matmul path, which backpropagates.
    """
    for module in model.modules():
        if type(module).__module__.startswith("gptqmodel.") and getattr(module, "linear_mode", "") is None:
            module.linear_mode = "train"
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, max_shard_size: str = "2GB",
                  overwrite: bool = False) -> Path:
    """Fold a LoRA adapter into its base model and save a complete checkpoint folder.

    An `output_dir` that already holds a model is refused unless `overwrite` is set.
    """
    from peft import PeftConfig, PeftModel


    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise LoadError(f"{adapter_dir} has no adapter_config.json, so it is not a LoRA adapter folder.")
    found = model_files_in(output_dir)
    if found and not overwrite:
        raise LoadError(f"{output_dir} already holds a model ({', '.join(found[:3])}). Choose another folder, or pass "
                        "--overwrite to replace it.")
    base_name = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    if not base_name:
        raise LoadError(f"{adapter_dir}/adapter_config.json does not say which base model it belongs to "
                        "(base_model_name_or_path).")
    base = resolve_checkpoint(base_name)
    if read_gptq_settings(base) is not None:
        raise LoadError(
            f"The adapter's base model {base} is GPTQ-quantized, and LoRA cannot be merged into quantized weights. "
            "Merge it into the 16-bit checkpoint that was quantized (set base_model_name_or_path in "
            f"{adapter_dir / 'adapter_config.json'} to it), then quantize the merged model with run_gptq.py."
        )
    model = QWenLMHeadModel.from_pretrained(base)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output_dir, max_shard_size=max_shard_size)
    copy_checkpoint_metadata(base, output_dir, full=True)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qwen.lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="merge an adapter into its base model and save a complete checkpoint")
    merge.add_argument("adapter_dir")
    merge.add_argument("output_dir")
    merge.add_argument("--max-shard-size", default="2GB")
    merge.add_argument("--overwrite", action="store_true", help="replace a model already saved in OUTPUT_DIR")
    args = parser.parse_args(argv)
    try:
        print(merge_adapter(args.adapter_dir, args.output_dir, args.max_shard_size, overwrite=args.overwrite))
    except LoadError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()


__all__ = [
    "LoraSettings", "default_modules_to_save", "is_chat_checkpoint", "merge_adapter",
    "prepare_lora_model",
]
