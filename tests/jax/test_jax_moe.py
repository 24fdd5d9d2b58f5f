"""MixtureOfExperts against a per-token NumPy loop: routing, capacity, dispatch, aux, counts."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from jax_keys import rbg_key

from jax_block import MixtureOfExperts
from jax_block.moe import group_block_size

D_MODEL, D_FF = 16, 32
ATOL = 1e-5


def rand_x(B: int, T: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, T, D_MODEL)).astype(np.float32)


def assert_close(a, b, atol: float = ATOL) -> None:
    np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol, rtol=0
    )


def reference(params, x, k: int, capacity_factor: float | None) -> ref.MoEOut:
    """The float64 reference MoE of x (..., d_model): top-k over the params' experts."""
    weights = ref.flax_weights(params)
    s = ref.spec(d_model=D_MODEL, num_experts=len(weights["gate.weight"]), top_k_experts=k)
    return ref.moe(x, weights, "", s, capacity_factor)


def expert(params, e: int, x) -> np.ndarray:
    """Expert e of the params applied to x (..., d_model), in float64."""
    return ref.feed_forward(x, ref.flax_weights(params), f"experts.{e}", ref.spec())


def moe_fn(E=4, k=2, factor=1.25, dispatch="auto", z=0.0, dropout=0.0, train=False):
    """A jitted MoE forward for one configuration, compiled once per input shape per session.

    run(params, x, key=None, counts=None) -> (output, aux loss, expert_counts afterwards).
    """
    run = _moe_fn(E, k, factor, dispatch, z, dropout, train)

    def call(params, x, key=None, counts=None):
        return run(params, x, key, np.zeros(E, np.float32) if counts is None else counts)

    return call


@functools.cache
def _moe_fn(E, k, factor, dispatch, z, dropout, train):
    mod = MixtureOfExperts(D_MODEL, D_FF, E, k, dropout, factor, z, dispatch)

    @jax.jit
    def run(params, x, key, counts):
        variables = {"params": params, "moe_stats": {"expert_counts": counts}}
        rngs = {"dropout": key} if key is not None else {}
        (out, aux), state = mod.apply(
            variables, x, not train, True, rngs=rngs, mutable=["moe_stats"]
        )
        return out, aux, state["moe_stats"]["expert_counts"]

    return run


@functools.cache
def moe_params(E: int, seed: int = 0) -> dict:
    return ref.random_params(MixtureOfExperts(D_MODEL, D_FF, E, 1), rand_x(1, 2), seed=seed)


def with_gate(params: dict, kernel: np.ndarray) -> dict:
    return {**params, "gate": {"kernel": jnp.asarray(kernel, jnp.float32)}}


def identity_gate(params: dict) -> dict:
    """Gate = [I_E; 0]: a token's router logits are its first E features."""
    E = params["gate"]["kernel"].shape[1]
    return with_gate(params, np.eye(D_MODEL, E))


def tokens_with_logits(logits: list[list[float]], B: int, T: int, seed: int = 2) -> np.ndarray:
    x = rand_x(B, T, seed).reshape(B * T, D_MODEL)
    x[:, : len(logits[0])] = logits
    return x.reshape(B, T, D_MODEL)


# --------------------------------------------------------------------------- API
def test_fields_defaults_and_stacked_parameters():
    mod = MixtureOfExperts(D_MODEL, D_FF)
    assert (mod.num_experts, mod.top_k, mod.dropout) == (8, 2, 0.1)
    assert mod.expert_capacity_factor == 1.25
    assert (mod.router_z_loss_coef, mod.dispatch) == (0.0, "auto")
    shapes = jax.eval_shape(mod.init, jax.random.PRNGKey(0), rand_x(1, 3))["params"]
    shapes = jax.tree_util.tree_map(lambda a: a.shape, shapes)
    assert shapes == {
        "gate": {"kernel": (D_MODEL, 8)},  # no bias
        "experts": {
            "fc1": {"kernel": (8, D_MODEL, D_FF), "bias": (8, D_FF)},
            "fc2": {"kernel": (8, D_FF, D_MODEL), "bias": (8, D_MODEL)},
        },
    }


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(num_experts=0), r"num_experts must be >= 1, got 0"),
        (dict(top_k=0), r"top_k must be in \[1, num_experts=4\], got 0"),
        (dict(top_k=5), r"top_k must be in \[1, num_experts=4\], got 5"),
        (dict(expert_capacity_factor=0.0), r"expert_capacity_factor must be > 0.*got 0\.0"),
        (dict(expert_capacity_factor=-1.5), r"expert_capacity_factor must be > 0.*got -1\.5"),
        (dict(dispatch="sparse"), r"dispatch must be auto, buffers or grouped, got 'sparse'"),
    ],
)
def test_bad_config_raises(args, match):
    kw = dict(num_experts=4, top_k=2, expert_capacity_factor=1.0)
    kw.update(args)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(
            MixtureOfExperts(D_MODEL, D_FF, **kw).init, jax.random.PRNGKey(0), rand_x(1, 3)
        )


