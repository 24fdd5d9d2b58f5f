"""MultiHeadAttention against an explicit float64 reference: projections, masks, cache."""

from __future__ import annotations

import pytest
import reference as ref
import torch

from torch_block import KVCache, MultiHeadAttention, TransformerBlock

D_MODEL, N_HEADS = 16, 4
HEAD_DIM = D_MODEL // N_HEADS
ATOL = 1e-5


def ref_attention(
    mod: MultiHeadAttention,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = True,
    query_start: int = 0,
) -> torch.Tensor:
    """The float64 reference of the queries x[:, query_start:] over all of x (B, L, d_model),
    with the module's weights: (B, L - query_start, d_model)."""
    s = ref.spec(d_model=D_MODEL, n_heads=N_HEADS, causal=causal)
    mask = None if mask is None else mask.numpy()
    x64 = x.detach().double().numpy()
    out = ref.attention(x64, ref.torch_weights(mod), "", s, mask, query_start=query_start)
    return torch.from_numpy(out)


def ref_keys_values(mod: MultiHeadAttention, x: torch.Tensor) -> list[torch.Tensor]:
    """The float64 keys and values of x (B, L, d_model) in the cache's layout (B, H, L, D)."""
    s = ref.spec(d_model=D_MODEL, n_heads=N_HEADS)
    k, v = ref.keys_values(x.detach().double().numpy(), ref.torch_weights(mod), "", s)
    return [torch.from_numpy(a).permute(0, 2, 1, 3) for a in (k, v)]


def make_attention(causal: bool = True, dropout: float = 0.0, seed: int = 0) -> MultiHeadAttention:
    torch.manual_seed(seed)
    mod = MultiHeadAttention(D_MODEL, N_HEADS, dropout, causal=causal)
    return mod.eval()


def rand_x(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, D_MODEL, generator=g)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> bool:
    return torch.allclose(a.double(), b.double(), atol=atol, rtol=0)


def test_attributes_and_parameter_shapes():
    mod = MultiHeadAttention(D_MODEL, N_HEADS)
    assert (mod.d_model, mod.n_heads, mod.head_dim) == (D_MODEL, N_HEADS, HEAD_DIM)
    assert mod.causal is True
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        layer = getattr(mod, name)
        assert layer.weight.shape == (D_MODEL, D_MODEL) and layer.bias.shape == (D_MODEL,)
    assert mod.dropout.p == pytest.approx(0.1)
    assert MultiHeadAttention(D_MODEL, N_HEADS, causal=False).causal is False


def test_d_model_not_divisible_by_heads_raises():
    with pytest.raises(ValueError, match=r"d_model \(18\).*n_heads \(4\)"):
        MultiHeadAttention(18, 4)


@pytest.mark.parametrize("causal", [True, False])
def test_no_mask_matches_reference(causal):
    mod = make_attention(causal=causal)
    x = rand_x(2, 7)
    out = mod(x)
    assert out.shape == (2, 7, D_MODEL) and out.dtype == torch.float32
    assert close(out, ref_attention(mod, x, causal=causal))


def test_causal_and_bidirectional_differ_and_first_token_is_local():
    causal, bidir = make_attention(True), make_attention(False)
    x = rand_x(1, 5)
    out_c, out_b = causal(x), bidir(x)
    # the last token sees every key either way; earlier tokens do not under the causal rule
    assert close(out_c[:, -1], out_b[:, -1])
    assert not close(out_c[:, 0], out_b[:, 0], atol=1e-3)
    # causal: token t does not depend on later tokens
    x2 = x.clone()
    x2[:, 3:] += 1.0
    assert close(causal(x2)[:, :3], out_c[:, :3])


def _masks(B: int, T: int):
    g = torch.Generator().manual_seed(5)
    pad = torch.ones(B, 1, 1, T, dtype=torch.bool)
    pad[0, ..., :2] = False  # left padding of row 0
    pattern = (torch.rand(1, 1, T, T, generator=g) > 0.4).float()  # 0/1 floats
    pattern[..., :, -1] = 1.0
    square = torch.rand(T, T, generator=g) > 0.3
    return {"padding_B11S": pad, "float01_11TS": pattern, "bool_TS": square}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mask_name", ["padding_B11S", "float01_11TS", "bool_TS"])
def test_masks_match_reference(causal, mask_name):
    B, T = 2, 6
    mask = _masks(B, T)[mask_name]
    mod = make_attention(causal=causal)
    x = rand_x(B, T, seed=2)
    out = mod(x, mask=mask)
    assert torch.isfinite(out).all()
    assert close(out, ref_attention(mod, x, mask=mask, causal=causal))


def test_integer_mask_same_as_bool_mask():
    mod = make_attention()
    x = rand_x(2, 4, seed=3)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]]).reshape(2, 1, 1, 4)
    assert torch.equal(mod(x, mask=mask), mod(x, mask=mask.bool()))
    assert close(mod(x, mask=mask), ref_attention(mod, x, mask=mask))


def test_all_ones_mask_is_no_mask():
    mod = make_attention(causal=False)
    x = rand_x(2, 5, seed=4)
    assert close(mod(x, mask=torch.ones(5, 5)), mod(x))


