"""KVCache pytree: shapes, immutable writes, jit through it, overflow and negative positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_block import KVCache, TransformerBlock

B, H, S, D = 3, 2, 10, 4


def rand_kv(batch: int, length: int, heads: int = H, head_dim: int = D, seed: int = 0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((batch, heads, length, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, heads, length, head_dim)).astype(np.float32)
    return jnp.asarray(k), jnp.asarray(v)


def filled_cache(seed: int = 9) -> KVCache:
    """A cache whose every slot holds a distinct random value, at position 0."""
    k, v = rand_kv(B, S, seed=seed)
    return KVCache(k, v, jnp.zeros((), jnp.int32))


@pytest.fixture(scope="module")
def jit_write():
    """cache.write(k, v, start) under jit, the position traced; counts its traces."""
    traces = []

    def write(cache, k, v, start):
        traces.append(1)
        return cache.write(k, v, start)

    fn = jax.jit(write)
    fn.traces = traces
    return fn


# --------------------------------------------------------------------------- create
def test_create_shapes_dtype_and_position():
    cache = KVCache.create(B, S, H, D)
    assert cache.k_cache.shape == (B, H, S, D) and cache.v_cache.shape == (B, H, S, D)
    assert cache.k_cache.dtype == jnp.float32 and cache.v_cache.dtype == jnp.float32
    assert cache.position.shape == () and cache.position.dtype == jnp.int32
    assert int(cache.position) == 0
    assert (cache.max_batch_size, cache.max_seq_len, cache.n_heads, cache.head_dim) == (B, S, H, D)
    assert not np.any(np.asarray(cache.k_cache)) and not np.any(np.asarray(cache.v_cache))
    assert not bool(cache.overflowed)

    bf16 = KVCache.create(1, 4, 2, 3, dtype=jnp.bfloat16)
    assert bf16.k_cache.dtype == jnp.bfloat16 and bf16.v_cache.dtype == jnp.bfloat16


def test_repr_shows_shape_dtype_and_position_also_under_jit():
    cache = KVCache.create(B, S, H, D, dtype=jnp.bfloat16)
    assert repr(cache) == f"KVCache(shape=({B}, {H}, {S}, {D}), dtype=bfloat16, position=0)"
    k, v = rand_kv(B, 4)
    assert str(cache.write(k, v, 3)).endswith("position=7)")
    seen = []
    jax.jit(lambda c: seen.append(repr(c)) or c)(cache)
    assert seen == [f"KVCache(shape=({B}, {H}, {S}, {D}), dtype=bfloat16, position=traced)"]


def test_block_create_kv_cache_on_the_unbound_module():
    cache = TransformerBlock.create(d_model=16, n_heads=4, d_ff=32).create_kv_cache(
        2, 7, dtype=jnp.bfloat16
    )
    assert cache.k_cache.shape == (2, 4, 7, 4) and cache.k_cache.dtype == jnp.bfloat16
    assert int(cache.position) == 0


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, S, H, D), r"max_batch_size must be a positive int, got 0"),
        ((B, -1, H, D), r"max_seq_len must be a positive int, got -1"),
        ((B, S, 2.0, D), r"n_heads must be a positive int, got 2\.0"),
        ((B, S, H, True), r"head_dim must be a positive int, got True"),
    ],
)
def test_create_rejects_bad_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        KVCache.create(*args)


# --------------------------------------------------------------------------- write
def test_write_returns_a_new_cache_and_leaves_the_old_one():
    old = filled_cache()
    old_k, old_v = np.asarray(old.k_cache), np.asarray(old.v_cache)
    k, v = rand_kv(2, 3, seed=1)  # batch 2 of the cache's 3 rows
    new = old.write(k, v, 4)

    np.testing.assert_array_equal(np.asarray(old.k_cache), old_k)
    np.testing.assert_array_equal(np.asarray(old.v_cache), old_v)
    assert int(old.position) == 0 and int(new.position) == 7
    expect_k, expect_v = old_k.copy(), old_v.copy()
    expect_k[:2, :, 4:7], expect_v[:2, :, 4:7] = k, v
    np.testing.assert_array_equal(np.asarray(new.k_cache), expect_k)
    np.testing.assert_array_equal(np.asarray(new.v_cache), expect_v)
    assert new.position.dtype == jnp.int32 and not bool(new.overflowed)


def test_write_casts_to_the_cache_dtype():
    cache = KVCache.create(1, 4, H, D, dtype=jnp.bfloat16)
    k, v = rand_kv(1, 2)
    new = cache.write(k, v, 1)
    assert new.k_cache.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(new.k_cache[:, :, 1:3], np.float32),
        np.asarray(k.astype(jnp.bfloat16), np.float32),
    )


def test_cache_is_a_pytree():
    cache = filled_cache()
    leaves, treedef = jax.tree_util.tree_flatten(cache)
    assert len(leaves) == 3
    assert {leaf.shape for leaf in leaves} == {(B, H, S, D), ()}
    doubled = jax.tree_util.tree_map(lambda a: a * 2, cache)
    assert isinstance(doubled, KVCache)
    np.testing.assert_array_equal(np.asarray(doubled.k_cache), 2 * np.asarray(cache.k_cache))
    assert isinstance(jax.tree_util.tree_unflatten(treedef, leaves), KVCache)

    shifted = jax.jit(lambda c: c.replace(position=c.position + 5))(cache)
    assert isinstance(shifted, KVCache) and int(shifted.position) == 5
    np.testing.assert_array_equal(np.asarray(shifted.v_cache), np.asarray(cache.v_cache))


def test_traced_writes_compile_once_for_every_position(jit_write):
    cache = KVCache.create(B, S, H, D)
    expected = np.zeros((B, H, S, D), np.float32)
    before = len(jit_write.traces)
    for p in range(0, S, 2):
        k, v = rand_kv(B, 2, seed=p)
        cache = jit_write(cache, k, v, jnp.int32(p))
        expected[:, :, p : p + 2] = k
        assert int(cache.position) == p + 2
    np.testing.assert_array_equal(np.asarray(cache.k_cache), expected)
    assert len(jit_write.traces) - before == 1
    assert not bool(cache.overflowed)


# --------------------------------------------------------------------------- overflow
@pytest.mark.parametrize(
    "start, length, match",
    [
        (8, 3, r"writing 3 tokens at position 8 needs 11 slots; the cache has max_seq_len=10"),
        (10, 1, r"writing 1 tokens at position 10 needs 11 slots; .*max_seq_len=10"),
        (0, 11, r"writing 11 tokens needs 11 slots; the cache has max_seq_len=10"),
        (-1, 1, r"cache_position must be >= 0, got -1"),
    ],
)
def test_concrete_write_that_does_not_fit_raises(start, length, match):
    cache = filled_cache()
    k, v = rand_kv(B, length)
    with pytest.raises(ValueError, match=match):
        cache.write(k, v, start)
    with pytest.raises(ValueError, match=match):  # concrete under jit too: raises at trace time
        jax.jit(lambda c, k, v: c.write(k, v, start))(cache, k, v)


def test_write_rejects_bad_shapes_and_positions():
    cache = filled_cache()
    k, v = rand_kv(B, 2)
    with pytest.raises(ValueError, match=r"batch size 4 exceeds the cache's max_batch_size 3"):
        cache.write(*rand_kv(4, 2), 0)
    with pytest.raises(ValueError, match=r"cache holds n_heads=2, head_dim=4; got n_heads=3"):
        cache.write(*rand_kv(B, 2, heads=3), 0)
    shapes = r"k and v must both be \(B, H, T, D\); got \(3, 2, 2, 4\) and \(3, 2, 1, 4\)"
    with pytest.raises(ValueError, match=shapes):
        cache.write(k, v[:, :, :1], 0)
    with pytest.raises(TypeError, match=r"cache_position must be an integer, got 1\.5"):
        cache.write(k, v, 1.5)


def test_traced_write_past_the_end_drops_the_overflow_and_flags_it(jit_write):
    cache = filled_cache()
    old_k = np.asarray(cache.k_cache)
    k, v = rand_kv(B, 4, seed=3)
    new = jit_write(cache, k, v, jnp.int32(8))  # slots 8, 9 fit; 10, 11 do not

    expected = old_k.copy()
    expected[:, :, 8:10] = k[:, :, :2]  # only what fits; slots 0..7 untouched, nothing wrapped
    np.testing.assert_array_equal(np.asarray(new.k_cache), expected)
    assert int(new.position) == 12 and bool(new.overflowed)

    again = jit_write(new, k, v, new.position)  # the flag sticks; nothing more is written
    np.testing.assert_array_equal(np.asarray(again.k_cache), expected)
    assert bool(again.overflowed)

    exact = jit_write(cache, k, v, jnp.int32(S - 4))  # ends exactly at max_seq_len: fine
    assert int(exact.position) == S and not bool(exact.overflowed)


@pytest.mark.parametrize("start", [-1, -2, -7])
def test_traced_negative_position_writes_nothing_and_flags_it(jit_write, start):
    cache = filled_cache()
    k, v = rand_kv(B, 4, seed=4)
    new = jit_write(cache, k, v, jnp.int32(start))
    np.testing.assert_array_equal(np.asarray(new.k_cache), np.asarray(cache.k_cache))
    np.testing.assert_array_equal(np.asarray(new.v_cache), np.asarray(cache.v_cache))
    assert bool(new.overflowed) and int(new.position) < 0
