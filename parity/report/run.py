"""Running a torch module and its Flax twin on the same input, and `assert_parity` for users."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import linen as nn
from flax.traverse_util import flatten_dict

import jax_block
import torch_block
from jax_block import moe as jax_moe
from torch_block import moe as torch_moe

from ..dtypes import TORCH_DTYPES
from .compare import (
    NEAR_TIES,
    TOLERANCES,
    Agreement,
    Row,
    Tolerance,
    compare,
    routing_agreement,
)
from .precision import full_precision
from .render import render_table


# --------------------------------------------------------------------------- router logits
@contextlib.contextmanager
def _torch_router_logits(module: torch.nn.Module) -> Iterator[list[tuple[torch.Tensor, int]]]:
    """Collects (router logits (N, E), top_k) of every MoE layer call inside `module`."""
    captured: list[tuple[torch.Tensor, int]] = []

    def hook(moe: torch_block.MixtureOfExperts, args: tuple) -> None:
        tokens = args[0].reshape(-1, args[0].shape[-1])  # (N, d_model)
        bias = None if moe.gate.bias is None else moe.gate.bias.float()  # GPT-OSS's router
        captured.append((F.linear(tokens.float(), moe.gate.weight.float(), bias), moe.top_k))

    handles = [
        layer.register_forward_pre_hook(hook)
        for layer in module.modules()
        if isinstance(layer, torch_block.MixtureOfExperts)
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _is_router_gate(module: nn.Module, method_name: str) -> bool:
    return (
        method_name == "__call__"
        and module.name == "gate"
        and isinstance(module.parent, jax_block.MixtureOfExperts)
    )


# --------------------------------------------------------------------------- arrays
def as_jax(value: Any) -> Any:
    """An array (torch tensor, numpy or JAX) as a JAX array, bfloat16 kept; other values as is."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            return jnp.asarray(value.float().numpy(), jnp.bfloat16)
        return jnp.asarray(value.numpy())
    if isinstance(value, (np.ndarray, jax.Array)):
        return jnp.asarray(value)
    return value


def as_torch(value: Any) -> Any:
    """An array (torch tensor, numpy or JAX) as a torch tensor, bfloat16 kept; others as is."""
    if isinstance(value, (np.ndarray, jax.Array)):
        array = np.asarray(value)
        if array.dtype == jnp.bfloat16:
            return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(array.copy())
    return value


def is_array(value: Any) -> bool:
    """True for torch tensors, NumPy and JAX arrays."""
    return isinstance(value, (torch.Tensor, np.ndarray, jax.Array))


# --------------------------------------------------------------------------- running both
@partial(jax.jit, static_argnames=("module", "deterministic", "static_kwargs"))
def _jax_apply(
    module: nn.Module,
    params: dict,
    x: jax.Array,
    array_kwargs: dict[str, jax.Array],
    rng: jax.Array,
    deterministic: bool,
    static_kwargs: tuple[tuple[str, Any], ...],
) -> tuple[Any, list[jax.Array]]:
    """module.apply, compiled once per (module, shapes, flags); also returns router logits."""
    out, state = module.apply(
        {"params": params},
        x,
        **array_kwargs,
        **dict(static_kwargs),
        deterministic=deterministic,
        rngs={"dropout": rng},
        capture_intermediates=_is_router_gate,
    )
    logits = [
        value
        for path, calls in flatten_dict(state.get("intermediates", {})).items()
        if path[-2:] == ("gate", "__call__")
        for value in calls
    ]
    return out, logits


_jax_route = jax.jit(jax_moe.route, static_argnums=1)


@dataclass
class Run:
    """Both frameworks' outputs of one call on the same input, with their router logits."""

    torch_out: tuple
    jax_out: tuple
    torch_logits: list[tuple[torch.Tensor, int]]  # (logits (N, E), top_k) per MoE layer call
    jax_logits: list[jax.Array]  # logits (N, E) per MoE layer call, in the same order

    def agreement(self, threshold: float) -> tuple[Agreement | None, np.ndarray | None]:
        """Routing agreement summed over every MoE layer call (None without MoE layers), and,
        with exactly one call, its (N,) tokens routed apart by a near tie."""
        if not self.torch_logits:
            return None, None
        if len(self.torch_logits) != len(self.jax_logits):
            raise ValueError(
                f"torch made {len(self.torch_logits)} MoE calls, JAX {len(self.jax_logits)}"
            )
        parts = [
            routing_agreement(
                torch_moe.route(t_logits, k).probs, _jax_route(j_logits, k).probs, k, threshold
            )
            for (t_logits, k), j_logits in zip(self.torch_logits, self.jax_logits, strict=True)
        ]
        counts = [part[0] for part in parts]
        total = Agreement(*(sum(getattr(c, f) for c in counts) for f in vars(counts[0])))
        return total, parts[0][1] if len(parts) == 1 else None

    def dropped(self, capacity_factor: float | None) -> tuple[int, int, int]:
        """(torch dropped, JAX dropped, assignments) under `capacity_factor`, by each own router."""
        torch_dropped = jax_dropped = assignments = 0
        for (t_logits, k), j_logits in zip(self.torch_logits, self.jax_logits, strict=True):
            n, e = t_logits.shape
            capacity = torch_moe.expert_capacity(n, k, e, capacity_factor)
            torch_dropped += int((torch_moe.route(t_logits, k).rank >= capacity).sum())
            capacity = jax_moe.expert_capacity(n, k, e, capacity_factor)
            jax_dropped += int((_jax_route(j_logits, k).rank >= capacity).sum())
            assignments += n * k
        return torch_dropped, jax_dropped, assignments


