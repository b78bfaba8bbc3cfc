"""Splitting a Qwen (v1) model across GPUs: which GPU holds which module, decided by a pure function.

The split is a pipeline, in the model's order: GPU 0 holds the embedding `transformer.wte` and the first blocks, each
next GPU the next blocks, and the last GPU the last blocks with the final norm `transformer.ln_f` and the output layer
`lm_head` (the norm feeds only the output layer, so the two belong together; the original `utils.py` put `ln_f` on
GPU 0, sending every hidden state back to the first GPU and forward again to the last one). These four kinds of
modules hold every weight of the model: rotary tables are computed per call, not kept in a module, and
`transformer.drop` has no weights.

GPUs are balanced by weight memory, counted in blocks. The embedding and the output layer are each vocab x hidden
parameters, worth 1.4 blocks in Qwen-72B, 3 in Qwen-7B and 6 in Qwen-1.8B, so the first and last GPU take fewer blocks
than the others; the original counted each as one block whatever the model size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint_folder import LoadError, resolve_checkpoint
from .configuration_qwen import QWenConfig
from .loading import load_model_and_tokenizer

EMBEDDING = "transformer.wte"
FINAL_NORM = "transformer.ln_f"
OUTPUT_LAYER = "lm_head"


def block_name(index: int) -> str:
    return f"transformer.h.{index}"


def _block_parameters(config: Any) -> int:
    hidden, projection = config.hidden_size, config.kv_channels * config.num_attention_heads
    ff = config.intermediate_size // 2  # the width of each of w1 and w2
    bias = 0 if config.no_bias else 1
    attention = hidden * 3 * projection + 3 * projection + projection * hidden + bias * hidden  # c_attn has a bias
    mlp = 2 * hidden * ff + ff * hidden + bias * (2 * ff + hidden)
    return attention + mlp + 2 * hidden  # + ln_1, ln_2


def module_costs(config: Any) -> tuple[float, float]:
    """(embedding, final norm + output layer) in blocks' worth of parameters, for `qwen_device_map`."""
    block = _block_parameters(config)
    embedding = config.vocab_size * config.hidden_size
    return embedding / block, (embedding + config.hidden_size) / block


def qwen_device_map(
    num_layers: int, num_gpus: int, embedding_cost: float = 1.0, head_cost: float = 1.0
) -> dict[str, int]:
    """Device map (module name -> GPU index) spreading `num_layers` blocks over `num_gpus` GPUs in order.

    `embedding_cost` and `head_cost` are what the embedding and the final norm + output layer weigh, in blocks (1.0
    each by default, as the original counted them; `module_costs(config)` gives the real ratios). Laid end to end, the
    embedding, the blocks and the head fill `num_gpus` equal shares, and each block goes to the GPU whose share holds
    its middle. An embedding (or head) that outweighs a share has its GPU to itself, and the other GPUs share the
    rest. So the GPUs holding only blocks differ by at most one block, the embedding and head GPUs take fewer blocks,
    and no GPU holds more than an equal share plus one block, or the embedding or head alone where that is more.
    """
    for name, value in (("num_layers", num_layers), ("num_gpus", num_gpus)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}.")
    if embedding_cost < 0 or head_cost < 0:
        raise ValueError(f"Module costs cannot be negative (embedding {embedding_cost}, head {head_cost}).")
    first, last = 0, num_gpus - 1  # the GPUs the blocks are spread over
    while first < last:
        share = (embedding_cost + num_layers + head_cost) / (last - first + 1)
        if embedding_cost > share:  # it alone fills GPU `first` beyond a share: adding blocks there only makes it worse
            first, embedding_cost = first + 1, 0.0
        elif head_cost > share:
            last, head_cost = last - 1, 0.0
        else:
            break
    share = (embedding_cost + num_layers + head_cost) / (last - first + 1)
    device_map = {EMBEDDING: 0}
    for index in range(num_layers):
        middle = embedding_cost + index + 0.5
        device_map[block_name(index)] = first + min(last - first, int(middle // share))
    device_map[FINAL_NORM] = num_gpus - 1
    device_map[OUTPUT_LAYER] = num_gpus - 1
    return device_map


def device_map_for_config(config: Any, num_gpus: int) -> dict[str, int]:
    """`qwen_device_map` for a model of this config, balanced by the real sizes of its embedding and output layer."""
    return qwen_device_map(config.num_hidden_layers, num_gpus, *module_costs(config))


def load_model_on_gpus(
    model_name_or_path: str | Path | None = None,
    num_gpus: int = 2,
    dtype: torch.dtype | str | None = None,
    *,
    checkpoint_path: str | Path | None = None,
) -> Any:
    """A checkpoint (folder, hub id or `demo`) loaded for inference across the first `num_gpus` CUDA GPUs, as the
    original README's `utils.load_model_on_gpus`; each weight is read straight onto its GPU.

    `model_name_or_path` and `num_gpus` are the original's parameters, in its order; `checkpoint_path` is another
    name for the first, the one this repository's earlier versions used.

    Raises `LoadError` when fewer CUDA GPUs are visible than asked (on a machine without one too: this function is
    for GPUs; on the CPU load with `QWenLMHeadModel.from_pretrained(folder)`). Without `dtype`, bf16 where the GPUs
    support it, else fp16, as the released model chose.
    """
    if (model_name_or_path is None) == (checkpoint_path is None):
        raise TypeError("load_model_on_gpus() takes the checkpoint once: as model_name_or_path (first argument) or as "
                        "checkpoint_path=, not both and not neither.")
    if model_name_or_path is None:
        model_name_or_path = checkpoint_path
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
        raise LoadError(f"num_gpus must be a whole number of at least 1, got {num_gpus!r}.")
    available = torch.cuda.device_count()
    if available < num_gpus:
        if available == 0:
            why = ("no CUDA GPU is visible" + (" (this PyTorch is built without CUDA)" if torch.version.cuda is None
                                               else ""))
        else:
            why = f"only {available} CUDA GPU{'s are' if available > 1 else ' is'} visible"
        raise LoadError(
            f"load_model_on_gpus(num_gpus={num_gpus}) needs {num_gpus} CUDA GPU{'s' if num_gpus > 1 else ''}, but "
            f"{why}. Pass num_gpus={available} or fewer, check CUDA_VISIBLE_DEVICES"
            + ("" if available else ", or load on the CPU with QWenLMHeadModel.from_pretrained(folder)") + "."
        )
    folder = resolve_checkpoint(model_name_or_path)
    device_map = device_map_for_config(QWenConfig.from_pretrained(folder), num_gpus)
    model, _ = load_model_and_tokenizer(folder, dtype=dtype, device_map=device_map)
    return model


__all__ = ["device_map_for_config", "load_model_on_gpus", "module_costs", "qwen_device_map"]