# --------------------------------------------------------------------------- routing and output
@pytest.mark.parametrize("E, k", [(4, 1), (4, 2), (3, 3), (1, 1)])
def test_eval_matches_loop_reference(E, k):
    params = moe_params(E, seed=E * 10 + k)
    x = rand_x(2, 3, seed=3)
    out, aux, _ = moe_fn(E, k)(params, x)
    expected = reference(params, x, k, None)
    assert len(expected.kept) == 6 * k
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert_close(out, expected.out)
    assert float(aux) == pytest.approx(expected.aux, abs=1e-6)


@pytest.mark.parametrize("factor, dispatch", [(0.5, "auto"), (0.5, "grouped"), (None, "auto")])
def test_training_with_capacity_matches_loop_reference(factor, dispatch):
    params = moe_params(4, seed=4)
    x = rand_x(2, 3, seed=5)
    out, aux, _ = moe_fn(4, 2, factor, dispatch, train=True)(params, x)
    expected = reference(params, x, 2, factor)
    assert len(expected.kept) == (12 if factor is None else 7)  # C = 2 drops 5 of 12 here
    assert_close(out, expected.out)
    assert float(aux) == pytest.approx(expected.aux, abs=1e-6)


def test_ties_go_to_the_lower_expert_index():
    params = moe_params(4, seed=6)
    x = rand_x(2, 3, seed=6)
    zero = with_gate(params, np.zeros((D_MODEL, 4)))  # every probability 1/4: experts 0 and 1
    out, *_ = moe_fn(4, 2)(zero, x)
    x64 = np.asarray(x, np.float64)
    assert_close(out, 0.5 * expert(params, 0, x64) + 0.5 * expert(params, 1, x64))

    # partial tie: logits [1, 2, 2, 0] -> experts 1 and 2; with k=1 -> expert 1 alone
    x = tokens_with_logits([[1.0, 2.0, 2.0, 0.0]] * 6, 2, 3)
    x64 = np.asarray(x, np.float64)
    out, *_ = moe_fn(4, 2)(identity_gate(params), x)
    assert_close(out, 0.5 * expert(params, 1, x64) + 0.5 * expert(params, 2, x64))
    out, *_ = moe_fn(4, 1)(identity_gate(params), x)
    assert_close(out, expert(params, 1, x64))


# Hand-built router: 6 tokens (batch 2 x 3, row-major), E=4, k=2. First choice logit 2, second 1.
#   token:   0      1      2      3      4      5
#   choice: (0,1)  (0,2)  (0,1)  (1,0)  (1,3)  (2,0)
# Slot-major queues: expert 0 <- t0 t1 t2 (first) t3 t5 (second); expert 1 <- t3 t4, t0 t2;
#                    expert 2 <- t5, t1; expert 3 <- t4.
HAND_CHOICES = [(0, 1), (0, 2), (0, 1), (1, 0), (1, 3), (2, 0)]
# (token, expert) pairs dropped, worked out by hand from the queues above:
HAND_DROPPED = {
    0.5: {(2, 0), (3, 0), (5, 0), (0, 1), (2, 1)},  # C = ceil(0.5 * 6 * 2 / 4) = 2
    1.0: {(3, 0), (5, 0), (2, 1)},  # C = ceil(1.0 * 6 * 2 / 4) = 3
    1.25: {(5, 0)},  # C = ceil(1.25 * 6 * 2 / 4) = 4
}
HAND_COUNTS = [5, 4, 2, 1]  # assignments per expert before dropping


def hand_logits() -> list[list[float]]:
    rows = []
    for first, second in HAND_CHOICES:
        row = [0.0] * 4
        row[first], row[second] = 2.0, 1.0
        rows.append(row)
    return rows


