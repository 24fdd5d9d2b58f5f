"""KVCache: preallocated (B, H, S, D) buffers, positions, update/get/reset/to, and bad writes."""

from __future__ import annotations

import pytest
import torch

from torch_block import KVCache

B, H, S, D = 3, 2, 10, 4


def make_cache() -> KVCache:
    return KVCache(B, S, H, D)


def rand_kv(batch: int, length: int, heads: int = H, head_dim: int = D, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, heads, length, head_dim, generator=g)
    v = torch.randn(batch, heads, length, head_dim, generator=g)
    return k, v


def snapshot(cache: KVCache):
    return cache.k_cache.clone(), cache.v_cache.clone(), cache.cache_position


def assert_unchanged(cache: KVCache, snap) -> None:
    k, v, pos = snap
    assert cache.cache_position == pos
    assert torch.equal(cache.k_cache, k)
    assert torch.equal(cache.v_cache, v)


def test_preallocated_shapes_dtype_and_start_position():
    cache = make_cache()
    assert cache.k_cache.shape == (B, H, S, D)
    assert cache.v_cache.shape == (B, H, S, D)
    assert cache.k_cache.dtype == torch.float32
    assert cache.k_cache.device.type == "cpu"
    assert cache.cache_position == 0
    assert (cache.max_batch_size, cache.max_seq_len, cache.n_heads, cache.head_dim) == (B, S, H, D)
    assert torch.count_nonzero(cache.k_cache) == 0 and torch.count_nonzero(cache.v_cache) == 0


def test_dtype_argument():
    cache = KVCache(1, 4, 2, 3, dtype=torch.float64, device="cpu")
    assert cache.k_cache.dtype == torch.float64 and cache.v_cache.dtype == torch.float64


def test_update_writes_slots_and_returns_prefix():
    cache = make_cache()
    k1, v1 = rand_kv(B, 4, seed=1)
    keys, values = cache.update(k1, v1)
    assert cache.cache_position == 4
    assert keys.shape == (B, H, 4, D) and values.shape == (B, H, 4, D)
    assert torch.equal(keys, k1) and torch.equal(values, v1)

    k2, v2 = rand_kv(B, 3, seed=2)
    keys, values = cache.update(k2, v2)
    assert cache.cache_position == 7
    assert keys.shape == (B, H, 7, D)
    assert torch.equal(keys, torch.cat([k1, k2], dim=2))
    assert torch.equal(values, torch.cat([v1, v2], dim=2))
    # slots past the written ones are untouched zeros
    assert torch.count_nonzero(cache.k_cache[:, :, 7:]) == 0
    assert torch.count_nonzero(cache.v_cache[:, :, 7:]) == 0


def test_update_with_explicit_start_pos_and_smaller_batch():
    cache = make_cache()
    k1, v1 = rand_kv(2, 5, seed=3)
    cache.update(k1, v1)
    assert cache.cache_position == 5
    # rewrite slots [2, 4) for a batch of 2: position becomes 2 + 2 = 4
    k2, v2 = rand_kv(2, 2, seed=4)
    keys, values = cache.update(k2, v2, start_pos=2)
    assert cache.cache_position == 4
    assert keys.shape == (2, H, 4, D)
    expected_k = torch.cat([k1[:, :, :2], k2], dim=2)
    expected_v = torch.cat([v1[:, :, :2], v2], dim=2)
    assert torch.equal(keys, expected_k) and torch.equal(values, expected_v)
    # slot 4 still holds the first write; the third batch row was never written
    assert torch.equal(cache.k_cache[:2, :, 4], k1[:, :, 4])
    assert torch.count_nonzero(cache.k_cache[2]) == 0


def test_update_fills_exactly_to_max_seq_len():
    cache = make_cache()
    k, v = rand_kv(1, S, seed=5)
    keys, _ = cache.update(k, v)
    assert cache.cache_position == S
    assert keys.shape == (1, H, S, D)


def test_get_defaults_and_arguments():
    cache = make_cache()
    k, v = rand_kv(B, 6, seed=6)
    cache.update(k, v)
    keys, values = cache.get()
    assert keys.shape == (B, H, 6, D)
    assert torch.equal(keys, k) and torch.equal(values, v)
    keys, values = cache.get(batch_size=2, seq_len=4)
    assert keys.shape == (2, H, 4, D)
    assert torch.equal(keys, k[:2, :, :4]) and torch.equal(values, v[:2, :, :4])
    keys, _ = cache.get(batch_size=1)
    assert keys.shape == (1, H, 6, D)
    keys, _ = cache.get(seq_len=S)
    assert keys.shape == (B, H, S, D)


def test_reset_zeroes_and_rewinds():
    cache = make_cache()
    cache.update(*rand_kv(B, 5, seed=7))
    cache.reset()
    assert cache.cache_position == 0
    assert torch.count_nonzero(cache.k_cache) == 0 and torch.count_nonzero(cache.v_cache) == 0
    keys, _ = cache.get()
    assert keys.shape == (B, H, 0, D)


