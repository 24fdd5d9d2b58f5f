"""TransformerBlock: the whole public API, a float64 reference forward, the cache, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch

from torch_block import FeedForward, KVCache, MixtureOfExperts, MultiHeadAttention, TransformerBlock

D_MODEL, N_HEADS, D_FF = 16, 4, 32
HEAD_DIM = D_MODEL // N_HEADS
ATOL = 1e-5


# --------------------------------------------------------------------------- reference
def block64(block: TransformerBlock, x, mask=None, causal=True) -> torch.Tensor:
    """The float64 reference block (eval, dropless MoE) with the block's weights (B, T, d_model)."""
    s = ref.spec(d_model=D_MODEL, n_heads=N_HEADS, causal=causal, use_moe=block.use_moe)
    if block.use_moe:
        s.update(num_experts=block.feed_forward.num_experts, top_k_experts=block.feed_forward.top_k)
    mask = None if mask is None else mask.numpy()
    y, _ = ref.block(x.detach().double().numpy(), ref.torch_weights(block), s, mask)
    return torch.from_numpy(y)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> bool:
    return torch.allclose(a.double(), b.double(), atol=atol, rtol=0)


def make_block(use_moe=False, dropout=0.0, seed=0, **kw) -> TransformerBlock:
    torch.manual_seed(seed)
    if use_moe:
        kw.setdefault("num_experts", 4)
    return TransformerBlock(D_MODEL, N_HEADS, D_FF, dropout, use_moe, **kw).eval()


def rand_x(B, T, seed=1, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, T, D_MODEL, generator=g)


# --------------------------------------------------------------------------- constructor
def test_constructor_defaults_and_attributes():
    block = TransformerBlock(D_MODEL, N_HEADS, D_FF)
    assert block.d_model == D_MODEL and block.use_moe is False
    assert isinstance(block.attention, MultiHeadAttention)
    assert isinstance(block.norm1, torch.nn.LayerNorm)
    assert isinstance(block.norm2, torch.nn.LayerNorm)
    assert isinstance(block.feed_forward, FeedForward)
    assert isinstance(block.dropout, torch.nn.Dropout) and block.dropout.p == pytest.approx(0.1)
    assert block.attention.dropout.p == pytest.approx(0.1)
    assert block.feed_forward.dropout.p == pytest.approx(0.1)
    assert block.attention.causal is True
    assert block.norm1.eps == 1e-5 and block.norm2.eps == 1e-5
    assert block.norm1.normalized_shape == (D_MODEL,)
    assert block.feed_forward.fc1.weight.shape == (D_FF, D_MODEL)


def test_constructor_moe_positional_and_keywords():
    block = TransformerBlock(
        D_MODEL, N_HEADS, D_FF, 0.2, True, 3, 1,
        causal=False, expert_capacity_factor=2.0, router_z_loss_coef=0.5,
    )  # fmt: skip
    assert block.use_moe is True and block.dropout.p == pytest.approx(0.2)
    moe = block.feed_forward
    assert isinstance(moe, MixtureOfExperts)
    assert (moe.num_experts, moe.top_k, moe.d_model) == (3, 1, D_MODEL)
    assert moe.expert_capacity_factor == 2.0 and moe.router_z_loss_coef == 0.5
    assert len(moe.experts) == 3 and moe.experts[0].dropout.p == pytest.approx(0.2)
    assert block.attention.causal is False
    default = TransformerBlock(D_MODEL, N_HEADS, D_FF, use_moe=True)
    assert (default.feed_forward.num_experts, default.feed_forward.top_k) == (8, 2)
    assert default.feed_forward.expert_capacity_factor == 1.25


def test_causal_capacity_and_z_loss_are_keyword_only():
    with pytest.raises(TypeError):
        TransformerBlock(D_MODEL, N_HEADS, D_FF, 0.1, False, 8, 2, False)