@pytest.mark.parametrize("factor, dispatch", [(0.5, "auto"), (0.5, "grouped"), (1.0, "auto")])
def test_capacity_drops_the_assignments_known_in_advance(factor, dispatch):
    params = identity_gate(moe_params(4, seed=7))
    x = tokens_with_logits(hand_logits(), 2, 3)
    w_first = math.e / (math.e + 1.0)  # e^2 / (e^2 + e^1), renormalised over the top 2
    w_second = 1.0 / (math.e + 1.0)
    tokens = np.asarray(x, np.float64).reshape(6, D_MODEL)
    expected = np.zeros((6, D_MODEL))
    full = np.zeros((6, D_MODEL))
    for n, (first, second) in enumerate(HAND_CHOICES):
        for e, w in ((first, w_first), (second, w_second)):
            full[n] += w * expert(params, e, tokens[n])
            if (n, e) not in HAND_DROPPED[factor]:
                expected[n] += w * expert(params, e, tokens[n])

    out, *_ = moe_fn(4, 2, factor, dispatch, train=True)(params, x)
    assert_close(np.asarray(out).reshape(6, D_MODEL), expected)
    if factor == 0.5:
        assert not np.any(np.asarray(out)[0, 2])  # token 2 lost both choices
    # eval drops nothing (a module with factor 1.25 would drop one assignment in training)
    out_eval, *_ = moe_fn(4, 2)(params, x)
    assert_close(np.asarray(out_eval).reshape(6, D_MODEL), full)


def test_hand_router_matches_loop_reference_too():
    params = identity_gate(moe_params(4, seed=7))
    x = tokens_with_logits(hand_logits(), 2, 3)
    for factor, dropped_by_hand in HAND_DROPPED.items():
        result = reference(params, x, 2, factor)
        assert [[e for e, _ in c] for c in result.choices] == [list(c) for c in HAND_CHOICES]
        dropped = {
            (n, HAND_CHOICES[n][s]) for n in range(6) for s in range(2) if (n, s) not in result.kept
        }
        assert dropped == dropped_by_hand
        assert result.counts.tolist() == HAND_COUNTS


# --------------------------------------------------------------------------- dispatch paths
def test_group_block_size_by_input_size():
    assert group_block_size(2, 4) == 1  # decode: one token, k=2
    assert group_block_size(16, 4) == 1
    assert group_block_size(32, 4) == 2
    assert group_block_size(256, 4) == 16
    assert group_block_size(1 << 20, 8) == 256


def test_buffers_and_grouped_paths_agree():
    """Eval on the same params: buffers vs grouped, grouped with block size 1 vs larger blocks."""
    E, k = 4, 2
    params = moe_params(E, seed=20 + E)
    x = rand_x(4, 32, seed=21)  # N = 128 tokens
    assert group_block_size(k * 128, E) > 1
    big_grouped, *_ = moe_fn(E, k, dispatch="grouped")(params, x)
    big_buffers, *_ = moe_fn(E, k, dispatch="buffers")(params, x)
    assert_close(big_grouped, big_buffers)
    assert_close(big_grouped, reference(params, x, k, None).out)

    one = x[:, 5:6]  # decode-sized: N = 4, block size 1
    assert group_block_size(k * 4, E) == 1
    small_grouped, *_ = moe_fn(E, k, dispatch="grouped")(params, one)
    assert_close(small_grouped, np.asarray(big_grouped)[:, 5:6])


def test_grouped_path_with_uneven_expert_loads():
    # every token prefers expert 0, then 1 or 2 alternately; expert 3 gets nothing
    E, k = 4, 2
    logits = [[3.0, 1.0 + (n % 2), 2.0 - (n % 2), -3.0] for n in range(128)]
    params = identity_gate(moe_params(E, seed=22))
    x = tokens_with_logits(logits, 4, 32)
    assert group_block_size(k * 128, E) == 16
    out, *_ = moe_fn(E, k, dispatch="grouped")(params, x)
    assert_close(out, reference(params, x, k, None).out)


# --------------------------------------------------------------------------- aux loss
def test_aux_loss_known_f_and_P_top1():
    # E=4, k=1, 6 tokens. probs: tokens 0-2 [.5,.25,.125,.125] -> expert 0; tokens 3-4
    # [.25,.5,.125,.125] -> expert 1; token 5 uniform (a tie -> expert 0).
    # f = [4/6, 2/6, 0, 0]; P = [2.25/6, 2/6, .875/6, .875/6]
    # aux = 4 * (4/6 * 2.25/6 + 2/6 * 2/6) = 4 * (9/36 + 4/36) = 13/9
    params = identity_gate(moe_params(4, seed=41))
    a, b = [0.5, 0.25, 0.125, 0.125], [0.25, 0.5, 0.125, 0.125]
    logits = [[math.log(p) for p in row] for row in (a, a, a, b, b, [0.25] * 4)]
    _, aux, _ = moe_fn(4, 1)(params, tokens_with_logits(logits, 2, 3))
    assert aux.shape == () and aux.dtype == jnp.float32
    assert float(aux) == pytest.approx(13 / 9, abs=1e-6)


