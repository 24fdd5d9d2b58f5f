"""Rotary position embedding: rotate q and k per head by their tokens' absolute positions."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """concat(-x[half:], x[:half]) over the last axis."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by angle position * inv_freq[i]; positions (B|1, T).

    Angles, cos and sin are float32; the result has x's dtype.
    """
    angles = positions[:, None, :, None].float() * inv_freq  # (B|1, 1, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B|1, 1, T, D)
    x32 = x.float()
    return (x32 * angles.cos() + rotate_half(x32) * angles.sin()).to(x.dtype)
