"""The models the benchmarks run: the same weights in torch_block and jax_block."""

from __future__ import annotations

import numpy as np

SMALL = dict(vocab_size=1024, max_seq_len=1024, d_model=256, n_layers=4, n_heads=8, d_ff=1024)
MEDIUM = dict(vocab_size=8192, max_seq_len=1024, d_model=1024, n_layers=8, n_heads=16, d_ff=4096)


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

    flax_lm = TransformerLM(**config, dropout=0.0, **extra)
    params = flax_lm.init(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32))["params"]
    return flax_lm, params


def prompts(batch: int, length: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """Random token ids (batch, length), int64."""
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, length), dtype=np.int64)


def tree_bytes(tree) -> int:
    """Bytes of every array in a pytree of JAX params."""
    import jax

    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))


def cache_bytes(config: dict, batch: int, positions: int, itemsize: int) -> int:
    """Bytes of the keys and values of `positions` tokens in every layer."""
    return 2 * config["n_layers"] * batch * positions * config["d_model"] * itemsize