def run_both(
    torch_module: torch.nn.Module,
    flax_module: nn.Module,
    params: dict,
    x: Any,
    *,
    train: bool = False,
    **call_kwargs: Any,
) -> Run:
    """Call both modules on x with the same keyword arguments (arrays converted per framework).

    `train` puts the torch module in training mode for the call (restored afterwards; a MoE
    layer's expert_counts grows as in any training call) and runs Flax with deterministic=False
    and a dropout rng. Keyword values that are not arrays (flags) reach both unchanged.
    """
    array_kwargs = {k: as_jax(v) for k, v in call_kwargs.items() if is_array(v)}
    static_kwargs = tuple(sorted((k, v) for k, v in call_kwargs.items() if not is_array(v)))
    was_training = torch_module.training
    torch_module.train(train)
    try:
        with torch.no_grad(), _torch_router_logits(torch_module) as torch_logits:
            torch_kwargs = {k: as_torch(v) for k, v in call_kwargs.items()}
            torch_out = torch_module(as_torch(x), **torch_kwargs)
    finally:
        torch_module.train(was_training)
    jax_out, jax_logits = _jax_apply(
        flax_module,
        params,
        as_jax(x),
        array_kwargs,
        jax.random.PRNGKey(0),
        not train,
        static_kwargs,
    )
    return Run(_as_tuple(torch_out), _as_tuple(jax_out), torch_logits, jax_logits)


def _as_tuple(out: Any) -> tuple:
    return out if isinstance(out, tuple) else (out,)


# --------------------------------------------------------------------------- assert_parity
# Names of the positions of each module's return tuple; the rest are "output[i]".
OUTPUT_NAMES = {
    "TransformerBlock": ("output", "kv cache", "aux loss"),
    "TransformerLM": ("logits", "aux loss"),
}


def output_rows(
    run: Run, module_name: str, config: str, dtype: str, tolerance: Tolerance | None = None
) -> list[Row]:
    """One row per array both modules return (None and caches skipped); the first carries the
    routing agreement and leaves out tokens a near tie routed apart."""
    names = OUTPUT_NAMES.get(module_name, ())
    routing, excluded = run.agreement(NEAR_TIES.get(dtype, NEAR_TIES["float32"]))
    rows = []
    for i, (expected, actual) in enumerate(zip(run.torch_out, run.jax_out, strict=True)):
        if not (is_array(expected) and is_array(actual)):
            continue
        name = names[i] if i < len(names) else f"output[{i}]"
        extra = {} if rows else {"routing": routing, "excluded": excluded}
        rows.append(compare(name, config, dtype, expected, actual, tolerance, **extra))
    return rows


def _dtype_name(torch_module: torch.nn.Module) -> str:
    dtype = next(torch_module.parameters()).dtype
    return next((name for name, d in TORCH_DTYPES.items() if d == dtype), str(dtype))


def assert_parity(
    torch_module: torch.nn.Module,
    flax_module: nn.Module,
    params: dict,
    x: Any,
    *,
    train: bool = False,
    tolerance: Tolerance | None = None,
    **call_kwargs: Any,
) -> list[Row]:
    """Run both modules on x with `call_kwargs` (e.g. mask=..., return_aux_loss=True) and
    compare every returned array and the MoE routing.

    Raises AssertionError carrying the rendered table when any comparison fails; returns the
    rows otherwise. The tolerance defaults to docs/design.md's for the torch module's dtype. Runs
    under `full_precision()`, so float32 tolerances hold on GPUs too.
    """
    dtype = _dtype_name(torch_module)
    tolerance = tolerance or TOLERANCES.get(dtype, TOLERANCES["float32"])
    module_name = type(torch_module).__name__
    with full_precision():
        run = run_both(torch_module, flax_module, params, x, train=train, **call_kwargs)
        rows = output_rows(run, module_name, module_name, dtype, tolerance)
    if not rows:
        raise AssertionError(f"{module_name} returned no array to compare")
    if not all(row.passed for row in rows):
        raise AssertionError("torch and JAX disagree:\n" + render_table(rows))
    return rows
