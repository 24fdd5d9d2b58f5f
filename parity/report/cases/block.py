"""The block's cases: forward, cached decode, training mode, aux losses."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import torch

import jax_block

from ...dtypes import DTYPES, JAX_DTYPES, TORCH_DTYPES
from ..compare import Row, to_float64
from ..registry import (
    BATCH,
    CONFIGS,
    FAMILIES,
    MOE_FAMILIES,
    NAMED_FAMILIES,
    ORIGINAL,
    PREFILL_LEN,
    SEQ_LEN,
    TRAIN_CAPACITY_FACTOR,
    Z_LOSS_COEF,
    Setup,
    case,
    with_note,
)
from ..run import as_jax, run_both


# --------------------------------------------------------------------------- block cases
def _forward(setup: Setup, name: str, *, mask: torch.Tensor | None = None, **overrides: Any) -> Row:
    """The first output of the block built with `overrides`, in eval mode (aux loss on)."""
    torch_module, flax_module, params = setup.build(**overrides)
    kwargs = {} if mask is None else {"mask": mask}
    run = run_both(torch_module, flax_module, params, setup.input(), return_aux_loss=True, **kwargs)
    return setup.compare_output(name, run)


@case("forward causal", dtypes=DTYPES)
@case(
    "forward causal", configs=FAMILIES + NAMED_FAMILIES, dtypes=("bfloat16",)
)  # float32: the LM cases
def forward_causal(setup: Setup) -> list[Row]:
    """Full forward, causal, no mask."""
    return [_forward(setup, "forward causal")]


@case("forward bidirectional")
def forward_bidirectional(setup: Setup) -> list[Row]:
    """Full forward with causal=False."""
    return [_forward(setup, "forward bidirectional", causal=False)]


def padding_mask() -> torch.Tensor:
    """(BATCH, 1, SEQ_LEN, SEQ_LEN): row 1 left-padded by 4 (its first 4 queries, causal, see no
    key), and query 5 of row 0 blocked from every key."""
    mask = torch.ones(BATCH, 1, SEQ_LEN, SEQ_LEN, dtype=torch.bool)
    mask[1, :, :, :4] = False
    mask[0, :, 5, :] = False
    return mask


@case("forward masked")
def forward_masked(setup: Setup) -> list[Row]:
    """Causal forward with a padding mask; some query rows may attend no key at all."""
    mask = padding_mask()
    causal = torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool).tril()
    empty_rows = int((~(mask & causal).any(dim=-1)).sum())
    row = _forward(setup, "forward masked", mask=mask)
    return [with_note(row, f"{empty_rows} fully masked query rows", empty_rows=empty_rows)]


def _cached(setup: Setup, cache_dtype: str) -> tuple[list[Any], list[Any], list[Any]]:
    """Prefill PREFILL_LEN tokens, then decode one token at a time (JAX: decode_step), with
    caches of `cache_dtype`: (torch outputs, JAX outputs, torch outputs with a cache of the
    compute dtype), one per call."""
    torch_module, flax_module, params = setup.build()
    x = setup.input()
    torch_cache = torch_module.create_kv_cache(BATCH, SEQ_LEN, TORCH_DTYPES[cache_dtype])
    same_dtype_cache = torch_module.create_kv_cache(BATCH, SEQ_LEN, TORCH_DTYPES[setup.dtype])
    jax_cache = flax_module.create_kv_cache(BATCH, SEQ_LEN, JAX_DTYPES[cache_dtype])
    chunks = [(0, PREFILL_LEN)] + [(t, t + 1) for t in range(PREFILL_LEN, SEQ_LEN)]
    torch_outs, jax_outs, same_dtype_outs = [], [], []
    for start, end in chunks:
        with torch.no_grad():
            y, _, _ = torch_module(x[:, start:end], kv_cache=torch_cache, use_cache=True)
            torch_outs.append(y)
            if cache_dtype != setup.dtype:
                y, _, _ = torch_module(x[:, start:end], kv_cache=same_dtype_cache, use_cache=True)
                same_dtype_outs.append(y)
        y, jax_cache = jax_block.decode_step(
            flax_module, params, as_jax(x[:, start:end]), jax_cache
        )
        jax_outs.append(y)
    return torch_outs, jax_outs, same_dtype_outs or torch_outs


def _cached_rows(
    setup: Setup, torch_outs: list[Any], jax_outs: list[Any], suffix: str = "", **details: Any
) -> list[Row]:
    """A row for the prefill and one for every decode step together (worst step noted)."""
    step_errors = [
        float(np.max(np.abs(to_float64(t) - to_float64(j))))
        for t, j in zip(torch_outs[1:], jax_outs[1:], strict=True)
    ]
    worst = int(np.argmax(step_errors))
    return [
        setup.compare(
            f"cached prefill{suffix}",
            torch_outs[0],
            jax_outs[0],
            note=f"{PREFILL_LEN} tokens",
            details=details,
        ),
        setup.compare(
            f"cached decode{suffix}",
            torch.cat(torch_outs[1:], dim=1),
            jnp.concatenate(jax_outs[1:], axis=1),
            note=f"{len(step_errors)} steps of 1 token; worst step {worst + 1}",
            details={"step_max_abs_error": step_errors, **details},
        ),
    ]


# The families' cached decoding: "lm cached decode" (the same blocks through their caches, with
# left padding), and for llama "cached decode, float32 compute, bfloat16 cache".
@case("cached decode", rows=("cached prefill", "cached decode"))
def cached_decode(setup: Setup) -> list[Row]:
    """Prefill half the sequence, then decode one token at a time (JAX: decode_step)."""
    torch_outs, jax_outs, _ = _cached(setup, setup.dtype)
    return _cached_rows(setup, torch_outs, jax_outs)


BF16_CACHE_ROWS = ("cached prefill, bfloat16 cache", "cached decode, bfloat16 cache")


@case(
    "cached decode, float32 compute, bfloat16 cache",
    configs=("dense", "llama"),
    rows=BF16_CACHE_ROWS,
)
def cached_decode_bfloat16_cache(setup: Setup) -> list[Row]:
    """float32 blocks with bfloat16 caches: both attend to what the cache holds after the write
    (new keys and values rounded to bfloat16), so they agree at the float32 tolerance."""
    torch_outs, jax_outs, float32_outs = _cached(setup, "bfloat16")
    rounding = max(
        float(np.max(np.abs(to_float64(a) - to_float64(b))))
        for a, b in zip(torch_outs, float32_outs, strict=True)
    )
    rows = _cached_rows(setup, torch_outs, jax_outs, ", bfloat16 cache", cache_rounding=rounding)
    note = f"a float32 cache differs by {rounding:.1e}"
    return [with_note(row, note) for row in rows]


@case("train, dropout 0", configs=ORIGINAL + MOE_FAMILIES)
def train_dropout_0(setup: Setup) -> list[Row]:
    """Training mode, dropout 0; MoE: a capacity factor small enough to drop assignments."""
    use_moe = CONFIGS[setup.config].get("use_moe", False)
    overrides = {"expert_capacity_factor": TRAIN_CAPACITY_FACTOR} if use_moe else {}
    torch_module, flax_module, params = setup.build(**overrides)
    run = run_both(torch_module, flax_module, params, setup.input(), train=True)
    row = setup.compare_output("train, dropout 0", run)
    if not use_moe:
        return [row]
    torch_dropped, jax_dropped, assignments = run.dropped(TRAIN_CAPACITY_FACTOR)
    note = f"capacity factor {TRAIN_CAPACITY_FACTOR}: dropped {torch_dropped}/{assignments}"
    if torch_dropped != jax_dropped:
        note += f" torch, {jax_dropped}/{assignments} JAX"
    details = dict(dropped_torch=torch_dropped, dropped_jax=jax_dropped, assignments=assignments)
    same_drops = torch_dropped == jax_dropped > 0
    return [with_note(row, note, same_drops, **details)]


def _aux(setup: Setup, name: str, **overrides: Any) -> Row:
    torch_module, flax_module, params = setup.build(**overrides)
    run = run_both(torch_module, flax_module, params, setup.input(), return_aux_loss=True)
    value = float(run.torch_out[2])
    return setup.compare(name, run.torch_out[2], run.jax_out[2], note=f"value {value:.4f}")


@case("aux loss", configs=("moe",))  # the families' aux loss: the "lm aux loss" rows
def aux_loss(setup: Setup) -> list[Row]:
    """The load-balancing loss."""
    return [_aux(setup, "aux loss")]


@case("z-loss", configs=("moe",))
def z_loss(setup: Setup) -> list[Row]:
    """The aux loss with a router z-loss term (router_z_loss_coef > 0)."""
    row = _aux(setup, "z-loss", router_z_loss_coef=Z_LOSS_COEF)
    return [with_note(row, f"aux + {Z_LOSS_COEF} * z")]
