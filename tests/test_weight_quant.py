"""Weight-only int8/int4 quantization on load (`qwen.weight_quant`, `--dtype int8|int4`) and `--dtype auto`.

Checked here on real checkpoints: the logits of the trained test checkpoint stay within the documented bound with
either activation dtype; int8 greedy replies equal fp32's through chat(), the int8 KV cache and the batching engine;
the fused kernels compute what their own dequantized weights give; bytes and state-dict names; the refusals (GPTQ
folders, LoRA, conversion); `--dtype auto` on the CPU; the scripts' flag.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen import QWenLMHeadModel
from qwen.checkpoint import write_random_checkpoint
from qwen.checkpoint_folder import LoadError
from qwen.convert import ConvertError, to_qwen2_model
from qwen.engine import GenerationEngine, SamplingParams
from qwen.loading import add_model_arguments, fastest_cpu_dtype, load_model_and_tokenizer
from qwen.lora import LoraSettings, prepare_lora_model
from qwen.weight_quant import (
    LOGIT_BOUND,
    Int4Linear,
    Int8Linear,
    Kernel,
    WeightQuantError,
    is_weight_quantized,
    quantize_weights,
    quantized_layer_names,
)
from support import STOP_IDS
from trained_checkpoint import EXCHANGES, chat_turn, memorizing_checkpoint_cached

REPO = Path(__file__).resolve().parents[1]
GREEDY = dict(do_sample=False, repetition_penalty=1.0, top_p=None, top_k=None)
KERNELS = {"bf16": Kernel("fused", torch.bfloat16), "fp32": Kernel("fused", torch.float32)}


@pytest.fixture(scope="module")
def memorized_dir(tmp_path_factory, tokenizer):
    """The tiny checkpoint trained to give EXCHANGES' replies (the folder test_kv_quant uses too)."""
    conversations = [chat_turn(tokenizer, query, reply) for query, reply in EXCHANGES]
    return memorizing_checkpoint_cached(tmp_path_factory.getbasetemp() / "memorized", conversations)


@pytest.fixture(scope="module")
def fp32_logits(memorized_dir, tokenizer):
    model = QWenLMHeadModel.from_pretrained(memorized_dir).eval()
    return logits_of(model, tokenizer)


def logits_of(model, tokenizer) -> list[torch.Tensor]:
    """Logits at every position of each exchange's prompt followed by its reply."""
    with torch.no_grad():
        return [model(torch.tensor([sum(chat_turn(tokenizer, query, reply), [])])).logits[0].float()
                for query, reply in EXCHANGES]