def test_to_cpu_returns_self_and_keeps_contents():
    cache = make_cache()
    k, v = rand_kv(B, 2, seed=8)
    cache.update(k, v)
    moved = cache.to("cpu")
    assert moved is cache
    assert cache.k_cache.device.type == "cpu"
    assert cache.cache_position == 2
    assert torch.equal(cache.get()[0], k)
    assert cache.to(torch.device("cpu")) is cache


def test_dtype_and_device_attributes_are_what_the_constructor_and_to_were_given():
    default = make_cache()
    assert default.dtype == torch.float32 and default.device == "cpu"
    meta = torch.device("meta")  # a second device on any machine (tensors without data)
    on_meta = KVCache(1, 4, 2, 3, dtype=torch.bfloat16, device=meta)
    assert on_meta.dtype == torch.bfloat16 and on_meta.device == meta
    assert on_meta.k_cache.device == meta and on_meta.v_cache.dtype == torch.bfloat16

    cache = KVCache(1, 4, 2, 3, dtype=torch.float64, device=torch.device("cpu"))
    assert cache.device == torch.device("cpu") and cache.dtype == torch.float64
    assert cache.to("cpu") is cache and cache.device == "cpu"
    assert cache.to("meta") is cache
    assert cache.device == "meta" and cache.k_cache.device == meta == cache.v_cache.device
    assert cache.dtype == torch.float64 == cache.k_cache.dtype  # .to(device) keeps the dtype


def test_repr_shows_shape_dtype_device_and_position():
    cache = KVCache(B, S, H, D, dtype=torch.bfloat16)
    assert repr(cache) == (
        f"KVCache(shape=({B}, {H}, {S}, {D}), dtype=torch.bfloat16, device=cpu, cache_position=0)"
    )
    cache.update(*rand_kv(B, 4))
    assert str(cache).endswith("cache_position=4)")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_batch_size=0), r"max_batch_size.*0"),
        (dict(max_seq_len=-1), r"max_seq_len.*-1"),
        (dict(n_heads=0), r"n_heads.*0"),
        (dict(head_dim=2.5), r"head_dim.*2\.5"),
    ],
)
def test_constructor_rejects_non_positive_sizes(kwargs, match):
    args = dict(max_batch_size=1, max_seq_len=4, n_heads=2, head_dim=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        KVCache(**args)


def _prefilled_cache() -> KVCache:
    cache = make_cache()
    cache.update(*rand_kv(B, 6, seed=9))
    return cache


@pytest.mark.parametrize(
    "batch, length, heads, head_dim, start, match",
    [
        # batch too big: names the batch given and the limit
        (B + 1, 1, H, D, None, rf"batch size {B + 1}.*max_batch_size {B}"),
        # heads mismatch: names what the cache holds and what came
        (B, 1, H + 1, D, None, rf"n_heads={H}, head_dim={D}.*n_heads={H + 1}, head_dim={D}"),
        # head_dim mismatch
        (B, 1, H, D + 2, None, rf"n_heads={H}, head_dim={D}.*n_heads={H}, head_dim={D + 2}"),
        # negative position
        (B, 1, H, D, -1, r"cache_position must be >= 0, got -1"),
        # overflow past max_seq_len from the current position (6 + 5 > 10)
        (B, 5, H, D, None, rf"5 tokens at position 6 needs 11 slots.*max_seq_len={S}"),
        # overflow from an explicit position
        (1, 2, H, D, S - 1, rf"2 tokens at position {S - 1} needs {S + 1}.*max_seq_len={S}"),
    ],
)
def test_bad_update_raises_and_leaves_cache_unchanged(batch, length, heads, head_dim, start, match):
    cache = _prefilled_cache()
    snap = snapshot(cache)
    k, v = rand_kv(batch, length, heads, head_dim, seed=10)
    with pytest.raises(ValueError, match=match):
        cache.update(k, v, start_pos=start)
    assert_unchanged(cache, snap)


def test_bad_update_shapes_raise_and_leave_cache_unchanged():
    cache = _prefilled_cache()
    snap = snapshot(cache)
    k, v = rand_kv(B, 1, seed=11)
    with pytest.raises(ValueError, match=r"\(B, H, T, D\).*\(3, 2, 1, 4\).*\(3, 2, 2, 4\)"):
        cache.update(k, torch.cat([v, v], dim=2))
    with pytest.raises(ValueError, match=r"\(B, H, T, D\)"):
        cache.update(k[0], v[0])
    assert_unchanged(cache, snap)


def test_non_int_position_raises_type_error_and_leaves_cache_unchanged():
    cache = _prefilled_cache()
    snap = snapshot(cache)
    with pytest.raises(TypeError, match=r"cache_position must be an int, got float"):
        cache.update(*rand_kv(B, 1, seed=12), start_pos=2.0)
    assert_unchanged(cache, snap)
