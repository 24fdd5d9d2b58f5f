"""Attention over blocks (long inputs) equals the full softmax, and long prefills stay small."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import jax_block.attention as attention_module
from jax_block import KVCache, MultiHeadAttention, TransformerLM
from jax_block.generate import generate_tokens

D_MODEL, T = 32, 500  # T spans several query and key blocks, with a ragged end


@pytest.mark.parametrize(
    "causal, window, n_kv_heads, padded, softcap",
    [
        (True, None, None, False, None),
        (True, 300, 2, True, None),
        (False, None, 1, True, None),
        (True, 300, 2, True, 2.0),  # Gemma 2: softcapped scores, its own query scale
    ],
)
def test_blocked_attention_equals_a_float64_reference(causal, window, n_kv_heads, padded, softcap):
    scores = {} if softcap is None else dict(query_pre_attn_scalar=6, attn_logit_softcap=softcap)
    module = MultiHeadAttention(
        D_MODEL, 4, 0.0, causal, n_kv_heads=n_kv_heads, sliding_window=window, **scores
    )
    x = jax.random.normal(jax.random.PRNGKey(1), (2, T, D_MODEL))
    params = module.init(jax.random.PRNGKey(0), x[:, :4])["params"]
    key_mask = np.ones((2, T), bool)
    if padded:
        key_mask[1, :37] = False  # a left-padded row
    mask = jnp.asarray(key_mask)[:, None, None, :]
    assert T * T < attention_module.BLOCKED_MIN_SCORES  # the full path, then blocks forced
    full = np.asarray(module.apply({"params": params}, x, mask)[0])
    old = attention_module.BLOCKED_MIN_SCORES
    attention_module.BLOCKED_MIN_SCORES = 1
    try:
        blocked = np.asarray(module.apply({"params": params}, x, mask)[0])
    finally:
        attention_module.BLOCKED_MIN_SCORES = old

    s = ref.spec(
        d_model=D_MODEL,
        n_heads=4,
        causal=causal,
        n_kv_heads=n_kv_heads,
        sliding_window=window,
        **scores,
    )
    want = ref.attention(x, ref.flax_weights(params), "", s, key_mask[:, None, None, :])
    np.testing.assert_allclose(blocked, want, atol=1e-5)
    np.testing.assert_allclose(full, want, atol=1e-5)


def test_blocked_attention_over_a_cache_at_a_traced_position():
    """A long chunk written at a traced position attends to the cache over blocks."""
    module = MultiHeadAttention(D_MODEL, 4, 0.0, n_kv_heads=2)
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 2 * T, D_MODEL))
    params = module.init(jax.random.PRNGKey(0), x[:, :4])["params"]
    full = np.asarray(module.apply({"params": params}, x)[0])

    def chunked(x):
        kv = KVCache.create(1, 2 * T, 2, D_MODEL // 4)  # its position is traced under jit
        first, kv = module.apply({"params": params}, x[:, :T], None, kv)
        second, kv = module.apply({"params": params}, x[:, T:], None, kv)
        return jnp.concatenate([first, second], axis=1)

    old = attention_module.BLOCKED_MIN_SCORES
    attention_module.BLOCKED_MIN_SCORES = 1
    try:
        got = np.asarray(jax.jit(chunked)(x))
    finally:
        attention_module.BLOCKED_MIN_SCORES = old
    np.testing.assert_allclose(got, full, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_lm():
    lm = TransformerLM.create(
        vocab_size=64,
        max_seq_len=2080,
        d_model=D_MODEL,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        dropout=0.0,
        positions="rope",
        n_kv_heads=2,
    )
    return lm, ref.random_params(lm, jnp.zeros((1, 1), jnp.int32))


def test_chunked_prefill_gives_the_tokens_of_a_full_forward_loop(tiny_lm, monkeypatch):
    """A prompt longer than LONG_PROMPT is prefilled chunk by chunk, through the cache, and
    gives the greedy tokens of the float64 reference.

    (`jax_block.generate` is the function; the module is reached by its import path.)
    """
    generate_module = importlib.import_module("jax_block.generate")
    monkeypatch.setattr(generate_module, "LONG_PROMPT", 16)
    monkeypatch.setattr(generate_module, "PREFILL_CHUNK", 16)
    lm, params = tiny_lm
    ids = np.random.default_rng(0).integers(0, 64, (2, 64))
    mask = np.ones((2, 64), np.int32)
    mask[1, :9] = 0  # a left-padded row
    got = np.asarray(generate_module.generate(lm, params, ids, mask, max_new_tokens=4))
    s = ref.spec(d_model=D_MODEL, n_heads=4, n_layers=2, positions="rope", n_kv_heads=2)
    want = ref.greedy(ids, ref.flax_weights(params), s, mask, 4)  # the whole sequence each time
    np.testing.assert_array_equal(got, want)


def test_a_long_prefill_needs_no_score_matrix(tiny_lm):
    """generate's XLA temp memory for a 2048-token prompt: the cache plus small blocks, far
    below one layer's (heads, T, T) float32 scores."""
    lm, params = tiny_lm
    P, new = 2048, 16
    compiled = generate_tokens.lower(
        lm,
        params,
        jnp.ones((1, P), jnp.int32),
        jnp.ones((1, P), jnp.int32),
        jax.random.PRNGKey(0),
        max_new_tokens=new,
        temperature=0.0,
        top_k=None,
        top_p=None,
        eos_token_id=None,
        pad_token_id=0,
    ).compile()
    cache_bytes = 2 * 2 * (P + new) * 2 * (D_MODEL // 4) * 4  # k and v, layers, slots, KV * D
    scores_bytes = 4 * P * P * 4
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert cache_bytes <= temp < cache_bytes + scores_bytes / 16, (temp, cache_bytes)
