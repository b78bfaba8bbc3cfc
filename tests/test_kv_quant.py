"""KV-cache quantization (`use_cache_quantization`): int8 keys and values with a scale and minimum per token and head.

Checked here: the round trip of one vector against the half-step bound that rounding guarantees; the logits through
the int8 cache against the float model's; the bytes the cache really holds; generate(), chat(), chat_stream() and the
batching engine on a quantized cache; `use_cache_kernel` accepted and run on the torch path.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import DynamicCache

from qwen import QWenConfig, QWenLMHeadModel
from qwen.engine import GenerationEngine, SamplingParams
from qwen.modeling_qwen import QuantizedKVCache, dequantize_kv, kv_cache_of, quantize_kv
from support import STOP_IDS, greedy_reference
from trained_checkpoint import EXCHANGES, SEA, chat_turn, memorizing_checkpoint_cached

GREEDY = dict(do_sample=False, repetition_penalty=1.0, top_p=None, top_k=None)


@pytest.fixture(scope="module")
def memorized_dir(tmp_path_factory, tokenizer):
    """A tiny checkpoint trained to give EXCHANGES' replies: attention that matters, and replies to compare."""
    conversations = [chat_turn(tokenizer, query, reply) for query, reply in EXCHANGES]
    return memorizing_checkpoint_cached(tmp_path_factory.getbasetemp() / "memorized", conversations)


