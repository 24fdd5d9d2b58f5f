"""MultiHeadAttention against a float64 NumPy reference: causal, bidirectional, masks, cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from jax_keys import rbg_key

from jax_block import KVCache, MultiHeadAttention

D_MODEL, N_HEADS = 16, 4
HEAD_DIM = D_MODEL // N_HEADS
ATOL = 1e-5


def rand_x(batch: int, length: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, length, D_MODEL)).astype(np.float32)


def assert_close(a, b, atol: float = ATOL) -> None:
    np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol, rtol=0
    )


def reference(params, x, causal: bool, mask=None, query_start: int = 0) -> np.ndarray:
    """The float64 reference of the queries x[:, query_start:] over all of x (B, L, d_model)."""
    s = ref.spec(d_model=D_MODEL, n_heads=N_HEADS, causal=causal)
    return ref.attention(x, ref.flax_weights(params), "", s, mask, query_start=query_start)


def build(causal: bool, dropout: float = 0.0):
    mod = MultiHeadAttention(D_MODEL, N_HEADS, dropout=dropout, causal=causal)
    params = ref.random_params(mod, rand_x(1, 2))  # random biases: a wrong bias path shows

    @jax.jit
    def apply(params, x, mask=None, kv_cache=None, cache_position=None):
        return mod.apply({"params": params}, x, mask, kv_cache, cache_position)

    return mod, params, apply


@pytest.fixture(scope="module")
def causal_attn():
    return build(causal=True)


@pytest.fixture(scope="module")
def bidir_attn():
    return build(causal=False)


@pytest.fixture(params=[True, False], ids=["causal", "bidirectional"])
def attn(request, causal_attn, bidir_attn):
    return causal_attn if request.param else bidir_attn


def test_parameters_fields_and_defaults():
    mod = MultiHeadAttention(D_MODEL, N_HEADS)
    assert (mod.dropout, mod.causal, mod.dtype, mod.param_dtype) == (
        0.1,
        True,
        jnp.float32,
        jnp.float32,
    )
    params = jax.eval_shape(mod.init, jax.random.PRNGKey(0), rand_x(1, 3))["params"]
    assert set(params) == {"q_proj", "k_proj", "v_proj", "out_proj"}
    for layer in params.values():
        assert layer["kernel"].shape == (D_MODEL, D_MODEL) and layer["bias"].shape == (D_MODEL,)


B, T = 2, 6  # every call without a cache uses x of this shape: one compilation per mask shape


def test_no_mask_matches_reference(attn):
    mod, params, apply = attn
    x = rand_x(B, T)
    out, cache = apply(params, x)
    assert out.shape == (B, T, D_MODEL) and out.dtype == jnp.float32 and cache is None
    assert_close(out, reference(params, x, mod.causal))


def test_causal_rule_hides_later_tokens(causal_attn, bidir_attn):
    (_, pc, causal), (_, pb, bidir) = causal_attn, bidir_attn
    x = rand_x(B, T, seed=2)
    moved = x.copy()
    moved[:, 3:] += 1.0
    assert_close(np.asarray(causal(pc, moved)[0])[:, :3], np.asarray(causal(pc, x)[0])[:, :3])
    changed = np.asarray(bidir(pb, moved)[0])[:, :3] - np.asarray(bidir(pb, x)[0])[:, :3]
    assert np.abs(changed).max() > 1e-3


def masks(B: int, T: int, S: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    pad = np.ones((B, 1, 1, S), bool)
    pad[0, ..., :2] = False  # left padding of row 0: with the causal rule, queries 0, 1 are empty
    pattern = (rng.random((1, 1, T, S)) > 0.4).astype(np.float32)  # 0/1 floats
    per_head = rng.random((B, N_HEADS, T, S)) > 0.5
    square = rng.random((T, S)) > 0.3
    square[1] = False  # a query row that may attend to nothing
    return {"padding_B11S": pad, "float01_11TS": pattern, "BHTS": per_head, "bool_TS": square}


@pytest.mark.parametrize("mask_name", ["padding_B11S", "float01_11TS", "BHTS", "bool_TS"])
def test_masks_match_reference(attn, mask_name):
    mod, params, apply = attn
    mask = masks(B, T, T)[mask_name]
    x = rand_x(B, T, seed=3)
    out, _ = apply(params, x, mask)
    assert np.isfinite(np.asarray(out)).all()
    assert_close(out, reference(params, x, mod.causal, mask))


def test_fully_masked_row_is_zero_attention_not_nan(attn):
    mod, params, apply = attn
    x = rand_x(B, T, seed=4)
    mask = masks(B, T, T)["bool_TS"]  # query 1 may attend to nothing, in every batch row
    out = np.asarray(apply(params, x, mask)[0])
    assert np.isfinite(out).all()
    for b in range(B):  # out_proj of a zero attention output is its bias
        assert_close(out[b, 1], params["out_proj"]["bias"])


def test_fully_masked_row_has_finite_gradients(causal_attn):
    _, params, apply = causal_attn
    x = rand_x(B, T, seed=4)
    mask = masks(B, T, T)["bool_TS"]

    def loss(p, x):
        return jnp.sum(apply(p, x, mask)[0] ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert np.abs(np.asarray(grads[1])[:, 1]).max() > 0  # the masked query still gets a gradient


# --------------------------------------------------------------------------- with a cache
S, PREFILL, CHUNK = 12, 5, 3  # every cached call: a (B + 1, H, S, D) cache, T = PREFILL or CHUNK


def garbage_cache() -> KVCache:
    """A cache with a spare batch row, full of random values: unwritten slots never count."""
    rng = np.random.default_rng(11)
    k = jnp.asarray(rng.standard_normal((B + 1, N_HEADS, S, HEAD_DIM)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B + 1, N_HEADS, S, HEAD_DIM)), jnp.float32)
    return KVCache(k, v, jnp.zeros((), jnp.int32))


def test_cache_prefill_then_chunks_match_reference(attn):
    mod, params, apply = attn
    L = PREFILL + 2 * CHUNK
    x = rand_x(B, L, seed=6)

    out, cache = apply(params, x[:, :PREFILL], None, garbage_cache(), np.int32(0))
    assert int(cache.position) == PREFILL
    assert_close(out, reference(params, x[:, :PREFILL], mod.causal))
    for start in (PREFILL, PREFILL + CHUNK):
        out, cache = apply(params, x[:, start : start + CHUNK], None, cache, np.int32(start))
        assert int(cache.position) == start + CHUNK
        expected = reference(params, x[:, : start + CHUNK], mod.causal, query_start=start)
        assert_close(out, expected)

    # the cache holds projected keys and values, heads split: (B, H, S, D)
    s = ref.spec(d_model=D_MODEL, n_heads=N_HEADS)
    k_ref, v_ref = ref.keys_values(x, ref.flax_weights(params), "", s)  # (B, L, H, D)
    after_k, after_v = np.asarray(cache.k_cache), np.asarray(cache.v_cache)
    assert_close(after_k[:B, :, :L], k_ref.transpose(0, 2, 1, 3))
    assert_close(after_v[:B, :, :L], v_ref.transpose(0, 2, 1, 3))
    before = np.asarray(garbage_cache().k_cache)
    np.testing.assert_array_equal(after_k[B:], before[B:])  # the spare batch row
    np.testing.assert_array_equal(after_k[:, :, L:], before[:, :, L:])  # the slots past L


def test_cache_mask_covers_max_seq_len_slots(attn):
    """The key axis of a mask with a cache is the cache's S slots; unwritten ones never count."""
    mod, params, apply = attn
    L = PREFILL + CHUNK
    x = rand_x(B, L, seed=7)
    rng = np.random.default_rng(8)
    mask = rng.random((B, 1, CHUNK, S)) > 0.3  # (B, 1, T, S)
    mask[:, :, :, L:] = True  # unwritten slots allowed by the mask: still never attended
    mask[0, :, 1, :L] = False  # a row with no written key allowed
    _, cache = apply(params, x[:, :PREFILL], None, garbage_cache(), np.int32(0))
    out, cache = apply(params, x[:, PREFILL:], mask, cache, np.int32(PREFILL))
    expected = reference(params, x, mod.causal, mask[..., :L], query_start=PREFILL)
    assert np.isfinite(np.asarray(out)).all()
    assert_close(out, expected)


