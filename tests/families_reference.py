"""Float64 NumPy references for the architecture families (docs/design.md section 8).

Weights are read by torch's state_dict names (Linear weights (out, in)); `flax_weights` renames
a Flax parameter tree into them. Nothing here imports torch_block, jax_block, parity or
twin_core: every formula is restated from the contract (explicit loops where an index mapping
or a mask is the point), so a test that compares a twin with it can fail.

A model is described by `spec(**fields)`: the block's or LM's constructor fields over the
defaults of the original block. `rope_scaling` may be any object with the llama3 attributes.
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
    sliding_window=None,
    norm_topk_prob=True,
    shared_expert_d_ff=None,
    shared_expert_gate=False,
    tie_embeddings=True,
)

Weights = Mapping[str, np.ndarray]


def spec(**fields: Any) -> dict[str, Any]:
    """The constructor fields over DEFAULTS, with the resolved n_kv_heads and head_dim."""
    out = {**DEFAULTS, **fields}
    out["n_kv_heads"] = out["n_kv_heads"] or out["n_heads"]
    out["head_dim"] = out["head_dim"] or out["d_model"] // out["n_heads"]
    return out


# --------------------------------------------------------------------------- weights
def torch_weights(module: Any) -> dict[str, np.ndarray]:
    """A torch module's state_dict as float64 NumPy arrays, by key."""
    return {key: value.detach().double().numpy() for key, value in module.state_dict().items()}


def randomize_torch(module: Any, seed: int = 0) -> Any:
    """Every parameter of a torch module redrawn at unit scale (random_array); eval mode."""
    import torch  # only torch tests call this: the module itself needs NumPy alone

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            parameter.copy_(torch.from_numpy(random_array(name, tuple(parameter.shape), rng)))
    return module.eval()


def flax_weights(params: Mapping) -> dict[str, np.ndarray]:
    """A Flax parameter tree as float64 arrays under torch's state_dict names.

    kernel (in, out) -> weight (out, in); scale and embedding -> weight; the stacked experts'
    kernels (E, in, out) and biases (E, out) -> one weight and bias per expert;
    blocks_{i} -> blocks.{i}.
    """
    out: dict[str, np.ndarray] = {}

    def visit(tree: Mapping, path: tuple[str, ...]) -> None:
        for name, value in tree.items():
            if isinstance(value, Mapping):
                visit(value, (*path, name))
                continue
            array = np.asarray(value, np.float64)
            parts = [part.replace("blocks_", "blocks.") for part in path]
            leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(name, name)
            if "experts" in parts:  # (E, ...) stacked: feed_forward/experts/fc1/kernel
                at = parts.index("experts")
                for e in range(array.shape[0]):
                    item = array[e].T if name == "kernel" else array[e]
                    key = [*parts[: at + 1], str(e), *parts[at + 1 :], leaf]
                    out[".".join(key)] = item
            else:
                out[".".join([*parts, leaf])] = array.T if name == "kernel" else array

    visit(params, ())
    return out


def random_array(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A unit-scale draw for a weight named by its torch key or Flax leaf.

    Matrices N(0, 1/fan_in) (fan_in: torch's last axis, a Flax kernel's second to last);
    embeddings N(0, 1/d_model), so tied logits are unit-scale too; norm scales 1 + N(0, 0.1^2);
    biases N(0, 0.1^2).
    """
    z = rng.standard_normal(shape)
    leaf = name.rsplit(".", 1)[-1].rsplit("/", 1)[-1]
    if "embedding" in name:
        return z / math.sqrt(shape[-1])
    if "norm" in name and leaf in ("weight", "scale"):
        return 1.0 + 0.1 * z
    if leaf == "kernel":
        return z / math.sqrt(shape[-2])
    if leaf == "weight":
        return z / math.sqrt(shape[-1])
    return 0.1 * z


# --------------------------------------------------------------------------- pieces
def linear(x: np.ndarray, weights: Weights, name: str) -> np.ndarray:
    """x (..., in) @ weight.T (+ bias when the weights hold one)."""
    y = x @ weights[f"{name}.weight"].T
    bias = weights.get(f"{name}.bias")
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
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x * rsqrt(mean(x^2) + eps) * weight."""
    return x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + eps) * weight


