"""A linear layer's tensors as one value, and the product every layer computes with them:
`linear(x, *params)` is the layer's output, `F.linear`'s."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

Linear = tuple[torch.Tensor, torch.Tensor | None]  # (weight (out, in), bias (out,) or None)

# Weights of more elements than this (16 MiB in float32) take oneDNN's product in inference:
# the sizes where a step is bound by reading the weights; smaller ones keep F.linear's
# arithmetic, the original project's, bit for bit.
LARGE_WEIGHT = 1 << 22
# oneDNN's linear kernel (the one torch.compile's CPU backend calls), where this build has it
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise"
)


def linear_params(layer: nn.Linear) -> Linear:
    """The weight and bias of `layer` (the tensors themselves, not copies)."""
    return layer.weight, layer.bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: x (..., in), weight (out, in) -> (..., out).

    A float32 weight of more than LARGE_WEIGHT elements on CPU, without autograd and outside
    torch.compile, goes through oneDNN's kernel, which reads it at 27-31 GB/s at batch 1 on the
    benchmark machine where F.linear's MKL product reads 18 (docs/design.md 'Real model
    sizes'); the result then differs from F.linear's by float summation order only.
    """
    if (
        ONEDNN_LINEAR
        and weight.numel() > LARGE_WEIGHT
        and weight.dtype == x.dtype == torch.float32
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
