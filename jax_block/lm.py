"""A decoder-only language model (GPT-2's layout by default), built on TransformerBlock."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from twin_core import LMConfig, RopeScaling

from .block import TransformerBlock, config_of
from .cache import KVCache
from .norm import make_norm
from .sharding import (
    ACTIVATION_AXES,
    AxisNamedModule,
    constrain,
    dense_axes,
    kv_cache_sharding,
    named_init,
)


def position_ids(attention_mask: jax.Array | None, start: jax.Array, length: int) -> jax.Array:
    """Positions of the `length` tokens written at slot `start`: (B, length), or (1, length).

    With a mask (B, S) over every key slot, a token's position is the number of real tokens
    before it, so a left-padded row starts at 0; pad slots get position 0.
    """
    if attention_mask is None:
        return start + jnp.arange(length)[None, :]  # (1, T)
    real_so_far = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1)  # (B, S)
    return jax.lax.dynamic_slice_in_dim(jnp.maximum(real_so_far - 1, 0), start, length, axis=1)


class TransformerLM(AxisNamedModule):
    """Token embedding [+ learned positions] -> dropout -> blocks -> norm -> LM head.

    The fields are those of `twin_core.LMConfig` (read back as `.config`), plus the compute
    and parameter dtypes; the defaults are GPT-2's layout. The blocks are the submodules
    `blocks_0` ... `blocks_{n_layers-1}`. With `tie_embeddings` the head is the token embedding
    matrix (`token_embedding.attend`) and there is no `lm_head`.
    """

    vocab_size: int
    max_seq_len: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    dropout: float = 0.1
    use_moe: bool = False
    num_experts: int = 8
    top_k_experts: int = 2
    expert_capacity_factor: float | None = 1.25
    tie_embeddings: bool = True
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
        config_of(self, LMConfig)  # raises ValueError on a field that cannot work
        super().__post_init__()

    @property
    def config(self) -> LMConfig:
        """The framework-free configuration of this language model."""
        return config_of(self, LMConfig)

    @classmethod
    def from_config(cls, config: LMConfig, **module_args: Any) -> TransformerLM:
        """The language model that `config` describes; `module_args`: dtype, param_dtype, ..."""
        return cls(**config.kwargs(), **module_args)

    def create_kv_cache(
        self,
        max_batch_size: int,
        max_seq_len: int,
        dtype: jnp.dtype = jnp.float32,
        *,
        mesh: Mesh | None = None,
        rules=None,
    ) -> tuple[KVCache, ...]:
        """One empty cache per block, each with `max_seq_len` slots; with `mesh`, placed on it
        (batch over data, kv heads over tensor: `jax_block.sharding.DEFAULT_RULES` or `rules`)."""
        config = self.config
        sharding = kv_cache_sharding(config, max_batch_size, max_seq_len, mesh, rules)
        return tuple(
            KVCache.create(
                max_batch_size,
                max_seq_len,
                config.resolved_n_kv_heads,
                config.resolved_head_dim,
                dtype,
                sharding,
            )
            for _ in range(self.n_layers)
        )

    def check_inputs(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        kv_cache: tuple[KVCache, ...] | None,
    ) -> None:
        """Raise ValueError unless input_ids (B, T) are token ids and the mask covers every key.

        Token ids are checked when they are concrete; under jit an id >= vocab_size or a
        position >= max_seq_len gives NaN logits (never a silent wrap).
        """
        if not hasattr(input_ids, "dtype") or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer array, got {_describe(input_ids)}")
        if input_ids.ndim != 2 or input_ids.size == 0:
            raise ValueError(
                f"input_ids must be (batch >= 1, seq_len >= 1), got shape {tuple(input_ids.shape)}"
            )
        if not isinstance(input_ids, jax.core.Tracer):
            ids = np.asarray(input_ids)
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.vocab_size:
                raise ValueError(
                    f"token ids must be in [0, vocab_size={self.vocab_size}), got values in "
                    f"[{low}, {high}]"
                )
        B, T = input_ids.shape
        if kv_cache is None and T > self.max_seq_len:
            raise ValueError(f"seq_len {T} exceeds max_seq_len={self.max_seq_len}")
        if kv_cache is not None and len(kv_cache) != self.n_layers:
            raise ValueError(f"kv_cache must hold {self.n_layers} caches, got {len(kv_cache)}")
        S = T if kv_cache is None else kv_cache[0].max_seq_len
        if attention_mask is not None and tuple(attention_mask.shape) != (B, S):
            raise ValueError(
                f"attention_mask must be (batch, key slots) = {(B, S)}, "
                f"got {tuple(attention_mask.shape)}"
            )

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
        return_aux_loss: bool = False,
        kv_cache: tuple[KVCache, ...] | None = None,
    ) -> jax.Array | tuple:
        """input_ids (B, T) -> logits (B, T, vocab_size), then aux if asked, then the new cache.

        `attention_mask` (B, S) marks real tokens with 1 over every key slot: S = T without a
        cache, S = the caches' max_seq_len (all slots, static) with one. Pad keys are never
        attended and positions count real tokens only. With `kv_cache` (one KVCache per block)
        the tokens are written at the caches' position and the updated caches are returned
        last. aux is the sum of the blocks' MoE losses (0 for dense blocks).
        """
        self.check_inputs(input_ids, attention_mask, kv_cache)
        start = jnp.zeros((), jnp.int32) if kv_cache is None else kv_cache[0].position
        T = input_ids.shape[1]
        positions = position_ids(attention_mask, start, T)  # (B|1, T)
        embed = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        normal = nn.initializers.normal(stddev=0.02)
        token_embedding = nn.Embed(
            self.vocab_size,
            self.d_model,
            name="token_embedding",
            embedding_init=named_init(normal, "vocab", "embed"),
            **embed,
        )
        x = token_embedding(input_ids)  # (B, T, d_model)
        if self.positions == "learned":
            x = x + nn.Embed(
                self.max_seq_len,
                self.d_model,
                name="position_embedding",
                embedding_init=named_init(normal, "length", "embed"),
                **embed,
            )(positions)
        x = constrain(x, ACTIVATION_AXES)
        x = nn.Dropout(self.dropout, name="dropout")(x, deterministic=deterministic)
        key_mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        aux = jnp.zeros((), jnp.float32)
        block = self.config.block()
        new_cache = []
        for i in range(self.n_layers):
            layer_cache = None if kv_cache is None else kv_cache[i]
            x, layer_cache, block_aux = TransformerBlock.from_config(
                block, dtype=self.dtype, param_dtype=self.param_dtype, name=f"blocks_{i}"
            )(x, key_mask, layer_cache, None, deterministic, return_aux_loss, positions)
            new_cache.append(layer_cache)
            if block_aux is not None:
                aux = aux + block_aux
        norm = make_norm(
            self.norm, self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm"
        )
        x = norm(x)  # (B, T, d_model)
        if self.tie_embeddings:
            logits = token_embedding.attend(x)  # (B, T, vocab_size)
        else:
            logits = nn.Dense(
                self.vocab_size,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="lm_head",
                **dense_axes("embed", "vocab"),
            )(x)  # (B, T, vocab_size)
        logits = constrain(logits, ("batch", "length", "vocab"))
        outputs = [logits]
        if return_aux_loss:
            outputs.append(aux)
        if kv_cache is not None:
            outputs.append(tuple(new_cache))
        return logits if len(outputs) == 1 else tuple(outputs)


def _describe(value) -> str:
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"a {value.dtype} array of shape {tuple(value.shape)}"
    return type(value).__name__