def test_mask_that_does_not_broadcast_raises():
    mod = make_attention()
    x = rand_x(2, 4)
    with pytest.raises(ValueError, match=r"\(2, 1, 1, 3\).*\(2, 4, 4, 4\)"):
        mod(x, mask=torch.ones(2, 1, 1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"at most 4 dimensions"):
        mod(x, mask=torch.ones(1, 2, 1, 1, 4, dtype=torch.bool))


def test_cache_prefill_then_decode_matches_reference():
    B, T_pre, T_dec = 2, 5, 3
    mod = make_attention()
    x = rand_x(B, T_pre + T_dec, seed=6)
    full_ref = ref_attention(mod, x)
    cache = KVCache(B, 12, N_HEADS, HEAD_DIM)

    out = mod(x[:, :T_pre], kv_cache=cache)
    assert cache.cache_position == T_pre
    assert close(out, full_ref[:, :T_pre])
    for t in range(T_pre, T_pre + T_dec):
        out = mod(x[:, t : t + 1], kv_cache=cache)
        assert out.shape == (B, 1, D_MODEL)
        assert cache.cache_position == t + 1
        assert close(out, full_ref[:, t : t + 1])

    # the cache holds the projected keys and values, heads split, of every token written
    k_ref, v_ref = ref_keys_values(mod, x)
    keys, values = cache.get()
    assert keys.shape == (B, N_HEADS, T_pre + T_dec, HEAD_DIM)
    assert close(keys, k_ref) and close(values, v_ref)
    assert torch.count_nonzero(cache.k_cache[:, :, T_pre + T_dec :]) == 0


def test_cache_decode_with_padding_mask_and_explicit_position():
    B, T_pre = 2, 4
    mod = make_attention()
    x = rand_x(B, T_pre + 2, seed=7)
    pad = torch.ones(B, 1, 1, T_pre + 2, dtype=torch.bool)
    pad[1, ..., 0] = False
    full_ref = ref_attention(mod, x, mask=pad)
    cache = KVCache(B, 8, N_HEADS, HEAD_DIM)
    out = mod(x[:, :T_pre], mask=pad[..., :T_pre], kv_cache=cache, cache_position=0)
    assert close(out, full_ref[:, :T_pre])
    out = mod(x[:, T_pre:], mask=pad, kv_cache=cache, cache_position=T_pre)
    assert close(out, full_ref[:, T_pre:])
    assert cache.cache_position == T_pre + 2


def test_cache_chunk_attends_causally_within_itself():
    # a multi-token chunk after a prefill: query i of the chunk sees the prefix and chunk[:i+1]
    mod = make_attention()
    x = rand_x(1, 7, seed=8)
    cache = KVCache(1, 7, N_HEADS, HEAD_DIM)
    mod(x[:, :3], kv_cache=cache)
    past_k, past_v = (t.clone() for t in cache.get())
    out = mod(x[:, 3:], kv_cache=cache)
    assert cache.cache_position == 7
    assert close(torch.cat([past_k, past_v]), torch.cat(ref_keys_values(mod, x[:, :3])))
    assert close(out, ref_attention(mod, x, query_start=3))


def test_fully_masked_query_row_gives_zeros_and_finite_gradients():
    mod = make_attention()
    x = rand_x(2, 4, seed=9).requires_grad_(True)
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    mask[0, :, 2, :] = False  # query 2 of row 0 may attend to nothing
    out = mod(x, mask=mask)
    assert torch.isfinite(out).all()
    # zero attention output: only out_proj's bias remains
    assert torch.allclose(out[0, 2], mod.out_proj.bias, atol=1e-7)
    assert close(out, ref_attention(mod, x, mask=mask))
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for p in mod.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_left_padding_with_causal_rule_gives_no_nan():
    # pad key 0 blocked, and the causal rule lets query 0 see only key 0: an empty row
    mod = make_attention()
    x = rand_x(1, 3, seed=10).requires_grad_(True)
    mask = torch.tensor([[[[False, True, True]]]])
    out = mod(x, mask=mask)
    assert torch.allclose(out[0, 0], mod.out_proj.bias, atol=1e-7)
    assert close(out, ref_attention(mod, x, mask=mask))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_dropout_only_in_training():
    mod = make_attention(dropout=0.5)
    x = rand_x(2, 6, seed=11)
    assert close(mod.eval()(x), ref_attention(mod, x))
    torch.manual_seed(0)
    assert not close(mod.train()(x), ref_attention(mod, x), atol=1e-3)
    mod0 = make_attention(dropout=0.0).train()
    assert close(mod0(x), ref_attention(mod0, x))


@pytest.mark.parametrize("causal", [True, False])
def test_block_attention_matches_reference(causal):
    torch.manual_seed(12)
    block = TransformerBlock(D_MODEL, N_HEADS, 32, dropout=0.0, causal=causal).eval()
    assert isinstance(block.attention, MultiHeadAttention)
    assert block.attention.causal is causal
    x = rand_x(2, 5, seed=13)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., :1] = False
    for m in (None, mask):
        got = block.attention(x, mask=m)
        assert close(got, ref_attention(block.attention, x, mask=m, causal=causal))


def test_block_attention_with_cache_matches_reference():
    torch.manual_seed(14)
    block = TransformerBlock(D_MODEL, N_HEADS, 32, dropout=0.0).eval()
    x = rand_x(1, 6, seed=15)
    want = ref_attention(block.attention, x)
    cache = block.create_kv_cache(1, 6)
    outs = [block.attention(x[:, :4], kv_cache=cache)]
    outs += [block.attention(x[:, t : t + 1], kv_cache=cache) for t in (4, 5)]
    assert close(torch.cat(outs, dim=1), want)
