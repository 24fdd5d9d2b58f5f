"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
