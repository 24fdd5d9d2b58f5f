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
                n_kv_heads=config.n_kv_heads,
                head_dim=config.head_dim,
                qkv_bias=config.qkv_bias,
                out_bias=config.out_bias,
                positions=config.positions,
                rope_theta=config.rope_theta,
                rope_scaling=config.rope_scaling,
                partial_rotary_factor=config.partial_rotary_factor,
                sliding_window=config.sliding_window,
                query_pre_attn_scalar=config.query_pre_attn_scalar,
                attn_logit_softcap=config.attn_logit_softcap,
                qk_norm=config.qk_norm,
                norm=config.norm,
                norm_eps=config.norm_eps,
                attention_sinks=config.attention_sinks,
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
        ffn = dict(activation=config.activation, gated=config.gated_ffn, bias=config.ffn_bias)
        ffn.update(swiglu_limit=config.swiglu_limit, swiglu_alpha=config.swiglu_alpha)
        if config.use_moe:
            ff, aux = MixtureOfExperts(
                config.d_model,
                config.d_ff,
                config.num_experts,
                config.top_k_experts,
                config.dropout,
                config.expert_capacity_factor,
                config.router_z_loss_coef,
                norm_topk_prob=config.norm_topk_prob,
                shared_expert_d_ff=config.shared_expert_d_ff,
                shared_expert_gate=config.shared_expert_gate,
                router_bias=config.router_bias,
                router=config.router,
                n_group=config.n_group,
                topk_group=config.topk_group,
                routed_scaling_factor=config.routed_scaling_factor,
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
