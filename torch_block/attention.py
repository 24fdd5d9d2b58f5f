"""Multi-head self-attention with an optional KV cache, grouped key/value heads and rope."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from twin_core import RopeScaling, inv_frequencies

from .cache import KVCache
from .rope import apply_rope


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
    """Scaled dot-product attention over n_heads query heads; causal unless `causal=False`.

    Query head h reads key/value head h // (n_heads // n_kv_heads) (GQA; MQA at 1). With
    `positions="rope"` q and k are rotated at their tokens' positions before the cache write.
    With `sliding_window` W a query at p sees keys k with p - W < k <= p.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.1,
        *,
        causal: bool = True,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        positions: str = "learned",
        rope_theta: float = 10000.0,
        rope_scaling: RopeScaling | None = None,
        sliding_window: int | None = None,
    ):
        super().__init__()
        if n_heads < 1 or (head_dim is None and d_model % n_heads != 0):
            raise ValueError(
                f"d_model ({d_model}) must be divisible by n_heads ({n_heads}), n_heads >= 1"
            )
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.head_dim = d_model // n_heads if head_dim is None else head_dim
        self.causal = causal
        self.sliding_window = sliding_window
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        self.q_proj = nn.Linear(d_model, H * D, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, KV * D, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, KV * D, bias=qkv_bias)
        self.out_proj = nn.Linear(H * D, d_model, bias=out_bias)
        self.dropout = nn.Dropout(dropout)
        self.rope = positions == "rope"
        if self.rope:
            inv_freq = torch.from_numpy(inv_frequencies(D, rope_theta, rope_scaling))
            self.register_buffer("inv_freq", inv_freq, persistent=False)  # (D/2,)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_position: int | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend x (B, T, d_model) to itself and, with a cache, to the tokens cached before it.

        `positions` (B|1, T) are the rope positions (default: cache position + arange(T)).
        """
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        start = 0
        if kv_cache is not None:
            start = kv_cache.cache_position if cache_position is None else cache_position
            kv_cache.check_write(B, KV, D, start, T)
        S = start + T
        if mask is not None:
            check_mask(mask, (B, H, T, S))

        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, KV, D).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, KV, D).transpose(1, 2)  # (B, KV, T, D)
        if self.rope:
            if positions is None:
                positions = start + torch.arange(T, device=x.device)[None, :]  # (1, T)
            q = apply_rope(q, positions, self.inv_freq)
            k = apply_rope(k, positions, self.inv_freq)

        if kv_cache is not None:
            # attend to what the cache holds after the write: new keys rounded to its dtype
            k, v = kv_cache.write(k, v, start)  # (B, KV, S, D)
            k, v = k.to(q.dtype), v.to(q.dtype)

        allowed = None  # every key: so too for causal one-token steps, whose keys all precede
        if (self.causal and T > 1) or self.sliding_window is not None:
            query_pos = start + torch.arange(T, device=x.device)[:, None]  # (T, 1)
            key_pos = torch.arange(S, device=x.device)[None, :]  # (1, S)
            allowed = key_pos <= query_pos if self.causal else torch.ones(T, S, dtype=torch.bool)
            if self.sliding_window is not None:
                allowed = allowed & (key_pos > query_pos - self.sliding_window)  # (T, S)
        if mask is not None:
            allowed = mask.to(torch.bool) if allowed is None else allowed & mask.to(torch.bool)

        if allowed is None and not self.training and q.dtype == torch.float32:
            # every key allowed and no dropout (a decode step): one fused kernel, same result
            out = F.scaled_dot_product_attention(q, k, v, scale=D**-0.5, enable_gqa=KV != H)
        else:
            G = H // KV
            grouped_q = q.float().reshape(B, KV, G * T, D)  # query head h = kv * G + g
            scores = torch.matmul(grouped_q, k.float().transpose(-2, -1)) * D**-0.5
            scores = scores.view(B, H, T, S)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
            probs = F.softmax(scores, dim=-1)  # (B, H, T, S)
            if allowed is not None:
                probs = probs * allowed  # a row with no allowed key is all zeros
            probs = self.dropout(probs.to(v.dtype))
            out = torch.matmul(probs.view(B, KV, G * T, S), v).view(B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H * D)
        return self.out_proj(out)
