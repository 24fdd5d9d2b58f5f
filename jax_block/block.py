"""The pre-norm transformer block: attention then a dense or Mixture-of-Experts feed-forward."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from twin_core import BlockConfig

from .attention import MultiHeadAttention
from .cache import KVCache, LatentCache
from .configured import ConfiguredModule
from .feed_forward import FeedForward
from .mla import MultiHeadLatentAttention
from .moe import MixtureOfExperts
from .norm import make_norm
from .sharding import ACTIVATION_AXES, constrain, kv_cache_sharding, latent_cache_sharding


class TransformerBlock(ConfiguredModule):
    """h = x + Dropout(Attention(Norm1(x))); y = h + Dropout(FFN(Norm2(h))).

    With `sandwich_norms` (Gemma) the attention output and the FFN output are normed too before
    their residual adds: h = x + Dropout(PostAttentionNorm(Attention(Norm1(x)))), and so on.

    `config` (a `twin_core.BlockConfig`) defines the block; `dtype` is the compute dtype and
    `param_dtype` the parameters'. `TransformerBlock.create(d_model=64, n_heads=4, d_ff=256)`
    builds one from config fields by keyword.
    """

    config_type = BlockConfig
    config: BlockConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def create_kv_cache(
        self,
        max_batch_size: int,
        max_seq_len: int,
        dtype: jnp.dtype = jnp.float32,
        *,
        mesh: Mesh | None = None,
        rules=None,
    ) -> KVCache | LatentCache:
        """An empty cache sized for this block's key/value heads (MLA: a LatentCache); with `mesh`,
        placed on it (batch over data, kv heads over tensor, an MLA latent on no axis:
        `jax_block.sharding.DEFAULT_RULES` or `rules`)."""
        config = self.config
        if config.is_mla:  # on a mesh: batch over data, the latent on no axis
            return LatentCache.create(
                max_batch_size,
                max_seq_len,
                config.kv_lora_rank,
                config.qk_rope_head_dim,
                dtype,
                latent_cache_sharding(max_batch_size, mesh, rules),
            )
        sharding = kv_cache_sharding(config, max_batch_size, max_seq_len, mesh, rules)
        return KVCache.create(
            max_batch_size,
            max_seq_len,
            config.resolved_n_kv_heads,
            config.resolved_head_dim,
            dtype,
            sharding,
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
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None, jax.Array | None]:
        """x (B, T, d_model) -> (output (B, T, d_model), the new cache or None, aux or None).

        With a cache, the T tokens are written at `cache_position` (default: the cache's
        position) and attend to everything cached before them; the cache passed in is unchanged.
        `positions` (B|1, T) are the rope positions (default: cache position + arange(T)).
        """
        config = self.config
        if x.ndim != 3 or x.shape[-1] != config.d_model or min(x.shape[:2]) < 1:
            raise ValueError(
                f"x must be (batch >= 1, seq_len >= 1, d_model={config.d_model}), "
                f"got {tuple(x.shape)}"
            )
        x = constrain(x.astype(self.dtype), ACTIVATION_AXES)  # the residual stream, in dtype
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if config.is_mla:
            attention = MultiHeadLatentAttention(config, name="attention", **dtypes)
        else:
            attention = MultiHeadAttention(
                config.d_model,
                config.n_heads,
                config.dropout,
                config.causal,
                **config.attention_options(),
                name="attention",
                **dtypes,
            )
        norm1 = make_norm(config.norm, config.norm_eps, name="norm1", **dtypes)
        attn, new_cache = attention(
            norm1(x), mask, kv_cache, cache_position, deterministic, positions
        )
        if config.sandwich_norms:
            attn = make_norm(config.norm, config.norm_eps, name="post_attention_norm", **dtypes)(
                attn
            )
        dropout = nn.Dropout(config.dropout, name="dropout")
        h = x + dropout(attn, deterministic=deterministic)
        aux = None
        normed = make_norm(config.norm, config.norm_eps, name="norm2", **dtypes)(h)
        ffn = config.feed_forward_options()
        if config.use_moe:
            ff, aux = MixtureOfExperts(
                config.d_model,
                config.d_ff,
                config.num_experts,
                config.top_k_experts,
                config.dropout,
                config.expert_capacity_factor,
                config.router_z_loss_coef,
                **config.moe_options(),
                name="feed_forward",
                **ffn,
                **dtypes,
            )(normed, deterministic, return_aux_loss)
        else:
            ff = FeedForward(
                config.d_model, config.d_ff, config.dropout, name="feed_forward", **ffn, **dtypes
            )(normed, deterministic)
        if config.sandwich_norms:
            ff = make_norm(config.norm, config.norm_eps, name="post_feed_forward_norm", **dtypes)(
                ff
            )
        y = constrain(h + dropout(ff, deterministic=deterministic), ACTIVATION_AXES)
        return y, new_cache, aux
