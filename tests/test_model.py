"""The model against the released architecture and numerics: names, shapes, caches, NTK/logn, windows, backends."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import ModelOutput

from qwen import QWenConfig, QWenLMHeadModel
from qwen.checkpoint import config_for_size
from qwen.modeling_qwen import (
    CACHE_KEY, attention_backend, cache_field, causal_mask, choose_dtype, kv_cache_of, logn_scale, ntk_alpha_for_length,
    project, rotary_inv_freq, with_kv_cache,
)


def small_config(**overrides) -> QWenConfig:
    values = dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, kv_channels=16,
        intermediate_size=256, seq_length=32, max_position_embeddings=256, no_bias=True,
    )
    values.update(overrides)
    return QWenConfig(**values)


def small_model(seed: int = 0, **overrides) -> QWenLMHeadModel:
    torch.manual_seed(seed)
    model = QWenLMHeadModel(small_config(**overrides)).eval()
    # Larger weights than the init so that attention patterns (and therefore positions) really matter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("c_attn.weight"):
                param.normal_(0, 0.2)
    return model


def test_72b_state_dict_matches_released_index(released_dir):
    """Every parameter name of the released Qwen-72B, and sizes adding up to its bf16 byte count."""
    index = json.loads((released_dir / "Qwen-72B" / "model.safetensors.index.json").read_text())
    config = QWenConfig.from_pretrained(released_dir / "Qwen-72B")
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert set(shapes) == set(index["weight_map"])
    assert sum(math.prod(s) for s in shapes.values()) * 2 == index["metadata"]["total_size"]
    h, ff = 8192, 49152 // 2
    assert shapes["transformer.wte.weight"] == (152064, h)
    assert shapes["lm_head.weight"] == (152064, h)
    assert shapes["transformer.h.79.attn.c_attn.weight"] == (3 * h, h)
    assert shapes["transformer.h.79.attn.c_attn.bias"] == (3 * h,)
    assert shapes["transformer.h.0.attn.c_proj.weight"] == (h, h)
    assert shapes["transformer.h.0.mlp.w1.weight"] == (ff, h)
    assert shapes["transformer.h.0.mlp.w2.weight"] == (ff, h)
    assert shapes["transformer.h.0.mlp.c_proj.weight"] == (h, ff)
    assert shapes["transformer.ln_f.weight"] == (h,)


def test_aug_2023_config_names_are_translated(released_dir):
    old = QWenConfig.from_pretrained(released_dir / "Qwen-7B-Chat-2023-08")
    assert (old.hidden_size, old.num_attention_heads, old.num_hidden_layers) == (4096, 32, 32)
    assert old.intermediate_size == 22016 and old.vocab_size == 151936 and old.seq_length == 2048
    with torch.device("meta"):
        model = QWenLMHeadModel(old)
    assert model.transformer.h[0].mlp.w1.weight.shape == (11008, 4096)
    assert QWenConfig(**config_for_size("7B").to_dict()).hidden_size == 4096


def test_rejects_unknown_legacy_architecture():
    with pytest.raises(NotImplementedError, match="activation"):
        QWenConfig(activation="gelu")


@pytest.mark.parametrize(
    "length, expected", [(1, 1), (16, 1), (17, 1), (32, 1), (33, 3), (64, 3), (65, 7), (128, 7), (129, 15)]
)
def test_ntk_alpha_rule(length, expected):
    assert ntk_alpha_for_length(length, 32) == expected


def test_logn_factor_below_at_and_beyond_seq_length():
    positions = torch.tensor([[0, 30, 31, 32, 63, 1023]])
    factors = logn_scale(positions, 32).flatten().tolist()
    expected = [1.0, 1.0, 1.0, math.log(33, 32), math.log(64, 32), math.log(1024, 32)]
    assert factors == pytest.approx(expected, rel=1e-6)


def test_rotary_base_grows_with_ntk_alpha():
    plain = rotary_inv_freq(16, 10000.0, 1.0)
    scaled = rotary_inv_freq(16, 10000.0, 3.0)
    assert plain[0] == scaled[0] == 1.0
    expected_base = 10000.0 * 3.0 ** (16 / 14)
    assert scaled[-1].item() == pytest.approx(expected_base ** (-14 / 16), rel=1e-6)


def test_window_mask():
    mask = causal_mask(q_len=5, kv_len=5, window=2, device=torch.device("cpu"))[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)
    decode = causal_mask(q_len=1, kv_len=5, window=3, device=torch.device("cpu"))[0, 0]
    assert decode.tolist() == [[False, False, True, True, True]]


def full_logits(model: QWenLMHeadModel, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


@pytest.mark.parametrize(
    "overrides",
    [
        dict(use_dynamic_ntk=False, use_logn_attn=False),
        dict(use_dynamic_ntk=False, use_logn_attn=True),
        dict(use_window_attn=True, window_size=[4, 8, 16], use_dynamic_ntk=False),
        dict(rotary_pct=0.5, no_bias=False, use_dynamic_ntk=False),
    ],
    ids=["plain", "logn", "window", "partial-rotary-bias"],
)
def test_cached_decoding_equals_full_forward_at_every_step(overrides):
    model = small_model(**overrides)
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (2, 48))  # past seq_length=32, so logn is active in the "logn" case
    prompt_len = 7
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(ids[:, :prompt_len], cache=cache, use_cache=True)
        reference = full_logits(model, ids)
        torch.testing.assert_close(out.logits, reference[:, :prompt_len], atol=1e-5, rtol=1e-5)
        for step in range(prompt_len, ids.shape[1]):
            out = model(ids[:, step : step + 1], cache=kv_cache_of(out), use_cache=True)
            torch.testing.assert_close(out.logits[:, 0], reference[:, step], atol=1e-5, rtol=1e-5)


def test_dynamic_ntk_alpha_is_fixed_at_prefill():
    """Decoding past seq_length keeps the prefill's alpha, as the released model did (not the growing length's)."""
    model = small_model(use_dynamic_ntk=True, use_logn_attn=False)
    plain = small_model(use_dynamic_ntk=False, use_logn_attn=False)  # same seed, same weights
    torch.manual_seed(2)
    ids = torch.randint(0, 512, (1, 60))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        attributes = set(vars(cache))
        out = model(ids[:, :20], cache=cache, use_cache=True)  # 20 <= 32: alpha 1
        assert model.transformer.ntk_alphas_of(cache) == [1]
        assert set(vars(cache)) == attributes  # the model keeps the alpha itself, nothing is written onto the cache
        for step in range(20, 60):
            out = model(ids[:, step : step + 1], cache=kv_cache_of(out), use_cache=True)
        reference_alpha1 = full_logits(plain, ids)[:, -1]
        torch.testing.assert_close(out.logits[:, 0], reference_alpha1, atol=1e-5, rtol=1e-5)
        # A full forward over all 60 tokens picks alpha 3 and really changes the numbers.
        assert not torch.allclose(full_logits(model, ids)[:, -1], reference_alpha1, atol=1e-3)


def test_long_prompt_alpha_matches_manual_rule():
    model = small_model(use_dynamic_ntk=True)
    ids = torch.randint(0, 512, (1, 40))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    assert model.transformer.ntk_alphas_of(cache) == [3]


def test_per_sequence_alpha_from_true_lengths_in_padded_batch():
    model = small_model(use_dynamic_ntk=True, use_logn_attn=False)
    long_ids = torch.randint(1, 512, (1, 40))
    short_ids = torch.randint(1, 512, (1, 30))
    batch = torch.cat([long_ids, torch.cat([torch.zeros(1, 10, dtype=torch.long), short_ids], 1)])
    mask = torch.ones_like(batch)
    mask[1, :10] = 0
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(batch, attention_mask=mask, cache=cache, use_cache=True)
        assert model.transformer.ntk_alphas_of(cache) == [3, 1]
        alone_long = full_logits(model, long_ids)[:, -1]
        alone_short = full_logits(model, short_ids)[:, -1]
    torch.testing.assert_close(out.logits[0, -1], alone_long[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[1, -1], alone_short[0], atol=1e-5, rtol=1e-5)


def test_window_longer_than_sequence_changes_nothing_and_short_window_does():
    base = small_model(use_dynamic_ntk=False)
    wide = small_model(use_dynamic_ntk=False, use_window_attn=True, window_size=64)
    narrow = small_model(use_dynamic_ntk=False, use_window_attn=True, window_size=4)
    ids = torch.randint(0, 512, (1, 20))
    torch.testing.assert_close(full_logits(wide, ids), full_logits(base, ids), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(full_logits(narrow, ids)[:, -1], full_logits(base, ids)[:, -1], atol=1e-3)
    # the first `window` positions see the same keys either way
    torch.testing.assert_close(full_logits(narrow, ids)[:, :4], full_logits(base, ids)[:, :4], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("overrides", [dict(), dict(use_window_attn=True, window_size=6), dict(softmax_in_fp32=True)])
def test_eager_and_sdpa_agree(overrides):
    model = small_model(**overrides)
    ids = torch.randint(0, 512, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    sdpa = full_logits(model, ids, attention_mask=mask)
    with torch.no_grad():
        eager = model(ids, attention_mask=mask, use_cache=False, output_attentions=True)
    torch.testing.assert_close(eager.logits, sdpa, atol=1e-5, rtol=1e-5)
    weights = eager.attentions[0]
    assert weights.shape == (2, 4, 40, 40)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 40), atol=1e-5, rtol=1e-5)
    assert torch.all(weights[1, :, 5:, :5] == 0), "padding keys must get no attention"


def test_loss_ignores_minus_100_labels():
    model = small_model()
    ids = torch.randint(0, 512, (1, 10))
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, labels=labels, use_cache=False)
    logits = out.logits[0, 4:-1]
    expected = torch.nn.functional.cross_entropy(logits, ids[0, 5:])
    torch.testing.assert_close(out.loss, expected)


def test_loss_with_num_items_in_batch_is_the_mean_over_the_whole_step():
    """Trainer hands the model the target count of the whole step; split batches must add up to the unsplit mean."""
    model = small_model()
    ids = torch.randint(0, 512, (2, 10))
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, :7] = -100  # unequal target counts, where a mean of per-part means would differ
    whole = model(ids, labels=labels, use_cache=False).loss
    count = int((labels[:, 1:] != -100).sum())
    parts = [model(ids[i:i + 1], labels=labels[i:i + 1], use_cache=False, num_items_in_batch=torch.tensor(count)).loss
             for i in range(2)]
    torch.testing.assert_close(parts[0] + parts[1], whole)
    per_row = (labels[:, 1:] != -100).sum(1)
    assert per_row.tolist() == [7, 3]
    mean_of_means = (parts[0] * count / per_row[0] + parts[1] * count / per_row[1]) / 2
    assert not torch.isclose(mean_of_means, whole)  # so the check above tells the two reductions apart


def test_gradient_checkpointing_recomputes_blocks():
    model = small_model()
    model.train()
    model.activation_checkpointing_enable() if hasattr(model, "activation_checkpointing_enable") else model.gradient_checkpointing_enable()
    calls = []
    mlp = model.transformer.h[1].mlp
    original = mlp.forward
    mlp.forward = lambda x: calls.append(1) or original(x)
    ids = torch.randint(0, 512, (2, 12))
    loss = model(ids, labels=ids).loss
    assert len(calls) == 1
    loss.backward()
    assert len(calls) == 2, "the block's forward must run again during backward"
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None


@pytest.mark.parametrize("rows", [1, 2, 8, 128, 129])
@pytest.mark.parametrize("bias", [True, False])
def test_project_equals_the_linear_layer(rows, bias):
    torch.manual_seed(rows)
    layer = torch.nn.Linear(96, 200, bias=bias)
    x = torch.randn(rows, 1, 96)  # (B, T, in) as in batched decoding
    with torch.no_grad():
        out = project(layer, x)
        assert out.shape == (rows, 1, 200)
        torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=1e-5)


def test_project_leaves_training_and_wrapped_layers_to_their_own_forward():
    class Scaled(torch.nn.Linear):  # stands for LoRA / quantized subclasses with their own forward
        def forward(self, x):
            return 2 * super().forward(x)

    layer = Scaled(8, 4)
    x = torch.randn(4, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(project(layer, x), layer(x))
    plain = torch.nn.Linear(8, 4)
    calls = []
    plain.register_forward_hook(lambda module, args, out: calls.append(1))
    with torch.no_grad():
        project(plain, x)
    assert calls == [1], "hooks (accelerate offloading, PEFT) must see the call"
    out = project(torch.nn.Linear(8, 4), x.requires_grad_())
    assert out.requires_grad


# transformers 5.17 (the GPU machine's) names the KV cache `past_key_values` in its outputs and generate()'s kwargs;
# later releases call it `cache`. These dataclasses have the fields of each release's CausalLMOutputWithPast.
@dataclasses.dataclass
class _OutputWithPastKeyValues(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None


@dataclasses.dataclass
class _OutputWithCache(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None


@dataclasses.dataclass
class _OutputWithoutCache(ModelOutput):
    logits: torch.Tensor | None = None


def test_the_cache_field_is_the_one_the_installed_transformers_outputs_have():
    assert cache_field(_OutputWithPastKeyValues) == "past_key_values"
    assert cache_field(_OutputWithCache) == "cache"
    with pytest.raises(TypeError, match="neither"):
        cache_field(_OutputWithoutCache)
    assert cache_field(BaseModelOutputWithPast) == cache_field(CausalLMOutputWithPast) == CACHE_KEY

    cache = DynamicCache()
    built = with_kv_cache(CausalLMOutputWithPast, cache, logits=torch.zeros(1))
    assert getattr(built, CACHE_KEY) is cache and kv_cache_of(built) is cache
    # The model's own outputs go through the same helper: the cache it filled is the one it returns.
    model = QWenLMHeadModel(small_config()).eval()
    given = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3]]), cache=given, use_cache=True)
        inner = model.transformer(torch.tensor([[4]]), cache=given, use_cache=True)
    assert kv_cache_of(out) is given and kv_cache_of(inner) is given and given.get_seq_length() == 4


@pytest.mark.parametrize(
    "device_map", [None, "cpu", {"": "cpu"}, torch.device("cpu"), {"transformer": "cpu", "lm_head": "disk"}]
)
def test_a_model_left_on_the_cpu_gets_fp32_even_where_cuda_is_visible(device_map):
    for native_bf16 in (True, False):
        assert choose_dtype(None, None, None, device_map, cuda_available=True, native_bf16=native_bf16) is torch.float32
    assert choose_dtype(None, None, None, "auto", cuda_available=False, native_bf16=False) is torch.float32


@pytest.mark.parametrize("device_map", ["auto", "cuda", 0, {"": 0}, {"transformer": 0, "lm_head": "cpu"}])
def test_on_a_gpu_bf16_only_where_it_is_native(device_map):
    assert choose_dtype(None, None, None, device_map, cuda_available=True, native_bf16=True) is torch.bfloat16
    # V100 and T4 emulate bf16: the released model chose fp16 there.
    assert choose_dtype(None, None, None, device_map, cuda_available=True, native_bf16=False) is torch.float16
    assert choose_dtype(None, None, True, device_map, cuda_available=True, native_bf16=True) is torch.float32
    assert choose_dtype(True, None, None, device_map, cuda_available=True, native_bf16=False) is torch.bfloat16
    with pytest.raises(ValueError, match="only one"):
        choose_dtype(True, True, None, device_map, cuda_available=True, native_bf16=True)


def test_an_explicit_sdpa_request_is_kept_where_flash_attn_is_installed(tiny_chat_dir):
    # The released config says use_flash_attn "auto": flash-attn wherever it is installed and the model runs in half
    # precision on CUDA, unless the caller asked for SDPA or eager by name.
    default = QWenLMHeadModel.from_pretrained(tiny_chat_dir).config
    asked = QWenLMHeadModel.from_pretrained(tiny_chat_dir, attn_implementation="sdpa").config
    assert default._attn_implementation == asked._attn_implementation == "sdpa"  # transformers cannot tell them apart
    for config, expected in ((default, "flash"), (asked, "sdpa")):
        assert attention_backend(config._attn_implementation, config.use_flash_attn, cuda_half=True,
                                 flash_installed=True) == expected
    assert attention_backend("eager", True, cuda_half=True, flash_installed=True) == "eager"
    assert attention_backend("flash_attention_2", False, cuda_half=True, flash_installed=True) == "flash"
    assert attention_backend("sdpa", "auto", cuda_half=False, flash_installed=True) == "sdpa"  # CPU or fp32
    assert attention_backend("sdpa", True, cuda_half=True, flash_installed=False) == "sdpa"  # not installed: SDPA