def norm(x: np.ndarray, weights: Weights, name: str, s: Mapping) -> np.ndarray:
    if s["norm"] == "rmsnorm":
        return rms_norm(x, weights[f"{name}.weight"], s["norm_eps"])
    return layer_norm(x, weights[f"{name}.weight"], weights[f"{name}.bias"], s["norm_eps"])


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
    freq = default_inv_freq(s["head_dim"], s["rope_theta"])
    return freq if s["rope_scaling"] is None else llama3_inv_freq(freq, s["rope_scaling"])


def rotate(x: np.ndarray, positions: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """x (B, T, heads, D) rotated per head: x*cos + rotate_half(x)*sin, angle position*freq[i]
    on both halves; rotate_half(x) = concat(-x[D/2:], x[:D/2]); positions (B|1, T)."""
    angles = np.asarray(positions, np.float64)[..., None] * freq  # (B|1, T, D/2)
    angles = np.concatenate([angles, angles], axis=-1)[:, :, None, :]  # (B|1, T, 1, D)
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(angles) + rotated * np.sin(angles)


def allowed_keys(query_pos: int, n_keys: int, causal: bool, window: int | None) -> np.ndarray:
    """(n_keys,) bool: key k may be attended from query_pos (causal: k <= p; with a window
    W: p - W < k <= p)."""
    allowed = np.ones(n_keys, bool)
    for k in range(n_keys):
        if causal and k > query_pos:
            allowed[k] = False
        if window is not None and not query_pos - window < k <= query_pos:
            allowed[k] = False
    return allowed


def kv_head(h: int, s: Mapping) -> int:
    """The key/value head that query head h reads: h // (n_heads / n_kv_heads)."""
    return h // (s["n_heads"] // s["n_kv_heads"])


def attention(
    x: np.ndarray,
    weights: Weights,
    name: str,
    s: Mapping,
    mask: np.ndarray | None = None,
    positions: np.ndarray | None = None,
) -> np.ndarray:
    """Self-attention of x (B, T, d_model) at positions 0..T-1 (rope: `positions` (B|1, T),
    default arange(T)); mask broadcastable to (B, n_heads, T, T), 1 = may attend. A query with
    no allowed key gives a zero attention output."""
    B, T, _ = x.shape
    H, KV, D = s["n_heads"], s["n_kv_heads"], s["head_dim"]
    q = linear(x, weights, f"{name}.q_proj").reshape(B, T, H, D)
    k = linear(x, weights, f"{name}.k_proj").reshape(B, T, KV, D)
    v = linear(x, weights, f"{name}.v_proj").reshape(B, T, KV, D)
    if s["positions"] == "rope":
        pos = np.arange(T)[None, :] if positions is None else positions
        q, k = rotate(q, pos, inv_freq(s)), rotate(k, pos, inv_freq(s))
    given = np.ones((B, H, T, T), bool)
    if mask is not None:
        given = np.broadcast_to(np.asarray(mask).astype(bool), (B, H, T, T))
    out = np.zeros((B, T, H, D))
    for b in range(B):
        for h in range(H):
            g = kv_head(h, s)
            for t in range(T):
                keys = np.flatnonzero(
                    allowed_keys(t, T, s["causal"], s["sliding_window"]) & given[b, h, t]
                )
                if keys.size == 0:
                    continue
                scores = k[b, keys, g] @ q[b, t, h] / math.sqrt(D)
                p = np.exp(scores - scores.max())
                out[b, t, h] = (p / p.sum()) @ v[b, keys, g]
    return linear(out.reshape(B, T, H * D), weights, f"{name}.out_proj")


def feed_forward(x: np.ndarray, weights: Weights, name: str, s: Mapping) -> np.ndarray:
    """fc2(act(fc1 x)), or gated fc2(act(fc1 x) * fc3 x); biases where the weights have them."""
    h = activation(s["activation"], linear(x, weights, f"{name}.fc1"))
    if s["gated_ffn"]:
        h = h * linear(x, weights, f"{name}.fc3")
    return linear(h, weights, f"{name}.fc2")


class MoEOut(NamedTuple):
    out: np.ndarray  # shaped like the input
    aux: float  # Switch load-balancing loss (no z-loss)
    probs: np.ndarray  # (N, E)


def moe(x: np.ndarray, weights: Weights, name: str, s: Mapping) -> MoEOut:
    """Dropless (eval) MoE, token by token: top-k of softmax(x @ gate.T) with ties to the
    lower expert, weights renormalised when norm_topk_prob, plus the shared expert (scaled by
    sigmoid(x @ w) when gated)."""
    tokens = x.reshape(-1, x.shape[-1])  # (N, d_model)
    N, E, k = tokens.shape[0], s["num_experts"], s["top_k_experts"]
    logits = tokens @ weights[f"{name}.gate.weight"].T  # (N, E)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = probs / probs.sum(axis=-1, keepdims=True)
    out = np.zeros_like(tokens)
    counts = np.zeros(E)
    for n in range(N):
        top = sorted(range(E), key=lambda e: (-probs[n, e], e))[:k]
        total = sum(probs[n, e] for e in top) if s["norm_topk_prob"] else 1.0
        for e in top:
            expert = feed_forward(tokens[n], weights, f"{name}.experts.{e}", s)
            out[n] += probs[n, e] / total * expert
            counts[e] += 1
        if s["shared_expert_d_ff"] is not None:
            shared = feed_forward(tokens[n], weights, f"{name}.shared_expert", s)
            if s["shared_expert_gate"]:
                gate = float(tokens[n] @ weights[f"{name}.shared_expert_gate.weight"][0])
                shared = shared / (1.0 + math.exp(-gate))
            out[n] += shared
    aux = E * float(np.sum(counts / (N * k) * probs.mean(axis=0)))
    return MoEOut(out.reshape(x.shape), aux, probs)


def block(
    x: np.ndarray,
    weights: Weights,
    s: Mapping,
    mask: np.ndarray | None = None,
    positions: np.ndarray | None = None,
    prefix: str = "",
) -> tuple[np.ndarray, float | None]:
    """The pre-norm block without dropout: (output (B, T, d_model), aux loss or None)."""
    x = np.asarray(x, np.float64)
    attn = attention(
        norm(x, weights, f"{prefix}norm1", s), weights, f"{prefix}attention", s, mask, positions
    )
    h = x + attn
    normed = norm(h, weights, f"{prefix}norm2", s)
    if not s["use_moe"]:
        return h + feed_forward(normed, weights, f"{prefix}feed_forward", s), None
    result = moe(normed, weights, f"{prefix}feed_forward", s)
    return h + result.out, result.aux


def real_positions(attention_mask: np.ndarray) -> np.ndarray:
    """(B, T): the number of real tokens before each slot, counted in a loop (pads: 0)."""
    positions = np.zeros(attention_mask.shape, np.int64)
    for b, row in enumerate(attention_mask):
        seen = 0
        for t, real in enumerate(row):
            positions[b, t] = seen if real else 0
            seen += int(real)
    return positions


def lm(ids: np.ndarray, weights: Weights, s: Mapping, attention_mask: np.ndarray | None = None):
    """Logits (B, T, vocab_size) of the LM: embedding (+ learned positions), blocks with pad
    keys masked and positions counting real tokens, final norm, head (tied by default)."""
    ids = np.asarray(ids)
    B, T = ids.shape
    attention_mask = np.ones((B, T), np.int64) if attention_mask is None else attention_mask
    positions = real_positions(np.asarray(attention_mask))  # (B, T)
    x = weights["token_embedding.weight"][ids]  # (B, T, d_model)
    if s["positions"] == "learned":
        x = x + weights["position_embedding.weight"][positions]
    key_mask = np.asarray(attention_mask).astype(bool)[:, None, None, :]  # (B, 1, 1, T)
    for i in range(s["n_layers"]):
        x, _ = block(x, weights, s, key_mask, positions, prefix=f"blocks.{i}.")
    x = norm(x, weights, "norm", s)
    head = weights["token_embedding.weight" if s["tie_embeddings"] else "lm_head.weight"]
    return x @ head.T


def greedy(ids: np.ndarray, weights: Weights, s: Mapping, mask: np.ndarray, n: int) -> np.ndarray:
    """n greedy tokens (B, n) after left-padded prompts: the whole sequence again for each."""
    tokens = []
    for _ in range(n):
        token = lm(ids, weights, s, mask)[:, -1].argmax(axis=-1)  # (B,)
        tokens.append(token)
        ids = np.concatenate([ids, token[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
    return np.stack(tokens, axis=1)
