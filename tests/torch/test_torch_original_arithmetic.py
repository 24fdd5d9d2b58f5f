"""The original architecture computes the original project's arithmetic, bit for bit.

The reference below is that project's block and language model written out in plain torch
ops, step for step in its order: pre-norm residual block, attention with one fused kernel when
no key is masked in eval, otherwise the scores written out (masked fill, float32 softmax,
probabilities zeroed on masked keys, dropout), exact-GELU feed-forward, learned positions that
count real tokens only. Every comparison is `torch.equal`: a change of summation order, even one
that stays within float32 rounding, fails these tests (which is what keeps the original
project's outputs and checkpoints meaning the same thing).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torch_block
from torch_block import TransformerBlock, TransformerLM

D_MODEL, N_HEADS, D_FF = 64, 4, 128


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- the reference
def ref_attention(block, h, mask, cache, start, training):
    """The original MultiHeadAttention.forward; cache = (k (B, H, S_max, D), v) or None."""
    a = block.attention
    B, T, _ = h.shape
    H, D = N_HEADS, D_MODEL // N_HEADS
    q = F.linear(h, a.q_proj.weight, a.q_proj.bias).view(B, T, H, D).transpose(1, 2)
    k = F.linear(h, a.k_proj.weight, a.k_proj.bias).view(B, T, H, D).transpose(1, 2)
    v = F.linear(h, a.v_proj.weight, a.v_proj.bias).view(B, T, H, D).transpose(1, 2)
    S = start + T
    if cache is not None:
        cache[0][:B, :, start:S] = k
        cache[1][:B, :, start:S] = v
        k, v = cache[0][:B, :, :S], cache[1][:B, :, :S]
    allowed = None
    if T > 1:
        query_pos = start + torch.arange(T)
        allowed = torch.arange(S)[None, :] <= query_pos[:, None]  # (T, S)
    if mask is not None:
        allowed = mask if allowed is None else allowed & mask
    if allowed is None and not training:
        out = F.scaled_dot_product_attention(q, k, v, scale=D**-0.5)
    else:
        scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * D**-0.5  # (B, H, T, S)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        probs = F.softmax(scores, dim=-1)
        if allowed is not None:
            probs = probs * allowed
        probs = F.dropout(probs.to(v.dtype), a.dropout.p, training)
        out = torch.matmul(probs, v)
    out = out.transpose(1, 2).reshape(B, T, H * D)
    return F.linear(out, a.out_proj.weight, a.out_proj.bias)


def ref_block(block, x, mask=None, cache=None, start=0, training=False):
    """The original TransformerBlock.forward (dense): pre-norm, exact GELU, dropout after each."""
    p = block.dropout.p
    n1, n2, ffn = block.norm1, block.norm2, block.feed_forward
    h1 = F.layer_norm(x, (D_MODEL,), n1.weight, n1.bias, n1.eps)
    h = x + F.dropout(ref_attention(block, h1, mask, cache, start, training), p, training)
    h2 = F.layer_norm(h, (D_MODEL,), n2.weight, n2.bias, n2.eps)
    hidden = F.dropout(F.gelu(F.linear(h2, ffn.fc1.weight, ffn.fc1.bias)), ffn.dropout.p, training)
    return h + F.dropout(F.linear(hidden, ffn.fc2.weight, ffn.fc2.bias), p, training)


def ref_lm(lm, ids, attention_mask=None, caches=None, start=0):
    """The original TransformerLM.forward in eval mode: logits (B, T, V)."""
    T = ids.shape[1]
    if attention_mask is None:
        positions = start + torch.arange(T)[None, :]
    else:
        real_so_far = torch.cumsum(attention_mask.long(), dim=-1)
        positions = (real_so_far - 1).clamp(min=0)[:, start : start + T]
    x = F.embedding(ids, lm.token_embedding.weight) + F.embedding(
        positions, lm.position_embedding.weight
    )
    key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    for i, block in enumerate(lm.blocks):
        x = ref_block(block, x, key_mask, None if caches is None else caches[i], start)
    x = F.layer_norm(x, (D_MODEL,), lm.norm.weight, lm.norm.bias, lm.norm.eps)
    return F.linear(x, lm.token_embedding.weight)


def empty_cache(B: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The original KVCache's buffers: keys and values, each (B, H, S, D) zeros."""
    shape = (B, N_HEADS, S, D_MODEL // N_HEADS)
    return torch.zeros(shape), torch.zeros(shape)


def ref_greedy(lm, ids, attention_mask, new):
    """Greedy tokens: prefill the prompts, then one cached step per token, as the original."""
    B, L = ids.shape
    S = L + new
    caches = [empty_cache(B, S) for _ in lm.blocks]
    mask = attention_mask.long()
    logits = ref_lm(lm, ids, mask, caches, 0)[:, -1]
    tokens = []
    for t in range(new):
        token = logits.argmax(dim=-1)  # (B,)
        tokens.append(token)
        if t == new - 1:
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
        logits = ref_lm(lm, token[:, None], mask, caches, L + t)[:, -1]
    return torch.stack(tokens, dim=1)


# --------------------------------------------------------------------------- the tests
def make_block() -> TransformerBlock:
    torch.manual_seed(0)
    return TransformerBlock(D_MODEL, N_HEADS, D_FF, 0.1).eval()


def make_lm() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(256, 64, D_MODEL, 2, N_HEADS, D_FF, 0.1).eval()


def inputs(B: int, T: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, d_model) and a padding mask (B, 1, 1, T): row b skips its first 3*b keys."""
    x = torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    for b in range(B):
        mask[b, ..., : 3 * b] = False
    return x, mask


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "padded"])
@pytest.mark.parametrize("T", [1, 7, 250])
def test_block_forward_is_the_original_arithmetic(T, masked):
    """Up to torch_block.attention.WHOLE_SCORES scores (3 x 4 x 250 x 250 here)."""
    block = make_block()
    x, mask = inputs(3, T)
    mask = mask if masked else None
    with torch.no_grad():
        assert torch.equal(block(x, mask)[0], ref_block(block, x, mask))


@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "padded"])
def test_cached_prefill_and_steps_are_the_original_arithmetic(masked):
    block = make_block()
    x, mask = inputs(3, 12, seed=2)
    cache = block.create_kv_cache(3, 12)
    ref_cache = empty_cache(3, 12)
    chunks = [(0, 8)] + [(t, t + 1) for t in range(8, 12)]
    with torch.no_grad():
        for start, end in chunks:
            m = mask[..., :end] if masked else None
            got = block(x[:, start:end], m, cache, use_cache=True)[0]
            want = ref_block(block, x[:, start:end], m, ref_cache, start)
            assert torch.equal(got, want), (start, end)


def test_training_with_dropout_is_the_original_arithmetic_and_random_stream():
    block = make_block().train()
    x, mask = inputs(2, 9, seed=3)
    torch.manual_seed(5)
    got = block(x, mask)[0]
    torch.manual_seed(5)
    want = ref_block(block, x, mask, training=True)
    assert torch.equal(got, want)


def test_lm_logits_and_greedy_tokens_are_the_original_arithmetic():
    lm = make_lm()
    ids = torch.randint(1, 256, (3, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :9] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        assert torch.equal(lm(ids, mask), ref_lm(lm, ids, mask))
        assert torch.equal(lm(ids), ref_lm(lm, ids))
        want = ref_greedy(lm, ids[:, :12], mask[:, :12], 16)
    got = torch_block.generate(lm, ids[:, :12], mask[:, :12], max_new_tokens=16)
    assert torch.equal(got, want)
