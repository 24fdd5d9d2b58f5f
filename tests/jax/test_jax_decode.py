"""Jitted cached decoding: cache consistency, one compilation for every position, real donation."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

from jax_block import TransformerBlock, decode_step

D_MODEL, N_HEADS, D_FF = 16, 4, 32
B, CHUNK, S_MAX = 2, 3, 16
LENGTH = 3 * CHUNK  # a prefill of CHUNK tokens, then two chunks or 2 * CHUNK single tokens


def rand_x(batch: int, length: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, length, D_MODEL)).astype(np.float32)


def make_block(use_moe: bool = False, d_ff: int = D_FF) -> TransformerBlock:
    return TransformerBlock.create(
        d_model=D_MODEL, n_heads=N_HEADS, d_ff=d_ff, dropout=0.1, use_moe=use_moe, num_experts=4
    )


@functools.cache
def setup(use_moe: bool):
    block = make_block(use_moe)
    params = ref.random_params(block, rand_x(1, 2), seed=3)
    full = jax.jit(lambda p, x: block.apply({"params": p}, x)[0])
    return block, params, full


def snapshot(cache):
    return jax.tree_util.tree_map(np.array, cache)


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_full_forward_equals_prefill_plus_decodes_plus_chunks(use_moe):
    block, params, full = setup(use_moe)
    x = rand_x(B, LENGTH, seed=2)
    expected = np.asarray(full(params, x))  # eval mode: dropout off, MoE dropless

    def prefill():
        cache = block.create_kv_cache(B, S_MAX)
        y, cache = decode_step(block, params, x[:, :CHUNK], cache)
        np.testing.assert_allclose(np.asarray(y), expected[:, :CHUNK], atol=1e-5, rtol=0)
        return cache

    cache = prefill()
    for t in range(CHUNK, LENGTH):  # then one token at a time
        y, cache = decode_step(block, params, x[:, t : t + 1], cache)
        assert int(cache.position) == t + 1
        np.testing.assert_allclose(np.asarray(y), expected[:, t : t + 1], atol=1e-5, rtol=0)

    cache = prefill()
    for start in range(CHUNK, LENGTH, CHUNK):  # then several tokens at a time
        y, cache = decode_step(block, params, x[:, start : start + CHUNK], cache)
        want = expected[:, start : start + CHUNK]
        np.testing.assert_allclose(np.asarray(y), want, atol=1e-5, rtol=0)
    assert int(cache.position) == LENGTH and not bool(cache.overflowed)


def test_one_compilation_for_twenty_positions_and_overflow_is_flagged():
    block = make_block(d_ff=24)  # a configuration no other test compiles
    params = ref.random_params(block, rand_x(1, 2), seed=4)
    S = 16
    x = rand_x(1, 20, seed=5)
    cache = block.create_kv_cache(1, S)
    before = decode_step._cache_size()
    for t in range(20):
        old = snapshot(cache)
        y, cache = decode_step(block, params, x[:, t : t + 1], cache)
        new_k, new_v = np.array(cache.k_cache), np.array(cache.v_cache)
        assert int(cache.position) == t + 1
        assert bool(cache.overflowed) == (t + 1 > S)
        if t >= S:  # past the end: nothing written, nothing wrapped onto earlier slots
            np.testing.assert_array_equal(new_k, old.k_cache)
            np.testing.assert_array_equal(new_v, old.v_cache)
        else:  # slot t written, every other slot as it was
            assert np.all(new_k[:, :, t] != old.k_cache[:, :, t])
            new_k[:, :, t] = old.k_cache[:, :, t]
            np.testing.assert_array_equal(new_k, old.k_cache)
    assert decode_step._cache_size() - before == 1


def test_donation_deletes_the_cache_passed_in_without_warning():
    block = make_block(d_ff=40)  # a fresh compilation, so a donation warning would show
    params = ref.random_params(block, rand_x(1, 2), seed=6)
    cache = block.create_kv_cache(B, 8, dtype=jnp.bfloat16)  # not the block's dtype: still donated
    x = rand_x(B, 2, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Some donated buffers were not usable" would raise
        _, new = decode_step(block, params, x, cache)
        _, newer = decode_step(block, params, x, new)
    for leaf in jax.tree_util.tree_leaves(cache) + jax.tree_util.tree_leaves(new):
        assert leaf.is_deleted()
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(newer))
    assert newer.k_cache.dtype == jnp.bfloat16 and int(newer.position) == 4
    with pytest.raises(RuntimeError, match="deleted"):
        np.asarray(cache.k_cache)


@pytest.mark.parametrize(
    "x_shape, mask, match",
    [
        (
            (B, 1, D_MODEL),
            np.ones((B, 1, 1, 5), bool),
            r"mask of shape \(2, 1, 1, 5\) does not broadcast to .*\(2, 4, 1, 16\)",
        ),
        ((B, 1, D_MODEL + 1), None, r"d_model=16\), got \(2, 1, 17\)"),
        ((B + 1, 1, D_MODEL), None, r"batch size 3 exceeds the cache's max_batch_size 2"),
        ((B, 17, D_MODEL), None, r"writing 17 tokens needs 17 slots; .*max_seq_len=16"),
    ],
)
def test_bad_input_raises_at_trace_time_and_keeps_the_donated_cache(x_shape, mask, match):
    block, params, _ = setup(False)
    cache = block.create_kv_cache(B, S_MAX)
    _, cache = decode_step(block, params, rand_x(B, CHUNK, seed=8), cache)
    before = snapshot(cache)
    with pytest.raises(ValueError, match=match):
        decode_step(block, params, np.zeros(x_shape, np.float32), cache, mask)
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(cache))
    np.testing.assert_array_equal(np.asarray(cache.k_cache), before.k_cache)
    assert int(cache.position) == CHUNK
