"""The small block and language-model configurations the family tests run in both frameworks.

Each is one option or one family of docs/design.md section 8, on tiny shapes so that JAX compiles
fast; the NumPy reference of tests/reference/ computes the same model from them.
"""

from __future__ import annotations

from typing import Any

from twin_core import LLAMA_OPTIONS, RopeScaling

BASE = dict(d_model=32, n_heads=4, d_ff=48, dropout=0.0)
# Llama: RMSNorm, gated SiLU without biases, rope, GQA 4:1, no attention biases; head_dim given
# (8 heads of 8 over d_model 32, so H * D != d_model).
LLAMA = dict(BASE, **LLAMA_OPTIONS, n_heads=8, n_kv_heads=2, head_dim=8, norm_eps=1e-6)
# head_dim 8, theta 1e4: wavelengths 6.3, 63, 628, 6283 against 64 / 4 and 64 / 1: one
# frequency of each llama3 branch (kept, smoothed, divided), two divided.
LLAMA3_SCALING = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)
WINDOW = 3  # shorter than every test sequence

BLOCKS: dict[str, dict[str, Any]] = {
    "original": dict(BASE),
    "gpt2": dict(BASE, activation="gelu_tanh"),
    "relu_no_biases": dict(BASE, activation="relu", ffn_bias=False, out_bias=False),
    "mqa_gated_gelu": dict(BASE, n_kv_heads=1, gated_ffn=True),
    "llama": LLAMA,
    "llama3_rope": dict(LLAMA, rope_scaling=LLAMA3_SCALING),
    "mistral": dict(LLAMA, sliding_window=WINDOW, rope_theta=1e6),
    "qwen2": dict(LLAMA, qkv_bias=True),
    "mixtral": dict(LLAMA, use_moe=True, num_experts=4, top_k_experts=2),
    "qwen2_moe": dict(
        LLAMA,
        qkv_bias=True,
        use_moe=True,
        num_experts=4,
        top_k_experts=2,
        norm_topk_prob=False,
        shared_expert_d_ff=40,
        shared_expert_gate=True,
    ),
    # Qwen3: q/k RMSNorm per head; OLMoE: over the whole projections (d_model wide: 4 heads)
    "qwen3": dict(LLAMA, qk_norm="head"),
    "olmoe": dict(
        LLAMA,
        n_heads=4,
        head_dim=None,
        qk_norm="projection",
        use_moe=True,
        num_experts=4,
        top_k_experts=2,
        norm_topk_prob=False,
    ),
    "layernorm_qk_norm": dict(BASE, qk_norm="head"),  # the block's norm kind: with biases
    # Gemma 2: Gemma's RMSNorm, sandwich norms, gated gelu_tanh, its own query scale, softcapped
    # scores (a cap of 2 acts on unit-scale scores); Gemma 3: q/k norm per head, no softcap.
    # Norm weights are drawn near 1 (as for the other norms): Gemma's norms then scale by 2
    "gemma2": dict(
        LLAMA,
        norm="gemma_rmsnorm",
        activation="gelu_tanh",
        sandwich_norms=True,
        query_pre_attn_scalar=6,
        attn_logit_softcap=2.0,
    ),
    "gemma3": dict(
        LLAMA,
        norm="gemma_rmsnorm",
        activation="gelu_tanh",
        sandwich_norms=True,
        query_pre_attn_scalar=32,  # its q and k are normed: scores up to about 4 * head_dim
        qk_norm="head",
    ),
    "shared_ungated": dict(
        BASE, use_moe=True, num_experts=3, top_k_experts=1, shared_expert_d_ff=24
    ),
    "bidirectional_rope": dict(LLAMA, causal=False),
    "phi3_partial_rotary": dict(LLAMA, partial_rotary_factor=0.5),  # 4 of 8 dims rotated
}
# The causal ones: full forward == cached prefill + decode.
CAUSAL_BLOCKS = [name for name, config in BLOCKS.items() if config.get("causal", True)]

_LM = dict(vocab_size=64, max_seq_len=32, n_layers=2)
LMS: dict[str, dict[str, Any]] = {
    "gpt2": dict(_LM, **BLOCKS["gpt2"]),
    "llama": dict(_LM, **BLOCKS["llama3_rope"], tie_embeddings=False),
    "mistral": dict(_LM, **BLOCKS["mistral"], tie_embeddings=False),
    "qwen2": dict(_LM, **BLOCKS["qwen2"]),
    "mixtral": dict(_LM, **BLOCKS["mixtral"], tie_embeddings=False),
    "qwen2_moe": dict(_LM, **BLOCKS["qwen2_moe"]),
    "qwen3": dict(_LM, **BLOCKS["qwen3"]),
    "olmoe": dict(_LM, **BLOCKS["olmoe"], tie_embeddings=False),
    # Gemma: embeddings times sqrt(d_model), sliding and full layers; Gemma 2 softcaps its
    # logits, Gemma 3's sliding layers rotate with their own base (its full ones linear-scaled)
    "gemma2": dict(
        _LM,
        **BLOCKS["gemma2"],
        embed_scale=True,
        final_logit_softcap=3.0,
        sliding_window=WINDOW,
        layer_types=("sliding_attention", "full_attention"),
    ),
    "gemma3": dict(
        _LM,
        **BLOCKS["gemma3"],
        embed_scale=True,
        sliding_window=WINDOW,
        layer_types=("sliding_attention", "full_attention"),
        rope_theta=1e6,
        rope_scaling=RopeScaling(rope_type="linear", factor=8.0),
        local_rope_theta=100.0,
    ),
    # per-layer: layer 0 sliding with MoE, layer 1 full attention with a dense feed-forward
    "mixed_layers": dict(
        _LM,
        **BLOCKS["qwen2_moe"],
        sliding_window=WINDOW,
        layer_types=("sliding_attention", "full_attention"),
        dense_layers=(1,),
        dense_d_ff=56,
    ),
}

