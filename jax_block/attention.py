"""Multi-head self-attention with an optional KV cache."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .cache import KVCache


def check_mask(mask: jax.Array, shape: tuple[int, int, int, int]) -> None:
    """Raise ValueError unless `mask` broadcasts to `shape` = (B, H, T, S)."""
    if mask.ndim > 4:
        raise ValueError(f"mask must have at most 4 dimensions, got shape {tuple(mask.shape)}")
    try:
        broadcast = np.broadcast_shapes(tuple(mask.shape), shape)
    except ValueError:
        broadcast = None
    if broadcast != shape:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to (batch, heads, query_len, "
            f"key_len) = {shape}"
        )


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over n_heads heads; causal unless `causal=False`.

    With a cache the keys are the max_seq_len cache slots (static shapes), of which those
    written before this call, [0, position), may be attended, then the T new tokens; `mask`
    covers the max_seq_len slots, the new tokens' keys at their slots [position, position + T).
    A position known while tracing to be 0 (a Python or NumPy int) reads no cache slot.
    """

    d_model: int
    n_heads: int
    dropout: float = 0.1
    causal: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        kv_cache: KVCache | None = None,
        cache_position: jax.Array | int | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, KVCache | None]:
        """Attend x (B, T, d_model) to itself and to the cache; returns (out, new cache)."""
        if self.n_heads < 1 or self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), "
                "n_heads >= 1"
            )
        B, T, _ = x.shape
        H, D = self.n_heads, self.d_model // self.n_heads
        start = 0
        S = T
        if kv_cache is not None:
            start = kv_cache.position if cache_position is None else cache_position
            kv_cache.check_write(B, H, D, start, T)
            S = kv_cache.max_seq_len
        if mask is not None:
            check_mask(mask, (B, H, T, S))

        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = nn.Dense(self.d_model, name="q_proj", **dense)(x).reshape(B, T, H, D)
        k = nn.Dense(self.d_model, name="k_proj", **dense)(x).reshape(B, T, H, D)
        v = nn.Dense(self.d_model, name="v_proj", **dense)(x).reshape(B, T, H, D)
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, H, T, D)

        # Keys: the cache's slots [0, start) as they were before this write, then the T new
        # keys. The written cache is only returned, so XLA updates it in place with no copy.
        # A start known to be 0 while tracing (a Python or NumPy 0) has no cached keys to read.
        query_pos = start + jnp.arange(T)  # (T,): also the slots of the new keys
        q = q.astype(jnp.float32)
        scores = jnp.einsum("bhtd,bhsd->bhts", q, k.astype(jnp.float32))  # (B, H, T, T)
        allowed = jnp.ones((T, T), bool)  # (T, T): query t may see new key j
        if self.causal:
            allowed = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
        new_cache, read_cache = None, False
        if kv_cache is not None:
            new_cache = kv_cache.write(k, v, start)
            allowed = allowed & ((start >= 0) & (query_pos < S))  # new keys the write kept
            read_cache = isinstance(start, jax.core.Tracer) or int(start) != 0
        if read_cache:
            cached_k = kv_cache.k_cache[:B].astype(jnp.float32)  # (B, H, S, D)
            cached_scores = jnp.einsum("bhtd,bhsd->bhts", q, cached_k)  # (B, H, T, S)
            scores = jnp.concatenate([cached_scores, scores], axis=-1)  # (B, H, T, S + T)
            cached = jnp.broadcast_to(jnp.arange(S) < start, (T, S))  # (T, S)
            allowed = jnp.concatenate([cached, allowed], axis=-1)  # (T, S + T)
        if mask is not None:
            mask = jnp.atleast_1d(mask.astype(bool))
            if kv_cache is not None:  # the mask covers the S slots; new key j is at slot start + j
                new_keys = jnp.take(mask, jnp.clip(query_pos, 0, mask.shape[-1] - 1), axis=-1)
                mask = jnp.concatenate([mask, new_keys], axis=-1) if read_cache else new_keys
            allowed = allowed & mask  # (B, H, T, [S +] T) after broadcasting

        scores = scores * D**-0.5
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1) * allowed  # a row with no allowed key is zeros
        probs = nn.Dropout(self.dropout)(probs.astype(self.dtype), deterministic=deterministic)
        out = jnp.einsum("bhts,bhsd->bhtd", probs[..., -T:], v)  # (B, H, T, D)
        if read_cache:
            cached_v = kv_cache.v_cache[:B].astype(self.dtype)  # (B, H, S, D)
            out = out + jnp.einsum("bhts,bhsd->bhtd", probs[..., :S], cached_v)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, H * D)  # (B, T, d_model)
        return nn.Dense(self.d_model, name="out_proj", **dense)(out), new_cache
