"""The token step of `generate`: one new token per row through a TransformerLM in eval mode.

`token_step` computes what `TransformerLM.forward` computes for one token, with the same
functions its modules' `forward` calls (`embed`, `norm`, `project`, `attend`, `merge_heads`,
`feed_forward`, the MixtureOfExperts module, `unembed`), against the caches that generate
preallocated for the whole generation. It leaves out the per-call work that a step does not
need: no input checks (generate checked the prompt), no position or mask tensor rebuilt from
the whole mask, no module call in the layer loop (each module's `params()` is read once per
generate call: its tensors themselves, never copied).

With `slot=None` it is the form that `torch.compile` takes: every shape fixed (the whole cache
is attended, the slots after the current one masked), the slot a 0-d tensor, the cache written
in place with `index_copy_`; one compilation then serves every position. Eagerly the slot is
also given as an int, and the cache is read up to it, with no mask unless the prompts were
padded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .attention import AttentionParams, attend, merge_heads, project
from .block import TransformerBlock
from .cache import KVCache, LatentCache, write_slots
from .feed_forward import FeedForwardParams, feed_forward
from .lm import EmbeddingParams, TransformerLM, embed, unembed
from .mla import LatentAttentionParams, attend_latent, project_latent
from .moe import MixtureOfExperts
from .norm import NormParams, norm


class LayerParams(NamedTuple):
    """What a step reads of one block: the dense feed-forward's params or the MoE module."""

    norm1: NormParams
    attention: AttentionParams | LatentAttentionParams  # the second: latent attention (MLA)
    sliding_window: int | None  # this layer's window (None: full attention)
    post_attention_norm: NormParams | None  # with sandwich_norms
    norm2: NormParams
    post_feed_forward_norm: NormParams | None  # with sandwich_norms
    feed_forward: FeedForwardParams | None  # dense
    moe: MixtureOfExperts | None


class StepInputs(NamedTuple):
    """What every step of one generate call reads: the model's params, the caches (written in
    place), the prompts' layout and the Python values a compiled step is specialised to."""

    layers: tuple[LayerParams, ...]
    k_caches: tuple[torch.Tensor, ...]  # each (B, KV, S, D); an MLA layer's latent (B, S, R)
    v_caches: tuple[torch.Tensor, ...]  # each (B, KV, S, D); an MLA layer's rope keys (B, S, Dr)
    embedding: EmbeddingParams
    norm: NormParams
    head: torch.Tensor  # (V, d_model)
    final_logit_softcap: float | None
    key_valid: torch.Tensor  # (B, 1, 1, S) bool: the slot holds a real token
    pads: torch.Tensor  # (B, 1) int64: pad slots at the start of each row
    slots: torch.Tensor  # (S,) int64: 0 .. S-1
    padless: bool  # every prompt slot holds a real token: no key mask


def layer_params(block: TransformerBlock) -> LayerParams:
    """The params of `block`'s modules."""
    ffn = block.feed_forward
    moe = ffn if isinstance(ffn, MixtureOfExperts) else None
    sandwich = block.config.sandwich_norms
    return LayerParams(
        norm1=block.norm1.params(),
        attention=block.attention.params(),
        sliding_window=None if block.config.is_mla else block.attention.sliding_window,
        post_attention_norm=block.post_attention_norm.params() if sandwich else None,
        norm2=block.norm2.params(),
        post_feed_forward_norm=block.post_feed_forward_norm.params() if sandwich else None,
        feed_forward=None if moe is not None else ffn.params(),
        moe=moe,
    )


def _keys(cache: KVCache | LatentCache) -> tuple[torch.Tensor, torch.Tensor]:
    """What a layer's cache holds: keys and values, or an MLA layer's latent and rope keys."""
    if isinstance(cache, LatentCache):
        return cache.latent, cache.rope_key
    return cache.k_cache, cache.v_cache


def step_inputs(
    lm: TransformerLM, caches: list[KVCache | LatentCache], key_valid: torch.Tensor
) -> StepInputs:
    """The inputs of token steps of `lm` (in eval mode) over `caches`, whose slots hold real
    tokens where key_valid (B, S) is True (a row's pads come first)."""
    return StepInputs(
        layers=tuple(layer_params(block) for block in lm.blocks),
        k_caches=tuple(_keys(cache)[0] for cache in caches),
        v_caches=tuple(_keys(cache)[1] for cache in caches),
        embedding=lm.embedding_params(),
        norm=lm.norm.params(),
        head=lm.head_weight(),
        final_logit_softcap=lm.config.final_logit_softcap,
        key_valid=key_valid[:, None, None, :],
        pads=(~key_valid).sum(dim=-1, keepdim=True),
        slots=torch.arange(key_valid.shape[1], device=key_valid.device),
        padless=bool(key_valid.all()),
    )


def _moe(moe: MixtureOfExperts, h: torch.Tensor) -> torch.Tensor:
    return moe(h[:, None], False)[0][:, 0]


