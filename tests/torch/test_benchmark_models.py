"""The byte counts the benchmarks judge bandwidth and memory by, against hand-computed numbers
and the caches torch_block actually allocates."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import torch

from torch_block.lm import TransformerLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ is not installed
models = importlib.import_module("benchmarks.models")
SMALL, MEDIUM, SMALL_LLAMA, MEDIUM_LLAMA = (
    models.SMALL,
    models.MEDIUM,
    models.SMALL_LLAMA,
    models.MEDIUM_LLAMA,
)
SMALL_MIXTRAL, cache_bytes = models.SMALL_MIXTRAL, models.cache_bytes
llama_d_ff, step_weight_bytes = models.llama_d_ff, models.step_weight_bytes


def test_llama_like_models_keep_the_sizes_and_group_four_query_heads_per_kv_head():
    for dense, llama in ((SMALL, SMALL_LLAMA), (MEDIUM, MEDIUM_LLAMA)):
        for key in ("vocab_size", "d_model", "n_layers", "n_heads"):
            assert llama[key] == dense[key]
        assert llama["n_heads"] == 4 * llama["n_kv_heads"]
        assert (llama["norm"], llama["activation"], llama["positions"]) == (
            "rmsnorm",
            "silu",
            "rope",
        )
        assert llama["gated_ffn"] and not llama["tie_embeddings"]
        assert not (llama["ffn_bias"] or llama["qkv_bias"] or llama["out_bias"])
    assert SMALL_MIXTRAL["num_experts"] == 8 and SMALL_MIXTRAL["top_k_experts"] == 2
    assert SMALL_MIXTRAL["expert_capacity_factor"] is None


def test_llama_d_ff_is_llamas_rounding():
    assert llama_d_ff(4096) == 11008  # Llama 7B
    assert (llama_d_ff(256), llama_d_ff(1024)) == (768, 2816)


def test_cache_bytes_counts_kv_heads_times_head_dim():
    # 2 (keys, values) * 4 layers * batch 8 * 4096 positions * width * 4 bytes
    assert cache_bytes(SMALL, 8, 4096, 4) == 2 * 4 * 8 * 4096 * 256 * 4
    assert cache_bytes(SMALL_LLAMA, 8, 4096, 4) == 2 * 4 * 8 * 4096 * (2 * 32) * 4
    with_head_dim = {**SMALL_LLAMA, "head_dim": 48}
    assert cache_bytes(with_head_dim, 1, 10, 2) == 2 * 4 * 1 * 10 * (2 * 48) * 2


def test_cache_bytes_equals_what_torch_block_allocates():
    config = dict(vocab_size=16, max_seq_len=12, d_model=32, n_layers=3, n_heads=8, d_ff=8)
    for extra in ({}, dict(n_kv_heads=2), dict(n_kv_heads=1, head_dim=6)):
        lm = TransformerLM(**config, **extra)
        caches = lm.create_kv_cache(max_batch_size=5, max_seq_len=12, dtype=torch.bfloat16)
        allocated = sum(c.k_cache.nbytes + c.v_cache.nbytes for c in caches)
        assert cache_bytes({**config, **extra}, 5, 12, 2) == allocated


def test_step_weight_bytes_leaves_out_the_tables_a_step_only_indexes():
    def arr(*shape):
        return np.zeros(shape, np.float32)

    block = {"attention": {"q_proj": {"kernel": arr(4, 4)}}, "norm1": {"scale": arr(4)}}
    tied = {
        "token_embedding": {"embedding": arr(10, 4)},
        "position_embedding": {"embedding": arr(7, 4)},
        "blocks_0": block,
    }
    assert step_weight_bytes(tied) == 4 * (40 + 16 + 4)  # the tied embedding, read as the head
    untied = {
        "token_embedding": {"embedding": arr(10, 4)},
        "blocks_0": block,
        "lm_head": {"kernel": arr(4, 10)},
    }
    assert step_weight_bytes(untied) == 4 * (16 + 4 + 40)  # the head, not the embedding
