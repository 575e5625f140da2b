"""Tiny models of every decoder-only text causal-LM family transformers ships, built from config (random weights,
nothing downloaded).

`ARCHITECTURES` holds every `model_type` of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` that is a decoder-only text language
model, in every supported transformers release (the range of setup.cfg), `EXCLUDED` every other one with the reason
(families that exist only as remote code, `trust_remote_code=True`, are not in the mapping), `ADDED` the families that
only later releases than the oldest supported one ship (`ships` tells whether the installed one does), `REFUSED` the
families the start-up probe refuses, with the evidence. `tiny_model(model_type)` builds a model small enough for CPU
tests: 2 layers, hidden size 32, vocabulary 64, with the family's own extras (experts, state sizes, low-rank
attention, ...) shrunk to match, sliding windows of 4 tokens (shorter than the test sequences, so that windowed
attention and its cache are exercised) and, for hybrid families, one layer of each kind.
"""

import configparser
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from packaging.requirements import Requirement
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM

from rkd_trl.demo.synthetic import build_tokenizer

VOCAB_SIZE = 64
WINDOW = 4
NOT_SET = object()  # a COMMON setting the family's config does not take

# A word-level tokenizer of exactly VOCAB_SIZE tokens: 5 special ones and the words w00 … w58.
TOKENIZER = build_tokenizer([f"w{index:02d}" for index in range(VOCAB_SIZE - 5)])

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

# Shared shapes of the extras, spelled out per family below because each family names them its own way.
SLIDING_AND_FULL = ["sliding_attention", "full_attention"]
LINEAR_AND_FULL = ["linear_attention", "full_attention"]
LOW_RANK_ATTENTION = dict(  # multi-head latent attention (DeepSeek-V2 style): one KV head per query head
    num_key_value_heads=4, head_dim=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
    v_head_dim=8,
)
# Sparse-attention indexers: top-4 tokens (so that the selection acts within the test sequences), and enough indexer
# heads that index scores are rarely tied (with 2 heads their ReLU scores are often all 0, and top-k breaks the ties
# differently in a full forward and token by token: the model's own `generate` then disagrees with its forward).
SPARSE_INDEXER = dict(index_topk=4, index_head_dim=8, index_n_heads=8)
# A third layer that reads the KV cache of the layer before it (cross-layer KV sharing).
SHARED_KV_LAYER = dict(num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "full_attention"],
                       sliding_window=WINDOW, num_kv_shared_layers=1)

