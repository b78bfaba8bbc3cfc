"""Multi-GPU placement (qwen/device_map.py, utils.py): the device map as a pure function for every released size and
1..8 GPUs, its coverage of the real model's weights (built on the meta device), the errors, and a real load across
GPUs where there are at least two."""

from __future__ import annotations

import inspect
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

# utils.py is imported the way the README does it, from the repository root, however pytest was started.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen.checkpoint import config_for_size  # noqa: E402
from qwen.device_map import device_map_for_config, module_costs, qwen_device_map  # noqa: E402
from qwen.loading import LoadError  # noqa: E402
from utils import load_model_on_gpus  # noqa: E402

RELEASED = {"1.8B": 24, "7B": 32, "14B": 40, "72B": 80}  # size -> num_hidden_layers of the released config.json


def meta_model(size: str):
    from qwen import QWenLMHeadModel

    with torch.device("meta"):
        return QWenLMHeadModel(config_for_size(size))


def gpu_loads(device_map: dict[str, int], num_gpus: int, embedding: float, head: float) -> list[float]:
    loads = [0.0] * num_gpus
    for name, gpu in device_map.items():
        loads[gpu] += embedding if name == "transformer.wte" else head if name == "lm_head" else (
            0.0 if name == "transformer.ln_f" else 1.0)
    return loads


@pytest.mark.parametrize("size", list(RELEASED))
def test_module_costs_are_the_real_parameter_ratios(size):
    model = meta_model(size)
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    embedding, head = module_costs(model.config)
    assert embedding == model.transformer.wte.weight.numel() / block
    assert head == (model.lm_head.weight.numel() + model.transformer.ln_f.weight.numel()) / block


@pytest.mark.parametrize("size", list(RELEASED))
def test_map_covers_every_weight_of_the_model(size):
    model = meta_model(size)
    assert model.config.num_hidden_layers == RELEASED[size]
    # Whatever holds weights or buffers, however the model grows (a rotary module with a cached table, say), must
    # have a device: walk them all rather than trusting the list of names in device_map.py.
    tensors = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
    for num_gpus in (1, 3, 8):
        device_map = device_map_for_config(model.config, num_gpus)
        uncovered = [name for name in tensors
                     if not any(name == key or name.startswith(key + ".") for key in device_map)]
        assert uncovered == []
        modules = dict(model.named_modules())
        assert all(key in modules for key in device_map)
        from accelerate.utils import check_device_map

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # accelerate only warns about keys that name no module
            check_device_map(model, device_map)


@pytest.mark.parametrize("size", list(RELEASED))
@pytest.mark.parametrize("num_gpus", range(1, 9))
def test_map_is_an_ordered_balanced_pipeline(size, num_gpus):
    num_layers = RELEASED[size]
    embedding, head = module_costs(config_for_size(size))
    device_map = qwen_device_map(num_layers, num_gpus, embedding, head)

    assert list(device_map) == ["transformer.wte", *(f"transformer.h.{i}" for i in range(num_layers)),
                                "transformer.ln_f", "lm_head"]
    assert device_map["transformer.wte"] == 0
    assert device_map["transformer.ln_f"] == device_map["lm_head"] == num_gpus - 1  # the original put ln_f on 0
    blocks = [device_map[f"transformer.h.{i}"] for i in range(num_layers)]
    assert blocks == sorted(blocks) and set(blocks) <= set(range(num_gpus))  # in order: each GPU a contiguous run

    loads = gpu_loads(device_map, num_gpus, embedding, head)
    assert all(load > 0 for load in loads)  # every GPU asked for is used
    share = sum(loads) / num_gpus
    assert max(loads) <= max(share + 1, embedding, head)
    counts = Counter(blocks)
    only_blocks = [counts[gpu] for gpu in range(1, num_gpus - 1)]
    assert not only_blocks or max(only_blocks) - min(only_blocks) <= 1
    if num_gpus > 1 and embedding < share:  # the embedding's GPU takes fewer blocks than a GPU of blocks alone
        assert counts[0] <= min(only_blocks or [counts[num_gpus - 1] + 1])


def test_hand_checked_maps():
    def blocks_per_gpu(device_map: dict[str, int]) -> list[int]:
        counts = Counter(gpu for name, gpu in device_map.items() if name.startswith("transformer.h."))
        return [counts[gpu] for gpu in range(max(device_map.values()) + 1)]

    # The original's counting (embedding and head one block each): 34 units, 8.5 per GPU.
    assert blocks_per_gpu(qwen_device_map(32, 4)) == [7, 9, 8, 8]
    assert blocks_per_gpu(qwen_device_map(32, 1)) == [32]
    # Qwen-7B's real costs (embedding and head about 3.07 blocks each): 38.15 units, 9.54 per GPU.
    assert blocks_per_gpu(device_map_for_config(config_for_size("7B"), 4)) == [6, 10, 10, 6]
    # Qwen-1.8B on 8 GPUs: the embedding (6.1 blocks) outweighs a share (4.5), so GPU 0 holds it alone, and GPU 7
    # the head alone; the 24 blocks go 4 to each of the six others.
    assert blocks_per_gpu(device_map_for_config(config_for_size("1.8B"), 8)) == [0, 4, 4, 4, 4, 4, 4, 0]


