"""Rotary position embedding: rotate q and k per head by their tokens' absolute positions."""

from __future__ import annotations

import torch

from twin_core import RopeTables


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """concat(-x[half:], x[:half]) over the last axis."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def frequencies(positions: torch.Tensor, rope: RopeTables) -> torch.Tensor:
    """The frequencies that rotate tokens at positions (B|1, T): (n,), or (B|1, 1, n) by each
    row's sequence length max(position) + 1 (dynamic NTK, longrope: `RopeTables.inv_freq_at`)."""
    if rope.original_length is None:
        return rope.inv_freq
    seq_len = positions.amax(dim=-1, keepdim=True)[..., None] + 1  # (B|1, 1, 1)
    return rope.inv_freq_at(seq_len.float(), torch.where)  # (B|1, 1, n)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, rope: RopeTables) -> torch.Tensor:
    """x (B, H, T, D) with its first rope.rotary_dims dims rotated by angle position * inv_freq[i];
    positions (B|1, T).

    Angles, cos and sin are float32; the result has x's dtype.
    """
    angles = positions[..., None].float() * frequencies(positions, rope)  # (B|1, T, n)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B|1, 1, T, R)
    cos, sin = angles.cos(), angles.sin()
    if rope.attention_factor != 1.0:
        cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
    R = rope.rotary_dims
    x32 = x.float()
    rotated = x32[..., :R] * cos + rotate_half(x32[..., :R]) * sin
    if R < x.shape[-1]:
        rotated = torch.cat([rotated, x32[..., R:]], dim=-1)
    return rotated.to(x.dtype)
