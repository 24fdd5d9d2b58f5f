"""The parity report: built-in cases run in torch and JAX, compared, and rendered as a table.

A case is a function `Setup -> list[Row]` registered with `@case(...)`; appending a case (the
language model, gradients, training steps) means writing one more such function.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import flax
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

from .convert import from_torch

DTYPES = ("float32", "bfloat16")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# --------------------------------------------------------------------------- result rows
@dataclass(frozen=True)
class Tolerance:
    """A bound on the error: "abs" bounds max|a - b|, "rel" bounds max|a - b| / max|a|."""

    kind: str
    value: float

    def holds(self, max_abs_error: float, max_rel_error: float) -> bool:
        error = max_abs_error if self.kind == "abs" else max_rel_error
        return error <= self.value  # False for NaN

    def __str__(self) -> str:
        return f"{self.kind} {self.value:.0e}"


# DESIGN.md section 7: float32 on unit-scale outputs, bfloat16 relative to the output's scale.
TOLERANCES = {"float32": Tolerance("abs", 1e-5), "bfloat16": Tolerance("rel", 2e-2)}
# Router probabilities closer than this are a near tie: 1e-5 in float32 (DESIGN.md section 7);
# bfloat16's epsilon where the router's input was computed in bfloat16 (observed differences
# between the frameworks' probabilities reach about 1e-3 there).
NEAR_TIES = {"float32": 1e-5, "bfloat16": float(jnp.finfo(jnp.bfloat16).eps)}


@dataclass(frozen=True)
class Agreement:
    """Top-k expert choices of the same tokens in both frameworks.

    `agree` counts tokens with identical ordered choices; `near_ties` counts tokens where two
    adjacent probabilities among the top k+1 differ by less than the near-tie threshold in
    either framework (their choices may legitimately differ); `disagree` counts tokens whose
    choices differ without a near tie: a failure.
    """

    tokens: int
    agree: int
    near_ties: int
    disagree: int

    def __str__(self) -> str:
        text = f"{self.agree}/{self.tokens}"
        if self.near_ties:
            text += f" ({self.near_ties} near tie{'s' if self.near_ties > 1 else ''})"
        return text


@dataclass(frozen=True)
class Row:
    """One comparison: torch (the reference) against JAX."""

    case: str
    config: str
    dtype: str
    max_abs_error: float
    max_rel_error: float
    tolerance: Tolerance
    passed: bool
    routing: Agreement | None = None
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; a non-finite error becomes None."""
        return {
            "case": self.case,
            "config": self.config,
            "dtype": self.dtype,
            "max_abs_error": _finite_or_none(self.max_abs_error),
            "max_rel_error": _finite_or_none(self.max_rel_error),
            "tolerance": {"kind": self.tolerance.kind, "value": self.tolerance.value},
            "routing": None if self.routing is None else vars(self.routing).copy(),
            "note": self.note,
            "details": self.details,
            "passed": self.passed,
            "result": "PASS" if self.passed else "FAIL",
        }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _float64(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().double().numpy()
    return np.asarray(array).astype(np.float64)


def compare(
    case: str,
    config: str,
    dtype: str,
    expected: Any,
    actual: Any,
    tolerance: Tolerance | None = None,
    routing: Agreement | None = None,
    note: str = "",
    details: dict[str, Any] | None = None,
    excluded: np.ndarray | None = None,
) -> Row:
    """A row comparing `actual` (JAX) with `expected` (torch); NaN anywhere fails.

    `excluded` (N,) marks tokens (rows of the leading B*T positions) left out of the error:
    those a near tie routed to different experts.
    """
    tolerance = tolerance or TOLERANCES[dtype]
    a, b = _float64(expected), _float64(actual)
    if excluded is not None and excluded.any() and a.shape == b.shape:
        a = a.reshape(len(excluded), -1)[~excluded]  # (kept tokens, features)
        b = b.reshape(len(excluded), -1)[~excluded]
        count = int(excluded.sum())
        note = "; ".join(filter(None, (note, f"{count} near-tie token(s) routed apart, excluded")))
        details = {**(details or {}), "excluded_tokens": count}
    if a.shape != b.shape:
        abs_error = rel_error = math.inf
        note = f"shape {b.shape} != {a.shape}; {note}".rstrip("; ")
    elif a.size == 0:
        abs_error = rel_error = 0.0
    else:
        abs_error = float(np.max(np.abs(a - b)))
        scale = float(np.max(np.abs(a)))
        rel_error = abs_error / scale if scale > 0 else (0.0 if abs_error == 0 else math.inf)
    passed = tolerance.holds(abs_error, rel_error) and (routing is None or routing.disagree == 0)
    return Row(
        case, config, dtype, abs_error, rel_error, tolerance, passed, routing, note, details or {}
    )


# --------------------------------------------------------------------------- routing
def near_ties(probs: Any, top_k: int, threshold: float = NEAR_TIES["float32"]) -> np.ndarray:
    """(N,) bool: two adjacent ones among a token's top k+1 probabilities differ < threshold."""
    top = -np.sort(-_float64(probs), axis=-1)[:, : top_k + 1]  # (N, k+1)
    return np.any(top[:, :-1] - top[:, 1:] < threshold, axis=-1)


def routing_agreement(
    probs_a: Any, probs_b: Any, top_k: int, threshold: float = NEAR_TIES["float32"]
) -> tuple[Agreement, np.ndarray]:
    """Compare the ordered top-k choices (ties to the lower expert) of (N, E) probabilities.

    Returns the counts and the (N,) tokens whose choices differ under a near tie.
    """
    a, b = _float64(probs_a), _float64(probs_b)
    choice_a = np.argsort(-a, axis=-1, kind="stable")[:, :top_k]  # (N, k)
    choice_b = np.argsort(-b, axis=-1, kind="stable")[:, :top_k]  # (N, k)
    agree = np.all(choice_a == choice_b, axis=-1)  # (N,)
    tie = near_ties(a, top_k, threshold) | near_ties(b, top_k, threshold)  # (N,)
    counts = Agreement(len(a), int(agree.sum()), int(tie.sum()), int((~agree & ~tie).sum()))
    return counts, ~agree & tie


@contextlib.contextmanager
def _torch_router_logits(module: torch.nn.Module) -> Iterator[list[tuple[torch.Tensor, int]]]:
    """Collects (router logits (N, E), top_k) of every MoE layer call inside `module`."""
    captured: list[tuple[torch.Tensor, int]] = []

    def hook(moe: torch_block.MixtureOfExperts, args: tuple) -> None:
        tokens = args[0].reshape(-1, args[0].shape[-1])  # (N, d_model)
        captured.append((F.linear(tokens.float(), moe.gate.weight.float()), moe.top_k))

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


# --------------------------------------------------------------------------- running both
def _jax_array(value: Any) -> Any:
    """An array (torch tensor, numpy or JAX) as a JAX array, bfloat16 kept; other values as is."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            return jnp.asarray(value.float().numpy(), jnp.bfloat16)
        return jnp.asarray(value.numpy())
    if isinstance(value, (np.ndarray, jax.Array)):
        return jnp.asarray(value)
    return value


def _torch_array(value: Any) -> Any:
    """An array (torch tensor, numpy or JAX) as a torch tensor, bfloat16 kept; others as is."""
    if isinstance(value, (np.ndarray, jax.Array)):
        array = np.asarray(value)
        if array.dtype == jnp.bfloat16:
            return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(array.copy())
    return value


def _is_array(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray, jax.Array))


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
    array_kwargs = {k: _jax_array(v) for k, v in call_kwargs.items() if _is_array(v)}
    static_kwargs = tuple(sorted((k, v) for k, v in call_kwargs.items() if not _is_array(v)))
    was_training = torch_module.training
    torch_module.train(train)
    try:
        with torch.no_grad(), _torch_router_logits(torch_module) as torch_logits:
            torch_kwargs = {k: _torch_array(v) for k, v in call_kwargs.items()}
            torch_out = torch_module(_torch_array(x), **torch_kwargs)
    finally:
        torch_module.train(was_training)
    jax_out, jax_logits = _jax_apply(
        flax_module,
        params,
        _jax_array(x),
        array_kwargs,
        jax.random.PRNGKey(0),
        not train,
        static_kwargs,
    )
    return Run(_as_tuple(torch_out), _as_tuple(jax_out), torch_logits, jax_logits)


def _as_tuple(out: Any) -> tuple:
    return out if isinstance(out, tuple) else (out,)


# Names of the positions of each module's return tuple; the rest are "output[i]".
OUTPUT_NAMES = {"TransformerBlock": ("output", "kv cache", "aux loss")}


def output_rows(
    run: Run, module_name: str, config: str, dtype: str, tolerance: Tolerance | None = None
) -> list[Row]:
    """One row per array both modules return (None and caches skipped); the first carries the
    routing agreement and leaves out tokens a near tie routed apart."""
    names = OUTPUT_NAMES.get(module_name, ())
    routing, excluded = run.agreement(NEAR_TIES.get(dtype, NEAR_TIES["float32"]))
    rows = []
    for i, (expected, actual) in enumerate(zip(run.torch_out, run.jax_out, strict=True)):
        if not (_is_array(expected) and _is_array(actual)):
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
    rows otherwise. The tolerance defaults to DESIGN.md's for the torch module's dtype.
    """
    dtype = _dtype_name(torch_module)
    tolerance = tolerance or TOLERANCES.get(dtype, TOLERANCES["float32"])
    run = run_both(torch_module, flax_module, params, x, train=train, **call_kwargs)
    module_name = type(torch_module).__name__
    rows = output_rows(run, module_name, module_name, dtype, tolerance)
    if not rows:
        raise AssertionError(f"{module_name} returned no array to compare")
    if not all(row.passed for row in rows):
        raise AssertionError("torch and JAX disagree:\n" + render_table(rows))
    return rows


# --------------------------------------------------------------------------- built-in cases
CONFIGS: dict[str, dict[str, Any]] = {
    "dense": dict(d_model=64, n_heads=4, d_ff=128, dropout=0.0),
    "moe": dict(
        d_model=64, n_heads=4, d_ff=128, dropout=0.0, use_moe=True, num_experts=8, top_k_experts=2
    ),
}
BATCH, SEQ_LEN, PREFILL_LEN = 2, 16, 8
TRAIN_CAPACITY_FACTOR = 0.5  # capacity 4 per expert < 64 assignments / 8 experts: drops certain
Z_LOSS_COEF = 0.1


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


CASES: list[Case] = []


def case(
    name: str, configs: tuple[str, ...] = ("dense", "moe"), dtypes: tuple[str, ...] = ("float32",)
) -> Callable[[Callable[[Setup], list[Row]]], Callable[[Setup], list[Row]]]:
    """Register a case function `Setup -> list[Row]` under `name`."""

    def register(run: Callable[[Setup], list[Row]]) -> Callable[[Setup], list[Row]]:
        CASES.append(Case(name, run, configs, dtypes))
        return run

    return register


def _with_note(row: Row, note: str, passed: bool = True, **details: Any) -> Row:
    """`row` with `note` appended, `details` added, and failed unless `passed`."""
    return replace(
        row,
        passed=row.passed and passed,
        note="; ".join(filter(None, (row.note, note))),
        details={**row.details, **details},
    )


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
    return [_with_note(row, f"{empty_rows} fully masked query rows", empty_rows=empty_rows)]


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
            flax_module, params, _jax_array(x[:, start:end]), jax_cache
        )
        jax_outs.append(y)
    steps = len(chunks) - 1
    step_errors = [
        float(np.max(np.abs(_float64(t) - _float64(j))))
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
    return [_with_note(row, note, same_drops, **details)]


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
    return [_with_note(row, f"aux + {Z_LOSS_COEF} * z")]


def run_cases(config: str = "all", dtype: str = "all", seed: int = 0) -> list[Row]:
    """Rows of every registered case that covers `config` and `dtype` ("all": every one)."""
    configs = _select(config, tuple(CONFIGS), "config")
    dtypes = _select(dtype, DTYPES, "dtype")
    rows = []
    with one_torch_thread():
        for config_name in configs:
            for dtype_name in dtypes:
                for entry in CASES:
                    if config_name in entry.configs and dtype_name in entry.dtypes:
                        rows += run_case(entry, Setup(config_name, dtype_name, seed))
    return rows


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """The cases' tensors are tiny: one torch thread is several times faster than a pool that
    competes with XLA's for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _select(choice: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    if choice == "all":
        return known
    if choice not in known:
        raise ValueError(f"{what} must be one of {', '.join(known)} or all, got {choice!r}")
    return (choice,)


def run_case(entry: Case, setup: Setup) -> list[Row]:
    """The rows of one case; a case that raises gives one failing row carrying the error."""
    try:
        return entry.run(setup)
    except Exception as error:  # reported as a failing row, so the report always finishes
        nan = math.nan
        note = f"error: {type(error).__name__}: {error}"
        return [
            Row(entry.name, setup.config, setup.dtype, nan, nan, setup.tolerance, False, None, note)
        ]


# --------------------------------------------------------------------------- rendering
def environment() -> dict[str, str]:
    """Versions and devices the report ran with."""
    device = jax.devices()[0]
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "jax_device": f"{device.platform} ({device.device_kind})",
        "torch_device": "cpu",
    }


def header(env: dict[str, str], seed: int) -> str:
    """One line naming the versions, devices and seed."""
    return (
        f"twin-block parity: torch {env['torch']}, jax {env['jax']}, flax {env['flax']}; "
        f"device: jax {env['jax_device']}, torch {env['torch_device']}; seed {seed}"
    )


def summary(rows: list[Row]) -> str:
    """'N/N PASS', then the failing rows' names if any."""
    passed = sum(row.passed for row in rows)
    text = f"{passed}/{len(rows)} PASS"
    failed = [f"{row.case} ({row.config}, {row.dtype})" for row in rows if not row.passed]
    return text + (f"; FAIL: {', '.join(failed)}" if failed else "")


COLUMNS = (
    "case",
    "config",
    "dtype",
    "max abs err",
    "max rel err",
    "tolerance",
    "routing",
    "result",
    "note",
)
NUMERIC_COLUMNS = {"max abs err", "max rel err"}  # right-aligned


def _cells(row: Row) -> tuple[str, ...]:
    return (
        row.case,
        row.config,
        row.dtype,
        f"{row.max_abs_error:.2e}",
        f"{row.max_rel_error:.2e}",
        str(row.tolerance),
        "-" if row.routing is None else str(row.routing),
        "PASS" if row.passed else "FAIL",
        row.note,
    )


def render_table(rows: list[Row]) -> str:
    """Aligned columns: case, config, dtype, errors, tolerance, routing, result, note."""
    table = [COLUMNS, *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = []
    for line in table:
        cells = [
            cell.rjust(width) if title in NUMERIC_COLUMNS else cell.ljust(width)
            for title, cell, width in zip(COLUMNS, line, widths, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def render_report(rows: list[Row], env: dict[str, str], seed: int) -> str:
    """Header line, table and summary line."""
    return "\n".join((header(env, seed), "", render_table(rows), "", summary(rows)))


def render_json(rows: list[Row], env: dict[str, str], seed: int) -> str:
    """The report as a JSON document: environment, seed, rows, passed and total counts."""
    document = {
        "environment": env,
        "seed": seed,
        "rows": [row.to_dict() for row in rows],
        "passed": sum(row.passed for row in rows),
        "total": len(rows),
        "all_passed": all(row.passed for row in rows),
    }
    return json.dumps(document, indent=2)