@pytest.mark.parametrize("wrong", [0, -1, 1.5, True, "2"])
def test_wrong_gpu_counts_are_refused(wrong):
    with pytest.raises(ValueError, match=r"num_gpus must be a whole number of at least 1"):
        qwen_device_map(32, wrong)
    # Before anything is loaded: the checkpoint does not even exist.
    with pytest.raises(LoadError, match=r"num_gpus must be a whole number of at least 1"):
        load_model_on_gpus("/nowhere/Qwen-7B-Chat", num_gpus=wrong)
    with pytest.raises(ValueError, match=r"num_layers must be a whole number of at least 1"):
        qwen_device_map(0, 2)


def test_more_gpus_than_visible_is_a_clear_error(tiny_chat_dir):
    visible = torch.cuda.device_count()
    expected = (r"no CUDA GPU is visible.*QWenLMHeadModel.from_pretrained\(folder\)" if visible == 0
                else rf"only {visible} CUDA GPUs? (is|are) visible. Pass num_gpus={visible} or fewer")
    with pytest.raises(LoadError, match=rf"num_gpus={visible + 1}\) needs {visible + 1} CUDA GPU.*{expected}"):
        load_model_on_gpus(tiny_chat_dir, num_gpus=visible + 1)
    if visible == 0:  # the documented behaviour on a CPU-only machine, num_gpus=1 included
        with pytest.raises(LoadError, match=r"needs 1 CUDA GPU, but no CUDA GPU is visible"):
            load_model_on_gpus(tiny_chat_dir, num_gpus=1)


def test_the_original_parameters_are_accepted(tiny_chat_dir):
    # The original utils.py: load_model_on_gpus(model_name_or_path, num_gpus=2). Each call below gets as far as
    # counting GPUs (one more than visible), so the checkpoint argument was taken, on a machine with or without GPUs.
    assert list(inspect.signature(load_model_on_gpus).parameters)[:2] == ["model_name_or_path", "num_gpus"]
    too_many = torch.cuda.device_count() + 1
    calls = [
        dict(args=(tiny_chat_dir, too_many), kwargs={}),
        dict(args=(), kwargs=dict(model_name_or_path=tiny_chat_dir, num_gpus=too_many)),
        dict(args=(), kwargs=dict(checkpoint_path=tiny_chat_dir, num_gpus=too_many)),  # this repository's older name
    ]
    for call in calls:
        with pytest.raises(LoadError, match=rf"num_gpus={too_many}\) needs {too_many} CUDA GPU"):
            load_model_on_gpus(*call["args"], **call["kwargs"])
    for args, kwargs in (((tiny_chat_dir,), dict(checkpoint_path=tiny_chat_dir)), ((), {})):
        with pytest.raises(TypeError, match="model_name_or_path"):
            load_model_on_gpus(*args, **kwargs)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids.to(model.device), use_cache=False).logits.float().cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_gpu_holds_everything(tiny_chat_dir):
    model = load_model_on_gpus(tiny_chat_dir, num_gpus=1)
    assert {p.device for p in model.parameters()} == {torch.device("cuda", 0)}
    assert model.dtype in (torch.bfloat16, torch.float16)  # the released rule on a GPU


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason=f"needs at least 2 CUDA GPUs, {torch.cuda.device_count()} visible")
def test_split_across_gpus_gives_the_single_gpu_logits(tiny_chat_dir, tokenizer):
    # The tiny model's embedding is ~470 blocks' worth: GPU 0 holds it with block 0, GPU 1 block 1 and the head.
    split = load_model_on_gpus(tiny_chat_dir, num_gpus=2, dtype=torch.float32)
    assert split.hf_device_map == device_map_for_config(split.config, 2)
    assert {p.device.index for p in split.parameters()} == {0, 1}
    assert split.lm_head.weight.device == split.transformer.ln_f.weight.device == torch.device("cuda", 1)
    whole = load_model_on_gpus(tiny_chat_dir, num_gpus=1, dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode("Splitting a model across GPUs changes where it runs, not what it says.")])
    torch.testing.assert_close(_logits(split, ids), _logits(whole, ids))
    response, _ = split.chat(tokenizer, "你好", history=None, max_new_tokens=8, do_sample=False)
    assert response == whole.chat(tokenizer, "你好", history=None, max_new_tokens=8, do_sample=False)[0]
