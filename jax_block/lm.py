"""A decoder-only language model (GPT-2's layout by default), built on TransformerBlock."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from twin_core import LMConfig
from twin_core.checks import check_key_mask, check_lm_call, check_token_range

from .block import TransformerBlock
from .configured import ConfiguredModule
from .norm import make_norm
from .scan import LayerGroup, first_cache, layer_groups, scanned_pattern, stack_caches
from .sharding import (
    ACTIVATION_AXES,
    constrain,
    dense_axes,
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


class TransformerLM(ConfiguredModule):
    """Token embedding [+ learned positions] -> dropout -> blocks -> norm -> LM head.

    `config` (a `twin_core.LMConfig`, GPT-2's layout by default) defines the model; `dtype` is
    the compute dtype and `param_dtype` the parameters'. Block i is the submodule `blocks_{i}`,
    built from `config.block_configs()[i]`; with `scan_layers` each run of a repeating pattern
    of layer kinds is one scanned submodule `blocks_{start}_{stop}` instead, compiled once
    (`jax_block.scan`: its parameter and cache layout). With `tie_embeddings` the head is the token
    embedding matrix (`token_embedding.attend`) and there is no `lm_head`.
    `TransformerLM.create(vocab_size=256, max_seq_len=64, ...)` builds one from config fields
    by keyword. With `embed_scale` the token embeddings are multiplied by sqrt(d_model) rounded
    to `dtype` (Gemma); with `final_logit_softcap` the logits are capped to
    cap * tanh(logits / cap).
    """

    config_type = LMConfig
    config: LMConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False

    @property
    def layer_groups(self) -> tuple[LayerGroup, ...]:
        """The groups of layers the model applies: one per layer, or scanned runs."""
        return layer_groups(self.config.block_configs(), self.scan_layers)

    def create_kv_cache(
        self,
        max_batch_size: int,
        max_seq_len: int,
        dtype: jnp.dtype = jnp.float32,
        *,
        mesh: Mesh | None = None,
        rules=None,
    ) -> tuple:
        """One empty cache per block, sized by that block's config, each with `max_seq_len` slots;
        with `mesh`, placed on it (batch over data, kv heads over tensor:
        `jax_block.sharding.DEFAULT_RULES` or `rules`). With `scan_layers`, one entry per
        layer group: a scanned group's caches are stacked over its repeats (`jax_block.scan`)."""
        caches = [
            TransformerBlock.from_config(block, parent=None).create_kv_cache(
                max_batch_size, max_seq_len, dtype, mesh=mesh, rules=rules
            )
            for block in self.config.block_configs()
        ]
        return stack_caches(caches, self.layer_groups)

    def check_inputs(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        kv_cache: tuple | None,
    ) -> None:
        """Raise ValueError unless input_ids (B, T) are token ids and the mask covers every key.

        Token ids are checked when they are concrete; under jit an id >= vocab_size or a
        position >= max_seq_len gives NaN logits (never a silent wrap).
        """
        config = self.config
        if not hasattr(input_ids, "dtype") or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer array, got {_describe(input_ids)}")
        if input_ids.ndim != 2 or input_ids.size == 0:
            raise ValueError(
                f"input_ids must be (batch >= 1, seq_len >= 1), got shape {tuple(input_ids.shape)}"
            )
        if not isinstance(input_ids, jax.core.Tracer):
            ids = np.asarray(input_ids)
            check_token_range(int(ids.min()), int(ids.max()), config.vocab_size)
        B, T = input_ids.shape
        caches = None if kv_cache is None else len(kv_cache)
        check_lm_call(T, config.max_seq_len, caches, len(self.layer_groups))
        S = T if kv_cache is None else first_cache(kv_cache).max_seq_len
        check_key_mask(attention_mask, (B, S))

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
        return_aux_loss: bool = False,
        kv_cache: tuple | None = None,
    ) -> jax.Array | tuple:
        """input_ids (B, T) -> logits (B, T, vocab_size), then aux if asked, then the new cache.

        `attention_mask` (B, S) marks real tokens with 1 over every key slot: S = T without a
        cache, S = the caches' max_seq_len (all slots, static) with one. Pad keys are never
        attended and positions count real tokens only. With `kv_cache` (`create_kv_cache`'s)
        the tokens are written at the caches' position and the updated caches are returned
        last. aux is the sum of the blocks' MoE losses (0 for dense blocks).
        """
        self.check_inputs(input_ids, attention_mask, kv_cache)
        config = self.config
        start = jnp.zeros((), jnp.int32) if kv_cache is None else first_cache(kv_cache).position
        T = input_ids.shape[1]
        positions = position_ids(attention_mask, start, T)  # (B|1, T)
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        normal = nn.initializers.normal(stddev=0.02)
        token_embedding = nn.Embed(
            config.vocab_size,
            config.d_model,
            name="token_embedding",
            embedding_init=named_init(normal, "vocab", "embed"),
            **dtypes,
        )
        x = token_embedding(input_ids)  # (B, T, d_model)
        if config.embed_scale:  # as transformers' Gemma: float32, then the compute dtype
            x = x * jnp.asarray(np.float32(config.d_model**0.5), self.dtype)
        if config.positions == "learned":
            x = x + nn.Embed(
                config.max_seq_len,
                config.d_model,
                name="position_embedding",
                embedding_init=named_init(normal, "length", "embed"),
                **dtypes,
            )(positions)
        x = constrain(x, ACTIVATION_AXES)
        x = nn.Dropout(config.dropout, name="dropout")(x, deterministic=deterministic)
        key_mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        aux = jnp.zeros((), jnp.float32)
        new_cache = []
        blocks = config.block_configs()
        for g, group in enumerate(self.layer_groups):
            layer_cache = None if kv_cache is None else kv_cache[g]
            if group.scanned:  # one copy of the pattern, scanned over the repeats
                Pattern = scanned_pattern(group.repeats)
                (x, aux), layer_cache = Pattern(
                    blocks[group.start : group.start + group.period],
                    deterministic,
                    return_aux_loss,
                    name=group.name,
                    **dtypes,
                )((x, aux), layer_cache, key_mask, None if kv_cache is None else start, positions)
            else:
                x, layer_cache, block_aux = TransformerBlock.from_config(
                    blocks[group.start], name=group.name, **dtypes
                )(x, key_mask, layer_cache, None, deterministic, return_aux_loss, positions)
                if block_aux is not None:
                    aux = aux + block_aux
            new_cache.append(layer_cache)
        x = make_norm(config.norm, config.norm_eps, name="norm", **dtypes)(x)  # (B, T, d_model)
        if config.tie_embeddings:
            logits = token_embedding.attend(x)  # (B, T, vocab_size)
        else:
            logits = nn.Dense(
                config.vocab_size,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="lm_head",
                **dense_axes("embed", "vocab"),
            )(x)  # (B, T, vocab_size)
        if config.final_logit_softcap is not None:
            cap = config.final_logit_softcap
            logits = jnp.tanh(logits / cap) * cap
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