# Per family: settings beyond COMMON (shrunk extras, layer kinds, and the logit post-processing under test).
ARCHITECTURES = {
    "afmoe": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=16),
    "apertus": {},
    "apertus1p5_text": {},
    "arcee": {},
    "aria_text": dict(moe_num_experts=4, moe_intermediate_size=16),
    "axk1": dict(**LOW_RANK_ATTENTION, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                 moe_intermediate_size=16, mlp_layer_types=["dense", "sparse"]),
    "axk2": dict(**LOW_RANK_ATTENTION, **SPARSE_INDEXER, n_routed_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=16, mlp_layer_types=["dense", "sparse"]),
    "bailing_hybrid": dict(**LOW_RANK_ATTENTION, layer_types=LINEAR_AND_FULL, num_experts=4, num_experts_per_token=2,
                           num_expert_group=1, topk_group=1, moe_intermediate_size=16,
                           mlp_layer_types=["dense", "sparse"], linear_head_dim=8, linear_num_heads=4),
    "bamba": dict(attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=4),
    "beam": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW, num_experts=4, num_experts_per_tok=2, n_group=1,
                 topk_group=1, moe_intermediate_size=16, mlp_layer_types=["dense", "sparse"]),
    "biogpt": {},
    "bitnet": {},
    "bloom": {},
    "blt": dict(
        # bytes → patches (an entropy model decides where) → a global transformer over patches → bytes
        encoder_hash_byte_group_size=[3, 4], encoder_hash_byte_group_vocab=64, local_attention_window_len=WINDOW,
        patcher_config=dict(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=64, sliding_window=WINDOW),
        encoder_config=dict(vocab_size=VOCAB_SIZE, hidden_size=32, hidden_size_global=32, num_attention_heads=4,
                            intermediate_size=64),
        decoder_config=dict(vocab_size=VOCAB_SIZE, hidden_size=32, hidden_size_global=32, num_attention_heads=4,
                            num_hidden_layers=1, intermediate_size=64),
        global_config=dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64),
    ),
    "codegen": dict(rotary_dim=4),
    "cohere": dict(logit_scale=3.0),
    "cohere2": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW),
    "cohere2_moe": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=16),
    "cohere_compass_text": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW, rope_parameters={
        "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
        "full_attention": dict(rope_type="default", rope_theta=10000.0),
    }),  # its default names no RoPE per layer kind
    "cpmant": dict(dim_head=8, dim_ff=64, position_bias_num_buckets=16, position_bias_max_distance=64),
    "ctrl": dict(dff=64),
    "cwm": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW),
    "dbrx": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
                 attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0),  # its attention reads both; unset
                 ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2)),
    "deepseek_v2": dict(**LOW_RANK_ATTENTION, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "deepseek_v3": dict(**LOW_RANK_ATTENTION, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                        moe_intermediate_size=16, first_k_dense_replace=1),
    "deepseek_v32": dict(**LOW_RANK_ATTENTION, **SPARSE_INDEXER, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                         topk_group=1, moe_intermediate_size=16, mlp_layer_types=["dense", "sparse"]),
    "deepseek_v4": dict(q_lora_rank=16, qk_rope_head_dim=4, n_routed_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=16, sliding_window=WINDOW, o_groups=2, o_lora_rank=16,
                        index_n_heads=8, index_head_dim=8, index_topk=4,
                        layer_types=["compressed_sparse_attention", "heavily_compressed_attention"],
                        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
                        mlp_layer_types=["hash_moe", "moe"]),
    "diffllama": {},
    "doge": dict(num_experts=16, num_experts_per_tok=2, keep_window_size=WINDOW),
    # Input, recurrent and output sections of one layer each; the recurrent one runs twice (one KV cache per loop).
    "dory": dict(num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                 sliding_window=WINDOW, n_input_layers=1, n_output_layers=1, n_recurrent_loops=2),
    "dots1": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW, n_routed_experts=4, num_experts_per_tok=2,
                  n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=1),
    "dots3_note_text": dict(LOW_RANK_ATTENTION, head_dim=8, **SPARSE_INDEXER, n_routed_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=16, shared_experts_intermediate_size=16,
                            layer_types=["indexed_attention", "sliding_attention"], sliding_window=WINDOW,
                            mlp_layer_types=["dense", "sparse"], per_layer_config={}),
    "emu3": dict(text_config=dict(COMMON)),  # Emu3ForCausalLM is its text model, configured under text_config
    "ernie4_5": {},
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=16, moe_layer_start_index=1),
    "exaone": {},
    "exaone4": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW),
    "exaone_moe": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=16, mlp_layer_types=["dense", "sparse"]),
    "falcon": dict(head_dim=NOT_SET, ffn_hidden_size=64),  # head_dim is derived, read-only
    "falcon_h1": dict(lm_head_multiplier=3.0, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8,
                      mamba_n_groups=1, mamba_chunk_size=4),
    "falcon_mamba": dict(state_size=8, time_step_rank=4),
    "flex_olmo": dict(num_experts=4, num_experts_per_tok=2),
    "flint": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=16, shared_expert_intermediate_size=16, mlp_only_layers=[0]),
    "gemma": {},
    "gemma2": dict(final_logit_softcapping=0.5, sliding_window=WINDOW),
    "gemma3_text": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW),
    # No pad_token_id: as nn.Embedding's padding_idx, its row would start at zero, and the altup magnitude
    # `mean(x ** 2) ** 0.5` has an infinite derivative at a zero vector, so any padded batch (its own `labels` loss
    # too) would train on NaN gradients. A checkpoint loads its own row.
    "gemma3n_text": dict(**SHARED_KV_LAYER, vocab_size_per_layer_input=VOCAB_SIZE, hidden_size_per_layer_input=8,
                         laurel_rank=4, activation_sparsity_pattern=[0.0] * 3, altup_num_inputs=2, pad_token_id=None),
    "gemma4_text": dict(**SHARED_KV_LAYER, vocab_size_per_layer_input=VOCAB_SIZE, hidden_size_per_layer_input=8,
                        per_layer_config={}),
    "gemma4_unified_text": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW, per_layer_config={}),
    "glm": {},
    "glm4": {},
    "glm4_moe": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1),
    "glm4_moe_lite": dict(**LOW_RANK_ATTENTION, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                          mlp_layer_types=["dense", "sparse"]),
    "glm_moe_dsa": dict(**LOW_RANK_ATTENTION, **SPARSE_INDEXER, n_routed_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=16, mlp_layer_types=["dense", "sparse"],
                        indexer_types=["full", "shared"]),
    "gpt-sw3": {},
    "gpt2": {},
    "gpt_bigcode": {},
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=WINDOW),
    "gpt_neox": {},
    "gpt_neox_japanese": {},
    "gpt_oss": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
    "gptj": dict(rotary_dim=4),
    "granite": dict(logits_scaling=4.0),
    "granite_swa": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "granitemoe_swa": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW, num_local_experts=4,
                           num_experts_per_tok=2),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"], num_local_experts=4, num_experts_per_tok=2,
                             shared_intermediate_size=16, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                             mamba_chunk_size=4),
    "granitemoeshared": dict(num_local_experts=4, num_experts_per_tok=2),
    "helium": {},
    "hrm_text": dict(num_hidden_layers=1, H_cycles=1, L_cycles=1),  # the layer stack is run H × (L + 1) times
    "hunyuan_v1_dense": {},
    "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2),
    "hy_v3": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                  mlp_layer_types=["dense", "sparse"]),
    "hy_v4": dict(**LOW_RANK_ATTENTION, **SPARSE_INDEXER, n_routed_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=16, mlp_layer_types=["dense", "sparse"], indexer_types=["full", "shared"]),
    "hyperclovax": dict(logits_scaling=4.0),
    # unpadded_vocab_size: the output head's width from 5.24 on (the rows of real tokens before; 200,058 by default).
    "inkling2_loop_text": dict(num_hidden_layers=3, layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"],
                               swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
                               sliding_window_size=WINDOW, rel_extent=16, n_routed_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=16, unpadded_vocab_size=VOCAB_SIZE, n_layers_per_attn_res_block=1,
                               loop_layer_index_start=1, loop_layer_index_end=2, loop_num_passes=2,
                               loop_gate_rank=4),  # the middle layer runs twice
    "inkling2_text": dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
                          sliding_window_size=WINDOW, rel_extent=16, layer_types=["hybrid_sliding", "hybrid"],
                          n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                          unpadded_vocab_size=VOCAB_SIZE),
    "inkling_text": dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
                         sliding_window_size=WINDOW, rel_extent=16, layer_types=["hybrid_sliding", "hybrid"],
                         n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "internlm3": {},
    "iquestcoder": {},
    "jais2": {},
    "jamba": dict(
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2,
        mamba_d_state=8, mamba_dt_rank=4, mamba_expand=2,
    ),
    "jetmoe": dict(kv_channels=8, num_local_experts=4, num_experts_per_tok=2),
    "kimi_linear": dict(**LOW_RANK_ATTENTION, layer_types=LINEAR_AND_FULL, num_experts=4, num_experts_per_token=2,
                        moe_intermediate_size=16, mlp_layer_types=["dense", "sparse"], linear_head_dim=8,
                        linear_num_heads=4),
    "kolibri1": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=16, shared_expert_intermediate_size=16),
    "laguna": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW, num_attention_heads_per_layer=[4, 4],
                   num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                   mlp_layer_types=["dense", "sparse"]),
    "lara_mini": dict(num_hidden_layers=3, layer_types=["linear_attention", "sliding_attention", "full_attention"],
                      sliding_window=WINDOW, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                      linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=16),
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=16, num_dense_layers=1),
    "lfm3": dict(layer_types=["conv", "sliding_attention"], sliding_window=WINDOW),
    "llama": {},
    "llama4_text": dict(layer_types=["chunked_attention", "full_attention"], attention_chunk_size=WINDOW,
                        num_local_experts=4, intermediate_size_mlp=64, moe_layers=[1], no_rope_layers=[1, 0]),
    "longcat_flash": dict(**LOW_RANK_ATTENTION, num_layers=1, ffn_hidden_size=64, n_routed_experts=4, moe_topk=2,
                          zero_expert_num=2, expert_ffn_hidden_size=16),
    "mamba": dict(state_size=8, expand=2, conv_kernel=4),
    "mamba2": dict(num_heads=4, head_dim=16, state_size=8, n_groups=1, chunk_size=4),
    "mellum": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
                   moe_intermediate_size=16),
    "mimo_v2_flash": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW, n_routed_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=16, v_head_dim=8,
                          mlp_layer_types=["dense", "sparse"]),
    "minicpm3": dict(**LOW_RANK_ATTENTION, scale_emb=1.0),  # at 12, the random model copies its last input token
    "minimax": dict(layer_types=LINEAR_AND_FULL, num_local_experts=4, num_experts_per_tok=2, block_size=4),
    "minimax_m2": dict(num_local_experts=4, num_experts_per_tok=2),
    "minimax_m3_vl_text": dict(layer_types=["minimax_m3_sparse", "full_attention"],
                               mlp_layer_types=["dense", "sparse"], num_local_experts=4, num_experts_per_tok=2,
                               dense_intermediate_size=64, shared_intermediate_size=16, rotary_dim=4,
                               index_n_heads=2, index_head_dim=8, index_block_size=2,
                               index_topk_blocks=2),  # one indexer head per KV head
    "ministral": dict(sliding_window=WINDOW),
    "ministral3": {},
    "mistral": dict(sliding_window=WINDOW),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    # The text decoder of a vision-language model: its image cross-attention layer is skipped without images.
    "mllama": dict(text_config=dict(COMMON, cross_attention_layers=[1])),
    "modernbert-decoder": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW, local_attention=WINDOW),
    "moshi": dict(ffn_dim=64, sliding_window=WINDOW),
    "mpt": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64),
    "nanochat": {},
    "nemotron": {},
    "nemotron_h": dict(layers_block_type=["mamba", "attention"], ssm_state_size=8, mamba_num_heads=4,
                       mamba_head_dim=16, n_groups=1, chunk_size=4),
    "olmo": {},
    "olmo2": {},
    "olmo3": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW),
    "olmo_hybrid": dict(layer_types=LINEAR_AND_FULL, linear_num_key_heads=2, linear_num_value_heads=2,
                        linear_key_head_dim=8, linear_value_head_dim=8),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "openai-gpt": {},
    "opt": dict(ffn_dim=64, word_embed_proj_dim=16),  # a projection between embedding and hidden sizes
    "persimmon": {},
    "phi": {},
    "phi3": dict(sliding_window=WINDOW),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=16),
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3_5_moe_text": dict(layer_types=LINEAR_AND_FULL, linear_num_key_heads=2, linear_num_value_heads=4,
                             linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=16, shared_expert_intermediate_size=16),
    "qwen3_5_text": dict(layer_types=LINEAR_AND_FULL, linear_num_key_heads=2, linear_num_value_heads=4,
                         linear_key_head_dim=8, linear_value_head_dim=8),
    "qwen3_moe": dict(num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "qwen3_next": dict(layer_types=LINEAR_AND_FULL, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=16, shared_expert_intermediate_size=16),
    "qwen4_exp_text": dict(layer_types=["linear_attention", "indexed_attention"], linear_num_key_heads=2,
                           linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                           hc_lowrank=8, ple_embed_dim=16, ngram_vocab_size_base=64, split_ngram_parts=4,
                           indexer_n_heads=8, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4,
                           indexer_compress_ratio=2),
    "recurrent_gemma": dict(lru_width=32, attention_window_size=WINDOW, block_types=["recurrent", "attention"]),
    "reformer": dict(is_decoder=True, attention_head_size=8, attn_layers=["local", "lsh"], axial_pos_shape=[8, 8],
                     axial_pos_embds_dim=[16, 16], feed_forward_size=64, local_attn_chunk_length=WINDOW,
                     lsh_attn_chunk_length=WINDOW),  # is_decoder: causal attention
    "rwkv": dict(attention_hidden_size=32, context_length=64),
    "sarvam_mla": dict(**LOW_RANK_ATTENTION, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                       moe_intermediate_size=16, first_k_dense_replace=1),
    "sarvam_moe": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1),
    "seed_oss": {},
    "smollm3": dict(no_rope_layers=[1, 0], use_sliding_window=True, sliding_window=WINDOW),
    "solar_open": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "stablelm": {},
    "starcoder2": dict(sliding_window=WINDOW),
    "vaultgemma": dict(layer_types=SLIDING_AND_FULL, sliding_window=WINDOW),
    "xglm": dict(d_model=32, ffn_dim=64, num_layers=2, attention_heads=4),
    # The cache sizes its state with q/k and v widths rounded up to multiples of 64, the layers without rounding: use
    # widths of 64.
    "xlstm": dict(embedding_dim=32, num_blocks=2, num_heads=4, chunk_size=4, qk_dim_factor=2.0, v_dim_factor=2.0),
    "youtu": dict(**LOW_RANK_ATTENTION),
    # Each hybrid layer is Mamba + the attention block shared by all of them (one alone cannot be tied).
    "zamba": dict(attention_hidden_size=64, attention_head_dim=16, mamba_d_state=8, mamba_dt_rank=4,
                  layers_block_type=["hybrid", "hybrid"]),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"], hybrid_layer_ids=[1], mamba_d_state=8, n_mamba_heads=4,
                   mamba_headdim=16, chunk_size=4, adapter_rank=4, attention_hidden_size=64, attention_head_dim=16,
                   kv_channels=8, num_query_groups=2),
    "zaya": dict(layer_types=["hybrid", "hybrid_sliding"], sliding_window=WINDOW, num_experts=4,
                 moe_intermediate_size=16, router_hidden_size=16),
}  # fmt: skip

