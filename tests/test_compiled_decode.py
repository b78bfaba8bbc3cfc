"""The fixed-shape decode step compiled with `torch.compile(fullgraph=True)` on the CPU gives the eager tokens.

fullgraph=True makes any graph break an error, so each test that passes also shows that the step traces whole: for
generate() over a static cache (transformers compiles the forward of its decode steps) and for the batching engine
(`decode_one_token` over a fixed-shape slot cache). Prompts past the tiny checkpoint's `seq_length` (256) engage
dynamic NTK (alpha 3) and logn scaling, whose values a fixed-shape step must get from tensors, not from the host.

Compiling is slow on a small CPU: the default suite compiles the tiniest model once; the rest is marked slow.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig, StaticCache

from qwen import QWenLMHeadModel
from qwen.engine import GenerationEngine, SamplingParams
from qwen.modeling_qwen import QuantizedStaticCache
from qwen.qwen_generation_utils import make_context
from support import STOP_IDS, greedy_reference

GREEDY = dict(do_sample=False, repetition_penalty=1.0, top_p=None, top_k=None)
COMPILED = CompileConfig(fullgraph=True, mode="default")
SEQ_LENGTH = 256  # the tiny checkpoint's


def long_prompt(tokenizer, tokens: int) -> list[int]:
    """A chat prompt of at least `tokens` tokens (past seq_length when above 256)."""
    story = "Once upon a time a dragon and a knight met on a bridge. " * (tokens // 12 + 1)
    ids = make_context(tokenizer, story, system="You are a helpful assistant.")[1]
    assert len(ids) >= tokens
    return ids


def graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process so far."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def generate_compiled_and_eager(model, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], list[int]]:
    ids = torch.tensor([prompt_ids])
    eager = model.generate(ids, max_new_tokens=new_tokens, **GREEDY)[0, len(prompt_ids):].tolist()
    compiled = model.generate(ids, max_new_tokens=new_tokens, cache_implementation="static", compile_config=COMPILED,
                              **GREEDY)[0, len(prompt_ids):].tolist()
    return compiled, eager


def test_generate_compiled_past_seq_length_gives_the_eager_tokens(tiny_chat_dir, tokenizer):
    model = QWenLMHeadModel.from_pretrained(tiny_chat_dir).eval()
    prompt = long_prompt(tokenizer, 300)
    assert model.config.use_dynamic_ntk and model.config.use_logn_attn and model.config.seq_length == SEQ_LENGTH
    before = graphs_compiled()
    compiled, eager = generate_compiled_and_eager(model, prompt, 8)
    assert graphs_compiled() > before  # the decode steps really ran compiled
    assert compiled == eager


def test_static_cache_decode_steps_take_the_fixed_shape_path_with_the_prefill_alpha(tiny_chat_dir, tokenizer):
    """Eager, cheap: the decode steps of generate() over a static cache get the prompt's NTK alpha as a tensor."""
    model = QWenLMHeadModel.from_pretrained(tiny_chat_dir).eval()
    prompt = torch.tensor([long_prompt(tokenizer, 300)])
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + 4)
    seen = []
    forward = model.transformer.forward

    def spy(*args, **kwargs):
        fixed = model.transformer._is_fixed_shape_step(
            kwargs.get("cache"), kwargs.get("attention_mask"), kwargs.get("position_ids"), kwargs.get("ntk_alphas"))
        alphas = kwargs.get("ntk_alphas")
        seen.append((fixed, None if alphas is None else alphas.tolist()))
        return forward(*args, **kwargs)

    model.transformer.forward = spy
    dynamic = model.generate(prompt, max_new_tokens=4, **GREEDY)
    seen.clear()
    static = model.generate(prompt, max_new_tokens=4, cache=cache, **GREEDY)
    assert seen == [(False, None)] + [(True, [3.0])] * 3  # the prefill chooses alpha 3 (300 / 256 tokens)
    assert static.tolist() == dynamic.tolist()


def test_int8_static_cache_is_chosen_for_use_cache_quantization(tiny_chat_dir, tokenizer):
    model = QWenLMHeadModel.from_pretrained(tiny_chat_dir, use_cache_quantization=True).eval()
    prompt = torch.tensor([long_prompt(tokenizer, 40)])
    dynamic = model.generate(prompt, max_new_tokens=6, **GREEDY)
    static = model.generate(prompt, max_new_tokens=6, cache_implementation="static", return_dict_in_generate=True,
                            **GREEDY)
    cache = static.past_key_values
    assert isinstance(cache, QuantizedStaticCache) and cache.layers[0].keys.dtype == torch.uint8
    assert static.sequences.tolist() == dynamic.tolist()


@pytest.mark.slow
def test_generate_compiled_int8_cache_gives_the_eager_tokens(tiny_chat_dir, tokenizer):
    model = QWenLMHeadModel.from_pretrained(tiny_chat_dir, use_cache_quantization=True).eval()
    before = graphs_compiled()
    for prompt in (long_prompt(tokenizer, 20), long_prompt(tokenizer, 300)):
        compiled, eager = generate_compiled_and_eager(model, prompt, 8)
        assert compiled == eager
    assert graphs_compiled() > before


def collect(handle) -> list[int]:
    tokens = []
    for event in handle:
        assert event.error is None, event.error
        tokens += event.token_ids
    return tokens


@pytest.mark.slow
@pytest.mark.parametrize("int8", [False, True], ids=["float-cache", "int8-cache"])
def test_engine_compiled_gives_the_eager_tokens(tiny_chat_dir, tokenizer, int8):
    """Greedy requests of different lengths, one past seq_length, decoding side by side; and a seeded sampled one."""
    model = QWenLMHeadModel.from_pretrained(tiny_chat_dir, use_cache_quantization=int8).eval()
    prompts = [make_context(tokenizer, query)[1] for query in ("你好", "Write Python code.", "1+1=?")]
    prompts.append(long_prompt(tokenizer, 300))
    # Sampling stays outside the compiled step; top-k keeps the random model's nearly flat distribution from
    # turning rounding-sized differences of the logits (compiled kernels sum in another order) into another token.
    sampled = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=5, repetition_penalty=1.1, seed=11,
                             stop_token_ids=STOP_IDS)

    def run(compile: bool) -> list[list[int]]:
        engine = GenerationEngine(model, tokenizer, max_batch_size=4, compile=compile)
        try:
            handles = [engine.submit(ids, SamplingParams(max_new_tokens=10 + i, do_sample=False, stop_token_ids=STOP_IDS))
                       for i, ids in enumerate(prompts)]
            handles.append(engine.submit(prompts[1], sampled))
            return [collect(handle) for handle in handles]
        finally:
            engine.close()

    before = graphs_compiled()
    compiled = run(True)
    assert graphs_compiled() > before
    for index, ids in enumerate(prompts):
        assert compiled[index] == greedy_reference(model, tokenizer, ids, 10 + index), index
    assert compiled[-1] == run(False)[-1]
