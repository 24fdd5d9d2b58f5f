"""The decode step of `generate`: one new token per row through a TransformerLM in eval mode.

`decode_step` computes what `TransformerLM.forward` computes for one token, against the caches
that generate preallocated for the whole generation, without the per-call work that a step does
not need: no input checks (generate checked the prompt), no position or mask tensor rebuilt from
the whole mask, no module call in the layer loop (the weights are read once per generate call,
as transposed views, never copied). The tests hold it to the model's forward.

With `slot=None` it is the form that `torch.compile` takes: every shape fixed (the whole cache
is attended, the slots after the current one masked), the slot a 0-d tensor, the cache written
in place with `index_copy_`; one compilation then serves every position. Eagerly the slot is
also given as an int, and the cache is read up to it, with no mask unless the prompts were
padded.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attend
from .cache import KVCache
from .feed_forward import ACTIVATIONS
from .lm import TransformerLM
from .rope import apply_rope

Linear = tuple[torch.Tensor, torch.Tensor | None]  # (weight transposed (in, out), bias or None)
Norm = tuple[torch.Tensor, torch.Tensor | None]  # (weight, bias or None)


class StepSpec(NamedTuple):
    """The Python values a step depends on (a compiled step is specialised to them)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm: str  # "layernorm" or "rmsnorm"
    norm_eps: float
    activation: str
    sliding_window: int | None
    padless: bool  # every prompt slot holds a real token: no key mask


class LayerWeights(NamedTuple):
    """One block's weights; `moe` is the MixtureOfExperts module of an MoE block (else None)."""

    norm1: Norm
    q: Linear
    k: Linear
    v: Linear
    out: Linear
    norm2: Norm
    fc1: Linear | None
    fc3: Linear | None
    fc2: Linear | None
    moe: nn.Module | None
    inv_freq: torch.Tensor | None  # (D/2,) with rope


class StepState(NamedTuple):
    """The tensors a step reads: weights, caches (written in place) and the prompts' layout."""

    layers: tuple[LayerWeights, ...]
    k_caches: tuple[torch.Tensor, ...]  # each (B, KV, S, D)
    v_caches: tuple[torch.Tensor, ...]  # each (B, KV, S, D)
    token_embedding: torch.Tensor  # (V, d_model)
    position_embedding: torch.Tensor | None  # (max_seq_len, d_model) with learned positions
    norm: Norm
    head: torch.Tensor  # (d_model, V)
    key_valid: torch.Tensor  # (B, 1, 1, S) bool: the slot holds a real token
    pads: torch.Tensor  # (B, 1) int64: pad slots at the start of each row
    slots: torch.Tensor  # (S,) int64: 0 .. S-1


def _linear(layer: nn.Linear) -> Linear:
    return layer.weight.t(), layer.bias


def _norm_weights(norm: nn.Module) -> Norm:
    return norm.weight, getattr(norm, "bias", None)


def _layer_weights(block: nn.Module) -> LayerWeights:
    attention, ffn = block.attention, block.feed_forward
    dense = not block.use_moe
    return LayerWeights(
        norm1=_norm_weights(block.norm1),
        q=_linear(attention.q_proj),
        k=_linear(attention.k_proj),
        v=_linear(attention.v_proj),
        out=_linear(attention.out_proj),
        norm2=_norm_weights(block.norm2),
        fc1=_linear(ffn.fc1) if dense else None,
        fc3=_linear(ffn.fc3) if dense and ffn.fc3 is not None else None,
        fc2=_linear(ffn.fc2) if dense else None,
        moe=None if dense else ffn,
        inv_freq=attention.inv_freq if attention.rope else None,
    )


def step_inputs(
    lm: TransformerLM, caches: list[KVCache], key_valid: torch.Tensor
) -> tuple[StepSpec, StepState]:
    """The spec and state of decode steps of `lm` (in eval mode) over `caches`, whose slots hold
    real tokens where key_valid (B, S) is True (a row's pads come first)."""
    config = lm.config
    block = lm.blocks[0].config
    spec = StepSpec(
        n_heads=config.n_heads,
        n_kv_heads=block.resolved_n_kv_heads,
        head_dim=block.resolved_head_dim,
        norm=config.norm,
        norm_eps=config.norm_eps,
        activation=config.activation,
        sliding_window=config.sliding_window,
        padless=bool(key_valid.all()),
    )
    head = lm.token_embedding.weight if lm.lm_head is None else lm.lm_head.weight
    state = StepState(
        layers=tuple(_layer_weights(block) for block in lm.blocks),
        k_caches=tuple(cache.k_cache for cache in caches),
        v_caches=tuple(cache.v_cache for cache in caches),
        token_embedding=lm.token_embedding.weight,
        position_embedding=(
            None if lm.position_embedding is None else lm.position_embedding.weight
        ),
        norm=_norm_weights(lm.norm),
        head=head.t(),
        key_valid=key_valid[:, None, None, :],
        pads=(~key_valid).sum(dim=-1, keepdim=True),
        slots=torch.arange(key_valid.shape[1], device=key_valid.device),
    )
    return spec, state