def worst_relative_error(logits: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """max over positions of max |logit - reference| / max |reference| (the bound of the module docstring)."""
    return max(((a - b).abs().amax(-1) / b.abs().amax(-1)).max().item() for a, b in zip(logits, reference))


@pytest.mark.parametrize("activations", ["bf16", "fp32"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_logits_stay_within_the_documented_bound(memorized_dir, tokenizer, fp32_logits, scheme, activations):
    model = QWenLMHeadModel.from_pretrained(memorized_dir).eval()
    quantize_weights(model, scheme, kernel=KERNELS[activations])
    error = worst_relative_error(logits_of(model, tokenizer), fp32_logits)
    print(f"{scheme} with {activations} activations: worst relative logit error {error:.4f}")
    assert 0 < error <= LOGIT_BOUND[scheme]


def test_int8_greedy_replies_equal_fp32s_in_chat_the_int8_cache_and_the_engine(memorized_dir, tokenizer):
    fp32 = QWenLMHeadModel.from_pretrained(memorized_dir).eval()
    int8, _ = load_model_and_tokenizer(memorized_dir, dtype="int8")
    assert isinstance(int8.lm_head, Int8Linear) and isinstance(int8.transformer.h[0].mlp.w1, Int8Linear)
    for query, reply in EXCHANGES:
        assert fp32.chat(tokenizer, query, history=None, **GREEDY)[0] == reply
        assert int8.chat(tokenizer, query, history=None, **GREEDY)[0] == reply
    int8.config.use_cache_quantization = True  # what generate() and the engine read to build an int8 KV cache
    for query, reply in EXCHANGES:
        assert int8.chat(tokenizer, query, history=None, **GREEDY)[0] == reply
    engine = GenerationEngine(int8, tokenizer, max_batch_size=2)
    try:
        handles = [(reply, engine.submit(chat_turn(tokenizer, query, reply)[0], SamplingParams(
            max_new_tokens=64, do_sample=False, stop_token_ids=STOP_IDS))) for query, reply in EXCHANGES]
        for reply, handle in handles:
            assert "".join(event.text for event in handle) == reply
        assert engine.cache.keys[0].dtype == torch.uint8
    finally:
        engine.close()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_fused_kernels_compute_what_the_dequantized_weights_give(tiny_chat_dir, scheme):
    # The dequantize path reads the codes in this module's own layout; the fused one in torch's packed layout.
    ids = torch.tensor([[151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]])
    outputs = []
    for kernel in (Kernel("fused", torch.float32), Kernel("dequantize", torch.float32)):
        model = QWenLMHeadModel.from_pretrained(tiny_chat_dir).eval()
        quantize_weights(model, scheme, kernel=kernel)
        with torch.no_grad():
            outputs.append(model(ids).logits)
    assert (outputs[0] - outputs[1]).abs().max().item() < 1e-5


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_last_positions_of_a_batch_go_through_the_fused_kernels(tiny_chat_dir, scheme):
    # generate() at batch > 1 hands the output layer a strided slice (each row's last position); in bf16 no cast copies
    # it, and torch's fused kernels accept only contiguous rows.
    model = QWenLMHeadModel.from_pretrained(tiny_chat_dir, dtype=torch.bfloat16).eval()
    quantize_weights(model, scheme, kernel=Kernel("fused", torch.bfloat16))
    hidden = torch.randn(2, 5, model.config.hidden_size, dtype=torch.bfloat16)
    last = hidden[:, -1:, :]
    assert not last.is_contiguous()
    with torch.no_grad():
        assert torch.equal(model.lm_head(last), model.lm_head(last.contiguous()))


def test_layers_names_and_bytes(tiny_chat_dir):
    float_model = QWenLMHeadModel.from_pretrained(tiny_chat_dir).eval()
    float_keys = set(float_model.state_dict())
    names = quantized_layer_names(float_model)
    assert len(names) == 5 * float_model.config.num_hidden_layers + 1 and names[-1] == "lm_head"
    for scheme, layer_class, extra in (("int8", Int8Linear, "scales"), ("int4", Int4Linear, "scales_and_zeros")):
        model = QWenLMHeadModel.from_pretrained(tiny_chat_dir).eval()
        summary = quantize_weights(model, scheme, kernel=KERNELS["bf16"])
        assert all(type(model.get_submodule(name)) is layer_class for name in names)
        keys = set(model.state_dict())
        # Every key of the float model is still there (the codes under `weight`), plus one for the scales per layer.
        assert keys == float_keys | {f"{name}.{extra}" for name in names}
        assert model.transformer.wte.weight.dtype == torch.float32 and not is_weight_quantized(float_model)
        head, vocab, hidden = model.lm_head, *float_model.lm_head.weight.shape
        if scheme == "int8":
            assert head.weight.dtype == torch.int8 and head.scales.shape == (vocab,)
            per_weight = 1 + 2 / hidden  # a byte per weight, a bf16 scale per row
        else:
            assert head.group_size == hidden == 32 and head.scales_and_zeros.shape == (1, vocab, 2)
            per_weight = 0.5 + 4 / 32  # two codes per byte, a bf16 scale and zero per group of 32
        assert head.weight.numel() * head.weight.element_size() == vocab * hidden * (1 if scheme == "int8" else 0.5)
        assert summary.quantized_bytes <= per_weight / 4 * summary.float_bytes * 1.01  # + the float biases


def test_a_bf16_checkpoint_quantizes_to_the_same_codes_and_the_rest_comes_back_in_fp32(tmp_path, tiny_chat_dir):
    # Loading the 16-bit weights as they are before quantizing must change nothing but the peak memory.
    folder = write_random_checkpoint(tmp_path / "bf16", size="tiny", seed=3, dtype=torch.bfloat16)
    model, _ = load_model_and_tokenizer(folder, dtype="int8")
    reference = QWenLMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    quantize_weights(reference, "int8", kernel=model.lm_head.kernel)
    assert model.transformer.wte.weight.dtype == model.transformer.ln_f.weight.dtype == torch.float32
    assert model.transformer.h[0].attn.c_attn.bias.dtype == torch.float32
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_what_cannot_take_quantized_weights_says_so(tiny_chat_dir, tmp_path, vocab_file, released_dir):
    model, _ = load_model_and_tokenizer(tiny_chat_dir, dtype="int4")
    with pytest.raises(ConvertError, match="needs float weights"):
        to_qwen2_model(model)
    with pytest.raises(ValueError, match=r"Cannot save this model: transformer\.h\.0\.attn\.c_attn holds weights "
                                         r"quantized on load"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    with pytest.raises(WeightQuantError, match="already quantized"):
        quantize_weights(model, "int8")
    with pytest.raises(LoadError, match="Q-LoRA"):
        prepare_lora_model(tiny_chat_dir, LoraSettings(), dtype="int8")
    with pytest.raises(WeightQuantError, match="group_size"):
        quantize_weights(QWenLMHeadModel.from_pretrained(tiny_chat_dir), "int4", group_size=100)
    from test_gptq import write_released_layout  # a GPTQ Int4 folder in the released layout, built by hand

    gptq = write_released_layout(tmp_path / "Int4", vocab_file, released_dir)
    with pytest.raises(LoadError, match="GPTQ-quantized already"):
        load_model_and_tokenizer(gptq, dtype="int4")


def test_dtype_auto_measures_on_the_cpu_and_no_dtype_keeps_the_released_rule(tiny_chat_dir):
    lines = []
    model, _ = load_model_and_tokenizer(tiny_chat_dir, dtype="auto", report=lines.append)
    chosen, seconds = fastest_cpu_dtype(model.config.vocab_size, model.config.hidden_size)
    assert set(seconds) == {torch.float32, torch.bfloat16} and all(value > 0 for value in seconds.values())
    assert model.dtype == chosen == min(seconds, key=seconds.get)
    assert len(lines) == 1 and lines[0].startswith(f"--dtype auto: {str(chosen).removeprefix('torch.')}")
    assert load_model_and_tokenizer(tiny_chat_dir, report=lines.append)[0].dtype == torch.float32
    assert len(lines) == 1  # nothing measured, nothing said
    import argparse

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    assert parser.parse_args([]).dtype is None and parser.parse_args(["--dtype", "int4"]).dtype == "int4"


def test_the_cli_demo_chats_on_int4_weights_and_says_which_kernel():
    result = subprocess.run(
        [sys.executable, "cli_demo.py", "-c", "demo", "--dtype", "int4"], cwd=REPO, input="hello\n:exit\n",
        capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "int4 weights" in result.stderr and "kernel: fused" in result.stderr
    assert "Qwen-Chat:" in result.stdout