# Families whose cache cannot drop finished rows (their state lives outside a reorderable `Cache`): the probe finds
# that keeping the rows, fed padding, reproduces their forward.
KEEPS_ENDED_ROWS = {"recurrent_gemma", "xlstm"}

# Families fed every sampled token (as student or teacher): the probe finds that a multi-token cached forward does not
# reproduce their plain forward (SSM and recurrent states updated by a chunked scan over several new tokens, which
# differs from their token-by-token recurrence; OpenAI GPT has no cache and is fed its whole sequence at every call),
# so teacher-mixed sampling cannot let them catch up (docs/algorithm.md).
FEEDS_EVERY_TOKEN = {"falcon_mamba", "jamba", "mamba", "openai-gpt", "recurrent_gemma"}


class Refusal(NamedTuple):
    """A family the start-up probe refuses: `message` matches its error; `reason` is why, with the evidence that the
    model itself, not this package, decodes differently from its forward."""

    message: str
    reason: str


NOT_REPRODUCIBLE = "cannot be decoded token by token reproducibly"
REFUSED = {
    "blt": Refusal(
        NOT_REPRODUCIBLE,
        "its KV-cached decoding differs from its forward: its own `generate` disagrees with its forward by up to 2.7 "
        "in log-probability (they agree with `use_cache=False`)",
    ),
    "cpmant": Refusal(
        NOT_REPRODUCIBLE,
        "its own `generate` disagrees with its forward by up to 2.1 in log-probability, without any padding",
    ),
    "deepseek_v4": Refusal(
        NOT_REPRODUCIBLE,
        "compressed attention: on left-padded prompts its own `generate` disagrees with its forward (by 6e-3 in "
        "log-probability; they agree without padding)",
    ),
    "doge": Refusal(
        NOT_REPRODUCIBLE,
        "dynamic-mask attention: once a sequence is longer than `keep_window_size` (4 in the tests, 2048 by default), its own "
        "`generate` disagrees with its forward (by up to 0.13 in log-probability)",
    ),
    "minimax": Refusal(
        NOT_REPRODUCIBLE,
        "on left-padded prompts its own `generate` disagrees with its forward (by 2e-3 in log-probability; they agree "
        "without padding), and its cache's `reorder_cache` leaves the linear-attention states in the old row order",
    ),
    "minimax_m3_vl_text": Refusal(
        NOT_REPRODUCIBLE,
        "block-sparse attention: on left-padded prompts its own `generate` disagrees with its forward (by 0.02 in "
        "log-probability; they agree without padding)",
    ),
    "moshi": Refusal(
        NOT_REPRODUCIBLE,
        "its cache keeps a sliding window of `sliding_window` tokens (4 in the tests, 3000 by default) while its forward "
        "attends to every earlier token: past the window its own `generate` disagrees with its forward (by up to "
        "0.09 in log-probability)",
    ),
    "reformer": Refusal(
        "cannot be scored: its forward over left-padded sequences",
        "its forward fails on position ids for lengths that are not a multiple of the chunk length, and its own "
        "`generate` fails with LSH attention layers",
    ),
    "rwkv": Refusal(
        NOT_REPRODUCIBLE,
        "it ignores the attention mask, so left padding runs through its recurrence: on left-padded prompts its own "
        "`generate` disagrees with its forward (by up to 1.4 in log-probability; they agree without padding)",
    ),
}