# --------------------------------------------------------------------------- return values
def test_return_tuple_without_cache_or_aux():
    block = make_block()
    x = rand_x(2, 5)
    result = block(x)
    assert isinstance(result, tuple) and len(result) == 3
    y, cache, aux = result
    assert y.shape == x.shape and y.dtype == torch.float32
    assert cache is None and aux is None
    assert block(x, use_cache=True)[1] is None  # use_cache without a cache
    assert block(x, return_aux_loss=True)[2] is None  # dense: no aux


def test_cache_given_without_use_cache_is_neither_read_nor_written():
    block = make_block()
    x = rand_x(2, 4)
    cache = block.create_kv_cache(2, 8)
    with torch.no_grad():  # put garbage in the cache: a read would change the output
        cache.k_cache.normal_()
        cache.v_cache.normal_()
    cache.cache_position = 3
    snap = (cache.k_cache.clone(), cache.v_cache.clone())
    y, returned, _ = block(x, kv_cache=cache)
    assert returned is None
    assert cache.cache_position == 3
    assert torch.equal(cache.k_cache, snap[0]) and torch.equal(cache.v_cache, snap[1])
    assert close(y, block64(block, x))
    y2, returned, _ = block(x, kv_cache=cache, use_cache=False, cache_position=0)
    assert returned is None and cache.cache_position == 3 and torch.equal(y2, y)


def test_use_cache_returns_the_same_cache_object_updated_in_place():
    block = make_block()
    cache = block.create_kv_cache(2, 8)
    y, returned, aux = block(rand_x(2, 3), kv_cache=cache, use_cache=True)
    assert returned is cache and aux is None
    assert cache.cache_position == 3
    assert torch.count_nonzero(cache.k_cache[:, :, :3]) > 0
    assert torch.count_nonzero(cache.k_cache[:, :, 3:]) == 0


def test_aux_only_for_moe_when_asked():
    block = make_block(use_moe=True)
    x = rand_x(2, 3)
    assert block(x)[2] is None
    _, cache, aux = block(x, return_aux_loss=True)
    assert cache is None
    assert isinstance(aux, torch.Tensor) and aux.dim() == 0 and torch.isfinite(aux)
    block.train()
    assert block(x, return_aux_loss=True)[2].dim() == 0
    assert block(x)[2] is None


def test_moe_with_cache_returns_both():
    block = make_block(use_moe=True)
    cache = block.create_kv_cache(1, 6)
    y, returned, aux = block(rand_x(1, 4), kv_cache=cache, use_cache=True, return_aux_loss=True)
    assert returned is cache and cache.cache_position == 4 and aux.dim() == 0


# --------------------------------------------------------------------------- state_dict
DENSE_KEYS = [
    "attention.q_proj.weight", "attention.q_proj.bias",
    "attention.k_proj.weight", "attention.k_proj.bias",
    "attention.v_proj.weight", "attention.v_proj.bias",
    "attention.out_proj.weight", "attention.out_proj.bias",
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
    "feed_forward.fc1.weight", "feed_forward.fc1.bias",
    "feed_forward.fc2.weight", "feed_forward.fc2.bias",
]  # fmt: skip
MOE_KEYS = DENSE_KEYS[:12] + [
    "feed_forward.expert_counts",
    "feed_forward.gate.weight",
    "feed_forward.experts.0.fc1.weight", "feed_forward.experts.0.fc1.bias",
    "feed_forward.experts.0.fc2.weight", "feed_forward.experts.0.fc2.bias",
    "feed_forward.experts.1.fc1.weight", "feed_forward.experts.1.fc1.bias",
    "feed_forward.experts.1.fc2.weight", "feed_forward.experts.1.fc2.bias",
    "feed_forward.experts.2.fc1.weight", "feed_forward.experts.2.fc1.bias",
    "feed_forward.experts.2.fc2.weight", "feed_forward.experts.2.fc2.bias",
]  # fmt: skip


