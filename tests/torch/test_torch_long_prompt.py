"""Long prompts in torch_block: attention in blocks of queries equals full attention (the
float64 NumPy reference of tests/reference/), with masks, left padding, a cache
offset, sliding windows and GQA; no block holds more scores than its budget; and generate's
chunked prefill gives the tokens of the full forward."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import reference as ref
import torch
from family_configs import BLOCKS, LMS

import torch_block
import torch_block.attention as attention
from torch_block import TransformerBlock, TransformerLM

generation = importlib.import_module("torch_block.generate")  # the module, not the function

ATOL = 1e-5  # docs/design.md section 7: float32, unit-scale outputs
BLOCK_NAMES = ["original", "mqa_gated_gelu", "llama", "mistral", "bidirectional_rope", "gemma2"]
T = 13  # tokens per block input: several query blocks of SMALL_BLOCK
SMALL_BLOCK = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of SMALL_BLOCK queries for every input (the defaults attend these whole)."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", SMALL_BLOCK)
    monkeypatch.setattr(attention, "WHOLE_SCORES", 0)


def make_block(name: str, dtype=torch.float32) -> TransformerBlock:
    torch.manual_seed(0)
    return ref.randomize_torch(TransformerBlock(**BLOCKS[name])).to(dtype)


def padded_mask(batch: int, length: int, pads: list[int]) -> torch.Tensor:
    """(batch, 1, 1, length) bool: row b may not attend its first pads[b] keys."""
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    for b, n in enumerate(pads):
        mask[b, ..., :n] = False
    return mask


def max_error(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def recorded_blocks(monkeypatch) -> list[tuple[int, ...]]:
    """The (B, H, rows, keys) of every call of `attention.attend`, recorded while it runs."""
    calls = []
    attend = attention.attend

    def recording(q, k, v, allowed, dropout=None, fused=False, **scores):
        calls.append((q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        return attend(q, k, v, allowed, dropout, fused, **scores)

    monkeypatch.setattr(attention, "attend", recording)
    return calls


# --------------------------------------------------------------------------- attention blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_blocked_block_equals_the_float64_reference(name, dtype, small_blocks, monkeypatch):
    block = make_block(name, dtype)
    s = ref.spec(**BLOCKS[name])
    x = torch.randn(3, T, s["d_model"], generator=torch.Generator().manual_seed(1), dtype=dtype)
    mask = padded_mask(3, T, [0, 3, 6])
    calls = recorded_blocks(monkeypatch)
    with torch.no_grad():
        got = block(x, mask)[0]
    want, _ = ref.block(x.double().numpy(), ref.torch_weights(block), s, mask.numpy())
    assert len(calls) == -(-T // SMALL_BLOCK)  # one call per block of queries
    assert max_error(got, want) <= ATOL


def test_a_query_with_no_allowed_key_gets_zeros_in_every_block(small_blocks):
    block = make_block("original")
    s = ref.spec(**BLOCKS["original"])
    x = torch.randn(2, T, s["d_model"], generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 1, T, T, dtype=torch.bool)
    mask[0, :, 5, :] = False  # query 5 of row 0 (in the second block) may see nothing
    mask[1, :, :, :9] = False  # row 1: queries 0..8 see nothing under the causal rule
    with torch.no_grad():
        got = block.attention(block.norm1(x), mask)
    bias = block.attention.out_proj.bias
    assert torch.isfinite(got).all()
    assert torch.allclose(got[0, 5], bias) and torch.allclose(got[1, :9], bias.expand(9, -1))
    want, _ = ref.block(x.double().numpy(), ref.torch_weights(block), s, mask.numpy())
    with torch.no_grad():
        assert max_error(block(x, mask)[0], want) <= ATOL


@pytest.mark.parametrize("name", ["original", "llama", "mistral"])
def test_blocked_chunk_after_a_cache_equals_the_full_reference(name, small_blocks):
    """Queries at slots 5.. of a cache attend the cached keys in blocks: the reference rows."""
    block = make_block(name)
    s = ref.spec(**BLOCKS[name])
    x = torch.randn(2, T, s["d_model"], generator=torch.Generator().manual_seed(3))
    mask = padded_mask(2, T, [0, 2])
    cache = block.create_kv_cache(2, T)
    with torch.no_grad():
        first = block(x[:, :5], mask[..., :5], cache, use_cache=True)[0]
        rest = block(x[:, 5:], mask, cache, use_cache=True)[0]
    want, _ = ref.block(x.double().numpy(), ref.torch_weights(block), s, mask.numpy())
    assert max_error(torch.cat([first, rest], dim=1), want) <= ATOL


def test_blocks_skip_keys_no_query_may_see(monkeypatch):
    """600 queries at the default sizes: blocks of QUERY_BLOCK rows, each against the keys up to
    its last query (causal) or its window, within the score budget; ~half the square in all."""
    torch.manual_seed(0)
    length, window = 600, 100
    monkeypatch.setattr(attention, "WHOLE_SCORES", 0)  # 2 x 4 x 600 x 600 would fit whole
    for sliding_window in (None, window):
        module = attention.MultiHeadAttention(32, 4, 0.0, sliding_window=sliding_window).eval()
        calls = recorded_blocks(monkeypatch)
        with torch.no_grad():
            module(torch.randn(2, length, 32))
        rows = [c[2] for c in calls]
        assert sum(rows) == length and max(rows) <= attention.QUERY_BLOCK
        assert all(B * rows * keys <= attention.SCORE_ELEMENTS for B, _, rows, keys in calls)
        keys = [c[3] for c in calls]
        ends = np.cumsum(rows)
        if sliding_window is None:
            assert keys == list(ends)  # keys [0, last query] of each block
        else:
            assert keys == [min(e, window - 1 + r) for e, r in zip(ends, rows, strict=True)]


def test_dropout_in_training_attends_every_key_at_once(monkeypatch):
    """Training with dropout keeps one call over all scores (the same probabilities as ever)."""
    torch.manual_seed(0)
    module = attention.MultiHeadAttention(32, 4, 0.5).train()
    monkeypatch.setattr(attention, "QUERY_BLOCK", 2)
    calls = recorded_blocks(monkeypatch)
    module(torch.randn(2, 9, 32))
    assert calls == [(2, 4, 9, 9)]


# --------------------------------------------------------------------------- chunked prefill
LMS_USED = ["gpt2", "llama", "mistral", "mixtral"]


@pytest.mark.parametrize("name", LMS_USED)
def test_chunked_prefill_gives_the_reference_tokens(name, monkeypatch):
    """A 17-token left-padded prompt prefilled in chunks of 4 (LONG_PROMPT patched to 8), with
    blocks of 3 queries: the greedy tokens of the float64 reference."""
    monkeypatch.setattr(generation, "LONG_PROMPT", 8)
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 4)
    monkeypatch.setattr(attention, "QUERY_BLOCK", 3)
    monkeypatch.setattr(attention, "WHOLE_SCORES", 0)
    torch.manual_seed(0)
    lm = ref.randomize_torch(TransformerLM(**LMS[name]))
    length, new = 17, 6
    ids = torch.randint(1, lm.vocab_size, (2, length), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :5] = 0
    ids = ids.masked_fill(mask == 0, 0)
    chunks = []
    hidden_states = lm.hidden_states

    def counted(input_ids, *args):
        chunks.append(input_ids.shape[1])
        return hidden_states(input_ids, *args)

    monkeypatch.setattr(lm, "hidden_states", counted)
    got = torch_block.generate(lm, ids, mask, max_new_tokens=new)
    assert chunks == [4, 4, 4, 4, 1]
    np.testing.assert_array_equal(
        got.numpy(),
        ref.greedy(ids.numpy(), ref.torch_weights(lm), ref.spec(**LMS[name]), mask.numpy(), new),
    )