def cache_bytes(cache) -> int:
    """Bytes of every tensor the cache holds for its keys and values."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def teacher_forced_logits(model: QWenLMHeadModel, ids: torch.Tensor, prompt_len: int, cache) -> torch.Tensor:
    """Logits of every position: the prompt in one forward, then one token at a time through `cache`."""
    with torch.no_grad():
        steps = [model(ids[:, :prompt_len], cache=cache, use_cache=True).logits]
        for position in range(prompt_len, ids.shape[1]):
            steps.append(model(ids[:, position: position + 1], cache=cache, use_cache=True).logits)
    return torch.cat(steps, dim=1).float()  # (B, T, vocab)


# --------------------------------------------------------------------------------------------------------------------
# One vector at a time
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_element_comes_back_within_half_a_step(dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 16, generator=generator) * torch.rand(2, 4, 9, 1, generator=generator) * 5
    x = x + 3 * torch.randn(2, 4, 9, 1, generator=generator)  # vectors far from zero too (asymmetric ranges)
    x[0, 0, 0] = 2.5  # a constant vector: scale 0
    x[0, 0, 1] = 0.0
    x = x.to(dtype)

    packed = quantize_kv(x)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 4, 9, 16 + 8)  # 16 codes, fp32 scale and minimum
    restored = dequantize_kv(packed, dtype)
    assert restored.dtype == dtype and restored.shape == x.shape

    x32, restored32 = x.float(), restored.float()
    step = (x32.amax(-1, keepdim=True) - x32.amin(-1, keepdim=True)) / 255  # (B, nh, T, 1): 256 codes per vector
    # Rounding to the nearest of 256 evenly spaced values: at most half a step off, plus the final cast to `dtype`.
    cast = 0 if dtype == torch.float32 else torch.finfo(dtype).eps * x32.abs()
    assert ((restored32 - x32).abs() <= step / 2 * (1 + 1e-5) + cast + 1e-7).all()
    # The ends of each vector are codes 0 and 255, exactly representable.
    torch.testing.assert_close(restored32.amin(-1), x32.amin(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(restored32.amax(-1), x32.amax(-1), rtol=2e-6, atol=1e-5)
    assert torch.equal(restored32[0, 0, :2], x32[0, 0, :2])  # constant vectors come back exactly


def test_a_token_costs_head_dim_plus_8_bytes_per_head():
    # Every released size has 128 channels per head: 136 bytes instead of 256 in bf16/fp16 and 512 in fp32.
    keys = torch.randn(1, 32, 10, 128, dtype=torch.bfloat16)  # (B, nh, T, hs) of Qwen-7B
    packed = quantize_kv(keys)
    assert packed.numel() * packed.element_size() == 32 * 10 * 136
    assert packed.numel() * packed.element_size() / (keys.numel() * keys.element_size()) == pytest.approx(136 / 256)


# --------------------------------------------------------------------------------------------------------------------
# In the model
# --------------------------------------------------------------------------------------------------------------------


def test_the_config_fields_of_the_released_models_switch_it_on(tmp_path, released_dir, tiny_chat_dir, caplog):
    # The later releases (Qwen-7B-Chat and up, Nov 2023) write both fields, false; the 72B folder here predates them.
    data = json.loads((released_dir / "Qwen-72B" / "config.json").read_text())
    data.update(use_cache_quantization=True, use_cache_kernel=True)
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = QWenConfig.from_pretrained(tmp_path)
    assert config.use_cache_quantization is True and config.use_cache_kernel is True
    assert QWenConfig().use_cache_quantization is False and QWenConfig().use_cache_kernel is False

    with caplog.at_level(logging.WARNING):
        model = QWenLMHeadModel.from_pretrained(tiny_chat_dir, use_cache_quantization=True, use_cache_kernel=True)
    assert "use_cache_kernel=True" in caplog.text and "dequantized with torch" in caplog.text
    plain = QWenLMHeadModel.from_pretrained(tiny_chat_dir, use_cache_quantization=True)
    ids = torch.tensor([[151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13]])
    with torch.no_grad():
        out, reference = model(ids, use_cache=True), plain(ids, use_cache=True)
    assert type(kv_cache_of(out)) is QuantizedKVCache and kv_cache_of(out).layers[0].keys.dtype == torch.uint8
    torch.testing.assert_close(out.logits, reference.logits, rtol=0, atol=0)  # the same torch path


def test_logits_through_the_int8_cache_stay_close_to_the_float_model(memorized_dir, tokenizer):
    model = QWenLMHeadModel.from_pretrained(memorized_dir, use_cache_quantization=True).eval()
    prompts = [chat_turn(tokenizer, query, reply) for query, reply in EXCHANGES]
    length = min(len(p) + len(r) for p, r in prompts)
    ids = torch.tensor([(p + r)[:length] for p, r in prompts])  # (2, T): prompts and their replies
    prompt_len = min(len(p) for p, _ in prompts)
    with torch.no_grad():
        exact = model(ids, use_cache=False).logits.float()  # no cache: full-precision keys and values
    float_cache = teacher_forced_logits(model, ids, prompt_len, DynamicCache(config=model.config))
    int8_cache = teacher_forced_logits(model, ids, prompt_len, QuantizedKVCache(model.config))
    torch.testing.assert_close(float_cache, exact, rtol=1e-4, atol=1e-4)

    # Each cached element is off by at most half a step, 1/510 of its vector's range (rms: a step / sqrt(12)); for
    # the 8 channels of a tiny head that range is about 3 standard deviations, so what attention reads is off by
    # ~0.35% of a channel's spread. The logits move by about as much: measured 0.23% (relative L2) on this trained
    # checkpoint. The bound, 0.5%, is twice that and stays below what a coarser cache gives on the same inputs:
    # truncating to the step below, as the released code did, 0.85%; 6-bit codes, 1.3%; 4-bit, 3.4%.
    error = float((int8_cache - exact).norm() / exact.norm())
    assert 1e-5 < error < 0.005, error  # above 1e-5: the cache really is quantized (float: ~1e-7)
    # Where the trained model is sure (every reply token above 0.99), the int8 cache changes no choice.
    assert torch.equal(int8_cache.argmax(-1)[:, prompt_len - 1:], exact.argmax(-1)[:, prompt_len - 1:])


def test_the_int8_cache_holds_half_the_bytes_of_an_fp32_one(tiny_chat_dir):
    model = QWenLMHeadModel.from_pretrained(tiny_chat_dir).eval()
    config = model.config
    ids = torch.randint(0, 151000, (2, 64), generator=torch.Generator().manual_seed(0))
    caches = {"float": DynamicCache(config=config), "int8": QuantizedKVCache(config)}
    with torch.no_grad():
        for cache in caches.values():
            model(ids, cache=cache, use_cache=True)
    vectors = config.num_hidden_layers * 2 * ids.numel() * config.num_attention_heads  # keys and values
    assert cache_bytes(caches["float"]) == vectors * config.kv_channels * 4
    assert cache_bytes(caches["int8"]) == vectors * (config.kv_channels + 8)
    # The tiny model's heads have 8 channels, so the 8 bytes of scale and minimum weigh as much as the codes.
    assert cache_bytes(caches["int8"]) / cache_bytes(caches["float"]) == 0.5


def test_generate_chat_and_chat_stream_run_on_the_int8_cache(memorized_dir, tokenizer):
    model = QWenLMHeadModel.from_pretrained(memorized_dir, use_cache_quantization=True).eval()
    for query, reply in EXCHANGES:
        assert model.chat(tokenizer, query, history=None, **GREEDY) == (reply, [(query, reply)])
        assert list(model.chat_stream(tokenizer, query, history=None, **GREEDY))[-1] == reply
    # generate() builds the int8 cache itself; a cache the caller passes is used as it is.
    prompt, _ = chat_turn(tokenizer, *SEA)
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=4, return_dict_in_generate=True, **GREEDY)
    assert type(kv_cache_of(out)) is QuantizedKVCache
    assert kv_cache_of(out).layers[0].keys.dtype == torch.uint8
    assert kv_cache_of(out).get_seq_length() == len(prompt) + 3  # the last token is sampled, not yet cached
    float_cache = DynamicCache(config=model.config)
    again = model.generate(ids, max_new_tokens=4, cache=float_cache, **GREEDY)
    assert float_cache.layers[0].keys.dtype == torch.float32
    assert torch.equal(again, out.sequences)
    # Beam search reorders the cache between steps: every packed tensor moves with its rows.
    beams = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, repetition_penalty=1.0)
    assert tokenizer.decode(beams[0, len(prompt):]).startswith(SEA[1][:20])


def test_the_engine_batches_requests_on_an_int8_slot_cache(memorized_dir, tiny_chat_dir, tokenizer):
    memorized = QWenLMHeadModel.from_pretrained(memorized_dir, use_cache_quantization=True).eval()
    engine = GenerationEngine(memorized, tokenizer, max_batch_size=2)
    try:
        handles = [(reply, engine.submit(chat_turn(tokenizer, query, reply)[0], SamplingParams(
            max_new_tokens=64, do_sample=False, stop_token_ids=STOP_IDS))) for query, reply in EXCHANGES * 2]
        for reply, handle in handles:  # 4 requests on 2 slots: rows are stored, compacted and reused
            assert "".join(event.text for event in handle) == reply
        assert engine.cache.keys[0].dtype == torch.uint8
        config = memorized.config
        expected = config.num_hidden_layers * 2 * 2 * config.num_attention_heads * engine.cache.capacity
        assert engine.cache.nbytes == expected * (config.kv_channels + 8)
    finally:
        engine.close()

    # On random weights (greedy choices with small margins) the engine still gives generate()'s own tokens with
    # the same int8 cache: it quantizes each token as QuantizedKVCache does.
    noisy = QWenLMHeadModel.from_pretrained(tiny_chat_dir, use_cache_quantization=True).eval()
    engine = GenerationEngine(noisy, tokenizer, max_batch_size=3)
    try:
        prompts = [chat_turn(tokenizer, query, "x")[0] for query in ("你好", "1+1=?", "Write Python code.", "晚安")]
        handles = [engine.submit(ids, SamplingParams(max_new_tokens=10, do_sample=False, stop_token_ids=STOP_IDS))
                   for ids in prompts]
        for ids, handle in zip(prompts, handles):
            tokens = [token for event in handle for token in event.token_ids]
            assert tokens == greedy_reference(noisy, tokenizer, ids, 10)
    finally:
        engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_int8_cache_on_cuda_in_half_precision(memorized_dir, tokenizer, dtype):
    model = QWenLMHeadModel.from_pretrained(memorized_dir, use_cache_quantization=True, dtype=dtype,
                                            device_map="cuda").eval()
    for query, reply in EXCHANGES:
        assert model.chat(tokenizer, query, history=None, **GREEDY)[0] == reply
    out = model.generate(torch.tensor([chat_turn(tokenizer, *SEA)[0]], device="cuda"), max_new_tokens=2,
                         return_dict_in_generate=True, **GREEDY)
    assert kv_cache_of(out).layers[0].keys.dtype == torch.uint8 and kv_cache_of(out).layers[0].keys.is_cuda