def test_state_dict_keys_and_shapes_dense():
    sd = make_block().state_dict()
    assert sorted(sd) == sorted(DENSE_KEYS)
    assert sd["attention.q_proj.weight"].shape == (D_MODEL, D_MODEL)
    assert sd["feed_forward.fc1.weight"].shape == (D_FF, D_MODEL)
    assert sd["feed_forward.fc2.weight"].shape == (D_MODEL, D_FF)
    assert sd["norm1.weight"].shape == (D_MODEL,)


def test_state_dict_keys_and_shapes_moe():
    sd = make_block(use_moe=True, num_experts=3).state_dict()
    assert sorted(sd) == sorted(MOE_KEYS)
    assert sd["feed_forward.gate.weight"].shape == (3, D_MODEL)
    assert sd["feed_forward.expert_counts"].shape == (3,)
    assert sd["feed_forward.experts.2.fc1.weight"].shape == (D_FF, D_MODEL)


@pytest.mark.parametrize("use_moe", [False, True])
def test_load_state_dict_strict_round_trip(use_moe):
    extra = {"num_experts": 3} if use_moe else {}  # MOE_KEYS lists 3 experts
    a = make_block(use_moe=use_moe, seed=1, **extra)
    b = make_block(use_moe=use_moe, seed=2, **extra)
    x = rand_x(2, 4)
    assert not close(a(x)[0], b(x)[0], atol=1e-3)
    result = b.load_state_dict(a.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(a(x)[0], b(x)[0])
    # a checkpoint keyed by the literal names (as the original project writes them) loads too
    keys = MOE_KEYS if use_moe else DENSE_KEYS
    literal = {key: a.state_dict()[key].clone() for key in keys}
    c = make_block(use_moe=use_moe, seed=3, **extra)
    c.load_state_dict(literal, strict=True)
    assert torch.equal(a(x)[0], c(x)[0])
    del literal["norm2.bias"]
    with pytest.raises(RuntimeError, match="norm2.bias"):
        c.load_state_dict(literal, strict=True)


# --------------------------------------------------------------------------- reference forward
@pytest.mark.parametrize("causal", [True, False])
def test_dense_block_matches_reference(causal):
    block = make_block(causal=causal, seed=4)
    x = rand_x(2, 6, seed=5)
    assert close(block(x)[0], block64(block, x, causal=causal))


def test_dense_block_with_masks_matches_reference():
    block = make_block(seed=6)
    x = rand_x(2, 5, seed=7)
    pad = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    pad[1, ..., :2] = False
    square = torch.rand(5, 5, generator=torch.Generator().manual_seed(8)) > 0.3
    query_key = torch.ones(1, 1, 5, 5)
    query_key[..., 3, :] = 0.0  # query 3 attends to nothing
    for mask in (pad, square, query_key):
        y = block(x, mask=mask)[0]
        assert torch.isfinite(y).all()
        assert close(y, block64(block, x, mask=mask))


def test_block_dropout_inactive_in_eval_and_rate_zero_in_training():
    block = make_block(dropout=0.3, seed=9)
    x = rand_x(2, 5, seed=10)
    assert close(block.eval()(x)[0], block64(block, x))
    torch.manual_seed(0)
    assert not close(block.train()(x)[0], block64(block, x), atol=1e-3)
    block0 = make_block(dropout=0.0, seed=9).train()
    assert close(block0(x)[0], block64(block0, x))


def test_moe_block_matches_reference_in_eval():
    block = make_block(use_moe=True, seed=11)
    x = rand_x(2, 4, seed=12)
    assert close(block(x)[0], block64(block, x))


def test_layer_norm_eps_is_1e_5():
    # a small-variance input makes eps matter: 1e-5 matches, 1e-6 does not
    block = make_block(seed=13)
    x = rand_x(1, 4, seed=14, scale=3e-3)
    y = block(x)[0]
    assert close(y, block64(block, x))
    weights = ref.torch_weights(block.norm1)
    row = x[0, 0]
    for eps, should_match in ((1e-5, True), (1e-6, False)):
        got = ref.layer_norm(row.double().numpy(), weights["weight"], weights["bias"], eps)
        got = torch.from_numpy(got)
        assert close(block.norm1(row), got, atol=1e-4) is should_match


def test_gradients_match_reference():
    """Gradients of sum(y^2) against central differences of the float64 reference, a few
    entries of x and of every parameter."""
    block = make_block(seed=15)
    x = rand_x(2, 4, seed=16).requires_grad_(True)
    names = [name for name, _ in block.named_parameters()]
    y = block(x)[0]
    grads = torch.autograd.grad(y.square().sum(), [x, *block.parameters()])
    s = ref.spec(d_model=D_MODEL, n_heads=N_HEADS)
    arrays = {"x": x.detach().double().numpy(), **ref.torch_weights(block)}

    def loss(arrays: dict) -> float:
        return float(np.sum(ref.block(arrays["x"], arrays, s)[0] ** 2))

    rng, eps = np.random.default_rng(17), 1e-6
    for name, g in zip(["x", *names], grads, strict=True):
        for _ in range(3):
            idx = tuple(int(rng.integers(0, n)) for n in g.shape)
            plus, minus = dict(arrays), dict(arrays)
            plus[name], minus[name] = arrays[name].copy(), arrays[name].copy()
            plus[name][idx] += eps
            minus[name][idx] -= eps
            numeric = (loss(plus) - loss(minus)) / (2 * eps)
            # k_proj.bias has an exactly zero gradient (softmax ignores a per-query shift): abs
            assert float(g[idx]) == pytest.approx(numeric, rel=1e-4, abs=1e-6), (name, idx)


# --------------------------------------------------------------------------- cache
def create_cache_checks(block):
    cache = block.create_kv_cache(3, 9)
    assert isinstance(cache, KVCache)
    assert cache.k_cache.shape == (3, N_HEADS, 9, HEAD_DIM)
    assert cache.v_cache.shape == (3, N_HEADS, 9, HEAD_DIM)
    assert cache.k_cache.dtype == torch.float32 and cache.k_cache.device.type == "cpu"
    assert cache.cache_position == 0
    cache64 = block.create_kv_cache(1, 2, dtype=torch.float64, device="cpu")
    assert cache64.k_cache.dtype == torch.float64 and cache64.k_cache.shape == (1, 4, 2, 4)


def test_create_kv_cache():
    create_cache_checks(make_block())
    create_cache_checks(make_block(use_moe=True))


def test_cache_of_another_dtype_from_create_kv_cache():
    # create_kv_cache takes a dtype: a float64 cache stores float32 keys/values exactly, so the
    # float32 block must give the same output as with a float32 cache
    block = make_block(seed=24)
    x = rand_x(2, 4, seed=25)
    cache64 = block.create_kv_cache(2, 6, dtype=torch.float64)
    y, _, _ = block(x, kv_cache=cache64, use_cache=True)
    assert y.dtype == torch.float32 and cache64.cache_position == 4
    assert close(y, block(x)[0])


@pytest.mark.parametrize("use_moe", [False, True])
def test_cache_consistency_prefill_decode_and_chunks(use_moe):
    B, T = 2, 9
    block = make_block(use_moe=use_moe, dropout=0.1, seed=17)  # eval: dropout off, MoE dropless
    x = rand_x(B, T, seed=18)
    full = block(x)[0]
    assert close(full, block64(block, x))

    # prefill 4, then one token at a time
    cache = block.create_kv_cache(B, T)
    outs = [block(x[:, :4], kv_cache=cache, use_cache=True)[0]]
    assert cache.cache_position == 4
    for t in range(4, T):
        y, returned, _ = block(x[:, t : t + 1], kv_cache=cache, use_cache=True)
        assert returned is cache and cache.cache_position == t + 1
        outs.append(y)
    assert close(torch.cat(outs, dim=1), full)

    # prefill 3, then chunks of 2, 3, 1 (explicit cache_position on one of them)
    cache = block.create_kv_cache(B + 1, T + 2)
    outs = [block(x[:, :3], kv_cache=cache, use_cache=True)[0]]
    outs.append(block(x[:, 3:5], kv_cache=cache, use_cache=True, cache_position=3)[0])
    outs.append(block(x[:, 5:8], kv_cache=cache, use_cache=True)[0])
    outs.append(block(x[:, 8:], kv_cache=cache, use_cache=True)[0])
    assert cache.cache_position == T
    assert close(torch.cat(outs, dim=1), full)


def test_cache_rewrite_at_an_earlier_position():
    # prefill 5 tokens, then rewrite from position 3: equals a full forward of x[:3] + new
    block = make_block(seed=19)
    x = rand_x(1, 5, seed=20)
    new = rand_x(1, 2, seed=21)
    cache = block.create_kv_cache(1, 8)
    block(x, kv_cache=cache, use_cache=True)
    y, _, _ = block(new, kv_cache=cache, use_cache=True, cache_position=3)
    assert cache.cache_position == 5
    full = block64(block, torch.cat([x[:, :3], new], dim=1))
    assert close(y, full[:, 3:])


def test_cache_with_padding_mask_in_decode():
    block = make_block(seed=22)
    x = rand_x(2, 6, seed=23)
    pad = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    pad[0, ..., :2] = False
    full = block64(block, x, mask=pad)
    cache = block.create_kv_cache(2, 6)
    outs = [block(x[:, :4], mask=pad[..., :4], kv_cache=cache, use_cache=True)[0]]
    for t in (4, 5):
        step = block(x[:, t : t + 1], mask=pad[..., : t + 1], kv_cache=cache, use_cache=True)
        outs.append(step[0])
    y = torch.cat(outs, dim=1)
    assert torch.isfinite(y).all()
    assert close(y, full)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((30, 4, 64), {}, r"d_model \(30\).*n_heads \(4\)"),
        ((16, 0, 64), {}, r"d_model \(16\).*n_heads \(0\)"),
        ((16, 4, 64, 0.0, True, 0, 1), {}, r"num_experts must be >= 1, got 0"),
        ((16, 4, 64, 0.0, True, 4, 0), {}, r"top_k.*num_experts=4.*got 0"),
        ((16, 4, 64, 0.0, True, 4, 5), {}, r"top_k.*num_experts=4.*got 5"),
        ((16, 4, 64, 0.0, True), {"expert_capacity_factor": 0.0}, r"capacity_factor.*> 0.*0\.0"),
        ((16, 4, 64, 0.0, True), {"expert_capacity_factor": -1.0}, r"capacity_factor.*-1\.0"),
    ],
)
def test_bad_constructor_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerBlock(*args, **kwargs)


