"""A jitted cached decoding step that compiles once for every position."""

from __future__ import annotations

from functools import partial

import jax

from .block import TransformerBlock
from .cache import IN_PLACE_CACHE_OPTIONS, KVCache


@partial(
    jax.jit,
    static_argnames=("block",),
    donate_argnames=("kv_cache",),
    compiler_options=IN_PLACE_CACHE_OPTIONS,
)
def decode_step(
    block: TransformerBlock,
    params: dict,
    x: jax.Array,
    kv_cache: KVCache,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """Apply `block` (eval mode) to x (B, T, d_model) at the cache's position.

    The position is traced, so one compilation serves every step of a given (B, T). The cache
    is donated: its buffers are reused for the returned cache and the argument is deleted.
    A write past max_seq_len is dropped and shows as `new_cache.overflowed`.
    """
    y, new_cache, _ = block.apply({"params": params}, x, mask, kv_cache)
    return y, new_cache
