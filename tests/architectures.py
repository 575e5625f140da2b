"""Tiny models of transformers' decoder-only architectures, built from config (random weights, nothing downloaded).

`tiny_model(model_type)` builds a model small enough for CPU tests: 2 layers, hidden size 32, vocabulary 64, with
the architecture's own extras (experts, state sizes, layer types, ...) shrunk to match.
"""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB_SIZE = 64

COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# Per architecture: settings beyond COMMON (shrunk extras, and the logit post-processing under test).
ARCHITECTURES = {
    "llama": {},
    "gemma2": dict(final_logit_softcapping=0.5, sliding_window=4),
    "cohere": dict(logit_scale=3.0),
    "granite": dict(logits_scaling=4.0),
    "hyperclovax": dict(logits_scaling=4.0),
    "falcon_h1": dict(
        lm_head_multiplier=3.0, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1,
        mamba_chunk_size=4,
    ),
    "mamba": dict(state_size=8, expand=2, conv_kernel=4),
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    "qwen3_next": dict(
        layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    ),
    "jamba": dict(
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2,
        mamba_d_state=8, mamba_dt_rank=4, mamba_expand=2,
    ),
    "recurrent_gemma": dict(lru_width=32, attention_window_size=4, block_types=["recurrent", "attention"]),
}  # fmt: skip


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A randomly initialised tiny `*ForCausalLM` of `model_type`, in eval mode."""
    config = AutoConfig.for_model(model_type, **{**COMMON, **ARCHITECTURES[model_type], **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()