B_MAX, S_MAX, PREFILL = 2, 8, 5


def prefilled(block):
    cache = block.create_kv_cache(B_MAX, S_MAX)
    block(rand_x(B_MAX, PREFILL, seed=30), kv_cache=cache, use_cache=True)
    return cache, (cache.k_cache.clone(), cache.v_cache.clone(), cache.cache_position)


def assert_unchanged(cache: KVCache, snap) -> None:
    assert cache.cache_position == snap[2]
    assert torch.equal(cache.k_cache, snap[0]) and torch.equal(cache.v_cache, snap[1])


BAD_CALLS = {
    # name: (x shape, extra forward kwargs, error type, message pattern)
    "x_2d": ((3, D_MODEL), {}, ValueError, r"d_model=16.*got \(3, 16\)"),
    "x_4d": ((1, 1, 3, D_MODEL), {}, ValueError, r"d_model=16.*got \(1, 1, 3, 16\)"),
    "x_last_dim": ((2, 1, D_MODEL + 1), {}, ValueError, r"d_model=16.*got \(2, 1, 17\)"),
    "batch_too_big": ((B_MAX + 1, 1, D_MODEL), {}, ValueError, r"batch size 3.*max_batch_size 2"),
    "negative_position": (
        (2, 1, D_MODEL), {"cache_position": -1}, ValueError, r"cache_position must be >= 0, got -1"
    ),
    "overflow_append": (
        (2, 4, D_MODEL), {}, ValueError, r"4 tokens at position 5 needs 9 slots.*max_seq_len=8"
    ),
    "overflow_explicit": (
        (2, 2, D_MODEL), {"cache_position": 7}, ValueError, r"position 7 needs 9.*max_seq_len=8"
    ),
    "position_not_int": ((2, 1, D_MODEL), {"cache_position": 1.0}, TypeError, r"int, got float"),
    "mask_no_broadcast": (
        (2, 1, D_MODEL),
        {"mask": torch.ones(2, 1, 1, 5, dtype=torch.bool)},  # key_len is 5 + 1 = 6
        ValueError,
        r"\(2, 1, 1, 5\) does not broadcast.*\(2, 4, 1, 6\)",
    ),
    "mask_bad_batch": (
        (2, 1, D_MODEL),
        {"mask": torch.ones(3, 1, 1, 6)},
        ValueError,
        r"\(3, 1, 1, 6\) does not broadcast.*\(2, 4, 1, 6\)",
    ),
    "mask_too_many_dims": (
        (2, 1, D_MODEL),
        {"mask": torch.ones(1, 1, 1, 1, 6)},
        ValueError,
        r"at most 4 dimensions.*\(1, 1, 1, 1, 6\)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("use_moe", [False, True])
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_forward_input_raises_and_leaves_cache_unchanged(name, use_moe):
    shape, kwargs, error, match = BAD_CALLS[name]
    block = make_block(use_moe=use_moe, seed=31)
    cache, snap = prefilled(block)
    if use_moe:
        block.train()  # a bad call must not count experts either
        block.feed_forward.reset_expert_counts()
    x = torch.randn(*shape)
    with pytest.raises(error, match=match):
        block(x, kv_cache=cache, use_cache=True, **kwargs)
    assert_unchanged(cache, snap)
    if use_moe:
        assert torch.count_nonzero(block.feed_forward.expert_counts) == 0
    # the cache still works afterwards, from where it was
    block.eval()(rand_x(2, 1, seed=32), kv_cache=cache, use_cache=True)
    assert cache.cache_position == PREFILL + 1


def test_mask_that_does_not_broadcast_without_cache():
    block = make_block()
    with pytest.raises(ValueError, match=r"\(1, 1, 4\) does not broadcast.*\(2, 4, 3, 3\)"):
        block(rand_x(2, 3), mask=torch.ones(1, 1, 4))


@pytest.mark.parametrize(
    "n_heads, head_dim, match",
    [
        (2, 8, r"cache holds n_heads=2, head_dim=8; got n_heads=4, head_dim=4"),
        (4, 8, r"cache holds n_heads=4, head_dim=8; got n_heads=4, head_dim=4"),
        (8, 4, r"cache holds n_heads=8, head_dim=4; got n_heads=4, head_dim=4"),
    ],
)
def test_cache_heads_or_head_dim_mismatch(n_heads, head_dim, match):
    block = make_block()
    cache = KVCache(B_MAX, S_MAX, n_heads, head_dim)
    cache.update(*(torch.randn(B_MAX, n_heads, 2, head_dim) for _ in range(2)))
    snap = (cache.k_cache.clone(), cache.v_cache.clone(), cache.cache_position)
    with pytest.raises(ValueError, match=match):
        block(rand_x(B_MAX, 1), kv_cache=cache, use_cache=True)
    assert_unchanged(cache, snap)
