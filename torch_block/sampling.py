"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch
import torch.nn.functional as F


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError unless temperature >= 0, top_k is None or >= 1, top_p None or in (0, 1]."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, Real)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1
    ):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, Real) or not 0 < top_p <= 1
    ):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """logits (B, V) with every token outside the top k, then outside the nucleus, set to -inf.

    The nucleus is the smallest set of most probable tokens whose probability sums to >= top_p;
    it always holds at least the most probable token. top_k >= V keeps every token.
    """
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, -math.inf)
    if top_p is not None:
        probs = F.softmax(logits, dim=-1)  # (B, V)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)  # (B, V)
        mass_before = torch.cumsum(sorted_probs, dim=-1)[:, :-1]  # (B, V-1)
        mass_before = torch.cat([torch.zeros_like(sorted_probs[:, :1]), mass_before], dim=-1)
        drop = (mass_before >= top_p).gather(-1, torch.argsort(order, dim=-1))  # (B, V)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of logits (B, V): argmax at temperature 0, else a sample from
    softmax(logits / temperature) after top-k and then top-p filtering. Returns (B,) int64."""
    logits = logits.float()  # (B, V)
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
