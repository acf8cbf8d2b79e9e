"""Tiny randomly initialised mlx-lm models of several architectures (no downloads)."""

from __future__ import annotations

import importlib

import mlx.core as mx

_COMMON = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
               vocab_size=128, max_position_embeddings=512, tie_word_embeddings=True,
               rope_theta=10000.0)

# model_type -> overrides of _COMMON (head_dim 16 unless stated)
SUPPORTED = {
    "llama": dict(),
    "qwen2": dict(),
    "qwen3": dict(head_dim=16),
    # mistral uses the llama module; GQA group 4
    "mistral": dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2),
    "gemma": dict(head_dim=16),
    "phi3": dict(num_key_value_heads=4),
    "starcoder2": dict(norm_epsilon=1e-5),
    # sliding-window layers: layer 0 local (window 8), layer 1 global
    "gemma3_text": dict(head_dim=16, sliding_window=8, sliding_window_pattern=2,
                        query_pre_attn_scalar=16),
}

REFUSED = {
    "deepseek_v3": ("MLA", dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                                qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                                num_experts_per_tok=2, moe_intermediate_size=32,
                                n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                                topk_group=1)),
    "glm4_moe_lite": ("MLA", dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                                  qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                                  num_experts_per_tok=2, moe_intermediate_size=32,
                                  n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                                  topk_group=1)),
    "mamba": ("recurrent state", dict(state_size=8, conv_kernel=4, use_bias=False,
                                      use_conv_bias=True, time_step_rank=4)),
    "qwen3_next": ("recurrent state", dict(
        linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1, shared_expert_intermediate_size=32,
        mlp_only_layers=[], moe_intermediate_size=32, rope_theta=10000.0,
        partial_rotary_factor=0.5, head_dim=16, full_attention_interval=2)),
    "jamba": ("recurrent state", dict(
        attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=1,
        expert_layer_period=2, mamba_d_conv=4, mamba_d_state=8, mamba_expand=2,
        num_experts=2, num_experts_per_tok=1)),
    "nemotron_h": ("recurrent state", dict(
        attention_bias=False, mamba_num_heads=4, mamba_head_dim=16, mamba_proj_bias=False,
        ssm_state_size=8, conv_kernel=4, n_groups=1, mlp_bias=False, layer_norm_epsilon=1e-5,
        use_bias=False, use_conv_bias=True, hybrid_override_pattern="M*")),
    "gemma2": ("does not go through", dict(head_dim=16)),
}


def tiny_model(model_type: str, seed: int = 0):
    overrides = SUPPORTED.get(model_type)
    if overrides is None:
        overrides = REFUSED[model_type][1]
    module = importlib.import_module(
        f"mlx_lm.models.{'llama' if model_type == 'mistral' else model_type}")
    cfg = dict(_COMMON, model_type=model_type, **overrides)
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    return model
