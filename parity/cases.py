"""The case registry, and the block's cases: forward, cached decode, training mode, aux losses.

A case is a function `Setup -> list[Row]` registered with `@case(name, configs, dtypes)`. The
report runs the cases of the modules listed in `parity.report.CASE_MODULES`; this module and
`parity.lm_cases` are two of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
from flax import linen as nn

import jax_block
import torch_block

from .compare import (
    DTYPES,
    JAX_DTYPES,
    NEAR_TIES,
    TOLERANCES,
    TORCH_DTYPES,
    Row,
    Tolerance,
    compare,
    to_float64,
)
from .convert import from_torch
from .run import Run, as_jax, run_both

CONFIGS: dict[str, dict[str, Any]] = {
    "dense": dict(d_model=64, n_heads=4, d_ff=128, dropout=0.0),
    "moe": dict(
        d_model=64, n_heads=4, d_ff=128, dropout=0.0, use_moe=True, num_experts=8, top_k_experts=2
    ),
}
BATCH, SEQ_LEN, PREFILL_LEN = 2, 16, 8
TRAIN_CAPACITY_FACTOR = 0.5  # capacity 4 per expert < 64 assignments / 8 experts: drops certain
Z_LOSS_COEF = 0.1


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Setup:
    """What one case runs on: a configuration name, a dtype name and a seed."""

    config: str
    dtype: str
    seed: int

    @property
    def tolerance(self) -> Tolerance:
        return TOLERANCES[self.dtype]

    def build(self, **overrides: Any) -> tuple[torch_block.TransformerBlock, nn.Module, dict]:
        """A seeded torch block of this configuration (eval mode, this dtype), and its twin."""
        with torch.random.fork_rng(devices=[]):  # the caller's torch RNG is left as it was
            torch.manual_seed(self.seed)
            block = torch_block.TransformerBlock(**{**CONFIGS[self.config], **overrides})
        block = block.to(TORCH_DTYPES[self.dtype]).eval()
        flax_module, params = from_torch(block)
        return block, flax_module, params

    def input(self) -> torch.Tensor:
        """A seeded unit-scale input (BATCH, SEQ_LEN, d_model) of this dtype."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        x = torch.randn(BATCH, SEQ_LEN, CONFIGS[self.config]["d_model"], generator=generator)
        return x.to(TORCH_DTYPES[self.dtype])

    def compare(self, case: str, expected: Any, actual: Any, **kwargs: Any) -> Row:
        return compare(case, self.config, self.dtype, expected, actual, self.tolerance, **kwargs)

    def compare_output(self, case: str, run: Run, **kwargs: Any) -> Row:
        """Compare the first output, with routing agreement and near-tie exclusions."""
        routing, excluded = run.agreement(NEAR_TIES[self.dtype])
        return self.compare(
            case, run.torch_out[0], run.jax_out[0], routing=routing, excluded=excluded, **kwargs
        )


@dataclass(frozen=True)
class Case:
    """A registered case: `run(setup)` returns its rows for each config and dtype it covers."""

    name: str
    run: Callable[[Setup], list[Row]]
    configs: tuple[str, ...]
    dtypes: tuple[str, ...]


CASES: list[Case] = []  # every case registered so far, from any module


def case(
    name: str, configs: tuple[str, ...] = ("dense", "moe"), dtypes: tuple[str, ...] = ("float32",)
) -> Callable[[Callable[[Setup], list[Row]]], Callable[[Setup], list[Row]]]:
    """Register a case function `Setup -> list[Row]` under `name`."""

    def register(run: Callable[[Setup], list[Row]]) -> Callable[[Setup], list[Row]]:
        CASES.append(Case(name, run, configs, dtypes))
        return run

    return register


def with_note(row: Row, note: str, passed: bool = True, **details: Any) -> Row:
    """`row` with `note` appended, `details` added, and failed unless `passed`."""
    return replace(
        row,
        passed=row.passed and passed,
        note="; ".join(filter(None, (row.note, note))),
        details={**row.details, **details},
    )


# --------------------------------------------------------------------------- block cases
def _forward(setup: Setup, name: str, *, mask: torch.Tensor | None = None, **overrides: Any) -> Row:
    """The first output of the block built with `overrides`, in eval mode (aux loss on)."""
    torch_module, flax_module, params = setup.build(**overrides)
    kwargs = {} if mask is None else {"mask": mask}
    run = run_both(torch_module, flax_module, params, setup.input(), return_aux_loss=True, **kwargs)
    return setup.compare_output(name, run)


@case("forward causal", dtypes=DTYPES)
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


@case("cached decode")
def cached_decode(setup: Setup) -> list[Row]:
    """Prefill half the sequence, then decode one token at a time (JAX: decode_step)."""
    torch_module, flax_module, params = setup.build()
    x = setup.input()
    torch_cache = torch_module.create_kv_cache(BATCH, SEQ_LEN, TORCH_DTYPES[setup.dtype])
    jax_cache = flax_module.create_kv_cache(BATCH, SEQ_LEN, JAX_DTYPES[setup.dtype])
    chunks = [(0, PREFILL_LEN)] + [(t, t + 1) for t in range(PREFILL_LEN, SEQ_LEN)]
    torch_outs, jax_outs = [], []
    for start, end in chunks:
        with torch.no_grad():
            y, _, _ = torch_module(x[:, start:end], kv_cache=torch_cache, use_cache=True)
        torch_outs.append(y)
        y, jax_cache = jax_block.decode_step(
            flax_module, params, as_jax(x[:, start:end]), jax_cache
        )
        jax_outs.append(y)
    steps = len(chunks) - 1
    step_errors = [
        float(np.max(np.abs(to_float64(t) - to_float64(j))))
        for t, j in zip(torch_outs[1:], jax_outs[1:], strict=True)
    ]
    worst = int(np.argmax(step_errors))
    return [
        setup.compare("cached prefill", torch_outs[0], jax_outs[0], note=f"{PREFILL_LEN} tokens"),
        setup.compare(
            "cached decode",
            torch.cat(torch_outs[1:], dim=1),
            jnp.concatenate(jax_outs[1:], axis=1),
            note=f"{steps} steps of 1 token; worst step {worst + 1}",
            details={"step_max_abs_error": step_errors},
        ),
    ]


@case("train, dropout 0")
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


@case("aux loss", configs=("moe",))
def aux_loss(setup: Setup) -> list[Row]:
    """The load-balancing loss."""
    return [_aux(setup, "aux loss")]


@case("z-loss", configs=("moe",))
def z_loss(setup: Setup) -> list[Row]:
    """The aux loss with a router z-loss term (router_z_loss_coef > 0)."""
    row = _aux(setup, "z-loss", router_z_loss_coef=Z_LOSS_COEF)
    return [with_note(row, f"aux + {Z_LOSS_COEF} * z")]
