"""Multi-head latent attention (DeepSeek-V3's MLA), attending from a latent KV cache."""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from twin_core import MLA_NORM_EPS, BlockConfig, mla_absorbs, mla_softmax_scale, rope_tables

from . import attention
from .attention import KeySource, check_mask, is_static_zero
from .cache import LatentCache
from .norm import make_norm
from .rope import apply_rope
from .sharding import AxisNamedModule, dense_axes


def deinterleave(x: jax.Array) -> jax.Array:
    """The pairs (x0, x1), (x2, x3), ... of the last axis as evens then odds: the rotate-half
    layout in which transformers' interleaved DeepSeek rope rotates them."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def _softmax(scores: jax.Array, allowed: jax.Array) -> jax.Array:
    """softmax over the allowed keys of float32 scores (B, H, T, S); a row with none: zeros."""
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1) * allowed


def attend_latent(
    q_nope: jax.Array,
    q_rope: jax.Array,
    latent: jax.Array,
    rope_key: jax.Array,
    allowed: jax.Array,
    kv_b: jax.Array,
    v_dim: int,
    scale: float,
    dropout: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """The heads' outputs (B, T, H, Dv) of queries q_nope, q_rope (B, T, H, Dn|Dr) over the S
    keys of latent (B, S, R) and rope_key (B, S, Dr); `allowed` broadcasts to (B, H, T, S);
    kv_b (R, H * (Dn + Dv)) is kv_b_proj's kernel.

    Where `twin_core.mla_absorbs` says so (few queries: decode), kv_b_proj is absorbed: the
    queries move into the latent space (q_nope W_k), the probabilities weight the latent
    itself and W_v maps the result to each head; otherwise the latent is expanded into
    per-head keys and values. Scores and softmax are float32.
    """
    B, T, H, Dn = q_nope.shape
    R = latent.shape[2]
    f32 = jnp.float32
    rope_scores = jnp.einsum("bthd,bsd->bhts", q_rope.astype(f32), rope_key.astype(f32))
    weights = kv_b.reshape(R, H, Dn + v_dim).astype(latent.dtype)
    if mla_absorbs(T, R, Dn, v_dim):
        q_latent = jnp.einsum("bthn,rhn->bthr", q_nope, weights[..., :Dn])  # (B, T, H, R)
        scores = jnp.einsum("bthr,bsr->bhts", q_latent.astype(f32), latent.astype(f32))
        probs = _softmax((scores + rope_scores) * scale, allowed).astype(latent.dtype)
        out_latent = jnp.einsum("bhts,bsr->bthr", dropout(probs), latent)  # (B, T, H, R)
        return jnp.einsum("bthr,rhv->bthv", out_latent, weights[..., Dn:])  # (B, T, H, Dv)
    kv = jnp.einsum("bsr,rhd->bshd", latent, weights)  # (B, S, H, Dn + Dv)
    k_nope, v = kv[..., :Dn], kv[..., Dn:]
    scores = jnp.einsum("bthn,bshn->bhts", q_nope.astype(f32), k_nope.astype(f32))
    probs = _softmax((scores + rope_scores) * scale, allowed).astype(v.dtype)
    return jnp.einsum("bhts,bshv->bthv", dropout(probs), v)  # (B, T, H, Dv)


def attend_latent_blocks(
    q_nope: jax.Array,
    q_rope: jax.Array,
    latent: jax.Array,
    rope_key: jax.Array,
    query_pos: jax.Array,
    mask: jax.Array | None,
    kv_b: jax.Array,
    v_dim: int,
    scale: float,
) -> jax.Array:
    """`attend_latent` (causal, eval) over blocks of queries and keys with an online softmax
    (`attention.blocked_attention`): no (B, H, T, S) scores are ever held. Queries at
    `query_pos` (T,), keys at slots 0..S-1, `mask` broadcasting to (B, H, T, S).

    Absorbed, it is attention with one key/value head shared by all H query heads: keys the
    latent and the rope key side by side (R + Dr), values the latent (R); expanded, H heads of
    keys [k_nope, rope_key] (Dn + Dr) and values (Dv). Returns (B, T, H, Dv).
    """
    B, T, H, Dn = q_nope.shape
    S, R = latent.shape[1:]
    weights = kv_b.reshape(R, H, Dn + v_dim).astype(latent.dtype)
    if mask is not None:
        mask = mask.astype(bool)
    blocked = functools.partial(attention.blocked_attention, causal=True, window=None)
    if mla_absorbs(T, R, Dn, v_dim):
        q_latent = jnp.einsum("bthn,rhn->bthr", q_nope, weights[..., :Dn])  # (B, T, H, R)
        q = jnp.concatenate([q_latent, q_rope.astype(q_latent.dtype)], axis=-1)[:, :, None]
        keys = jnp.concatenate([latent, rope_key], axis=-1)[:, None]  # (B, 1, S, R + Dr)
        source = KeySource(keys, latent[:, None], 0, S, mask)
        out_latent = blocked(q.astype(jnp.float32) * scale, query_pos, [source])[:, :, 0]
        return jnp.einsum("bthr,rhv->bthv", out_latent, weights[..., Dn:])  # (B, T, H, Dv)
    kv = jnp.einsum("bsr,rhd->bhsd", latent, weights)  # (B, H, S, Dn + Dv)
    k_nope, v = kv[..., :Dn], kv[..., Dn:]
    shared = jnp.broadcast_to(rope_key[:, None], (B, H, S, rope_key.shape[-1]))
    keys = jnp.concatenate([k_nope, shared.astype(k_nope.dtype)], axis=-1)  # (B, H, S, Dn + Dr)
    q = jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1)[:, :, :, None]
    source = KeySource(keys, v, 0, S, mask)
    return blocked(q.astype(jnp.float32) * scale, query_pos, [source])[:, :, :, 0]


class MultiHeadLatentAttention(AxisNamedModule):
    """DeepSeek-V3's multi-head latent attention (causal); `config` is a BlockConfig with
    kv_lora_rank set.

    q: q_a_proj -> RMSNorm (`q_a_norm`) -> q_b_proj, or q_proj without a q_lora_rank; split
    per head into qk_nope_head_dim and qk_rope_head_dim dims. kv_a_proj gives the latent
    (RMSNorm'd, `kv_a_norm`) and one rope key shared by every head; kv_b_proj expands the
    latent into per-head no-rope keys and values. The cache (a LatentCache) holds the latent
    and the rotated rope key of each token; the call attends to its max_seq_len slots after
    the write (a position known while tracing to be 0 reads the T new tokens only).
    """

    config: BlockConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        kv_cache: LatentCache | None = None,
        cache_position: jax.Array | int | None = None,
        deterministic: bool = True,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, LatentCache | None]:
        """Attend x (B, T, d_model) to itself and to the cache; returns (out, new cache).

        `positions` (B|1, T) are the rope positions (default: cache position + arange(T)).
        """
        c = self.config
        if not c.is_mla:
            raise ValueError("MultiHeadLatentAttention needs a config with kv_lora_rank set")
        B, T, _ = x.shape
        H, Dn, Dr, Dv, R = (
            c.n_heads,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            c.kv_lora_rank,
        )
        start, S = 0, T
        if kv_cache is not None:
            start = kv_cache.position if cache_position is None else cache_position
            S = kv_cache.max_seq_len
        if mask is not None:
            check_mask(mask, (B, H, T, S))
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(dtype=self.dtype, param_dtype=self.param_dtype, axis=None)
        if c.q_lora_rank is None:
            q = nn.Dense(H * (Dn + Dr), name="q_proj", **dense, **dense_axes("embed", "heads"))(x)
        else:
            q = nn.Dense(c.q_lora_rank, name="q_a_proj", **dense, **dense_axes("embed", None))(x)
            q = make_norm("rmsnorm", MLA_NORM_EPS, name="q_a_norm", **norm)(q)
            q = nn.Dense(H * (Dn + Dr), name="q_b_proj", **dense, **dense_axes(None, "heads"))(q)
        q = q.reshape(B, T, H, Dn + Dr)
        q_nope, q_rope = q[..., :Dn], q[..., Dn:]
        kv = nn.Dense(R + Dr, name="kv_a_proj", **dense, **dense_axes("embed", None))(x)
        latent = make_norm("rmsnorm", MLA_NORM_EPS, name="kv_a_norm", **norm)(kv[..., :R])
        if positions is None:
            positions = start + jnp.arange(T)[None, :]  # (1, T)
        rope = rope_tables(Dr, c.rope_theta, c.rope_scaling)
        if rope.original_length is not None:
            raise ValueError("MLA supports the rope types whose frequencies do not vary by length")
        q_rope = apply_rope(deinterleave(q_rope), positions, rope)  # (B, T, H, Dr)
        rope_key = apply_rope(deinterleave(kv[..., R:])[:, :, None], positions, rope)[:, :, 0]
        kv_b = nn.Dense(H * (Dn + Dv), name="kv_b_proj", **dense, **dense_axes(None, "heads"))
        if self.is_initializing():
            kv_b(latent)  # creates its kernel, read below
        kernel = nn.meta.unbox(kv_b.variables["params"]["kernel"])  # (R, H * (Dn + Dv))

        out_proj = nn.Dense(c.d_model, name="out_proj", **dense, **dense_axes("heads", "embed"))
        query_pos = start + jnp.arange(T)  # (T,)
        new_cache, key_mask = None, mask
        if kv_cache is not None:
            new_cache = kv_cache.write(latent, rope_key, start)  # checks the write
            if is_static_zero(start):  # the T new tokens, as the cache holds them
                latent = latent.astype(kv_cache.latent.dtype).astype(self.dtype)
                rope_key = rope_key.astype(kv_cache.rope_key.dtype).astype(self.dtype)
                if mask is not None and mask.ndim and mask.shape[-1] > 1:
                    key_mask = mask[..., :T]
            else:  # every slot after the write; the causal rule hides those not yet written
                latent = new_cache.latent[:B].astype(self.dtype)
                rope_key = new_cache.rope_key[:B].astype(self.dtype)
        scale = mla_softmax_scale(Dn + Dr, c.rope_scaling)
        if deterministic and T * latent.shape[1] >= attention.BLOCKED_MIN_SCORES:  # long inputs
            out = attend_latent_blocks(
                q_nope, q_rope, latent, rope_key, query_pos, key_mask, kernel, Dv, scale
            )
            return out_proj(out.reshape(B, T, H * Dv)), new_cache
        slots = jnp.arange(latent.shape[1])  # (L,)
        allowed = slots[None, :] <= query_pos[:, None]  # (T, L)
        if key_mask is not None:
            allowed = allowed & jnp.atleast_1d(key_mask.astype(bool))  # (B|1, H|1, T, L)
        allowed = jnp.broadcast_to(allowed, (B, H, T, latent.shape[1]))

        def dropout(probs: jax.Array) -> jax.Array:
            return nn.Dropout(c.dropout)(probs, deterministic=deterministic)

        out = attend_latent(q_nope, q_rope, latent, rope_key, allowed, kernel, Dv, scale, dropout)
        return out_proj(out.reshape(B, T, H * Dv)), new_cache
