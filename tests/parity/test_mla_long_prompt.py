"""Multi-head latent attention over blocks (long inputs, eval) equals its whole-score path, in
both frameworks and across them: a prefill long enough to expand the latent, then one-token
steps that absorb kv_b_proj, each attended over blocks of a few queries and keys (the block
sizes and thresholds shrunk here so that tiny inputs span several blocks with ragged ends)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_block.attention as jax_attention
import parity
import torch_block
import torch_block.attention as torch_attention
from twin_core import LLAMA_OPTIONS, RopeScaling, mla_absorbs

B, T, PREFILL, PAD = 2, 40, 30, 7  # row 1 left-padded by PAD
CONFIG = dict(
    vocab_size=64,
    max_seq_len=T,
    d_model=32,
    n_layers=1,
    n_heads=4,
    d_ff=32,
    dropout=0.0,
    **LLAMA_OPTIONS,
    tie_embeddings=False,
    q_lora_rank=16,
    kv_lora_rank=32,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,  # values narrower than keys (Dn + Dr = 12)
    rope_scaling=RopeScaling(  # yarn's mscale in the softmax scale
        rope_type="yarn",
        factor=4.0,
        original_max_position_embeddings=16,
        mscale=1.0,
        mscale_all_dim=1.0,
    ),
)
IDS = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(3))
MASK = torch.ones(B, T, dtype=torch.long)
MASK[1, :PAD] = 0


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    lm = torch_block.TransformerLM(**CONFIG).eval()
    flax_lm, params = parity.from_torch(lm)
    return lm, flax_lm, params


def test_the_prefill_expands_and_the_steps_absorb():
    R, Dn, Dv = CONFIG["kv_lora_rank"], CONFIG["qk_nope_head_dim"], CONFIG["v_head_dim"]
    assert not mla_absorbs(PREFILL, R, Dn, Dv) and mla_absorbs(1, R, Dn, Dv)


def torch_run(lm) -> tuple[np.ndarray, np.ndarray]:
    """Logits (B, T, V) of the full forward, and of a prefill then one-token cached steps."""
    with torch.no_grad():
        full = lm(IDS, MASK).numpy()
        cache = lm.create_kv_cache(B, T)
        steps = [lm(IDS[:, :PREFILL], MASK[:, :PREFILL], kv_cache=cache)[0]]
        for t in range(PREFILL, T):
            steps.append(lm(IDS[:, t : t + 1], MASK[:, : t + 1], kv_cache=cache)[0])
    return full, torch.cat(steps, dim=1).numpy()


def jax_run(flax_lm, params) -> tuple[np.ndarray, np.ndarray]:
    """As torch_run, each call jitted afresh (the block sizes are read while tracing); the
    cache's position is traced, so the steps read every slot of it."""
    ids, mask = jnp.asarray(IDS.numpy(), jnp.int32), jnp.asarray(MASK.numpy(), jnp.int32)
    full = jax.jit(lambda p, i, m: flax_lm.apply({"params": p}, i, m))(params, ids, mask)
    step = jax.jit(lambda p, i, m, c: flax_lm.apply({"params": p}, i, m, kv_cache=c))
    cache = flax_lm.create_kv_cache(B, T)
    logits, cache = step(params, ids[:, :PREFILL], mask, cache)
    steps = [logits]
    for t in range(PREFILL, T):
        logits, cache = step(params, ids[:, t : t + 1], mask, cache)
        steps.append(logits)
    return np.asarray(full), np.asarray(jnp.concatenate(steps, axis=1))


def test_blocked_latent_attention_equals_the_whole_scores(models, monkeypatch):
    lm, flax_lm, params = models
    real = MASK.numpy().astype(bool)
    torch_whole, torch_whole_steps = torch_run(lm)
    jax_whole, jax_whole_steps = jax_run(flax_lm, params)

    calls = []
    attend = torch_attention.attend
    monkeypatch.setattr(torch_attention, "WHOLE_SCORES", 0)
    monkeypatch.setattr(torch_attention, "QUERY_BLOCK", 16)
    monkeypatch.setattr(
        torch_attention, "attend", lambda *a, **k: calls.append(a) or attend(*a, **k)
    )
    monkeypatch.setattr(jax_attention, "BLOCKED_MIN_SCORES", 1)
    monkeypatch.setattr(jax_attention, "BLOCK_Q", 16)
    monkeypatch.setattr(jax_attention, "BLOCK_K", 8)
    blocked = jax_attention.blocked_attention
    traced = []
    monkeypatch.setattr(
        jax_attention, "blocked_attention", lambda *a, **k: traced.append(a) or blocked(*a, **k)
    )
    torch_blocked, torch_blocked_steps = torch_run(lm)
    jax_blocked, jax_blocked_steps = jax_run(flax_lm, params)

    # torch: the forward in 3 blocks of queries (16, 16, 8), each against the keys it may see,
    # with H heads of keys [k_nope, rope key]; a step: one query on one latent key head
    q, k, v = calls[0][:3]
    assert [c[0].shape[2] for c in calls[:3]] == [16, 16, 8]
    assert [c[1].shape[2] for c in calls[:3]] == [16, 32, 40]
    assert q.shape == (B, 4, 16, 12) and k.shape[1] == 4 and v.shape[-1] == 6
    step_q, step_k, step_v = calls[-1][:3]
    assert step_q.shape == (B, 4, 1, 32 + 4) and step_k.shape == (B, 1, T, 36)
    assert step_v.shape == (B, 1, T, 32)
    # JAX: the expanded prefill (H key heads) and the absorbed steps (one), traced once each
    assert [a[0].shape for a in traced] == [
        (B, T, 4, 1, 12),
        (B, PREFILL, 4, 1, 12),
        (B, 1, 1, 4, 36),
    ]

    for whole, blocks in [
        (torch_whole, torch_blocked),
        (torch_whole_steps, torch_blocked_steps),
        (jax_whole, jax_blocked),
        (jax_whole_steps, jax_blocked_steps),
        (torch_blocked, jax_blocked),
        (torch_blocked_steps, jax_blocked_steps),
        (torch_whole, torch_blocked_steps),  # cached decode == the full forward
    ]:
        np.testing.assert_allclose(blocks[real], whole[real], atol=1e-5, rtol=0)
        assert np.isfinite(blocks).all()  # pad queries, which may see no key, too
    assert np.abs(torch_whole[real]).max() > 0.5
