"""The two norms a block may use: LayerNorm (weight and bias) and RMSNorm (weight only)."""

from __future__ import annotations

import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, the mean taken in float32 (as Llama computes it)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim) in x's dtype."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """The norm of `kind` ("layernorm" or "rmsnorm") over the last `dim` features."""
    return nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else RMSNorm(dim, eps)
