"""Multi-head self-attention with an optional KV cache, grouped key/value heads and rope."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from twin_core import RopeScaling, inv_frequencies

from .cache import KVCache
from .rope import apply_rope


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


def is_static_zero(position) -> bool:
    """Whether a cache position is known while tracing to be 0 (a Python or NumPy int)."""
    return not isinstance(position, jax.Array) and int(position) == 0


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over n_heads query heads; causal unless `causal=False`.

    Query head h reads key/value head h // (n_heads // n_kv_heads) (GQA; MQA at 1). With
    `positions="rope"` q and k are rotated at their tokens' positions before the cache write.
    With `sliding_window` W a query at p sees keys k with p - W < k <= p.

    With a cache the T new keys are written first and the call attends to the cache's
    max_seq_len slots as they hold after the write (static shapes; `mask` covers those slots).
    A position known while tracing to be 0 (a Python or NumPy int) reads no cache slot: the
    keys are the T new ones, rounded to the cache's dtype as the cache holds them.
    """

    d_model: int
    n_heads: int
    dropout: float = 0.1
    causal: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    n_kv_heads: int | None = None
    head_dim: int | None = None
    qkv_bias: bool = True
    out_bias: bool = True
    positions: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        kv_cache: KVCache | None = None,
        cache_position: jax.Array | int | None = None,
        deterministic: bool = True,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Attend x (B, T, d_model) to itself and to the cache; returns (out, new cache).

        `positions` (B|1, T) are the rope positions (default: cache position + arange(T)).
        """
        if self.n_heads < 1 or (self.head_dim is None and self.d_model % self.n_heads != 0):
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), "
                "n_heads >= 1"
            )
        B, T, _ = x.shape
        H = self.n_heads
        KV = H if self.n_kv_heads is None else self.n_kv_heads
        D = self.d_model // H if self.head_dim is None else self.head_dim
        G = H // KV
        start = 0
        S = T
        if kv_cache is not None:
            start = kv_cache.position if cache_position is None else cache_position
            S = kv_cache.max_seq_len
        if mask is not None:
            check_mask(mask, (B, H, T, S))

        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = nn.Dense(H * D, use_bias=self.qkv_bias, name="q_proj", **dense)(x)
        k = nn.Dense(KV * D, use_bias=self.qkv_bias, name="k_proj", **dense)(x)
        v = nn.Dense(KV * D, use_bias=self.qkv_bias, name="v_proj", **dense)(x)
        q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, KV, D), v.reshape(B, T, KV, D)
        if self.positions == "rope":
            if positions is None:
                positions = start + jnp.arange(T)[None, :]  # (1, T)
            inv_freq = inv_frequencies(D, self.rope_theta, self.rope_scaling)  # (D/2,)
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, KV, T, D)

        query_pos = start + jnp.arange(T)  # (T,)
        key_pos = jnp.arange(T)  # slots of the keys attended to
        keys, values, new_cache = k, v, None
        if kv_cache is not None:
            new_cache = kv_cache.write(k, v, start)  # checks the write
            if is_static_zero(start):
                keys, values = k.astype(kv_cache.k_cache.dtype), v.astype(kv_cache.v_cache.dtype)
                if mask is not None and mask.ndim and mask.shape[-1] > 1:
                    mask = mask[..., :T]
            else:
                keys, values = new_cache.k_cache[:B], new_cache.v_cache[:B]  # (B, KV, S, D)
                key_pos = jnp.arange(S)

        allowed = jnp.ones((T, key_pos.size), bool)  # (T, S'): query t may see key slot s
        if self.causal:
            allowed = allowed & (key_pos[None, :] <= query_pos[:, None])
        if self.sliding_window is not None:
            allowed = allowed & (key_pos[None, :] > query_pos[:, None] - self.sliding_window)
        if kv_cache is not None:  # slots this call or earlier ones wrote
            allowed = allowed & (key_pos[None, :] < start + T) & (start >= 0)
        if mask is not None:
            allowed = allowed & mask.astype(bool)  # (B, H, T, S') after broadcasting

        grouped_q = q.reshape(B, T, KV, G, D).astype(jnp.float32)  # query head h = kv * G + g
        scores = jnp.einsum("btkgd,bksd->bkgts", grouped_q, keys.astype(jnp.float32))
        scores = scores.reshape(B, H, T, key_pos.size) * D**-0.5  # (B, H, T, S')
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1) * allowed  # a row with no allowed key is zeros
        probs = nn.Dropout(self.dropout)(probs.astype(self.dtype), deterministic=deterministic)
        probs = probs.reshape(B, KV, G, T, key_pos.size)
        out = jnp.einsum("bkgts,bksd->btkgd", probs, values.astype(self.dtype))
        out = out.reshape(B, T, H * D)  # (B, T, H * D)
        return nn.Dense(self.d_model, use_bias=self.out_bias, name="out_proj", **dense)(
            out
        ), new_cache
