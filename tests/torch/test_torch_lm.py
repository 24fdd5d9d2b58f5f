"""torch_block TransformerLM: names, a reference forward, cached decode, left-padded generation."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch

import torch_block
from torch_block.block import TransformerBlock
from torch_block.cache import KVCache
from torch_block.lm import TransformerLM
from twin_core import LMConfig

VOCAB, MAX_LEN, D_MODEL, N_LAYERS, N_HEADS, D_FF = 64, 128, 32, 2, 4, 64
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_lm(use_moe=False, tie_embeddings=True, seed=0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(
        VOCAB, MAX_LEN, D_MODEL, N_LAYERS, N_HEADS, D_FF, dropout=0.0, use_moe=use_moe,
        num_experts=4, tie_embeddings=tie_embeddings,
    ).eval()  # fmt: skip


def left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded with token 0: (ids, mask), (B, L)."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, L - n :] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[row, L - n :] = 1
    return ids, mask


# --------------------------------------------------------------------------- reference
def reference_logits(lm: TransformerLM, ids: torch.Tensor, mask: torch.Tensor):
    """The float64 reference LM with lm's weights: logits (B, T, V) and the aux loss."""
    s = ref.spec(
        d_model=D_MODEL, n_heads=N_HEADS, n_layers=N_LAYERS, num_experts=4,
        use_moe=lm.blocks[0].use_moe, tie_embeddings=lm.lm_head is None,
    )  # fmt: skip
    return ref.lm(ids.numpy(), ref.torch_weights(lm), s, mask.numpy())


def greedy_reference(lm: TransformerLM, ids, mask, n: int) -> torch.Tensor:
    """Greedy tokens from full forwards without a cache, one new token per loop step."""
    seq, full_mask = ids.clone(), mask.clone()
    new = []
    with torch.no_grad():
        for _ in range(n):
            token = lm(seq, full_mask)[:, -1].argmax(-1)  # (B,)
            new.append(token)
            seq = torch.cat([seq, token[:, None]], 1)
            full_mask = torch.cat([full_mask, torch.ones_like(token)[:, None]], 1)
    return torch.stack(new, 1)


# --------------------------------------------------------------------------- structure
def test_config_and_state_dict_names():
    tied, untied = make_lm(), make_lm(tie_embeddings=False)
    assert tied.config == LMConfig(
        vocab_size=VOCAB, max_seq_len=MAX_LEN, d_model=D_MODEL, n_layers=N_LAYERS,
        n_heads=N_HEADS, d_ff=D_FF, dropout=0.0, use_moe=False, num_experts=4,
        top_k_experts=2, expert_capacity_factor=1.25, tie_embeddings=True,
        router_z_loss_coef=0.0,
    )  # fmt: skip
    block_keys = sorted(TransformerBlock(D_MODEL, N_HEADS, D_FF).state_dict())
    expected = [
        "token_embedding.weight",
        "position_embedding.weight",
        "norm.weight",
        "norm.bias",
    ] + [f"blocks.{i}.{key}" for i in range(N_LAYERS) for key in block_keys]
    assert sorted(tied.state_dict()) == sorted(expected)
    assert sorted(untied.state_dict()) == sorted(expected + ["lm_head.weight"])
    sd = untied.state_dict()
    assert sd["token_embedding.weight"].shape == (VOCAB, D_MODEL)
    assert sd["position_embedding.weight"].shape == (MAX_LEN, D_MODEL)
    assert sd["lm_head.weight"].shape == (VOCAB, D_MODEL)
    assert 0.015 < float(sd["token_embedding.weight"].std()) < 0.025  # GPT-2 init, std 0.02