def test_known_position_zero_reads_no_cache_slot(attn):
    """A Python 0 as the position (known while tracing) skips the cache's slots altogether."""
    mod, params, _ = attn
    x = rand_x(B, PREFILL, seed=12)
    out, cache = mod.apply({"params": params}, x, None, garbage_cache(), 0)
    assert int(cache.position) == PREFILL
    assert_close(out, reference(params, x, mod.causal))


def test_traced_write_past_the_end_attends_only_to_the_keys_it_kept(attn):
    mod, params, apply = attn
    start = S - 1  # CHUNK = 3 tokens at slots 11, 12, 13: only slot 11 exists
    x = rand_x(B, start + CHUNK, seed=13)
    _, cache = apply(params, x[:, :PREFILL], None, garbage_cache(), np.int32(0))
    _, cache = apply(params, x[:, PREFILL:start], None, cache, np.int32(PREFILL))
    out, cache = apply(params, x[:, start:], None, cache, np.int32(start))
    assert bool(cache.overflowed)
    kept = np.zeros((1, 1, CHUNK, start + CHUNK), bool)
    kept[..., : start + 1] = True  # the cached slots and the one new key written
    expected = reference(params, x, mod.causal, kept, query_start=start)
    assert_close(out, expected)


def test_explicit_cache_position_overrides_the_caches_own(causal_attn):
    _, params, apply = causal_attn
    x = rand_x(B, PREFILL + CHUNK, seed=9)
    _, cache = apply(params, x[:, :PREFILL], None, garbage_cache(), np.int32(0))
    # rewrite from position 2: slots 2..4 are replaced and the old slot 4 is no longer attended
    out, cache = apply(params, x[:, PREFILL:], None, cache, np.int32(2))
    assert int(cache.position) == 2 + CHUNK
    moved = np.concatenate([x[:, :2], x[:, PREFILL:]], axis=1)
    assert_close(out, reference(params, moved, True, query_start=2))


