"""A linear layer's tensors as one value: `F.linear(x, *params)` is the layer's output."""

from __future__ import annotations

import torch
import torch.nn as nn

Linear = tuple[torch.Tensor, torch.Tensor | None]  # (weight (out, in), bias (out,) or None)


def linear_params(layer: nn.Linear) -> Linear:
    """The weight and bias of `layer` (the tensors themselves, not copies)."""
    return layer.weight, layer.bias