def test_cache_is_one_kv_cache_per_block():
    cache = make_lm().create_kv_cache(3, 40)
    assert len(cache) == N_LAYERS and all(isinstance(c, KVCache) for c in cache)
    assert cache[0].k_cache.shape == (3, N_HEADS, 40, D_MODEL // N_HEADS)
    assert cache[0] is not cache[1]


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize(
    "use_moe,tie", [(False, True), (False, False), (True, True)], ids=["dense", "untied", "moe"]
)
def test_forward_matches_reference_on_left_padded_batch(use_moe, tie):
    lm = make_lm(use_moe, tie)
    ids, mask = left_padded([9, 4, 1])
    with torch.no_grad():
        logits, aux = lm(ids, mask, return_aux_loss=True)
    want, want_aux = reference_logits(lm, ids, mask)
    assert logits.shape == (3, 9, VOCAB)
    real = mask.bool().numpy()  # pad positions have no defined output
    np.testing.assert_allclose(logits.numpy()[real], want[real], atol=ATOL, rtol=0)
    assert aux.dim() == 0 and float(aux) == pytest.approx(want_aux, abs=1e-6)
    if use_moe:
        assert float(aux) > 0.5 * N_LAYERS  # each layer's loss is near 1 at random routing


def test_forward_without_mask_counts_every_token_and_returns_logits_only():
    lm = make_lm()
    ids, _ = left_padded([6, 6])
    with torch.no_grad():
        logits = lm(ids)
    assert isinstance(logits, torch.Tensor)
    want, _ = reference_logits(lm, ids, torch.ones_like(ids))
    np.testing.assert_allclose(logits.numpy(), want, atol=ATOL, rtol=0)


def test_padding_does_not_change_a_rows_logits():
    lm = make_lm()
    ids, mask = left_padded([5, 2])
    with torch.no_grad():
        batch = lm(ids, mask)
        alone = lm(ids[1:, -2:])
    torch.testing.assert_close(batch[1, -2:], alone[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_cached_decode_logits_equal_full_forward_at_every_step(use_moe):
    lm = make_lm(use_moe)
    ids, mask = left_padded([12, 7, 3])
    with torch.no_grad():
        full = lm(ids, mask)  # (B, 12, V)
        cache = lm.create_kv_cache(3, 12)
        prefill, returned = lm(ids[:, :5], mask[:, :5], kv_cache=cache)
        assert returned is cache and cache[0].cache_position == 5
        steps = [prefill]
        for t in range(5, 12):
            steps.append(lm(ids[:, t : t + 1], mask[:, : t + 1], kv_cache=cache)[0])
    cached = torch.cat(steps, 1)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- generation
def test_greedy_generation_equals_full_forward_argmax_loop():
    lm = make_lm()
    ids, mask = left_padded([8, 3])
    got = torch_block.generate(lm, ids, mask, max_new_tokens=12)
    assert got.shape == (2, 12) and got.dtype == torch.long
    assert torch.equal(got, greedy_reference(lm, ids, mask, 12))


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_left_padded_batch_equals_each_prompt_alone(use_moe):
    lm = make_lm(use_moe)
    lengths = [10, 3, 6]
    ids, mask = left_padded(lengths)
    batch = torch_block.generate(lm, ids, mask, max_new_tokens=16)
    for row, n in enumerate(lengths):
        alone = torch_block.generate(lm, ids[row : row + 1, -n:], max_new_tokens=16)
        assert torch.equal(batch[row], alone[0]), f"row {row}"


def test_generate_runs_in_eval_mode_and_restores_the_mode():
    lm = TransformerLM(VOCAB, MAX_LEN, D_MODEL, N_LAYERS, N_HEADS, D_FF, dropout=0.5).train()
    ids, mask = left_padded([4, 2])
    first = torch_block.generate(lm, ids, mask, max_new_tokens=6)
    assert lm.training and all(m.training for m in lm.modules())
    assert torch.equal(first, torch_block.generate(lm, ids, mask, max_new_tokens=6))  # no dropout
    lm.eval()
    assert torch.equal(first, greedy_reference(lm, ids, mask, 6))


# --------------------------------------------------------------------------- bad input
def test_forward_rejects_bad_inputs():
    lm = make_lm()
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\[0, vocab_size=64\), got values in \[1, 64\]"):
        lm(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match="integer"):
        lm(ids.float())
    with pytest.raises(ValueError, match=r"\(batch >= 1, seq_len >= 1\)"):
        lm(torch.ones(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(2, 4\), got \(2, 3\)"):
        lm(ids, torch.ones(2, 3))
    with pytest.raises(ValueError, match="seq_len 129 exceeds max_seq_len=128"):
        lm(torch.ones(1, 129, dtype=torch.long))
    cache = lm.create_kv_cache(2, 8)
    with pytest.raises(ValueError, match="kv_cache must hold 2 caches, got 1"):
        lm(ids, kv_cache=cache[:1])
    assert cache[0].cache_position == 0


def test_constructor_rejects_bad_config():
    with pytest.raises(ValueError, match="vocab_size must be a positive int, got 0"):
        TransformerLM(0, MAX_LEN, D_MODEL, N_LAYERS, N_HEADS, D_FF)
    with pytest.raises(ValueError, match="divisible"):
        TransformerLM(VOCAB, MAX_LEN, 30, N_LAYERS, N_HEADS, D_FF)
    with pytest.raises(TypeError):
        TransformerLM(VOCAB, MAX_LEN, D_MODEL, N_LAYERS, N_HEADS, D_FF, 0.1, False, 8, 2, 1.25,
                      True, 0.5)  # fmt: skip
