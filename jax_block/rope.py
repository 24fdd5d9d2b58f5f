"""Rotary position embedding: rotate q and k per head by their tokens' absolute positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rotate_half(x: jax.Array) -> jax.Array:
    """concat(-x[half:], x[:half]) over the last axis."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x (B, T, H, D) rotated by angle position * inv_freq[i]; positions (B|1, T).

    Angles, cos and sin are float32; the result has x's dtype.
    """
    angles = positions[:, :, None, None].astype(jnp.float32) * inv_freq  # (B|1, T, 1, D/2)
    angles = jnp.concatenate([angles, angles], axis=-1)  # (B|1, T, 1, D)
    x32 = x.astype(jnp.float32)
    return (x32 * jnp.cos(angles) + rotate_half(x32) * jnp.sin(angles)).astype(x.dtype)
