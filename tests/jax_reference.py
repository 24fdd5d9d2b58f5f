"""Float64 NumPy references for the jax_block tests, computed straight from Flax parameter trees.

Nothing here imports jax_block: each function restates docs/design.md in plain NumPy (explicit loops
where the order matters), so a test that compares jax_block with it can fail. JAX is used only
to read parameter shapes off a module and to make keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def to_f64(tree):
    """A nested dict of arrays as float64 NumPy arrays."""
    if isinstance(tree, Mapping):
        return {name: to_f64(value) for name, value in tree.items()}
    return np.asarray(tree, np.float64)


def random_params(module, *args, seed: int = 0, **kwargs) -> dict:
    """Random float32 parameters for `module.init(key, *args, **kwargs)`, drawn with NumPy.

    Kernels (..., in, out) ~ N(0, 1/in); biases ~ N(0, 0.1^2); LayerNorm scales ~ 1 + N(0, 0.1^2).
    Only the shapes come from Flax (`jax.eval_shape`), so no initialiser has to compile.
    """
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args, **kwargs)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        z = rng.standard_normal(leaf.shape)
        if name == "kernel":
            z = z / math.sqrt(leaf.shape[-2])
        elif name == "scale":
            z = 1.0 + 0.1 * z
        else:
            z = 0.1 * z
        return jnp.asarray(z, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def rbg_key(seed: int) -> jax.Array:
    """A typed "rbg" key: what Flax's rngs take, at a fraction of threefry's compile time on CPU."""
    return jax.random.key(seed, impl="rbg")


def dense(x: np.ndarray, p: dict) -> np.ndarray:
    """x (..., in) @ kernel (in, out) + bias."""
    y = x @ p["kernel"]
    return y + p["bias"] if "bias" in p else y


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU."""
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def layer_norm(x: np.ndarray, p: dict, eps: float = 1e-5) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def feed_forward(p: dict, x: np.ndarray) -> np.ndarray:
    """fc1 -> exact GELU -> fc2 (no dropout)."""
    return dense(gelu(dense(x, p["fc1"])), p["fc2"])


def expert(p_experts: dict, e: int, x: np.ndarray) -> np.ndarray:
    """Expert e of stacked expert parameters (E, ...) applied to x (..., d_model)."""
    return feed_forward(
        {layer: {name: w[e] for name, w in p_experts[layer].items()} for layer in ("fc1", "fc2")},
        x,
    )


def attention(
    p: dict,
    x: np.ndarray,
    n_heads: int,
    causal: bool = True,
    mask: np.ndarray | None = None,
    query_start: int = 0,
) -> np.ndarray:
    """Multi-head attention of the queries x[:, query_start:] over the keys of all of x.

    x (B, L, d_model); mask broadcastable to (B, H, L - query_start, L), 1 = may attend.
    Returns (B, L - query_start, d_model). A query with no allowed key gives a zero attention
    output (so out_proj's bias alone).
    """
    p = to_f64(p)
    x = np.asarray(x, np.float64)
    B, L, d_model = x.shape
    T, H, D = L - query_start, n_heads, d_model // n_heads
    q = dense(x[:, query_start:], p["q_proj"]).reshape(B, T, H, D)
    k = dense(x, p["k_proj"]).reshape(B, L, H, D)
    v = dense(x, p["v_proj"]).reshape(B, L, H, D)
    allowed = np.ones((B, H, T, L), bool)
    if causal:
        allowed &= np.arange(L)[None, :] <= query_start + np.arange(T)[:, None]
    if mask is not None:
        allowed &= np.broadcast_to(np.asarray(mask).astype(bool), (B, H, T, L))
    out = np.zeros((B, T, H, D))
    for b in range(B):
        for h in range(H):
            for t in range(T):
                keys = np.flatnonzero(allowed[b, h, t])
                if keys.size == 0:
                    continue
                scores = k[b, keys, h] @ q[b, t, h] / math.sqrt(D)
                weights = np.exp(scores - scores.max())
                out[b, t, h] = (weights / weights.sum()) @ v[b, keys, h]
    return dense(out.reshape(B, T, d_model), p["out_proj"])


def route(gate_kernel: np.ndarray, tokens: np.ndarray, top_k: int):
    """Per token: logits (E,), probs (E,) and the top-k [(expert, renormalised weight), ...]."""
    logits = np.asarray(tokens, np.float64) @ np.asarray(gate_kernel, np.float64)  # (N, E)
    probs, choices = [], []
    for row in logits:
        p = np.exp(row - row.max())
        p = p / p.sum()
        top = sorted(range(row.size), key=lambda e: (-p[e], e))[:top_k]  # ties: lower index
        total = sum(p[e] for e in top)
        probs.append(p)
        choices.append([(e, p[e] / total) for e in top])
    return logits, np.array(probs), choices


class MoEResult(NamedTuple):
    """What the reference MoE computed, token by token."""

    out: np.ndarray  # shaped like the input
    kept: set  # (token, slot) assignments that fit their expert's capacity
    choices: list  # per token: [(expert, renormalised weight), ...] in slot order
    counts: np.ndarray  # (E,) assignments per expert before dropping
    aux: float  # Switch load-balancing loss
    logits: np.ndarray  # (N, E) router logits


def moe(p: dict, x: np.ndarray, top_k: int, capacity_factor: float | None) -> MoEResult:
    """The Mixture of Experts of docs/design.md section 4, one token and one slot at a time."""
    p = to_f64(p)
    x = np.asarray(x, np.float64)
    tokens = x.reshape(-1, x.shape[-1])
    N, E = tokens.shape[0], p["gate"]["kernel"].shape[1]
    logits, probs, choices = route(p["gate"]["kernel"], tokens, top_k)
    if capacity_factor is None:
        capacity = N
    else:
        capacity = max(1, math.ceil(capacity_factor * N * top_k / E))
    counts = np.zeros(E)
    kept = set()
    for s in range(top_k):  # slot-major: every token's first choice, then every second ...
        for n in range(N):
            e = choices[n][s][0]
            if counts[e] < capacity:
                kept.add((n, s))
            counts[e] += 1
    out = np.zeros_like(tokens)
    for n in range(N):
        for s in range(top_k):
            if (n, s) in kept:
                e, w = choices[n][s]
                out[n] += w * expert(p["experts"], e, tokens[n])
    f = counts / (N * top_k)
    aux = E * float(np.sum(f * probs.mean(axis=0)))
    return MoEResult(out.reshape(x.shape), kept, choices, counts, aux, logits)


def block(
    p: dict,
    x: np.ndarray,
    n_heads: int,
    causal: bool = True,
    mask: np.ndarray | None = None,
    top_k: int | None = None,
    capacity_factor: float | None = None,
) -> tuple[np.ndarray, MoEResult | None]:
    """Pre-LN block without dropout: dense FFN when top_k is None, else the MoE.

    Returns the output (B, T, d_model) and, for the MoE, what it computed.
    """
    p = to_f64(p)
    x = np.asarray(x, np.float64)
    h = x + attention(p["attention"], layer_norm(x, p["norm1"]), n_heads, causal, mask)
    normed = layer_norm(h, p["norm2"])
    if top_k is None:
        return h + feed_forward(p["feed_forward"], normed), None
    result = moe(p["feed_forward"], normed, top_k, capacity_factor)
    return h + result.out, result
