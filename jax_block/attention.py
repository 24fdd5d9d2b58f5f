"""Multi-head self-attention with an optional KV cache, grouped key/value heads and rope."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from twin_core import RopeScaling, check_heads, rope_tables
from twin_core.checks import check_mask

from .cache import KVCache
from .norm import make_norm
from .rope import apply_rope
from .sharding import AxisNamedModule, constrain, dense_axes, named_init


def is_static_zero(position) -> bool:
    """Whether a cache position is known while tracing to be 0 (a Python or NumPy int)."""
    return not isinstance(position, jax.Array) and int(position) == 0


class KeySource(NamedTuple):
    """Keys and values (B, KV, L, D) whose key j sits at cache slot `first_slot + j`.

    Key j may be attended only where first_slot + j < `end_slot` (slots not yet written, or
    dropped by an overflowing write, are never attended). `mask` covers its L keys (last axis
    L or 1) or is None.
    """

    keys: jax.Array
    values: jax.Array
    first_slot: jax.Array | int
    end_slot: jax.Array | int
    mask: jax.Array | None


def allowed_keys(
    source: KeySource, slots: jax.Array, query_pos: jax.Array, causal: bool, window: int | None
) -> jax.Array:
    """Whether query t may see key slot s: (T, L) from the positions, before the mask."""
    allowed = jnp.broadcast_to(slots[None, :] < source.end_slot, (query_pos.size, slots.size))
    if causal:
        allowed = allowed & (slots[None, :] <= query_pos[:, None])
    if window is not None:
        allowed = allowed & (slots[None, :] > query_pos[:, None] - window)
    return allowed


# Long inputs attend over blocks of queries and keys with an online softmax, so that no
# (heads, T, S) score matrix is ever materialised: used from T * S >= BLOCKED_MIN_SCORES on,
# in eval mode (no attention dropout).
BLOCK_Q, BLOCK_K = 128, 256
BLOCKED_MIN_SCORES = 512 * 512


def blocked_attention(
    q: jax.Array,
    query_pos: jax.Array,
    sources: list[KeySource],
    *,
    causal: bool,
    window: int | None,
    softcap: float | None = None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """Attention of scaled queries q (B, T, KV, G, D) at `query_pos` (T,) to every source.

    With `softcap` the scores become softcap * tanh(scores / softcap) before the mask; `sinks`
    (H,) join each row's softmax denominator as one more logit that attends to nothing.
    The same function as one softmax over all allowed keys of all sources; a query with no
    allowed key gives zeros. Queries go in blocks of BLOCK_Q (`lax.map`); each block runs over
    only the key blocks it may see (a `fori_loop` per source), keeping a running max, sum and
    output in float32. Returns (B, T, KV, G, Dv) in the values' dtype (values (B, KV, L, Dv):
    their width may differ from the keys', as MLA's).
    """
    B, T, KV, G, D = q.shape
    Dv = sources[-1].values.shape[-1]
    Tp = -(-T // BLOCK_Q) * BLOCK_Q
    q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0), (0, 0)))
    query_pos = jnp.pad(query_pos, (0, Tp - T), mode="edge")  # (Tp,)

    def padded_mask(mask: jax.Array | None) -> jax.Array | None:
        if mask is None:
            return None
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # (b, h, T|1, L|1)
        return jnp.pad(mask, [(0, 0), (0, 0), (0, Tp - T if mask.shape[2] > 1 else 0), (0, 0)])

    masks = [padded_mask(source.mask) for source in sources]

    def over_source(qi, q_block, q_pos, source, mask, carry):
        L = source.keys.shape[2]
        block_k = min(BLOCK_K, L)
        # key blocks [first, last) may hold allowed keys
        last = jnp.minimum(L, jnp.maximum(source.end_slot - source.first_slot, 0))
        if causal:
            last = jnp.minimum(last, jnp.maximum(q_pos[-1] - source.first_slot + 1, 0))
        last = -(-last // block_k)
        first = 0
        if window is not None:
            first = jnp.maximum(q_pos[0] - window + 1 - source.first_slot, 0) // block_k

        def key_block(ki, carry):
            running_max, running_sum, acc = carry
            # the last block may overlap the one before it; its keys already seen are masked
            start = jnp.minimum(ki * block_k, L - block_k)
            k_block = jax.lax.dynamic_slice_in_dim(source.keys, start, block_k, axis=2)
            v_block = jax.lax.dynamic_slice_in_dim(source.values, start, block_k, axis=2)
            j = start + jnp.arange(block_k)  # (BK,) keys of the source
            allowed = allowed_keys(source, source.first_slot + j, q_pos, causal, window)
            allowed = allowed & (j[None, :] >= ki * block_k)  # (BQ, BK)
            if mask is not None:
                starts = (0, 0, qi * BLOCK_Q if mask.shape[2] > 1 else 0, start)
                sizes = (*mask.shape[:2], min(mask.shape[2], BLOCK_Q), block_k)
                if mask.shape[3] == 1:
                    starts, sizes = starts[:3] + (0,), sizes[:3] + (1,)
                m = jax.lax.dynamic_slice(mask, starts, sizes)  # (b, h, BQ|1, BK|1)
                m = m.reshape(m.shape[0], KV, G, *m.shape[2:]) if m.shape[1] > 1 else m[:, :, None]
                allowed = allowed & m  # (B, KV, G, BQ, BK)
            k_block = k_block.astype(jnp.float32)
            scores = jnp.einsum("btkgd,bksd->bkgts", q_block, k_block)  # (B, KV, G, BQ, BK)
            if softcap is not None:
                scores = jnp.tanh(scores / softcap) * softcap
            scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
            new_max = jnp.maximum(running_max, scores.max(axis=-1))  # (B, KV, G, BQ)
            probs = jnp.exp(scores - new_max[..., None]) * allowed
            correction = jnp.exp(running_max - new_max)
            running_sum = running_sum * correction + probs.sum(axis=-1)
            update = jnp.einsum(
                "bkgts,bksd->bkgtd",
                probs.astype(v_block.dtype),
                v_block,
                preferred_element_type=jnp.float32,
            )
            return new_max, running_sum, acc * correction[..., None] + update

        return jax.lax.fori_loop(first, last, key_block, carry)

    def query_block(qi: jax.Array) -> jax.Array:
        q_block = jax.lax.dynamic_slice_in_dim(q, qi * BLOCK_Q, BLOCK_Q, axis=1)
        q_pos = jax.lax.dynamic_slice_in_dim(query_pos, qi * BLOCK_Q, BLOCK_Q)  # (BQ,)
        if sinks is None:
            start_max = jnp.full((B, KV, G, BLOCK_Q), jnp.finfo(jnp.float32).min)
            start_sum = jnp.zeros((B, KV, G, BLOCK_Q), jnp.float32)
        else:  # the sink is the first logit seen: running max = sink, sum = exp(0)
            sink = sinks.astype(jnp.float32).reshape(1, KV, G, 1)
            start_max = jnp.broadcast_to(sink, (B, KV, G, BLOCK_Q))
            start_sum = jnp.ones((B, KV, G, BLOCK_Q), jnp.float32)
        carry = (start_max, start_sum, jnp.zeros((B, KV, G, BLOCK_Q, Dv), jnp.float32))
        for source, mask in zip(sources, masks, strict=True):
            carry = over_source(qi, q_block, q_pos, source, mask, carry)
        _, total, acc = carry
        out = acc / jnp.where(total > 0, total, 1.0)[..., None]  # (B, KV, G, BQ, Dv)
        return out.transpose(0, 3, 1, 2, 4)  # (B, BQ, KV, G, Dv)

    blocks = jax.lax.map(query_block, jnp.arange(Tp // BLOCK_Q))  # (nQ, B, BQ, KV, G, Dv)
    out = blocks.transpose(1, 0, 2, 3, 4, 5).reshape(B, Tp, KV, G, Dv)[:, :T]
    return out.astype(sources[-1].values.dtype)


class MultiHeadAttention(AxisNamedModule):
    """Scaled dot-product attention over n_heads query heads; causal unless `causal=False`.

    Query head h reads key/value head h // (n_heads // n_kv_heads) (GQA; MQA at 1). With
    `positions="rope"` q and k are rotated at their tokens' positions before the cache write.
    With `sliding_window` W a query at p sees keys k with p - W < k <= p. `qk_norm` ("head" or
    "projection") norms q and k before rope with a norm of kind `norm` (`q_norm`, `k_norm`).
    Scores are scaled by `query_pre_attn_scalar` ** -0.5 when given (else head_dim ** -0.5)
    and, with `attn_logit_softcap`, capped to cap * tanh(scores / cap). With
    `attention_sinks` each head has a learned sink logit (`sinks`, (H,)) in every query's
    softmax denominator, attending to nothing (GPT-OSS).

    With a cache the T new keys are written first and the call attends to the cache's
    max_seq_len slots as they hold after the write (static shapes; `mask` covers those slots).
    A position known while tracing to be 0 (a Python or NumPy int) reads no cache slot: the
    keys are the T new ones, rounded to the cache's dtype as the cache holds them.
    """

    d_model: int
    n_heads: int
    dropout: float = 0.1
    causal: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    n_kv_heads: int | None = None
    head_dim: int | None = None
    qkv_bias: bool = True
    out_bias: bool = True
    positions: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 1.0
    sliding_window: int | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    qk_norm: str | None = None
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    attention_sinks: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        kv_cache: KVCache | None = None,
        cache_position: jax.Array | int | None = None,
        deterministic: bool = True,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Attend x (B, T, d_model) to itself and to the cache; returns (out, new cache).

        `positions` (B|1, T) are the rope positions (default: cache position + arange(T)).
        """
        check_heads(self.d_model, self.n_heads, self.head_dim)
        B, T, _ = x.shape
        H = self.n_heads
        KV = H if self.n_kv_heads is None else self.n_kv_heads
        D = self.d_model // H if self.head_dim is None else self.head_dim
        G = H // KV
        scale = (D if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar) ** -0.5
        start = 0
        S = T
        if kv_cache is not None:
            start = kv_cache.position if cache_position is None else cache_position
            S = kv_cache.max_seq_len
        if mask is not None:
            check_mask(mask, (B, H, T, S))

        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = dict(use_bias=self.qkv_bias, **dense)
        q = nn.Dense(H * D, name="q_proj", **qkv, **dense_axes("embed", "heads"))(x)
        k = nn.Dense(KV * D, name="k_proj", **qkv, **dense_axes("embed", "kv_heads"))(x)
        v = nn.Dense(KV * D, name="v_proj", **qkv, **dense_axes("embed", "kv_heads"))(x)
        if self.qk_norm == "projection":
            q = make_norm(self.norm, self.norm_eps, name="q_norm", axis="heads", **dense)(q)
            k = make_norm(self.norm, self.norm_eps, name="k_norm", axis="kv_heads", **dense)(k)
        q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, KV, D), v.reshape(B, T, KV, D)
        if self.qk_norm == "head":
            q = make_norm(self.norm, self.norm_eps, name="q_norm", axis="head_dim", **dense)(q)
            k = make_norm(self.norm, self.norm_eps, name="k_norm", axis="head_dim", **dense)(k)
        if self.positions == "rope":
            if positions is None:
                positions = start + jnp.arange(T)[None, :]  # (1, T)
            rope = rope_tables(D, self.rope_theta, self.rope_scaling, self.partial_rotary_factor)
            q, k = apply_rope(q, positions, rope), apply_rope(k, positions, rope)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, KV, T, D)
        k, v = (constrain(a, ("batch", "kv_heads", "length", "head_dim")) for a in (k, v))

        # Keys: what the cache held before this call (slots [0, start)), then the T new keys as
        # the cache holds them (rounded to its dtype), at slots [start, start + T). Reading the
        # cache as it was before the write lets XLA update it in place. A start known to be 0
        # while tracing (a Python or NumPy 0) has no cached keys to read.
        query_pos = start + jnp.arange(T)  # (T,): also the slots of the new keys
        sources, new_cache, new_mask, new_end = [], None, mask, T
        if kv_cache is not None:
            new_cache = kv_cache.write(k, v, start)  # checks the write
            k, v = k.astype(kv_cache.k_cache.dtype), v.astype(kv_cache.v_cache.dtype)
            new_end = jnp.where(start >= 0, S, start)  # the new keys the write kept: slots < S
            if mask is not None and mask.ndim and mask.shape[-1] > 1:  # the new keys' slots
                padded = jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, T)])
                new_mask = jax.lax.dynamic_slice_in_dim(padded, jnp.maximum(start, 0), T, -1)
            if not is_static_zero(start):
                cached = (kv_cache.k_cache[:B], kv_cache.v_cache[:B])  # (B, KV, S, D)
                sources.append(KeySource(*cached, 0, start, mask))
        sources.append(KeySource(k, v, start, new_end, new_mask))

        sinks = None
        if self.attention_sinks:
            init = named_init(nn.initializers.zeros_init(), "heads")
            sinks = self.param("sinks", init, (H,), self.param_dtype)  # (H,)
        grouped_q = q.reshape(B, T, KV, G, D).astype(jnp.float32)  # query head h = kv * G + g
        num_keys = sum(source.keys.shape[2] for source in sources)
        if deterministic and T * num_keys >= BLOCKED_MIN_SCORES:
            out = blocked_attention(
                grouped_q * scale,
                query_pos,
                [source._replace(values=source.values.astype(self.dtype)) for source in sources],
                causal=self.causal,
                window=self.sliding_window,
                softcap=self.attn_logit_softcap,
                sinks=sinks,
            )  # (B, T, KV, G, D)
        else:
            scores, allowed = [], []
            for source in sources:
                slots = source.first_slot + jnp.arange(source.keys.shape[2])  # (L,)
                ok = allowed_keys(source, slots, query_pos, self.causal, self.sliding_window)
                if source.mask is not None:
                    ok = ok & jnp.atleast_1d(source.mask.astype(bool))  # (B, H, T, L)
                keys = source.keys.astype(jnp.float32)
                score = jnp.einsum("btkgd,bksd->bkgts", grouped_q, keys)  # (B, KV, G, T, L)
                scores.append(score.reshape(B, H, T, slots.size))
                allowed.append(jnp.broadcast_to(ok, (B, H, T, slots.size)))
            scores = jnp.concatenate(scores, axis=-1) * scale  # (B, H, T, S')
            if self.attn_logit_softcap is not None:
                cap = self.attn_logit_softcap
                scores = jnp.tanh(scores / cap) * cap
            allowed = jnp.concatenate(allowed, axis=-1)
            scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
            if sinks is None:
                probs = jax.nn.softmax(scores, axis=-1)  # (B, H, T, S')
            else:  # one more column per row: the head's sink logit, dropped after the softmax
                sink = sinks.astype(jnp.float32)[None, :, None, None]  # (1, H, 1, 1)
                sink = jnp.broadcast_to(sink, (B, H, T, 1))
                probs = jax.nn.softmax(jnp.concatenate([scores, sink], -1), axis=-1)[..., :-1]
            probs = probs * allowed  # a row with no allowed key: zeros
            probs = nn.Dropout(self.dropout)(probs.astype(self.dtype), deterministic=deterministic)
            out, offset = 0, 0
            for source in sources:
                L = source.keys.shape[2]
                p = probs[..., offset : offset + L].reshape(B, KV, G, T, L)
                out = out + jnp.einsum("bkgts,bksd->bkgtd", p, source.values.astype(self.dtype))
                offset += L
            out = out.transpose(0, 3, 1, 2, 4)  # (B, T, KV, G, D)
        out = constrain(out.reshape(B, T, H * D), ("batch", "length", "heads"))  # (B, T, H * D)
        out_proj = nn.Dense(
            self.d_model,
            use_bias=self.out_bias,
            name="out_proj",
            **dense,
            **dense_axes("heads", "embed"),
        )
        return out_proj(out), new_cache
