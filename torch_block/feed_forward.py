"""The position-wise feed-forward network: fc1 -> activation [* fc3] -> dropout -> fc2."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .linear import Linear, linear, linear_params

ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class FeedForwardParams(NamedTuple):
    """What `feed_forward` reads of a FeedForward."""

    fc1: Linear  # (d_ff, d_model)
    fc3: Linear | None  # (d_ff, d_model) when gated
    fc2: Linear  # (d_model, d_ff)
    activation: str  # a key of ACTIVATIONS
    swiglu_limit: float | None = None  # GPT-OSS's clamped SwiGLU when set
    swiglu_alpha: float = 1.702


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float, alpha: float):
    """GPT-OSS's gated unit: (clamp(up, -l, l) + 1) * g * sigmoid(alpha * g), g = clamp(gate,
    max=l)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def feed_forward(
    x: torch.Tensor, params: FeedForwardParams, dropout: nn.Dropout | None = None
) -> torch.Tensor:
    """fc2(dropout(act(fc1(x)) [* fc3(x)])): x (..., d_model) -> (..., d_model); with a
    swiglu_limit, fc2(dropout(clamped_swiglu(fc1(x), fc3(x))))."""
    if params.swiglu_limit is not None:
        gate, up = linear(x, *params.fc1), linear(x, *params.fc3)  # (..., d_ff) twice
        h = clamped_swiglu(gate, up, params.swiglu_limit, params.swiglu_alpha)
    else:
        h = ACTIVATIONS[params.activation](linear(x, *params.fc1))  # (..., d_ff)
        if params.fc3 is not None:
            h = h * linear(x, *params.fc3)
    if dropout is not None:
        h = dropout(h)
    return linear(h, *params.fc2)


class FeedForward(nn.Module):
    """fc2(dropout(act(fc1(x)))), or with `gated` fc2(dropout(act(fc1(x)) * fc3(x))) (SwiGLU).

    The default is the original project's: exact GELU, not gated, with biases. With
    `swiglu_limit` (gated) the unit is GPT-OSS's `clamped_swiglu` of fc1 (gate) and fc3 (up).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        dropout: float = 0.1,
        *,
        activation: str = "gelu",
        gated: bool = False,
        bias: bool = True,
        swiglu_limit: float | None = None,
        swiglu_alpha: float = 1.702,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise KeyError(activation)
        if swiglu_limit is not None and not gated:
            raise ValueError("swiglu_limit needs gated=True (the clamped SwiGLU has an up path)")
        self.activation = activation
        self.swiglu_limit = swiglu_limit
        self.swiglu_alpha = swiglu_alpha
        self.fc1 = nn.Linear(d_model, d_ff, bias=bias)
        self.fc3 = nn.Linear(d_model, d_ff, bias=bias) if gated else None
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def params(self) -> FeedForwardParams:
        """The tensors and switches `feed_forward` reads."""
        fc3 = None if self.fc3 is None else linear_params(self.fc3)
        return FeedForwardParams(
            linear_params(self.fc1),
            fc3,
            linear_params(self.fc2),
            self.activation,
            self.swiglu_limit,
            self.swiglu_alpha,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_model) -> (..., d_model)."""
        return feed_forward(x, self.params(), self.dropout)
