"""The position-wise feed-forward network: fc1 -> activation [* fc3] -> dropout -> fc2."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class FeedForward(nn.Module):
    """fc2(dropout(act(fc1(x)))), or with `gated` fc2(dropout(act(fc1(x)) * fc3(x))) (SwiGLU).

    The default is the original project's: exact GELU, not gated, with biases.
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
    ):
        super().__init__()
        self.activation = ACTIVATIONS[activation]
        self.fc1 = nn.Linear(d_model, d_ff, bias=bias)
        self.fc3 = nn.Linear(d_model, d_ff, bias=bias) if gated else None
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_model) -> (..., d_model)."""
        h = self.activation(self.fc1(x))  # (..., d_ff)
        if self.fc3 is not None:
            h = h * self.fc3(x)
        return self.fc2(self.dropout(h))
