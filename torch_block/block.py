"""The pre-LN transformer block: attention then a dense or Mixture-of-Experts feed-forward."""

from __future__ import annotations

import torch
import torch.nn as nn

from .attention import MultiHeadAttention
from .cache import KVCache
from .feed_forward import FeedForward
from .moe import MixtureOfExperts, check_moe_config


class TransformerBlock(nn.Module):
    """h = x + Dropout(Attention(LN1(x))); y = h + Dropout(FFN(LN2(h)))."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.1,
        use_moe: bool = False,
        num_experts: int = 8,
        top_k_experts: int = 2,
        *,
        causal: bool = True,
        expert_capacity_factor: float | None = 1.25,
        router_z_loss_coef: float = 0.0,
    ):
        super().__init__()
        if n_heads < 1 or d_model % n_heads != 0:
            raise ValueError(
                f"d_model ({d_model}) must be divisible by n_heads ({n_heads}), n_heads >= 1"
            )
        if use_moe:
            check_moe_config(num_experts, top_k_experts, expert_capacity_factor)
        self.config = dict(
            d_model=d_model,
            n_heads=n_heads,
            d_ff=d_ff,
            dropout=dropout,
            use_moe=use_moe,
            num_experts=num_experts,
            top_k_experts=top_k_experts,
            causal=causal,
            expert_capacity_factor=expert_capacity_factor,
            router_z_loss_coef=router_z_loss_coef,
        )
        self.d_model = d_model
        self.n_heads = n_heads
        self.use_moe = use_moe
        self.attention = MultiHeadAttention(d_model, n_heads, dropout, causal=causal)
        self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-5)
        if use_moe:
            self.feed_forward = MixtureOfExperts(
                d_model,
                d_ff,
                num_experts,
                top_k_experts,
                dropout,
                expert_capacity_factor,
                router_z_loss_coef=router_z_loss_coef,
            )
        else:
            self.feed_forward = FeedForward(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)

    def create_kv_cache(
        self,
        max_batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> KVCache:
        """An empty cache sized for this block's heads."""
        return KVCache(
            max_batch_size, max_seq_len, self.n_heads, self.d_model // self.n_heads, dtype, device
        )

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        use_cache: bool = False,
        cache_position: int | None = None,
        return_aux_loss: bool = False,
    ) -> tuple[torch.Tensor, KVCache | None, torch.Tensor | None]:
        """x (B, T, d_model) -> (output (B, T, d_model), the updated cache or None, aux or None).

        With `use_cache` and a cache, the T tokens are written at `cache_position` (default:
        the cache's position) and attend to everything cached before them.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model or min(x.shape[:2]) < 1:
            raise ValueError(
                f"x must be (batch >= 1, seq_len >= 1, d_model={self.d_model}), "
                f"got {tuple(x.shape)}"
            )
        cache = kv_cache if use_cache else None
        h = x + self.dropout(self.attention(self.norm1(x), mask, cache, cache_position))
        aux = None
        if self.use_moe:
            ff, aux = self.feed_forward(self.norm2(h), return_aux_loss)
        else:
            ff = self.feed_forward(self.norm2(h))
        y = h + self.dropout(ff)
        return y, cache, aux
