"""The pre-LN transformer block: attention then a dense or Mixture-of-Experts feed-forward."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention import MultiHeadAttention
from .cache import KVCache
from .feed_forward import FeedForward
from .moe import MixtureOfExperts, check_moe_config


class TransformerBlock(nn.Module):
    """h = x + Dropout(Attention(LN1(x))); y = h + Dropout(FFN(LN2(h)))."""

    d_model: int
    n_heads: int
    d_ff: int
    dropout: float = 0.1
    use_moe: bool = False
    num_experts: int = 8
    top_k_experts: int = 2
    causal: bool = True
    expert_capacity_factor: float | None = 1.25
    router_z_loss_coef: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self) -> None:
        if self.n_heads < 1 or self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), "
                "n_heads >= 1"
            )
        if self.use_moe:
            check_moe_config(self.num_experts, self.top_k_experts, self.expert_capacity_factor)
        super().__post_init__()

    def create_kv_cache(
        self, max_batch_size: int, max_seq_len: int, dtype: jnp.dtype = jnp.float32
    ) -> KVCache:
        """An empty cache sized for this block's heads."""
        return KVCache.create(
            max_batch_size, max_seq_len, self.n_heads, self.d_model // self.n_heads, dtype
        )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        kv_cache: KVCache | None = None,
        cache_position: jax.Array | int | None = None,
        deterministic: bool = True,
        return_aux_loss: bool = False,
    ) -> tuple[jax.Array, KVCache | None, jax.Array | None]:
        """x (B, T, d_model) -> (output (B, T, d_model), the new cache or None, aux or None).

        With a cache, the T tokens are written at `cache_position` (default: the cache's
        position) and attend to everything cached before them; the cache passed in is unchanged.
        """
        if x.ndim != 3 or x.shape[-1] != self.d_model or min(x.shape[:2]) < 1:
            raise ValueError(
                f"x must be (batch >= 1, seq_len >= 1, d_model={self.d_model}), "
                f"got {tuple(x.shape)}"
            )
        x = x.astype(self.dtype)  # the residual stream, like every layer, computes in dtype
        # use_fast_variance=False: the two-pass variance, as torch computes it.
        norm = dict(
            epsilon=1e-5,
            use_fast_variance=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        attn, new_cache = MultiHeadAttention(
            self.d_model, self.n_heads, self.dropout, self.causal, self.dtype, self.param_dtype,
            name="attention",
        )(nn.LayerNorm(name="norm1", **norm)(x), mask, kv_cache, cache_position, deterministic)
        dropout = nn.Dropout(self.dropout, name="dropout")
        h = x + dropout(attn, deterministic=deterministic)
        aux = None
        normed = nn.LayerNorm(name="norm2", **norm)(h)
        if self.use_moe:
            ff, aux = MixtureOfExperts(
                self.d_model,
                self.d_ff,
                self.num_experts,
                self.top_k_experts,
                self.dropout,
                self.expert_capacity_factor,
                self.router_z_loss_coef,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="feed_forward",
            )(normed, deterministic, return_aux_loss)
        else:
            ff = FeedForward(
                self.d_model, self.d_ff, self.dropout, self.dtype, self.param_dtype,
                name="feed_forward",
            )(normed, deterministic)
        y = h + dropout(ff, deterministic=deterministic)
        return y, new_cache, aux
