"""The pre-norm transformer block: attention then a dense or Mixture-of-Experts feed-forward."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from twin_core import BlockConfig, RopeScaling

from .attention import MultiHeadAttention
from .cache import KVCache
from .feed_forward import FeedForward
from .moe import MixtureOfExperts
from .norm import make_norm
from .sharding import ACTIVATION_AXES, AxisNamedModule, constrain, kv_cache_sharding


def config_of(module: nn.Module, config_cls: type) -> Any:
    """The `config_cls` dataclass (BlockConfig or LMConfig) of a module's same-named fields."""
    return config_cls(**{f.name: getattr(module, f.name) for f in dataclasses.fields(config_cls)})


class TransformerBlock(AxisNamedModule):
    """h = x + Dropout(Attention(Norm1(x))); y = h + Dropout(FFN(Norm2(h))).

    The fields are those of `twin_core.BlockConfig` (read back as `.config`), plus the compute
    and parameter dtypes.
    """

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
    n_kv_heads: int | None = None
    head_dim: int | None = None
    qkv_bias: bool = True
    out_bias: bool = True
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"
    gated_ffn: bool = False
    ffn_bias: bool = True
    positions: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    norm_topk_prob: bool = True
    shared_expert_d_ff: int | None = None
    shared_expert_gate: bool = False

    def __post_init__(self) -> None:
        config_of(self, BlockConfig)  # raises ValueError on a field that cannot work
        super().__post_init__()

    @property
    def config(self) -> BlockConfig:
        """The framework-free configuration of this block."""
        return config_of(self, BlockConfig)

    @classmethod
    def from_config(cls, config: BlockConfig, **module_args: Any) -> TransformerBlock:
        """The block that `config` describes; `module_args`: dtype, param_dtype, name, parent."""
        return cls(**config.kwargs(), **module_args)

    def create_kv_cache(
        self,
        max_batch_size: int,
        max_seq_len: int,
        dtype: jnp.dtype = jnp.float32,
        *,
        mesh: Mesh | None = None,
        rules=None,
    ) -> KVCache:
        """An empty cache sized for this block's key/value heads; with `mesh`, placed on it
        (batch over data, kv heads over tensor: `jax_block.sharding.DEFAULT_RULES` or `rules`)."""
        config = self.config
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
        if x.ndim != 3 or x.shape[-1] != self.d_model or min(x.shape[:2]) < 1:
            raise ValueError(
                f"x must be (batch >= 1, seq_len >= 1, d_model={self.d_model}), "
                f"got {tuple(x.shape)}"
            )
        x = constrain(x.astype(self.dtype), ACTIVATION_AXES)  # the residual stream, in dtype
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = MultiHeadAttention(
            self.d_model,
            self.n_heads,
            self.dropout,
            self.causal,
            n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            qkv_bias=self.qkv_bias,
            out_bias=self.out_bias,
            positions=self.positions,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            sliding_window=self.sliding_window,
            name="attention",
            **dtypes,
        )
        norm1 = make_norm(self.norm, self.norm_eps, name="norm1", **dtypes)
        attn, new_cache = attention(
            norm1(x), mask, kv_cache, cache_position, deterministic, positions
        )
        dropout = nn.Dropout(self.dropout, name="dropout")
        h = x + dropout(attn, deterministic=deterministic)
        aux = None
        normed = make_norm(self.norm, self.norm_eps, name="norm2", **dtypes)(h)
        ffn = dict(activation=self.activation, gated=self.gated_ffn, bias=self.ffn_bias)
        if self.use_moe:
            ff, aux = MixtureOfExperts(
                self.d_model,
                self.d_ff,
                self.num_experts,
                self.top_k_experts,
                self.dropout,
                self.expert_capacity_factor,
                self.router_z_loss_coef,
                norm_topk_prob=self.norm_topk_prob,
                shared_expert_d_ff=self.shared_expert_d_ff,
                shared_expert_gate=self.shared_expert_gate,
                name="feed_forward",
                **ffn,
                **dtypes,
            )(normed, deterministic, return_aux_loss)
        else:
            ff = FeedForward(
                self.d_model, self.d_ff, self.dropout, name="feed_forward", **ffn, **dtypes
            )(normed, deterministic)
        y = constrain(h + dropout(ff, deterministic=deterministic), ACTIVATION_AXES)
        return y, new_cache, aux
