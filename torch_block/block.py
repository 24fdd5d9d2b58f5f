"""The pre-norm transformer block: attention then a dense or Mixture-of-Experts feed-forward."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from twin_core import BlockConfig

from .arguments import config_from_arguments
from .attention import MultiHeadAttention
from .cache import KVCache, LatentCache
from .feed_forward import FeedForward
from .mla import MultiHeadLatentAttention
from .moe import MixtureOfExperts
from .norm import make_norm


class TransformerBlock(nn.Module):
    """h = x + Dropout(Attention(Norm1(x))); y = h + Dropout(FFN(Norm2(h))).

    With `sandwich_norms` (Gemma) the attention output and the FFN output are normed too before
    their residual adds: h = x + Dropout(PostAttentionNorm(Attention(Norm1(x)))), and so on.

    The arguments are the original project's; `**architecture` takes any other field of
    `twin_core.BlockConfig` (the family options: norm, activation, n_kv_heads, rope, ...).
    """

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
        **architecture: Any,
    ):
        config = config_from_arguments(BlockConfig, locals())
        super().__init__()
        self.config = config
        self.d_model = config.d_model
        self.n_heads = config.n_heads
        self.use_moe = config.use_moe
        if config.is_mla:
            self.attention = MultiHeadLatentAttention(config)
        else:
            self.attention = MultiHeadAttention(
                config.d_model,
                config.n_heads,
                config.dropout,
                causal=config.causal,
                **config.attention_options(),
            )
        self.norm1 = make_norm(config.norm, config.d_model, config.norm_eps)
        self.norm2 = make_norm(config.norm, config.d_model, config.norm_eps)
        if config.sandwich_norms:
            self.post_attention_norm = make_norm(config.norm, config.d_model, config.norm_eps)
            self.post_feed_forward_norm = make_norm(config.norm, config.d_model, config.norm_eps)
        ffn = config.feed_forward_options()
        if config.use_moe:
            self.feed_forward = MixtureOfExperts(
                config.d_model,
                config.d_ff,
                config.num_experts,
                config.top_k_experts,
                config.dropout,
                config.expert_capacity_factor,
                router_z_loss_coef=config.router_z_loss_coef,
                **config.moe_options(),
                **ffn,
            )
        else:
            self.feed_forward = FeedForward(config.d_model, config.d_ff, config.dropout, **ffn)
        self.dropout = nn.Dropout(config.dropout)

    @classmethod
    def from_config(cls, config: BlockConfig) -> TransformerBlock:
        """The block that `config` describes."""
        return cls(**config.kwargs())

    def create_kv_cache(
        self,
        max_batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> KVCache | LatentCache:
        """An empty cache sized for this block's key/value heads (MLA: a LatentCache)."""
        c = self.config
        if c.is_mla:
            return LatentCache(
                max_batch_size, max_seq_len, c.kv_lora_rank, c.qk_rope_head_dim, dtype, device
            )
        return KVCache(
            max_batch_size,
            max_seq_len,
            self.config.resolved_n_kv_heads,
            self.config.resolved_head_dim,
            dtype,
            device,
        )

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        use_cache: bool = False,
        cache_position: int | None = None,
        return_aux_loss: bool = False,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache | None, torch.Tensor | None]:
        """x (B, T, d_model) -> (output (B, T, d_model), the updated cache or None, aux or None).

        With `use_cache` and a cache, the T tokens are written at `cache_position` (default:
        the cache's position) and attend to everything cached before them. `positions`
        (B|1, T) are the rope positions (default: the cache position + arange(T)).
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model or min(x.shape[:2]) < 1:
            raise ValueError(
                f"x must be (batch >= 1, seq_len >= 1, d_model={self.d_model}), "
                f"got {tuple(x.shape)}"
            )
        cache = kv_cache if use_cache else None
        attn = self.attention(self.norm1(x), mask, cache, cache_position, positions)
        if self.config.sandwich_norms:
            attn = self.post_attention_norm(attn)
        h = x + self.dropout(attn)
        aux = None
        if self.use_moe:
            ff, aux = self.feed_forward(self.norm2(h), return_aux_loss)
        else:
            ff = self.feed_forward(self.norm2(h))
        if self.config.sandwich_norms:
            ff = self.post_feed_forward_norm(ff)
        y = h + self.dropout(ff)
        return y, cache, aux
