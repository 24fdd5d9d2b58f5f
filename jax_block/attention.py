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

    With a cache the keys are all max_seq_len cache slots (static shapes), of which those
    written so far, [0, position + T), may be attended; `mask` then covers max_seq_len keys.
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
        start = jnp.zeros((), jnp.int32)
        S = T
        if kv_cache is not None:
            start = kv_cache.position if cache_position is None else cache_position
            kv_cache.check_write(B, H, D, start, T)
            start = jnp.asarray(start, jnp.int32)
            S = kv_cache.max_seq_len
        if mask is not None:
            check_mask(mask, (B, H, T, S))

        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = nn.Dense(self.d_model, name="q_proj", **dense)(x).reshape(B, T, H, D)
        k = nn.Dense(self.d_model, name="k_proj", **dense)(x).reshape(B, T, H, D)
        v = nn.Dense(self.d_model, name="v_proj", **dense)(x).reshape(B, T, H, D)
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, H, T, D)

        new_cache = None
        if kv_cache is not None:
            new_cache = kv_cache.write(k, v, start)
            k = new_cache.k_cache[:B].astype(self.dtype)  # (B, H, S, D)
            v = new_cache.v_cache[:B].astype(self.dtype)  # (B, H, S, D)

        query_pos = start + jnp.arange(T)  # (T,)
        key_pos = jnp.arange(S)  # (S,)
        allowed = key_pos[None, :] < start + T  # (T, S): only written slots
        if self.causal:
            allowed = key_pos[None, :] <= query_pos[:, None]
        if mask is not None:
            allowed = allowed & mask.astype(bool)  # (B, H, T, S) after broadcasting

        scores = jnp.einsum(
            "bhtd,bhsd->bhts", q.astype(jnp.float32), k.astype(jnp.float32)
        ) * D**-0.5  # (B, H, T, S)
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1) * allowed  # a row with no allowed key is zeros
        probs = nn.Dropout(self.dropout)(probs.astype(self.dtype), deterministic=deterministic)
        out = jnp.einsum("bhts,bhsd->bthd", probs, v).reshape(B, T, H * D)  # (B, T, d_model)
        return nn.Dense(self.d_model, name="out_proj", **dense)(out), new_cache