_compiled_step = None
_moe_outside_graph = _moe  # under torch.compile: _moe excluded from the graph (its shapes vary)


def compiled_token_step() -> Callable[..., torch.Tensor]:
    """`token_step` under torch.compile (static shapes), made once per process."""
    global _compiled_step, _moe_outside_graph
    if _compiled_step is None:
        _moe_outside_graph = torch.compiler.disable(_moe)
        # cpp_wrapper: the compiled step's launcher is C++, not Python (~10% of a small step)
        _compiled_step = torch.compile(token_step, dynamic=False, options={"cpp_wrapper": True})
    return _compiled_step


def token_step(
    inputs: StepInputs, tokens: torch.Tensor, pos: torch.Tensor, slot: int | None
) -> torch.Tensor:
    """Logits (B, V) of tokens (B,) written at cache slot `pos` (a 0-d int64 tensor).

    `slot` is the same slot as an int (eager), or None (static: the whole cache is attended,
    masked past `pos`, and written with index_copy_). The caches are updated in place.
    """
    B = tokens.shape[0]
    positions = pos.view(1, 1) if inputs.padless else pos - inputs.pads  # (B|1, 1)
    x = embed(tokens, positions.view(-1), inputs.embedding)  # (B, d_model)
    at = pos if slot is None else slot
    windows = dict.fromkeys(layer.sliding_window for layer in inputs.layers)
    views = {W: _key_view(inputs, W, pos, slot) for W in windows}  # window -> (keys, allowed)
    for layer, k_cache, v_cache in zip(
        inputs.layers, inputs.k_caches, inputs.v_caches, strict=True
    ):
        h = norm(x, layer.norm1).view(B, 1, -1)  # (B, 1, d_model)
        keys, allowed = views[layer.sliding_window]
        if isinstance(layer.attention, LatentAttentionParams):
            out = _latent_step(layer.attention, h, positions, k_cache, v_cache, at, keys, allowed)
        else:
            q, k, v = project(h, layer.attention, positions)  # (B, H|KV, 1, D)
            write_slots(k_cache, k, at)
            write_slots(v_cache, v, at)
            params = layer.attention
            scores = dict(scale=params.scale, softcap=params.softcap, sinks=params.sinks)
            out = attend(
                q, k_cache[:, :, keys], v_cache[:, :, keys], allowed, **scores
            )  # (B, H, 1, D)
        attn = merge_heads(out, layer.attention)
        if layer.post_attention_norm is not None:
            attn = norm(attn, layer.post_attention_norm)
        x = x + attn
        h = norm(x, layer.norm2)
        if layer.moe is None:
            ff = feed_forward(h, layer.feed_forward)
        else:
            ff = (_moe if slot is not None else _moe_outside_graph)(layer.moe, h)
        if layer.post_feed_forward_norm is not None:
            ff = norm(ff, layer.post_feed_forward_norm)
        x = x + ff
    return unembed(norm(x, inputs.norm), inputs.head, inputs.final_logit_softcap)  # (B, V)


def _latent_step(
    params: LatentAttentionParams,
    h: torch.Tensor,
    positions: torch.Tensor,
    latents: torch.Tensor,
    rope_keys: torch.Tensor,
    at: int | torch.Tensor,
    keys: slice,
    allowed: torch.Tensor | None,
) -> torch.Tensor:
    """The heads' outputs (B, H, 1, Dv) of an MLA layer for h (B, 1, d_model): its latent and
    rope key written at slot `at` of latents (B, S, R) and rope_keys (B, S, Dr), then attended
    from the slots `keys` (kv_b_proj absorbed)."""
    q_nope, q_rope, latent, rope_key = project_latent(h, params, positions)
    for cache, new in ((latents, latent), (rope_keys, rope_key)):  # new: (B, 1, R|Dr)
        if isinstance(at, torch.Tensor):
            cache.index_copy_(1, at.view(1), new.to(cache.dtype))
        else:
            cache[:, at : at + 1] = new  # cast by the copy
    latent, rope_key = latents[:, keys].to(h.dtype), rope_keys[:, keys].to(h.dtype)
    return attend_latent(q_nope, q_rope, latent, rope_key, allowed, params)


def _key_view(
    inputs: StepInputs, W: int | None, pos: torch.Tensor, slot: int | None
) -> tuple[slice, torch.Tensor | None]:
    """The cache slots a layer of window W (None: full) reads at `pos`, and which of them it
    may attend (None: all): the whole cache masked past pos (slot None), or the slots up to
    the int `slot`."""
    if slot is None:
        slots = inputs.slots.view(1, 1, 1, -1)  # (1, 1, 1, S)
        allowed = slots <= pos
        if W is not None:
            allowed = allowed & (slots > pos - W)
        return slice(None), allowed if inputs.padless else allowed & inputs.key_valid
    keys = slice(0 if W is None else max(0, slot - W + 1), slot + 1)
    return keys, None if inputs.padless else inputs.key_valid[..., keys]  # (B, 1, 1, S')
