"""Rotary position embedding: rotate q and k per head by their tokens' absolute positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from twin_core import RopeTables


def rotate_half(x: jax.Array) -> jax.Array:
    """concat(-x[half:], x[:half]) over the last axis."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def frequencies(positions: jax.Array, rope: RopeTables) -> jax.Array:
    """The frequencies that rotate tokens at positions (B|1, T): (n,), or (B|1, 1, n) by each
    row's sequence length max(position) + 1 (dynamic NTK, longrope: `RopeTables.inv_freq_at`)."""
    if rope.original_length is None:
        return rope.inv_freq
    seq_len = positions.max(axis=-1, keepdims=True)[..., None] + 1  # (B|1, 1, 1)
    return rope.inv_freq_at(seq_len.astype(jnp.float32), jnp.where)  # (B|1, 1, n)


def apply_rope(x: jax.Array, positions: jax.Array, rope: RopeTables) -> jax.Array:
    """x (B, T, H, D) with its first rope.rotary_dims dims rotated by angle position * inv_freq[i];
    positions (B|1, T).

    Angles, cos and sin are float32; the result has x's dtype.
    """
    angles = positions[..., None].astype(jnp.float32) * frequencies(positions, rope)  # (B|1, T, n)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None]  # (B|1, T, 1, R)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if rope.attention_factor != 1.0:
        cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
    R = rope.rotary_dims
    x32 = x.astype(jnp.float32)
    rotated = x32[..., :R] * cos + rotate_half(x32[..., :R]) * sin
    if R < x.shape[-1]:
        rotated = jnp.concatenate([rotated, x32[..., R:]], axis=-1)
    return rotated.astype(x.dtype)
