"""The models the benchmarks run: the same weights in torch_block and jax_block.

SMALL and MEDIUM are the original (GPT-2-era) architecture. SMALL_LLAMA and MEDIUM_LLAMA are
Llama-like models of the same widths, depths and heads: grouped-query attention with 4 query
heads per key/value head, rope, RMSNorm, a gated SiLU feed-forward (SwiGLU), no biases, an
untied LM head, and Llama's feed-forward width (2/3 of 4 * d_model, rounded up to a multiple
of 256), which keeps the gated feed-forward's weights close to the dense one's.
SMALL_MIXTRAL is SMALL_LLAMA with Mixtral's MoE: 8 SwiGLU experts, top-2, dropless.
"""

from __future__ import annotations

import numpy as np

from twin_core import LLAMA_OPTIONS

SMALL = dict(vocab_size=1024, max_seq_len=1024, d_model=256, n_layers=4, n_heads=8, d_ff=1024)
MEDIUM = dict(vocab_size=8192, max_seq_len=1024, d_model=1024, n_layers=8, n_heads=16, d_ff=4096)

GQA_GROUP = 4  # query heads per key/value head in the Llama-like models
LLAMA_FAMILY = dict(LLAMA_OPTIONS, tie_embeddings=False)
MIXTRAL_MOE = dict(use_moe=True, num_experts=8, top_k_experts=2, expert_capacity_factor=None)


def llama_d_ff(d_model: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4 * d_model, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * -(-hidden // multiple_of)


def llama_like(config: dict) -> dict:
    """The Llama-like model of `config`'s vocabulary, width, depth and heads."""
    return {
        **config,
        **LLAMA_FAMILY,
        "n_kv_heads": config["n_heads"] // GQA_GROUP,
        "d_ff": llama_d_ff(config["d_model"]),
    }


SMALL_LLAMA = llama_like(SMALL)  # d_ff 768, 2 key/value heads
MEDIUM_LLAMA = llama_like(MEDIUM)  # d_ff 2816, 4 key/value heads
SMALL_MIXTRAL = {**SMALL_LLAMA, **MIXTRAL_MOE}


def twin_lms(config: dict, dtype: str = "float32", seed: int = 0, **extra):
    """(torch TransformerLM in eval mode, Flax TransformerLM, its params): the same weights.

    dtype is "float32" or "bfloat16" (weights, activations and cache in that dtype).
    """
    import torch

    from parity.convert import from_torch
    from torch_block.lm import TransformerLM

    torch.manual_seed(seed)
    torch_lm = TransformerLM(**config, dropout=0.0, **extra).eval()
    if dtype == "bfloat16":
        torch_lm = torch_lm.to(torch.bfloat16)
    flax_lm, params = from_torch(torch_lm)
    return torch_lm, flax_lm, params


def jax_lm(config: dict, seed: int = 0, **extra):
    """(Flax TransformerLM, its params) without importing torch."""
    import jax
    import jax.numpy as jnp

    from jax_block.lm import TransformerLM

    flax_lm = TransformerLM.create(**config, dropout=0.0, **extra)
    params = flax_lm.init(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32))["params"]
    return flax_lm, params


def prompts(batch: int, length: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """Random token ids (batch, length), int64."""
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, length), dtype=np.int64)


def tree_bytes(tree) -> int:
    """Bytes of every array in a pytree of JAX params."""
    import jax

    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))


def kv_width(config: dict) -> int:
    """n_kv_heads * head_dim: the numbers one token's keys (or values) take in one layer."""
    n_kv_heads = config.get("n_kv_heads") or config["n_heads"]
    head_dim = config.get("head_dim") or config["d_model"] // config["n_heads"]
    return n_kv_heads * head_dim


def cache_bytes(config: dict, batch: int, positions: int, itemsize: int) -> int:
    """Bytes of the keys and values of `positions` tokens in every layer (n_kv_heads heads:
    a GQA cache is n_heads / n_kv_heads times smaller than a multi-head one)."""
    return 2 * config["n_layers"] * batch * positions * kv_width(config) * itemsize


def step_weight_bytes(params: dict) -> int:
    """Bytes of the weights that one decode step reads whole: every parameter except the
    embedding tables it only picks rows from (the learned positions; the token embedding when
    the LM head is a separate matrix; a tied embedding is read whole, as the head)."""
    skipped = {"position_embedding"} | ({"token_embedding"} if "lm_head" in params else set())
    return sum(tree_bytes(tree) for name, tree in params.items() if name not in skipped)


def transformers_greedy(model, ids, new_tokens: int):
    """transformers' greedy continuation (B, new_tokens) of a transformers model for unpadded
    prompts ids (B, T) (a torch tensor): exactly new_tokens tokens a row, none stopping early."""
    import torch

    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :]


def compiled_greedy(lm, params, ids, mask, rng, new_tokens: int):
    """jax_block's `generate_tokens` for greedy decoding of `new_tokens` tokens after prompts
    ids (B, P) with `mask` (no eos, pad 0), lowered and compiled ahead of time, not run."""
    from jax_block.generate import generate_tokens

    return generate_tokens.lower(
        lm,
        params,
        ids,
        mask,
        rng,
        max_new_tokens=new_tokens,
        temperature=0.0,
        top_k=None,
        top_p=None,
        eos_token_id=None,
        pad_token_id=0,
    ).compile()