# The 16-bit precisions users train in, as tests/test_architectures_precision.py runs the probe in them: name ->
# (the dtype the forward computes in under autocast, as accelerate's mixed precision runs it, over weights in the
# second dtype; None: the weights' own).
PRECISIONS_16_BIT = {"bf16 autocast": (torch.bfloat16, torch.float32), "bf16 weights": (None, torch.bfloat16)}

# Families that the probe accepts in float32 and refuses in a 16-bit precision, by precision: their own forward
# raises there (transformers' code mixes dtypes), so training in that precision would fail on them too. The probe
# refuses them with the model's error; they train in the other precisions.
MIXES_DTYPES = "cannot be scored: .* have the same (scalar type|dtype)"
REFUSED_IN_16_BIT = {
    "bf16 autocast": {
        "dbrx": Refusal(
            MIXES_DTYPES,
            "its experts accumulate into a float32 buffer with `index_add_` the bf16 outputs of autocast's matrix "
            "products (modeling_dbrx.py: `next_states.index_add_(0, token_idx, states)`): RuntimeError",
        ),
    },
    "bf16 weights": {
        "inkling2_loop_text": Refusal(
            MIXES_DTYPES,
            "its router casts the hidden states to float32 and multiplies them by the bf16 gate weights "
            "(modeling_inkling2_loop.py: `F.linear(flat, self.weight)`): RuntimeError",
        ),
        "inkling2_text": Refusal(
            MIXES_DTYPES,
            "its router casts the hidden states to float32 and multiplies them by the bf16 gate weights "
            "(modeling_inkling2.py: `F.linear(flat, self.weight)`): RuntimeError",
        ),
        "xlstm": Refusal(
            MIXES_DTYPES,
            "its chunkwise mLSTM recurrence keeps float32 states and multiplies them by bf16 keys and values "
            "(modeling_xlstm.py: `mlstm_chunkwise_recurrent_fw_C`): RuntimeError",
        ),
    },
}

