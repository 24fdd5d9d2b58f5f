"""TransformerBlock: API, a float64 NumPy forward, training, gradients, bad input, bfloat16."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from jax_keys import rbg_key

from jax_block import KVCache, TransformerBlock, TransformerLM
from twin_core import BlockConfig, LMConfig

D_MODEL, N_HEADS, D_FF = 16, 4, 32
HEAD_DIM = D_MODEL // N_HEADS
E, K = 4, 2
ATOL = 1e-5
B, T = 2, 5


def rand_x(batch: int, length: int, seed: int = 1, scale: float = 1.0) -> np.ndarray:
    x = scale * np.random.default_rng(seed).standard_normal((batch, length, D_MODEL))
    return x.astype(np.float32)


def assert_close(a, b, atol: float = ATOL) -> None:
    np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol, rtol=0
    )


def reference(params, x, causal=True, mask=None, top_k=None, capacity_factor=None):
    """The float64 reference block: (y (B, T, d_model), MoEOut or None); top_k None: dense."""
    weights = ref.flax_weights(params)
    s = ref.spec(d_model=D_MODEL, n_heads=N_HEADS, causal=causal, use_moe=top_k is not None)
    if top_k is not None:
        s.update(num_experts=len(weights["feed_forward.gate.weight"]), top_k_experts=top_k)
    return ref.block(x, weights, s, mask, capacity_factor=capacity_factor)


def make_block(use_moe: bool, **kw) -> TransformerBlock:
    kw = {"dropout": 0.0, "num_experts": E, "top_k_experts": K, **kw}
    return TransformerBlock.create(
        d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF, use_moe=use_moe, **kw
    )


@functools.cache
def block_params(use_moe: bool, seed: int = 0) -> dict:
    return ref.random_params(make_block(use_moe), rand_x(1, 2), seed=seed)


def forward(
    use_moe: bool,
    causal: bool = True,
    dtype=jnp.float32,
    train: bool = False,
    factor: float | None = 1.25,
):
    """A jitted block forward (y, aux, state) for one configuration, built once per session."""
    return _forward(use_moe, causal, dtype, train, factor)


@functools.cache
def _forward(use_moe, causal, dtype, train, factor):
    block = make_block(use_moe, causal=causal, dtype=dtype, expert_capacity_factor=factor)

    @jax.jit
    def run(params, x, mask=None):
        (y, cache, aux), state = block.apply(
            {"params": params},
            x,
            mask,
            deterministic=not train,
            return_aux_loss=True,
            mutable=["moe_stats"],
        )
        assert cache is None
        return y, aux, state

    return run


def hard_mask(batch: int, length: int) -> np.ndarray:
    """Left padding of 2 on row 0 and one query of row 1 that may attend to nothing."""
    mask = np.ones((batch, 1, length, length), bool)
    mask[0, ..., :2] = False
    mask[1, :, 3] = False
    return mask


# --------------------------------------------------------------------------- API
def test_fields_mirror_the_torch_constructor():
    block = TransformerBlock.create(d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF)
    config = block.config
    assert (config.dropout, config.use_moe, config.num_experts, config.top_k_experts) == (
        0.1,
        False,
        8,
        2,
    )
    assert (config.causal, config.expert_capacity_factor, config.router_z_loss_coef) == (
        True,
        1.25,
        0.0,
    )
    assert (block.dtype, block.param_dtype) == (jnp.float32, jnp.float32)
    kw = dict(
        d_model=16,
        n_heads=4,
        d_ff=32,
        dropout=0.2,
        use_moe=True,
        num_experts=4,
        top_k_experts=1,
        causal=False,
        expert_capacity_factor=None,
        router_z_loss_coef=0.1,
    )
    block = TransformerBlock.create(**kw)
    assert {name: getattr(block.config, name) for name in kw} == kw


LM_FIELDS = dict(vocab_size=32, max_seq_len=8, d_model=8, n_layers=2, n_heads=2, d_ff=16)
CREATE_CASES = [
    (TransformerBlock, BlockConfig, dict(d_model=8, n_heads=2, d_ff=16)),
    (TransformerLM, LMConfig, LM_FIELDS),
]


@pytest.mark.parametrize("module, config_cls, fields", CREATE_CASES, ids=["block", "lm"])
def test_create_holds_twin_cores_config_with_its_defaults(module, config_cls, fields):
    own = ["scan_layers"] if module is TransformerLM else []  # the LM's choice of layout
    assert [f.name for f in dataclasses.fields(module)] == [
        "config",
        "dtype",
        "param_dtype",
        *own,
        "parent",
        "name",
    ]
    assert module.create(**fields).config == config_cls(**fields)
    if own:
        assert module.create(**fields, scan_layers=True).scan_layers
    built = module.create(**fields, use_moe=True, dtype=jnp.bfloat16, name="m")
    config = config_cls(**fields, use_moe=True)
    assert built == module.from_config(config, dtype=jnp.bfloat16, name="m")
    assert (built.config, built.dtype, built.param_dtype) == (config, jnp.bfloat16, jnp.float32)


@pytest.mark.parametrize("module, config_cls, fields", CREATE_CASES, ids=["block", "lm"])
def test_create_refuses_an_unknown_keyword_by_name(module, config_cls, fields):
    with pytest.raises(
        TypeError, match=rf"{module.__name__}.create: unknown keyword\(s\) \['d_modle'\]"
    ):
        module.create(**fields, d_modle=8)
    other = (
        BlockConfig(d_model=8, n_heads=2, d_ff=16)
        if config_cls is LMConfig
        else LMConfig(**LM_FIELDS)
    )
    with pytest.raises(TypeError, match=rf"config must be a twin_core.{config_cls.__name__}"):
        module(other)


def test_init_parameter_tree_dtypes_and_distinct_experts():
    block = make_block(True)
    params = jax.jit(block.init)(rbg_key(0), rand_x(1, 3))["params"]
    shapes = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params)
    f32 = jnp.float32
    proj = {"kernel": ((D_MODEL, D_MODEL), f32), "bias": ((D_MODEL,), f32)}
    norm = {"scale": ((D_MODEL,), f32), "bias": ((D_MODEL,), f32)}
    assert shapes == {
        "attention": {name: proj for name in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "norm1": norm,
        "norm2": norm,
        "feed_forward": {
            "gate": {"kernel": ((D_MODEL, E), f32)},
            "experts": {
                "fc1": {"kernel": ((E, D_MODEL, D_FF), f32), "bias": ((E, D_FF), f32)},
                "fc2": {"kernel": ((E, D_FF, D_MODEL), f32), "bias": ((E, D_MODEL), f32)},
            },
        },
    }
    fc1 = np.asarray(params["feed_forward"]["experts"]["fc1"]["kernel"])
    assert all(not np.allclose(fc1[0], fc1[e]) for e in range(1, E))  # rngs split per expert

    dense = jax.eval_shape(make_block(False).init, jax.random.PRNGKey(0), rand_x(1, 3))
    ff = jax.tree_util.tree_map(lambda a: a.shape, dense["params"]["feed_forward"])
    assert ff == {
        "fc1": {"kernel": (D_MODEL, D_FF), "bias": (D_FF,)},
        "fc2": {"kernel": (D_FF, D_MODEL), "bias": (D_MODEL,)},
    }


@pytest.mark.parametrize("use_moe", [False, True])
def test_return_tuple_without_cache_and_aux_only_when_asked(use_moe):
    block = make_block(use_moe)
    x = rand_x(B, T)

    def call(**kw):
        return jax.eval_shape(lambda p: block.apply({"params": p}, x, **kw), block_params(use_moe))

    y, cache, aux = call()
    assert y.shape == (B, T, D_MODEL) and y.dtype == jnp.float32 and cache is None and aux is None
    _, _, aux = call(return_aux_loss=True)
    assert (aux is not None and aux.shape == ()) if use_moe else aux is None


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize(
    "use_moe, causal", [(False, True), (True, True), (False, False)], ids=["dense", "moe", "bidir"]
)
def test_block_matches_reference(use_moe, causal):
    params = block_params(use_moe)
    x = rand_x(B, T, seed=2)
    mask = hard_mask(B, T)
    y, aux, _ = forward(use_moe, causal)(params, x, jnp.asarray(mask))
    expected, moe = reference(params, x, causal, mask, K if use_moe else None)
    assert np.isfinite(np.asarray(y)).all()
    assert_close(y, expected)
    if use_moe:
        assert float(aux) == pytest.approx(moe.aux, abs=1e-6)
    # LayerNorm eps is 1e-5: a small-variance input makes it matter
    small = rand_x(B, T, seed=3, scale=3e-3)
    y, _, _ = forward(use_moe, causal)(params, small, jnp.asarray(mask))
    assert_close(y, reference(params, small, causal, mask, K if use_moe else None)[0])


def test_moe_block_in_training_drops_by_capacity_and_counts_experts():
    params = block_params(True, seed=4)
    x = rand_x(B, T, seed=5)
    mask = hard_mask(B, T)
    y, aux, state = forward(True, train=True, factor=0.5)(params, x, jnp.asarray(mask))
    expected, moe = reference(params, x, True, mask, K, capacity_factor=0.5)
    assert len(moe.kept) < B * T * K  # capacity really drops assignments here
    assert_close(y, expected)
    assert float(aux) == pytest.approx(moe.aux, abs=1e-6)
    counts = state["moe_stats"]["feed_forward"]["expert_counts"]
    np.testing.assert_array_equal(np.asarray(counts), moe.counts)
    _, _, state = forward(True)(params, x, jnp.asarray(mask))
    assert state == {}  # eval counts nothing


def test_dropout_only_in_training():
    block = make_block(False, dropout=0.3)
    params = block_params(False)
    x = rand_x(B, T, seed=6)

    @jax.jit
    def run(params, x, key):
        rngs = {"dropout": key}
        train = block.apply({"params": params}, x, deterministic=False, rngs=rngs)[0]
        return train, block.apply({"params": params}, x)[0]

    a, eval_out = run(params, x, rbg_key(0))
    b, _ = run(params, x, rbg_key(0))
    c, _ = run(params, x, rbg_key(1))
    assert_close(eval_out, reference(params, x)[0])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a - eval_out)).max() > 1e-3
    assert np.abs(np.asarray(a - c)).max() > 1e-3


# --------------------------------------------------------------------------- gradients
GRAD_E, GRAD_FACTOR = 8, 0.5  # N = 10 tokens, k = 2: capacity C = ceil(0.5 * 20 / 8) = 2


@functools.cache
def moe_grad_fn():
    """Loss and gradients of sum(y * r) + aux through the MoE block, training, dropout 0."""
    block = make_block(True, num_experts=GRAD_E, expert_capacity_factor=GRAD_FACTOR)

    def loss(params, x, mask, r):
        y, _, aux = block.apply(
            {"params": params}, x, mask, deterministic=False, return_aux_loss=True
        )
        return jnp.sum(y * r) + aux

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def ref_loss(params, x, mask, r):
    y, moe = reference(params, x, True, mask, K, GRAD_FACTOR)
    return float(np.sum(y * r)) + moe.aux, moe


def test_gradients_reach_the_router_and_used_experts_only():
    params = ref.random_params(make_block(True, num_experts=GRAD_E), rand_x(1, 2), seed=12)
    x = rand_x(B, T, seed=8)
    mask = hard_mask(B, T)  # with a fully masked query row: nothing may turn NaN
    r = np.random.default_rng(9).standard_normal((B, T, D_MODEL))
    value, (grads, gx) = moe_grad_fn()(params, x, jnp.asarray(mask), jnp.asarray(r))
    expected, moe = ref_loss(params, x, mask, r)
    assert float(value) == pytest.approx(expected, abs=1e-4)

    used = {moe.choices[n][s][0] for n, s in moe.kept}
    assigned = {e for choice in moe.choices for e, _ in choice}
    assert len(moe.kept) < B * T * K and 0 < len(used) < GRAD_E  # drops and idle experts
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves((grads, gx)))
    assert np.abs(np.asarray(grads["feed_forward"]["gate"]["kernel"])).min(axis=0).max() > 0
    for leaf in jax.tree_util.tree_leaves(grads["feed_forward"]["experts"]):
        per_expert = np.abs(np.asarray(leaf)).reshape(GRAD_E, -1).sum(axis=1)
        for e in range(GRAD_E):
            assert (per_expert[e] > 0) == (e in used), (e, used, assigned)

    # a few entries of every leaf against central differences of the float64 reference
    rng = np.random.default_rng(10)
    flat, treedef = jax.tree_util.tree_flatten(ref.to_f64(params))
    got = [np.asarray(g) for g in jax.tree_util.tree_leaves(grads)]
    for i, leaf in enumerate(flat):
        for _ in range(1 if leaf.size < 64 else 2):
            idx = tuple(rng.integers(0, n) for n in leaf.shape)
            eps = 1e-5
            plus, minus = [a.copy() for a in flat], [a.copy() for a in flat]
            plus[i][idx] += eps
            minus[i][idx] -= eps
            up, _ = ref_loss(jax.tree_util.tree_unflatten(treedef, plus), x, mask, r)
            down, _ = ref_loss(jax.tree_util.tree_unflatten(treedef, minus), x, mask, r)
            numeric = (up - down) / (2 * eps)
            assert float(got[i][idx]) == pytest.approx(numeric, rel=1e-3, abs=2e-4)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_model": 30}, r"d_model \(30\) must be divisible by n_heads \(4\)"),
        ({"n_heads": 0}, r"d_model \(16\) must be divisible by n_heads \(0\), n_heads >= 1"),
        (
            {"use_moe": True, "num_experts": 0, "top_k_experts": 1},
            r"num_experts must be >= 1, got 0",
        ),
        (
            {"use_moe": True, "num_experts": 4, "top_k_experts": 0},
            r"top_k must be in \[1, num_experts=4\], got 0",
        ),
        (
            {"use_moe": True, "num_experts": 4, "top_k_experts": 5},
            r"top_k must be in \[1, num_experts=4\], got 5",
        ),
        ({"use_moe": True, "expert_capacity_factor": 0.0}, r"> 0 or None, got 0\.0"),
        ({"use_moe": True, "expert_capacity_factor": -1.0}, r"> 0 or None, got -1\.0"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerBlock.create(
            **{"d_model": 16, "n_heads": 4, "d_ff": 64, "dropout": 0.0, **kwargs}
        )


B_MAX, S_MAX, PREFILL = 2, 8, 5

BAD_CALLS = {
    # name: (x shape, extra call kwargs, error type, message pattern)
    "x_2d": ((3, D_MODEL), {}, ValueError,
             r"x must be \(batch >= 1, seq_len >= 1, d_model=16\), got \(3, 16\)"),
    "x_4d": ((1, 1, 3, D_MODEL), {}, ValueError, r"d_model=16\), got \(1, 1, 3, 16\)"),
    "x_last_dim": ((2, 1, D_MODEL + 1), {}, ValueError, r"d_model=16\), got \(2, 1, 17\)"),
    "x_empty": ((2, 0, D_MODEL), {}, ValueError, r"seq_len >= 1, d_model=16\), got \(2, 0, 16\)"),
    "x_no_batch": ((0, 1, D_MODEL), {}, ValueError, r"\(batch >= 1, .*got \(0, 1, 16\)"),
    "batch_too_big": ((B_MAX + 1, 1, D_MODEL), {}, ValueError,
                      r"batch size 3 exceeds the cache's max_batch_size 2"),
    "negative_position": ((2, 1, D_MODEL), {"cache_position": -1}, ValueError,
                          r"cache_position must be >= 0, got -1"),
    "overflow_append": ((2, 4, D_MODEL), {}, ValueError,
                        r"writing 4 tokens at position 5 needs 9 slots; .*max_seq_len=8"),
    "overflow_explicit": ((2, 2, D_MODEL), {"cache_position": 7}, ValueError,
                          r"writing 2 tokens at position 7 needs 9 slots; .*max_seq_len=8"),
    "too_long_for_cache": ((2, 9, D_MODEL), {"cache_position": 0}, ValueError,
                           r"writing 9 tokens needs 9 slots; the cache has max_seq_len=8"),
    "position_not_int": ((2, 1, D_MODEL), {"cache_position": 1.0}, TypeError,
                         r"cache_position must be an integer, got 1\.0"),
    "mask_no_broadcast": ((2, 1, D_MODEL), {"mask": np.ones((2, 1, 1, 6), bool)}, ValueError,
                          r"mask of shape \(2, 1, 1, 6\) does not broadcast to .*\(2, 4, 1, 8\)"),
    "mask_bad_batch": ((2, 1, D_MODEL), {"mask": np.ones((3, 1, 1, 8))}, ValueError,
                       r"mask of shape \(3, 1, 1, 8\) does not broadcast to .*\(2, 4, 1, 8\)"),
    "mask_too_many_dims": ((2, 1, D_MODEL), {"mask": np.ones((1, 1, 1, 1, 8))}, ValueError,
                           r"at most 4 dimensions, got shape \(1, 1, 1, 1, 8\)"),
}  # fmt: skip


@functools.cache
def prefilled_cache() -> KVCache:
    block = make_block(False)
    cache = block.create_kv_cache(B_MAX, S_MAX)
    fill = jax.jit(lambda p, x, c: block.apply({"params": p}, x, kv_cache=c)[1])
    return fill(block_params(False), rand_x(B_MAX, PREFILL, seed=30), cache)


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_call_raises_at_trace_time_and_leaves_the_cache(name, use_moe):
    shape, kwargs, error, match = BAD_CALLS[name]
    block = make_block(use_moe)
    cache = prefilled_cache()  # a concrete cache at position 5, closed over below
    before = jax.tree_util.tree_map(np.asarray, cache)
    x = np.zeros(shape, np.float32)

    def call(params):
        return block.apply(
            {"params": params},
            x,
            kv_cache=cache,
            deterministic=False,
            rngs={"dropout": jax.random.PRNGKey(0)},
            mutable=["moe_stats"],
            **kwargs,
        )

    with pytest.raises(error, match=match):
        jax.eval_shape(call, block_params(use_moe))
    after = jax.tree_util.tree_map(np.asarray, cache)
    assert int(after.position) == PREFILL == int(before.position)
    np.testing.assert_array_equal(after.k_cache, before.k_cache)
    np.testing.assert_array_equal(after.v_cache, before.v_cache)


def test_mask_that_does_not_broadcast_without_cache():
    block = make_block(False)
    x = rand_x(2, 3)
    with pytest.raises(ValueError, match=r"\(1, 1, 4\) does not broadcast.*\(2, 4, 3, 3\)"):
        jax.eval_shape(
            lambda p: block.apply({"params": p}, x, jnp.ones((1, 1, 4))), block_params(False)
        )


@pytest.mark.parametrize(
    "n_heads, head_dim, match",
    [
        (2, 8, r"cache holds n_heads=2, head_dim=8; got n_heads=4, head_dim=4"),
        (4, 8, r"cache holds n_heads=4, head_dim=8; got n_heads=4, head_dim=4"),
        (8, 4, r"cache holds n_heads=8, head_dim=4; got n_heads=4, head_dim=4"),
    ],
)
def test_cache_heads_or_head_dim_mismatch(n_heads, head_dim, match):
    block = make_block(False)
    cache = KVCache.create(B_MAX, S_MAX, n_heads, head_dim)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(
            lambda p, c: block.apply({"params": p}, rand_x(B_MAX, 1), kv_cache=c),
            block_params(False),
            cache,
        )


# --------------------------------------------------------------------------- bfloat16
@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_bfloat16_forward_close_to_float32(use_moe):
    block = make_block(use_moe, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(block.init, jax.random.PRNGKey(0), rand_x(1, 2))["params"]
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}
    bf16_params = jax.eval_shape(
        make_block(use_moe, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).init,
        jax.random.PRNGKey(0),
        rand_x(1, 2),
    )["params"]
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(bf16_params)} == {
        jnp.dtype(jnp.bfloat16)
    }

    params = block_params(use_moe)
    x = rand_x(B, T, seed=2)
    mask = jnp.asarray(hard_mask(B, T))
    y16, aux16, _ = forward(use_moe, dtype=jnp.bfloat16)(params, x, mask)
    y32, aux32, _ = forward(use_moe)(params, x, mask)
    assert y16.dtype == jnp.bfloat16
    scale = float(np.abs(np.asarray(y32)).max())
    err = float(np.abs(np.asarray(y16, np.float32) - np.asarray(y32)).max())
    assert err <= 2e-2 * scale, (err, scale)
    if use_moe:
        assert aux16.dtype == jnp.float32  # the router computes in float32
        assert float(aux16) == pytest.approx(float(aux32), rel=2e-2)
