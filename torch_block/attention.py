"""Multi-head self-attention with an optional KV cache."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import KVCache


def check_mask(mask: torch.Tensor, shape: tuple[int, int, int, int]) -> None:
    """Raise ValueError unless `mask` broadcasts to `shape` = (B, H, T, S)."""
    if mask.dim() > 4:
        raise ValueError(f"mask must have at most 4 dimensions, got shape {tuple(mask.shape)}")
    try:
        broadcast = torch.broadcast_shapes(tuple(mask.shape), shape)
    except RuntimeError:
        broadcast = None
    if broadcast != shape:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to (batch, heads, query_len, "
            f"key_len) = {shape}"
        )


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over n_heads heads; causal unless `causal=False`."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.1, *, causal: bool = True):
        super().__init__()
        if n_heads < 1 or d_model % n_heads != 0:
            raise ValueError(
                f"d_model ({d_model}) must be divisible by n_heads ({n_heads}), n_heads >= 1"
            )
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.causal = causal
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_position: int | None = None,
    ) -> torch.Tensor:
        """Attend x (B, T, d_model) to itself and, with a cache, to the tokens cached before it."""
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        start = 0
        if kv_cache is not None:
            start = kv_cache.cache_position if cache_position is None else cache_position
            kv_cache.check_write(B, H, D, start, T)
        S = start + T
        if mask is not None:
            check_mask(mask, (B, H, T, S))

        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        v = self.v_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)

        if kv_cache is not None:
            k, v = kv_cache.update(k, v, start)  # (B, H, S, D)
            k, v = k.to(q.dtype), v.to(q.dtype)

        allowed = None  # every key: so too for causal one-token steps, whose keys all precede
        if self.causal and T > 1:
            query_pos = start + torch.arange(T, device=x.device)
            allowed = torch.arange(S, device=x.device)[None, :] <= query_pos[:, None]  # (T, S)
        if mask is not None:
            allowed = mask.to(torch.bool) if allowed is None else allowed & mask.to(torch.bool)

        if allowed is None and not self.training and q.dtype == torch.float32:
            # every key allowed and no dropout (a decode step): one fused kernel, same result
            out = F.scaled_dot_product_attention(q, k, v, scale=D**-0.5)  # (B, H, T, D)
        else:
            scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * D**-0.5  # (B, H, T, S)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
            probs = F.softmax(scores, dim=-1)
            if allowed is not None:
                probs = probs * allowed  # a row with no allowed key is all zeros
            probs = self.dropout(probs.to(v.dtype))
            out = torch.matmul(probs, v)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, H * D)  # (B, T, d_model)
        return self.out_proj(out)