MLA_SIZES = dict(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
# Bad configurations: (fields over BASE, words the ValueError must hold)
BAD: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "kv heads do not divide heads": (dict(n_heads=4, n_kv_heads=3), ("n_heads", "n_kv_heads")),
    "odd head_dim with rope": (dict(head_dim=7, positions="rope"), ("rope", "head_dim")),
    "window 0": (dict(sliding_window=0), ("sliding_window",)),
    "negative window": (dict(sliding_window=-2), ("sliding_window",)),
    "unknown activation": (dict(activation="swish"), ("activation", "swish")),
    "unknown norm": (dict(norm="batchnorm"), ("norm", "batchnorm")),
    "unknown positions": (dict(positions="alibi"), ("positions", "alibi")),
    "shared expert without MoE": (dict(shared_expert_d_ff=16), ("shared_expert_d_ff", "use_moe")),
    "unknown qk_norm": (dict(qk_norm="query"), ("qk_norm", "head", "projection", "query")),
    "shared gate without shared expert": (
        dict(use_moe=True, num_experts=2, shared_expert_gate=True),
        ("shared_expert_gate", "shared_expert_d_ff"),
    ),
    "router bias without MoE": (dict(router_bias=True), ("router_bias", "use_moe=True")),
    "swiglu limit without a gated silu": (
        dict(swiglu_limit=7.0),
        ("swiglu_limit", "gated_ffn=True", "activation='silu'", "got gated_ffn=False"),
    ),
    "swiglu limit 0": (
        dict(gated_ffn=True, activation="silu", swiglu_limit=0.0),
        ("swiglu_limit", "> 0", "0.0"),
    ),
    "swiglu alpha without a limit": (dict(swiglu_alpha=1.0), ("swiglu_alpha=1.0", "swiglu_limit")),
    "MLA sizes without kv_lora_rank": (dict(v_head_dim=8), ("v_head_dim", "kv_lora_rank")),
    "MLA without rope": (
        dict(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
        ("MLA", "positions='rope'"),
    ),
    "MLA with a key/value head count": (
        dict(
            **MLA_SIZES, positions="rope", qkv_bias=False, out_bias=False, n_heads=4, n_kv_heads=2
        ),
        ("MLA", "n_kv_heads"),
    ),
    "grouped sigmoid router without MoE": (
        dict(router="grouped_sigmoid", n_group=2),
        ("grouped_sigmoid", "use_moe=True"),
    ),
    "experts not split into groups": (
        dict(use_moe=True, num_experts=6, router="grouped_sigmoid", n_group=4),
        ("num_experts (6)", "n_group (4)"),
    ),
    "more experts than the chosen groups hold": (
        dict(
            use_moe=True,
            num_experts=8,
            top_k_experts=3,
            router="grouped_sigmoid",
            n_group=4,
            topk_group=1,
        ),
        ("top_k_experts (3)", "topk_group"),
    ),
    "group fields with the softmax router": (dict(n_group=2), ("n_group", "grouped_sigmoid")),
}

# Bad per-layer fields of a 2-layer LM: (fields over BASE and the LM's, words the error must hold)
BAD_LAYERS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "layer_types of another length": (
        dict(layer_types=("full_attention",)),
        ("layer_types", "2 layers", "got 1"),
    ),
    "unknown layer type": (
        dict(layer_types=("full_attention", "local")),
        ("layer_types", "sliding_attention", "local"),
    ),
    "sliding layer without a window": (
        dict(layer_types=("sliding_attention", "full_attention")),
        ("layers [0]", "sliding_window is None"),
    ),
    "dense layer out of range": (
        dict(use_moe=True, num_experts=2, dense_layers=(2,)),
        ("dense_layers", "[0, n_layers=2)", "[2]"),
    ),
    "dense layer twice": (
        dict(use_moe=True, num_experts=2, dense_layers=(1, 1)),
        ("dense_layers", "repeat"),
    ),
    "dense layers without MoE": (dict(dense_layers=(0,)), ("dense_layers", "use_moe=True")),
    "dense_d_ff without dense layers": (
        dict(use_moe=True, num_experts=2, dense_d_ff=16),
        ("dense_d_ff", "dense_layers"),
    ),
}
