"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits: jax.Array, top_k: int | None, top_p: float | None) -> jax.Array:
    """logits (B, V) with every token outside the top k, then outside the nucleus, set to -inf.

    The nucleus is the smallest set of most probable tokens whose probability sums to >= top_p;
    it always holds at least the most probable token. top_k >= V keeps every token.
    """
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p is not None:
        probs = jax.nn.softmax(logits, axis=-1)  # (B, V)
        order = jnp.argsort(-probs, axis=-1, stable=True)  # (B, V) most probable first
        sorted_probs = jnp.take_along_axis(probs, order, axis=-1)  # (B, V)
        mass_before = jnp.cumsum(sorted_probs, axis=-1)[:, :-1]  # (B, V-1)
        mass_before = jnp.concatenate([jnp.zeros_like(sorted_probs[:, :1]), mass_before], axis=-1)
        drop = jnp.take_along_axis(
            mass_before >= top_p, jnp.argsort(order, axis=-1), axis=-1
        )  # (B, V)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


def sample_next_token(
    logits: jax.Array,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """One token per row of logits (B, V): argmax at temperature 0, else a sample from
    softmax(logits / temperature) after top-k and then top-p filtering. Returns (B,) int32.

    temperature, top_k and top_p are Python numbers (static under jit); sampling needs `rng`.
    """
    logits = logits.astype(jnp.float32)  # (B, V)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if rng is None:
        raise ValueError(f"sampling at temperature {temperature} needs rng (a jax.random key)")
    filtered = filter_logits(logits / temperature, top_k, top_p)  # (B, V)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
