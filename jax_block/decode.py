"""A jitted cached decoding step that compiles once for every position."""

from __future__ import annotations

from functools import partial

import jax
from jax.sharding import Mesh

from .block import TransformerBlock
from .cache import IN_PLACE_CACHE_OPTIONS, KVCache
from .sharding import check_batch, check_mesh, check_model, use_mesh


@partial(
    jax.jit,
    static_argnames=("block", "mesh", "rules"),
    donate_argnames=("kv_cache",),
    compiler_options=IN_PLACE_CACHE_OPTIONS,
)
def decode_step(
    block: TransformerBlock,
    params: dict,
    x: jax.Array,
    kv_cache: KVCache,
    mask: jax.Array | None = None,
    mesh: Mesh | None = None,
    rules: tuple | None = None,
) -> tuple[jax.Array, KVCache]:
    """Apply `block` (eval mode) to x (B, T, d_model) at the cache's position.

    The position is traced, so one compilation serves every step of a given (B, T). The cache
    is donated: its buffers are reused for the returned cache and the argument is deleted.
    A write past max_seq_len is dropped and shows as `new_cache.overflowed`.

    With `mesh` (static; `rules` a hashable tuple of pairs, default
    `jax_block.sharding.DEFAULT_RULES`) the step runs sharded: params from
    `jax_block.shard_params`, the cache from `block.create_kv_cache(..., mesh=mesh)`.
    """
    if mesh is not None:
        mesh = check_mesh(mesh)
        check_model(block.config, mesh, rules)
        check_batch(x.shape[0], mesh, rules)
    with use_mesh(mesh, rules):
        y, new_cache, _ = block.apply({"params": params}, x, mask, kv_cache)
    return y, new_cache