# Families of `REFUSED` that the probe accepts in a 16-bit precision on the tiny random models, by precision, with
# why: a defect that changes these models' near-uniform next-token distributions by less than bf16 rounds them. None
# now: under bf16 autocast the probe also runs in float32, and in bf16 weights on a float32 copy of the first layers
# (`probe.float32_prefix_copy`), which refuses MiniMax, the one family that bf16 hid.
UNDETECTED_IN_16_BIT = {"bf16 autocast": {}, "bf16 weights": {}}

# Families of the causal-LM mapping that are not decoder-only text language models, with the reason.
ENCODER = (
    "encoder (bidirectional) architecture: its causal-LM head serves as the decoder of an `EncoderDecoderModel` "
    "(`is_decoder=True`), not as a decoder-only language model"
)
DECODER_OF_ENCODER_DECODER = (
    "decoder of an encoder-decoder model: it generates from an encoder's output (cross-attention), not as a "
    "decoder-only language model"
)
MULTIMODAL = "vision / audio-language model: its causal-LM class holds a vision or audio encoder for non-text inputs"
EXCLUDED = {
    **dict.fromkeys(
        ["bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert",
         "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm", "xlm-roberta", "xlm-roberta-xl",
         "xmod"],
        ENCODER,
    ),
    **dict.fromkeys(
        ["bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp", "pegasus", "plbart",
         "prophetnet", "trocr", "whisper", "musicgen", "musicgen_melody"],
        DECODER_OF_ENCODER_DECODER,
    ),
    **dict.fromkeys(
        ["fuyu", "gemma3", "gemma3n", "gemma4", "gemma4_unified", "git", "got_ocr2", "moss_transcribe_diarize",
         "phi4_multimodal"],
        MULTIMODAL,
    ),
    **{
        name: f"vision-language configuration; its text causal LM is the `{name}_text` family"
        for name in ["dots3_note", "llama4", "qwen3_5", "qwen3_5_moe", "qwen4_exp"]
    },
    "gemma4_assistant": "speculative-decoding drafter: it runs on its target model's embeddings and KV states",
    "gemma4_unified_assistant": "speculative-decoding drafter: it runs on its target model's embeddings and KV states",
    "xlnet": "permutation language model (two-stream attention over a memory), not left-to-right decoding",
}  # fmt: skip


