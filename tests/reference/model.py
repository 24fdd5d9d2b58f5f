"""The model in float64 NumPy, restated from docs/design.md (sections 2-4, 6 and 8).

Weights are read by torch's state_dict names (Linear weights (out, in); see weights.py for
Flax trees). A model is described by `spec(**fields)`: the block's or LM's constructor fields
over the defaults of the original block; `rope_scaling` may be any object with the llama3
attributes (the other rope types are checked against transformers' own functions). Explicit
loops where an order, an index mapping or a mask is the point, so that a test comparing a twin
with these functions can fail.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

DEFAULTS: dict[str, Any] = dict(
    dropout=0.0,
    use_moe=False,
    num_experts=8,
    top_k_experts=2,
    causal=True,
    n_kv_heads=None,
    head_dim=None,
    qkv_bias=True,
    out_bias=True,
    norm="layernorm",
    norm_eps=1e-5,
    activation="gelu",
    gated_ffn=False,
    ffn_bias=True,
    positions="learned",
    rope_theta=10000.0,
    rope_scaling=None,
    partial_rotary_factor=1.0,
    sliding_window=None,
    qk_norm=None,
    norm_topk_prob=True,
    shared_expert_d_ff=None,
    shared_expert_gate=False,
    tie_embeddings=True,
    layer_types=None,
    dense_layers=(),
    dense_d_ff=None,
    sandwich_norms=False,
    query_pre_attn_scalar=None,
    attn_logit_softcap=None,
    embed_scale=False,
    final_logit_softcap=None,
    local_rope_theta=None,
)

Weights = Mapping[str, np.ndarray]


def spec(**fields: Any) -> dict[str, Any]:
    """The constructor fields over DEFAULTS; with n_heads given, n_kv_heads and head_dim
    resolved (n_heads and d_model // n_heads by default)."""
    out = {**DEFAULTS, **fields}
    if "n_heads" in out:
        out["n_kv_heads"] = out["n_kv_heads"] or out["n_heads"]
        out["head_dim"] = out["head_dim"] or out["d_model"] // out["n_heads"]
    return out


def join(*names: str) -> str:
    """A state_dict key from its parts, skipping empty ones: join("", "q_proj") == "q_proj"."""
    return ".".join(name for name in names if name)


# --------------------------------------------------------------------------- small pieces
def linear(x: np.ndarray, weights: Weights, name: str) -> np.ndarray:
    """x (..., in) @ weight.T (+ bias when the weights hold one)."""
    y = np.asarray(x, np.float64) @ weights[join(name, "weight")].T
    bias = weights.get(join(name, "bias"))
    return y if bias is None else y + bias


def activation(name: str, x: np.ndarray) -> np.ndarray:
    """gelu (erf), gelu_tanh (GPT-2's gelu_new), silu, relu."""
    if name == "gelu":
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "silu":
        return x / (1.0 + np.exp(-x))
    if name == "relu":
        return np.maximum(x, 0.0)
    raise ValueError(f"unknown activation {name!r}")


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * weight + bias, the variance in two passes."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x * rsqrt(mean(x^2) + eps) * weight."""
    return x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + eps) * weight


def norm(x: np.ndarray, weights: Weights, name: str, s: Mapping) -> np.ndarray:
    """The spec's norm (LayerNorm, RMSNorm, or Gemma's RMSNorm: RMSNorm times (1 + weight)) with
    the weights under `name`."""
    x = np.asarray(x, np.float64)
    if s["norm"] == "rmsnorm":
        return rms_norm(x, weights[join(name, "weight")], s["norm_eps"])
    if s["norm"] == "gemma_rmsnorm":
        return rms_norm(x, 1.0 + weights[join(name, "weight")], s["norm_eps"])
    return layer_norm(x, weights[join(name, "weight")], weights[join(name, "bias")], s["norm_eps"])


