"""GPT-OSS's attention sinks on the long-input paths of both twins (torch's blocks of queries,
JAX's online softmax), against a float64 NumPy loop over the queries: the sink logit joins each
row's softmax denominator and attends to nothing. (The whole-score and cached paths are held to
transformers' GPT-OSS in tests/hf.)"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch

from jax_block.attention import KeySource, blocked_attention
from torch_block import MultiHeadAttention

H, KV, D, WINDOW = 4, 2, 8, 37


def sink_attention(q, k, v, sinks, window):
    """Causal attention of q (H, T, D) to k, v (KV, S, D) within `window`, one query at a time,
    softmax over [allowed scores, sink], in float64."""
    q, k, v, sinks = (np.asarray(a, np.float64) for a in (q, k, v, sinks))
    out = np.zeros_like(q)
    for h in range(H):
        g = h // (H // KV)
        for t in range(q.shape[1]):
            keys = np.arange(max(0, t - window + 1), t + 1)
            scores = k[g, keys] @ q[h, t] * D**-0.5
            top = max(scores.max(), sinks[h])
            weights = np.exp(scores - top)
            out[h, t] = weights @ v[g, keys] / (weights.sum() + np.exp(sinks[h] - top))
    return out


def draws(T: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, T, D, generator=generator) * 2  # scores of several units
    k, v = torch.randn(2, 1, KV, T, D, generator=generator)
    sinks = torch.randn(H, generator=generator) * 2
    return q, k, v, sinks


def test_torch_blocks_of_queries_with_sinks():
    """B * H * T * S above WHOLE_SCORES: queries attended in blocks (sinks: never the fused
    kernel, which has no sink)."""
    T = 520  # 4 * 520 * 520 > 2 ** 20
    q, k, v, sinks = draws(T, 0)
    attention = MultiHeadAttention(
        H * D, H, 0.0, n_kv_heads=KV, sliding_window=WINDOW, attention_sinks=True
    ).eval()
    with torch.no_grad():
        attention.sinks.copy_(sinks)
        out = attention.attend_blocks(q, k, v, 0, None)
    expected = sink_attention(q[0], k[0], v[0], sinks, WINDOW)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)


def test_jax_online_softmax_with_sinks():
    """Three blocks of queries, keys in overlapping blocks: the sink starts each running max
    and sum."""
    T = 300
    q, k, v, sinks = draws(T, 1)
    grouped = jnp.asarray(q[0].numpy()).reshape(KV, H // KV, T, D).transpose(2, 0, 1, 3)
    source = KeySource(jnp.asarray(k.numpy()), jnp.asarray(v.numpy()), 0, T, None)
    out = blocked_attention(
        grouped[None] * D**-0.5,
        jnp.arange(T),
        [source],
        causal=True,
        window=WINDOW,
        sinks=jnp.asarray(sinks.numpy()),
    )  # (1, T, KV, G, D)
    out = np.asarray(out)[0].transpose(1, 2, 0, 3).reshape(H, T, D)
    expected = sink_attention(q[0], k[0], v[0], sinks, WINDOW)
    np.testing.assert_allclose(out, expected, atol=1e-5)