class Added(NamedTuple):
    """A family that the oldest supported transformers does not ship: the first release that does, and the causal-LM
    class it maps the family to there."""

    release: str
    causal_lm_class: str


# Every family of ARCHITECTURES and EXCLUDED that is not in the oldest supported release (the floor of setup.cfg).
# tests/test_architectures.py checks, on the installed release, that exactly the families listed for it are in the
# mapping, with these classes.
ADDED = {
    "apertus1p5_text": Added("5.24.0", "Apertus1p5TextForCausalLM"),
    "dory": Added("5.24.0", "DoryForCausalLM"),
    "exaone": Added("5.24.0", "LlamaForCausalLM"),
    "inkling2_loop_text": Added("5.24.0", "Inkling2LoopForCausalLM"),
    "lara_mini": Added("5.24.0", "LaraMiniForCausalLM"),
    "sarvam_mla": Added("5.24.0", "DeepseekV3ForCausalLM"),
    "sarvam_moe": Added("5.24.0", "Glm4MoeForCausalLM"),
}


def ships(model_type: str) -> bool:
    """Whether the installed transformers has the family."""
    added = ADDED.get(model_type)
    return added is None or Version(transformers.__version__) >= Version(added.release)


def supported_transformers():
    """The range of transformers releases that setup.cfg allows (a `packaging` SpecifierSet)."""
    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    requirements = [Requirement(line) for line in setup["options"]["install_requires"].splitlines()
                    if line.strip() and not line.strip().startswith("#")]  # fmt: skip
    return next(requirement.specifier for requirement in requirements if requirement.name == "transformers")


def oldest_supported_transformers() -> Version:
    """The floor of `supported_transformers()`, the release `make test-oldest` installs."""
    return next(Version(spec.version) for spec in supported_transformers() if spec.operator == ">=")


def tiny_config(model_type: str, **overrides):
    """The tiny config of `model_type`: COMMON, the family's settings, then `overrides` (`NOT_SET` drops a key)."""
    settings = {**COMMON, **ARCHITECTURES[model_type], **overrides}
    return AutoConfig.for_model(model_type, **{key: value for key, value in settings.items() if value is not NOT_SET})


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A randomly initialised tiny `*ForCausalLM` of `model_type`, in eval mode."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()