def test_aux_loss_known_f_and_P_top2_and_z_loss():
    # E=4, k=2. Tokens A (row 0, three times): probs [.4,.3,.2,.1] -> experts 0,1;
    # tokens B (row 1, three times): [.1,.4,.3,.2] -> experts 1,2.
    # counts [3,6,3,0] -> f = [.25,.5,.25,0]; P = [.25,.35,.25,.15]
    # aux = 4 * (.0625 + .175 + .0625) = 1.2
    params = identity_gate(moe_params(4))
    p0, p1 = [0.4, 0.3, 0.2, 0.1], [0.1, 0.4, 0.3, 0.2]
    # shift the logits by 1 and 2: logsumexp = 1 and 2, z = mean(1, 1, 1, 4, 4, 4) = 2.5
    logits = [[math.log(p) + 1.0 for p in p0]] * 3 + [[math.log(p) + 2.0 for p in p1]] * 3
    x = tokens_with_logits(logits, 2, 3)
    out, aux, _ = moe_fn(4, 2)(params, x)
    assert float(aux) == pytest.approx(1.2, abs=1e-6)
    coef = 0.1
    out_z, aux_z, _ = moe_fn(4, 2, z=coef)(params, x)
    assert float(aux_z) == pytest.approx(1.2 + coef * 2.5, abs=1e-5)
    np.testing.assert_array_equal(np.asarray(out_z), np.asarray(out))  # z-loss: the loss only


def test_z_loss_matches_mean_logsumexp_squared_on_random_input():
    coef = 0.1
    params = moe_params(4, seed=8)
    x = rand_x(2, 3, seed=9)
    expected = reference(params, x, 2, None)
    z = float(np.mean(np.log(np.exp(expected.logits).sum(axis=-1)) ** 2))
    assert z > 0.1
    aux = float(moe_fn(4, 2)(params, x)[1])
    aux_z = float(moe_fn(4, 2, z=coef)(params, x)[1])
    assert aux == pytest.approx(expected.aux, abs=1e-6)
    assert aux_z - aux == pytest.approx(coef * z, abs=1e-6)


def test_aux_loss_counts_assignments_before_dropping():
    params = identity_gate(moe_params(4, seed=7))
    x = tokens_with_logits(hand_logits(), 2, 3)
    probs = reference(params, x, 2, None).probs
    f = np.array(HAND_COUNTS) / 12
    expected = 4 * float(np.sum(f * probs.mean(axis=0)))
    _, aux, _ = moe_fn(4, 2, 0.5, train=True)(params, x)  # C = 2: five assignments dropped
    assert float(aux) == pytest.approx(expected, abs=1e-6)
    _, aux_eval, _ = moe_fn(4, 2)(params, x)  # the same loss in eval
    assert float(aux_eval) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("deterministic", [True, False])
def test_aux_is_none_unless_asked(deterministic):
    mod = MixtureOfExperts(D_MODEL, D_FF, 4, 2)
    x = rand_x(1, 3)
    rngs = {"dropout": jax.random.PRNGKey(0)}
    # x is a NumPy array closed over, so traced as a constant: that must work too
    out, aux = jax.eval_shape(
        lambda p: mod.apply({"params": p}, x, deterministic, rngs=rngs), moe_params(4)
    )
    assert aux is None and out.shape == x.shape


# --------------------------------------------------------------------------- counts, dropout
def test_expert_counts_collection_counts_assignments_in_training():
    params = identity_gate(moe_params(4, seed=7))
    x = tokens_with_logits(hand_logits(), 2, 3)
    train = moe_fn(4, 2, 0.5, train=True)  # capacity drops 5 assignments; counts come before
    _, _, counts = train(params, x)
    np.testing.assert_array_equal(np.asarray(counts), HAND_COUNTS)
    _, _, counts = train(params, x, counts=counts)
    np.testing.assert_array_equal(np.asarray(counts), 2 * np.array(HAND_COUNTS))
    _, _, counts = moe_fn(4, 2)(params, x, counts=counts)  # eval counts nothing
    np.testing.assert_array_equal(np.asarray(counts), 2 * np.array(HAND_COUNTS))

    # with the collection absent or immutable: no counting and no error
    mod = MixtureOfExperts(D_MODEL, D_FF, 4, 2, 0.0, 0.5)
    _, state = jax.eval_shape(
        lambda p: mod.apply(p, x, True, mutable=["moe_stats"]), {"params": params}
    )
    assert state == {}
    out, aux = jax.eval_shape(lambda p: mod.apply({"params": p}, x, False), params)
    assert aux is None and out.shape == x.shape


@pytest.mark.parametrize("dispatch", ["buffers", "grouped"])
def test_expert_dropout_active_only_in_training(dispatch):
    params = moe_params(4, seed=14)
    x = rand_x(2, 3, seed=15)
    expected = reference(params, x, 2, None).out
    train = moe_fn(4, 2, None, dispatch, dropout=0.5, train=True)
    a, *_ = train(params, x, rbg_key(0))
    b, *_ = train(params, x, rbg_key(0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - expected).max() > 1e-3