# --------------------------------------------------------------------------- dropout, bad input
def test_dropout_only_in_training():
    mod, params, _ = build(causal=True, dropout=0.5)
    zero = MultiHeadAttention(D_MODEL, N_HEADS, dropout=0.0)

    @jax.jit
    def train(params, x, key):
        rngs = {"dropout": key}
        return (
            mod.apply({"params": params}, x, deterministic=False, rngs=rngs)[0],
            zero.apply({"params": params}, x, deterministic=False, rngs=rngs)[0],
        )

    x = rand_x(B, T, seed=10)
    expected = reference(params, x, True)
    a, train0 = train(params, x, rbg_key(1))
    b, _ = train(params, x, rbg_key(1))
    c, _ = train(params, x, rbg_key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same rng, the same mask
    assert np.abs(np.asarray(a) - expected).max() > 1e-3
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    assert_close(train0, expected)  # rate 0 in training is the eval forward


def test_bad_input_raises(causal_attn):
    mod, params, _ = causal_attn
    x = rand_x(2, 4)
    with pytest.raises(ValueError, match=r"d_model \(18\) must be divisible by n_heads \(4\)"):
        MultiHeadAttention(18, 4).init(jax.random.PRNGKey(0), np.ones((1, 2, 18)))
    with pytest.raises(
        ValueError,
        match=r"mask of shape \(2, 1, 1, 3\) does not broadcast to "
        r"\(batch, heads, query_len, key_len\) = \(2, 4, 4, 4\)",
    ):
        mod.apply({"params": params}, x, np.ones((2, 1, 1, 3), bool))
    with pytest.raises(ValueError, match=r"at most 4 dimensions, got shape \(1, 2, 1, 1, 4\)"):
        mod.apply({"params": params}, x, np.ones((1, 2, 1, 1, 4), bool))
    cache = KVCache.create(2, 9, N_HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match=r"mask of shape \(4, 4\) .* = \(2, 4, 4, 9\)"):
        mod.apply({"params": params}, x, np.ones((4, 4), bool), cache)  # key axis must be 9