# --------------------------------------------------------------------------- rope
def default_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """inv_freq[i] = theta^(-2i/head_dim), i < head_dim/2."""
    return np.array([theta ** (-2.0 * i / head_dim) for i in range(head_dim // 2)])


def llama3_inv_freq(inv_freq: np.ndarray, scaling: Any) -> np.ndarray:
    """Llama 3's scaling, one frequency at a time: wavelengths shorter than
    original_max / high_freq_factor keep their frequency, longer than original_max /
    low_freq_factor are divided by `factor`, and those between blend the two by
    smooth = (original_max / wavelength - low) / (high - low)."""
    old = scaling.original_max_position_embeddings
    low, high, factor = scaling.low_freq_factor, scaling.high_freq_factor, scaling.factor
    out = []
    for freq in inv_freq:
        wavelength = 2 * math.pi / freq
        if wavelength < old / high:
            out.append(freq)
        elif wavelength > old / low:
            out.append(freq / factor)
        else:
            smooth = (old / wavelength - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


def inv_freq(s: Mapping) -> np.ndarray:
    """The spec's rope frequencies (R / 2,) over the R = int(head_dim * partial_rotary_factor)
    rotated dims (llama3 scaling, linear scaling: every frequency divided by its factor, or
    none)."""
    freq = default_inv_freq(int(s["head_dim"] * s["partial_rotary_factor"]), s["rope_theta"])
    scaling = s["rope_scaling"]
    if scaling is None:
        return freq
    if getattr(scaling, "rope_type", "llama3") == "linear":
        return freq / scaling.factor
    return llama3_inv_freq(freq, scaling)


def rotate(x: np.ndarray, positions: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """x (B, T, heads, D) rotated per head over its first R = 2 * len(freq) dims, the others
    unchanged: r*cos + rotate_half(r)*sin of r = x[..., :R], angle position*freq[i] on both
    halves; rotate_half(r) = concat(-r[R/2:], r[:R/2]); positions (B|1, T)."""
    half = len(freq)
    angles = np.asarray(positions, np.float64)[..., None] * freq  # (B|1, T, R/2)
    angles = np.concatenate([angles, angles], axis=-1)[:, :, None, :]  # (B|1, T, 1, R)
    r = x[..., : 2 * half]
    rotated = np.concatenate([-r[..., half:], r[..., :half]], axis=-1)
    return np.concatenate([r * np.cos(angles) + rotated * np.sin(angles), x[..., 2 * half :]], -1)


# --------------------------------------------------------------------------- attention
def allowed_keys(query_pos: int, n_keys: int, causal: bool, window: int | None) -> np.ndarray:
    """(n_keys,) bool: key k may be attended from query_pos (causal: k <= p; with a window
    W: p - W < k <= p)."""
    k = np.arange(n_keys)
    allowed = np.ones(n_keys, bool)
    if causal or window is not None:
        allowed &= k <= query_pos
    if window is not None:
        allowed &= k > query_pos - window
    return allowed


def kv_head(h: int, s: Mapping) -> int:
    """The key/value head that query head h reads: h // (n_heads / n_kv_heads)."""
    return h // (s["n_heads"] // s["n_kv_heads"])


def qk_normed(y: np.ndarray, weights: Weights, name: str, s: Mapping, heads: int) -> np.ndarray:
    """A q or k projection y (B, T, heads * D) split into heads (B, T, heads, D), normed as
    qk_norm says with the weights under `name`: over the whole projection before the split
    ("projection"), over each head after it ("head"), or not at all (None)."""
    if s["qk_norm"] == "projection":
        y = norm(y, weights, name, s)
    y = y.reshape(*y.shape[:-1], heads, y.shape[-1] // heads)
    return norm(y, weights, name, s) if s["qk_norm"] == "head" else y


def keys_values(
    x: np.ndarray, weights: Weights, name: str, s: Mapping, positions: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """What the cache holds for x (B, L, d_model): keys (rotated with rope) and values, each
    (B, L, n_kv_heads, head_dim), k normed as qk_norm says; positions (B|1, L), default
    arange(L)."""
    B, L, _ = x.shape
    KV, D = s["n_kv_heads"], s["head_dim"]
    k = qk_normed(linear(x, weights, join(name, "k_proj")), weights, join(name, "k_norm"), s, KV)
    v = linear(x, weights, join(name, "v_proj")).reshape(B, L, KV, D)
    if s["positions"] == "rope":
        k = rotate(k, np.arange(L)[None, :] if positions is None else positions, inv_freq(s))
    return k, v


def attention(
    x: np.ndarray,
    weights: Weights,
    name: str,
    s: Mapping,
    mask: np.ndarray | None = None,
    positions: np.ndarray | None = None,
    query_start: int = 0,
) -> np.ndarray:
    """Self-attention of the queries x[:, query_start:] over the keys of all of x (B, L,
    d_model), x[:, i] at position i (rope: `positions` (B|1, L) instead); mask broadcastable to
    (B, n_heads, L - query_start, L), 1 = may attend. A query with no allowed key gives a zero
    attention output (out_proj's bias alone). Returns (B, L - query_start, d_model)."""
    x = np.asarray(x, np.float64)
    B, L, _ = x.shape
    T, H, D = L - query_start, s["n_heads"], s["head_dim"]
    q = linear(x[:, query_start:], weights, join(name, "q_proj"))
    q = qk_normed(q, weights, join(name, "q_norm"), s, H)  # (B, T, H, D)
    k, v = keys_values(x, weights, name, s, positions)
    if s["positions"] == "rope":
        pos = np.arange(L)[None, :] if positions is None else np.asarray(positions)
        q = rotate(q, pos[:, query_start:], inv_freq(s))
    given = np.ones((B, H, T, L), bool)
    if mask is not None:
        given = np.broadcast_to(np.asarray(mask).astype(bool), (B, H, T, L))
    out = np.zeros((B, T, H, D))
    scalar = D if s["query_pre_attn_scalar"] is None else s["query_pre_attn_scalar"]
    cap = s["attn_logit_softcap"]  # scores capped to cap * tanh(scores / cap)
    for b in range(B):
        for h in range(H):
            g = kv_head(h, s)
            for t in range(T):
                allowed = allowed_keys(query_start + t, L, s["causal"], s["sliding_window"])
                keys = np.flatnonzero(allowed & given[b, h, t])
                if keys.size == 0:
                    continue
                scores = k[b, keys, g] @ q[b, t, h] / math.sqrt(scalar)
                if cap is not None:
                    scores = cap * np.tanh(scores / cap)
                p = np.exp(scores - scores.max())
                out[b, t, h] = (p / p.sum()) @ v[b, keys, g]
    return linear(out.reshape(B, T, H * D), weights, join(name, "out_proj"))


# --------------------------------------------------------------------------- feed-forward
def feed_forward(x: np.ndarray, weights: Weights, name: str, s: Mapping) -> np.ndarray:
    """fc2(act(fc1 x)), or gated fc2(act(fc1 x) * fc3 x); biases where the weights have them."""
    h = activation(s["activation"], linear(x, weights, join(name, "fc1")))
    if s["gated_ffn"]:
        h = h * linear(x, weights, join(name, "fc3"))
    return linear(h, weights, join(name, "fc2"))


class Routing(NamedTuple):
    """The router's view of N tokens over E experts."""

    logits: np.ndarray  # (N, E)
    probs: np.ndarray  # (N, E) softmax of the logits
    choices: list  # per token: k [(expert, weight), ...], best first


def route(tokens: np.ndarray, weights: Weights, name: str, s: Mapping) -> Routing:
    """Top-k of softmax(tokens (N, d_model) @ gate.T) per token, ties to the lower expert;
    weights renormalised to sum to 1 when norm_topk_prob."""
    logits = np.asarray(tokens, np.float64) @ weights[join(name, "gate.weight")].T  # (N, E)
    probs, choices = [], []
    for row in logits:
        p = np.exp(row - row.max())
        p = p / p.sum()
        top = sorted(range(row.size), key=lambda e: (-p[e], e))[: s["top_k_experts"]]
        total = sum(p[e] for e in top) if s["norm_topk_prob"] else 1.0
        probs.append(p)
        choices.append([(e, p[e] / total) for e in top])
    return Routing(logits, np.array(probs), choices)


class MoEOut(NamedTuple):
    """What the reference MoE computed, token by token."""

    out: np.ndarray  # shaped like the input
    aux: float  # Switch load-balancing loss (no z-loss)
    probs: np.ndarray  # (N, E)
    logits: np.ndarray  # (N, E)
    choices: list  # per token: [(expert, weight), ...] in slot order
    kept: set  # (token, slot) assignments within their expert's capacity
    counts: np.ndarray  # (E,) assignments per expert before dropping


def moe(
    x: np.ndarray, weights: Weights, name: str, s: Mapping, capacity_factor: float | None = None
) -> MoEOut:
    """The Mixture of Experts (design section 4) over x (..., d_model), one token and one slot
    at a time: capacity C = max(1, ceil(c * N * k / E)) filled slot-major when a capacity
    factor c is given (training), dropless otherwise; plus the shared expert (scaled by
    sigmoid(x @ w) when gated)."""
    x = np.asarray(x, np.float64)
    tokens = x.reshape(-1, x.shape[-1])  # (N, d_model)
    N, E, k = tokens.shape[0], s["num_experts"], s["top_k_experts"]
    routing = route(tokens, weights, name, s)
    capacity = N if capacity_factor is None else max(1, math.ceil(capacity_factor * N * k / E))
    counts = np.zeros(E)
    kept = set()
    for slot in range(k):  # slot-major: every token's first choice, then every second ...
        for n in range(N):
            e = routing.choices[n][slot][0]
            if counts[e] < capacity:
                kept.add((n, slot))
            counts[e] += 1
    out = np.zeros_like(tokens)
    for n in range(N):
        for slot, (e, w) in enumerate(routing.choices[n]):
            if (n, slot) in kept:
                out[n] += w * feed_forward(tokens[n], weights, join(name, f"experts.{e}"), s)
        if s["shared_expert_d_ff"] is not None:
            shared = feed_forward(tokens[n], weights, join(name, "shared_expert"), s)
            if s["shared_expert_gate"]:
                gate = float(tokens[n] @ weights[join(name, "shared_expert_gate.weight")][0])
                shared = shared / (1.0 + math.exp(-gate))
            out[n] += shared
    aux = E * float(np.sum(counts / (N * k) * routing.probs.mean(axis=0)))
    return MoEOut(
        out.reshape(x.shape), aux, routing.probs, routing.logits, routing.choices, kept, counts
    )


# --------------------------------------------------------------------------- block and LM
def block(
    x: np.ndarray,
    weights: Weights,
    s: Mapping,
    mask: np.ndarray | None = None,
    positions: np.ndarray | None = None,
    name: str = "",
    capacity_factor: float | None = None,
) -> tuple[np.ndarray, MoEOut | None]:
    """The pre-norm block without dropout: the output (B, T, d_model) and, for the MoE, what
    it computed (capacity_factor as in `moe`). With sandwich_norms the attention's and the
    feed-forward's outputs are normed (post_attention_norm, post_feed_forward_norm) before
    their residual adds."""
    x = np.asarray(x, np.float64)

    def output(y: np.ndarray, norm_name: str) -> np.ndarray:
        return norm(y, weights, join(name, norm_name), s) if s["sandwich_norms"] else y

    normed = norm(x, weights, join(name, "norm1"), s)
    attn = attention(normed, weights, join(name, "attention"), s, mask, positions)
    h = x + output(attn, "post_attention_norm")
    normed = norm(h, weights, join(name, "norm2"), s)
    if not s["use_moe"]:
        ff = feed_forward(normed, weights, join(name, "feed_forward"), s)
        return h + output(ff, "post_feed_forward_norm"), None
    result = moe(normed, weights, join(name, "feed_forward"), s, capacity_factor)
    return h + output(result.out, "post_feed_forward_norm"), result


def layer_spec(s: Mapping, i: int) -> dict[str, Any]:
    """Layer i's spec in an LM spec: a "full_attention" layer of layer_types has no window (a
    "sliding_attention" one keeps sliding_window; without layer_types every layer does); a layer
    of dense_layers is a dense feed-forward (dense_d_ff wide) without a shared expert; a sliding
    layer rotates with local_rope_theta, unscaled, when that is set."""
    out = dict(s)
    if s["layer_types"] is not None and s["layer_types"][i] == "full_attention":
        out["sliding_window"] = None
    if out["sliding_window"] is not None and s["local_rope_theta"] is not None:
        out.update(rope_theta=s["local_rope_theta"], rope_scaling=None)
    if i in s["dense_layers"]:
        out.update(use_moe=False, shared_expert_d_ff=None, shared_expert_gate=False)
        out["d_ff"] = s["dense_d_ff"] or s["d_ff"]
    return out


def real_positions(attention_mask: np.ndarray) -> np.ndarray:
    """(B, T): the number of real tokens before each slot, counted in a loop (pads: 0)."""
    positions = np.zeros(attention_mask.shape, np.int64)
    for b, row in enumerate(attention_mask):
        seen = 0
        for t, real in enumerate(row):
            positions[b, t] = seen if real else 0
            seen += int(real)
    return positions


def lm(
    ids: np.ndarray, weights: Weights, s: Mapping, attention_mask: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """The LM in eval mode: logits (B, T, vocab_size) and the summed MoE aux loss (0.0 when
    dense). Embedding (+ learned positions), blocks with pad keys masked and positions counting
    real tokens (each layer as `layer_spec` says), final norm, head (tied by default). With
    embed_scale the token embeddings are times sqrt(d_model); with final_logit_softcap the
    logits are capped."""
    ids = np.asarray(ids)
    B, T = ids.shape
    attention_mask = np.ones((B, T), np.int64) if attention_mask is None else attention_mask
    positions = real_positions(np.asarray(attention_mask))  # (B, T)
    x = weights["token_embedding.weight"][ids]  # (B, T, d_model)
    if s["embed_scale"]:
        x = x * math.sqrt(s["d_model"])
    if s["positions"] == "learned":
        x = x + weights["position_embedding.weight"][positions]
    key_mask = np.asarray(attention_mask).astype(bool)[:, None, None, :]  # (B, 1, 1, T)
    aux = 0.0
    for i in range(s["n_layers"]):
        x, result = block(x, weights, layer_spec(s, i), key_mask, positions, name=f"blocks.{i}")
        aux += 0.0 if result is None else result.aux
    x = norm(x, weights, "norm", s)
    head = weights["token_embedding.weight" if s["tie_embeddings"] else "lm_head.weight"]
    logits, cap = x @ head.T, s["final_logit_softcap"]
    return (logits if cap is None else cap * np.tanh(logits / cap)), aux


def greedy(ids: np.ndarray, weights: Weights, s: Mapping, mask: np.ndarray, n: int) -> np.ndarray:
    """n greedy tokens (B, n) after left-padded prompts: the whole sequence again for each."""
    tokens = []
    for _ in range(n):
        token = lm(ids, weights, s, mask)[0][:, -1].argmax(axis=-1)  # (B,)
        tokens.append(token)
        ids = np.concatenate([ids, token[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
    return np.stack(tokens, axis=1)
