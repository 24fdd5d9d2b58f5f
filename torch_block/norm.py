"""The norms a block may use: LayerNorm (weight and bias), RMSNorm and Gemma's RMSNorm (weight
only)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class NormParams(NamedTuple):
    """What `norm` reads of a norm module."""

    weight: torch.Tensor  # (dim,)
    bias: torch.Tensor | None  # (dim,) for LayerNorm, None for the RMSNorms
    kind: str  # "layernorm", "rmsnorm" or "gemma_rmsnorm"
    eps: float


def norm(x: torch.Tensor, params: NormParams) -> torch.Tensor:
    """x (..., dim) normalised over its last axis -> (..., dim) in x's dtype.

    LayerNorm is F.layer_norm; RMSNorm is x * rsqrt(mean(x^2) + eps) * weight with the mean
    taken in float32 (as Llama computes it); Gemma's RMSNorm multiplies by (1 + weight) in
    float32 and rounds once at the end.
    """
    weight, bias, kind, eps = params
    if kind == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + eps)
    if kind == "gemma_rmsnorm":
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last `dim` features, computed by `norm`."""

    def params(self) -> NormParams:
        """The tensors and switches `norm` reads."""
        return NormParams(self.weight, self.bias, "layernorm", self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim)."""
        return norm(x, self.params())


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, the mean taken in float32 (see `norm`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def params(self) -> NormParams:
        """The tensors and switches `norm` reads."""
        return NormParams(self.weight, None, "rmsnorm", self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim) in x's dtype."""
        return norm(x, self.params())


class GemmaRMSNorm(RMSNorm):
    """x * rsqrt(mean(x^2) + eps) * (1 + weight) in float32, weight starting at 0 (see `norm`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def params(self) -> NormParams:
        """The tensors and switches `norm` reads."""
        return NormParams(self.weight, None, "gemma_rmsnorm", self.eps)


def make_norm(kind: str, dim: int, eps: float) -> LayerNorm | RMSNorm:
    """The norm of `kind` ("layernorm", "rmsnorm" or "gemma_rmsnorm") over the last `dim`
    features."""
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps)
    return GemmaRMSNorm(dim, eps) if kind == "gemma_rmsnorm" else RMSNorm(dim, eps)
