"""Weight mapping between the released Qwen (v1) layout and transformers' native `Qwen2ForCausalLM` layout.

The two architectures compute the same function within `seq_length` (Qwen2 has no dynamic NTK or logn scaling):
`c_attn` splits into q/k/v projections with their biases, `w2` (the gated input, under SiLU) becomes `gate_proj`,
`w1` becomes `up_proj` and the MLP's `c_proj` becomes `down_proj`.
"""

from __future__ import annotations

import torch

from .configuration_qwen import QWenConfig


def qwen2_config_dict(config: QWenConfig) -> dict:
    """Keyword arguments for `transformers.Qwen2Config` describing the same network as `config`."""
    if config.rotary_pct != 1.0:
        raise ValueError("Qwen2 rotates every channel of a head; a model with rotary_pct < 1 cannot be converted.")
    if config.kv_channels * config.num_attention_heads != config.hidden_size:
        raise ValueError("Qwen2 needs kv_channels * num_attention_heads == hidden_size.")
    if not config.no_bias:
        raise ValueError("Qwen2's output and MLP projections have no bias; this checkpoint has no_bias=False.")
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size // 2,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.layer_norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rotary_emb_base)},
        tie_word_embeddings=False,
        use_sliding_window=False,
        hidden_act="silu",
        attention_dropout=config.attn_dropout_prob,
        bos_token_id=151643,
        eos_token_id=151643,
    )


def qwen_to_qwen2_state_dict(state_dict: dict[str, torch.Tensor], config: QWenConfig) -> dict[str, torch.Tensor]:
    """Rename and split released Qwen tensors into Qwen2ForCausalLM's names; tensors are views, not copies."""
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": state_dict["transformer.wte.weight"],
        "model.norm.weight": state_dict["transformer.ln_f.weight"],
        "lm_head.weight": state_dict["lm_head.weight"],
    }
    projection = config.kv_channels * config.num_attention_heads
    for i in range(config.num_hidden_layers):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state_dict[f"{src}attn.c_attn.{kind}"].split(projection, dim=0)
            out[f"{dst}self_attn.q_proj.{kind}"] = q
            out[f"{dst}self_attn.k_proj.{kind}"] = k
            out[f"{dst}self_attn.v_proj.{kind}"] = v
        out[f"{dst}self_attn.o_proj.weight"] = state_dict[f"{src}attn.c_proj.weight"]
        out[f"{dst}input_layernorm.weight"] = state_dict[f"{src}ln_1.weight"]
        out[f"{dst}post_attention_layernorm.weight"] = state_dict[f"{src}ln_2.weight"]
        out[f"{dst}mlp.gate_proj.weight"] = state_dict[f"{src}mlp.w2.weight"]
        out[f"{dst}mlp.up_proj.weight"] = state_dict[f"{src}mlp.w1.weight"]
        out[f"{dst}mlp.down_proj.weight"] = state_dict[f"{src}mlp.c_proj.weight"]
    return out


def to_qwen2_model(model: torch.nn.Module) -> torch.nn.Module:
    """A `transformers.Qwen2ForCausalLM` holding the same weights as our `QWenLMHeadModel` (shared storage)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = model.config
    with torch.device("meta"):
        qwen2 = Qwen2ForCausalLM(Qwen2Config(**qwen2_config_dict(config)))
    tensors = qwen_to_qwen2_state_dict(model.state_dict(), config)
    qwen2.load_state_dict(tensors, strict=True, assign=True)
    # Non-persistent buffers (rotary inverse frequencies) were created on meta; rebuild them on the real device.
    qwen2.model.rotary_emb.__init__(qwen2.config)
    return qwen2.to(model.device).eval()


__all__ = ["qwen2_config_dict", "qwen_to_qwen2_state_dict", "to_qwen2_model"]