def linear(x: torch.Tensor, weights: Linear) -> torch.Tensor:
    """x (B, in) @ weight.T + bias -> (B, out): F.linear's arithmetic."""
    weight_t, bias = weights
    return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)


def norm(x: torch.Tensor, weights: Norm, spec: StepSpec) -> torch.Tensor:
    """LayerNorm, or RMSNorm with its mean in float32, over the last axis of x (B, d_model)."""
    weight, bias = weights
    if spec.norm == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, spec.norm_eps)
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + spec.norm_eps)
    return weight * normed.to(x.dtype)


def _moe(moe: nn.Module, h: torch.Tensor) -> torch.Tensor:
    B, d_model = h.shape
    return moe(h.view(B, 1, d_model), False)[0].view(B, d_model)


_compiled_step = None
_moe_outside_graph = _moe  # under torch.compile: _moe excluded from the graph (its shapes vary)


def compiled_decode_step():
    """`decode_step` under torch.compile (static shapes), made once per process."""
    global _compiled_step, _moe_outside_graph
    if _compiled_step is None:
        _moe_outside_graph = torch.compiler.disable(_moe)
        # cpp_wrapper: the compiled step's launcher is C++, not Python (~10% of a small step)
        _compiled_step = torch.compile(decode_step, dynamic=False, options={"cpp_wrapper": True})
    return _compiled_step


def feed_forward(h: torch.Tensor, layer: LayerWeights, spec: StepSpec, static: bool):
    """The block's dense or MoE feed-forward of h (B, d_model)."""
    if layer.moe is not None:
        return (_moe_outside_graph if static else _moe)(layer.moe, h)
    hidden = ACTIVATIONS[spec.activation](linear(h, layer.fc1))  # (B, d_ff)
    if layer.fc3 is not None:
        hidden = hidden * linear(h, layer.fc3)
    return linear(hidden, layer.fc2)


def decode_step(
    spec: StepSpec,
    state: StepState,
    tokens: torch.Tensor,
    pos: torch.Tensor,
    slot: int | None,
) -> torch.Tensor:
    """Logits (B, V) of tokens (B,) written at cache slot `pos` (a 0-d int64 tensor).

    `slot` is the same slot as an int (eager), or None (static: the whole cache is attended,
    masked past `pos`, and written with index_copy_). The caches are updated in place.
    """
    B = tokens.shape[0]
    H, KV, D, W = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.sliding_window
    positions = pos.view(1, 1) if spec.padless else pos - state.pads  # (B|1, 1)
    x = F.embedding(tokens, state.token_embedding)  # (B, d_model)
    if state.position_embedding is not None:
        x = x + F.embedding(positions.view(-1), state.position_embedding)
    if slot is None:
        keys = slice(None)
        slots = state.slots.view(1, 1, 1, -1)  # (1, 1, 1, S)
        allowed = slots <= pos
        if W is not None:
            allowed = allowed & (slots > pos - W)
        allowed = allowed if spec.padless else allowed & state.key_valid  # (B|1, 1, 1, S)
        index = pos.view(1)
    else:
        keys = slice(0 if W is None else max(0, slot - W + 1), slot + 1)
        allowed = None if spec.padless else state.key_valid[..., keys]  # (B, 1, 1, S')
    for layer, k_cache, v_cache in zip(state.layers, state.k_caches, state.v_caches, strict=True):
        h = norm(x, layer.norm1, spec)
        q = linear(h, layer.q).view(B, H, 1, D)
        k = linear(h, layer.k).view(B, KV, 1, D)
        v = linear(h, layer.v).view(B, KV, 1, D)
        if layer.inv_freq is not None:
            q = apply_rope(q, positions, layer.inv_freq)
            k = apply_rope(k, positions, layer.inv_freq)
        if slot is None:
            k_cache.index_copy_(2, index, k)
            v_cache.index_copy_(2, index, v)
        else:
            k_cache[:, :, slot : slot + 1] = k
            v_cache[:, :, slot : slot + 1] = v
        out = attend(q, k_cache[:, :, keys], v_cache[:, :, keys], allowed)  # (B, H, 1, D)
        x = x + linear(out.view(B, H * D), layer.out)
        x = x + feed_forward(norm(x, layer.norm2, spec), layer, spec, slot is None)
    return torch.mm(norm(x, state.norm, spec), state.head)  # (B, V)
