"""transformers' generate() on our model: greedy, sampling, beams, caches, padding, stop words."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, StaticCache

from qwen import QWenLMHeadModel

GREEDY = dict(do_sample=False, repetition_penalty=1.0, top_p=None, top_k=None)


@pytest.fixture(scope="module")
def model(tiny_chat_dir) -> QWenLMHeadModel:
    model = QWenLMHeadModel.from_pretrained(tiny_chat_dir).eval()
    # Sharper random weights so greedy continuations differ from prompt to prompt.
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("c_attn.weight", "w1.weight", "w2.weight")):
                param.normal_(0, 0.3)
    return model


def manual_greedy(model: QWenLMHeadModel, ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding by full re-runs without any cache: the reference for generate()."""
    ids = ids.clone()
    with torch.no_grad():
        for _ in range(steps):
            next_id = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids[0].tolist()


def test_greedy_generate_equals_full_reruns(model, tokenizer):
    ids = torch.tensor([tokenizer.encode("蒙古国的首都是乌兰巴托")])
    out = model.generate(ids, max_new_tokens=12, **GREEDY)
    assert out[0].tolist() == manual_greedy(model, ids, 12)


def test_static_cache_gives_the_same_tokens(model, tokenizer):
    ids = torch.tensor([tokenizer.encode("def add(a, b):")])
    dynamic = model.generate(ids, max_new_tokens=10, **GREEDY)
    static = model.generate(ids, max_new_tokens=10, cache_implementation="static", **GREEDY)
    assert static.tolist() == dynamic.tolist()
    cache = StaticCache(config=model.config, max_cache_len=64)
    explicit = model.generate(ids, max_new_tokens=10, cache=cache, **GREEDY)
    assert explicit.tolist() == dynamic.tolist()


def test_left_padded_batch_gives_each_prompts_own_tokens(model, tokenizer):
    prompts = ["Hello, world!", "埃塞俄比亚的首都是哪里？请回答", "1 2 3"]
    batch = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    assert batch["attention_mask"][0].tolist().count(0) > 0
    out = model.generate(**batch, max_new_tokens=8, **GREEDY)
    for row, prompt in zip(out, prompts):
        alone = model.generate(torch.tensor([tokenizer.encode(prompt)]), max_new_tokens=8, **GREEDY)
        assert row[-8:].tolist() == alone[0, -8:].tolist(), prompt


def test_sampling_is_seeded_and_top_k_1_is_greedy(model, tokenizer):
    ids = torch.tensor([tokenizer.encode("你好")])
    settings = dict(do_sample=True, top_p=0.8, top_k=0, temperature=0.9, repetition_penalty=1.1, max_new_tokens=10)
    torch.manual_seed(0)
    first = model.generate(ids, **settings)
    torch.manual_seed(0)
    second = model.generate(ids, **settings)
    assert first.tolist() == second.tolist()
    torch.manual_seed(0)
    top1 = model.generate(ids, do_sample=True, top_k=1, top_p=1.0, repetition_penalty=1.0, max_new_tokens=10)
    assert top1.tolist() == model.generate(ids, max_new_tokens=10, **GREEDY).tolist()


def test_repetition_penalty_changes_the_distribution(model, tokenizer):
    ids = torch.tensor([tokenizer.encode("a a a a a a")])
    plain = model.generate(ids, max_new_tokens=6, output_scores=True, return_dict_in_generate=True, **GREEDY)
    penalised = model.generate(
        ids, max_new_tokens=6, output_scores=True, return_dict_in_generate=True,
        **{**GREEDY, "repetition_penalty": 1.5},
    )
    assert not torch.equal(plain.scores[0], penalised.scores[0])


def test_beam_search_returns_ranked_beams(model, tokenizer):
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    out = model.generate(
        ids, num_beams=4, num_return_sequences=2, max_new_tokens=6, output_scores=True,
        return_dict_in_generate=True, **GREEDY,
    )
    assert out.sequences.shape == (2, ids.shape[1] + 6)
    assert out.sequences_scores[0] >= out.sequences_scores[1]
    # Beam 1 of a 1-beam search is greedy decoding.
    one_beam = model.generate(ids, num_beams=1, max_new_tokens=6, **GREEDY)
    assert one_beam[0].tolist() == manual_greedy(model, ids, 6)


def test_stop_words_end_generation_with_eos_like_the_released_model(model, tokenizer):
    ids = torch.tensor([tokenizer.encode("Hello, world!")])
    free_run = model.generate(ids, max_new_tokens=8, **GREEDY)[0, ids.shape[1] :].tolist()
    stop_at = free_run[2]
    stop_index = free_run.index(stop_at)
    out = model.generate(ids, max_new_tokens=8, stop_words_ids=[[stop_at]], eos_token_id=151643, **GREEDY)
    generated = out[0, ids.shape[1] :].tolist()
    assert generated[: stop_index + 1] == free_run[: stop_index + 1]
    assert generated[stop_index + 1] == 151643 and len(generated) == stop_index + 2
    # From generation_config.json, as Qwen-72B's `stop_words_ids` field does.
    config = GenerationConfig(max_new_tokens=8, eos_token_id=151643, pad_token_id=151643, **GREEDY)
    config.stop_words_ids = [free_run[1:3]]
    out = model.generate(ids, generation_config=config)
    assert out[0, ids.shape[1] :].tolist() == free_run[:3] + [151643]
