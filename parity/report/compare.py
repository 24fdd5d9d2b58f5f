"""Comparing torch's result (the reference) with JAX's: tolerances, result rows, MoE routing.

Everything here works on finished arrays (torch tensors, NumPy or JAX arrays, all read as
float64); nothing runs a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch


@dataclass(frozen=True)
class Tolerance:
    """A bound on the error: "abs" bounds max|a - b|, "rel" bounds max|a - b| / max|a|, and
    "exact" asks for identical arrays (max|a - b| == 0, e.g. generated token ids). Token rows
    may also be of kind "tie" (parity.report.tokens): identical until a near tie of the logits,
    `value` relative to their scale."""

    kind: str
    value: float

    def holds(self, max_abs_error: float, max_rel_error: float) -> bool:
        error = max_rel_error if self.kind == "rel" else max_abs_error
        return error <= self.value  # False for NaN

    def __str__(self) -> str:
        if self.kind == "exact":
            return "identical"
        return f"{self.kind} {self.value:.0e}"


# docs/design.md section 7: float32 on unit-scale outputs, bfloat16 relative to the output's scale.
TOLERANCES = {"float32": Tolerance("abs", 1e-5), "bfloat16": Tolerance("rel", 2e-2)}
# docs/design.md section 7: greedy generation gives identical tokens (float32).
IDENTICAL = Tolerance("exact", 0.0)
# Router probabilities closer than this are a near tie: 1e-5 in float32 (docs/design.md section 7);
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


def to_float64(array: Any) -> np.ndarray:
    """A torch tensor, NumPy or JAX array as a float64 NumPy array."""
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
    a, b = to_float64(expected), to_float64(actual)
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


def near_ties(probs: Any, top_k: int, threshold: float = NEAR_TIES["float32"]) -> np.ndarray:
    """(N,) bool: two adjacent ones among a token's top k+1 probabilities differ < threshold."""
    top = -np.sort(-to_float64(probs), axis=-1)[:, : top_k + 1]  # (N, k+1)
    return np.any(top[:, :-1] - top[:, 1:] < threshold, axis=-1)


def routing_agreement(
    probs_a: Any, probs_b: Any, top_k: int, threshold: float = NEAR_TIES["float32"]
) -> tuple[Agreement, np.ndarray]:
    """Compare the ordered top-k choices (ties to the lower expert) of (N, E) probabilities.

    Returns the counts and the (N,) tokens whose choices differ under a near tie.
    """
    a, b = to_float64(probs_a), to_float64(probs_b)
    choice_a = np.argsort(-a, axis=-1, kind="stable")[:, :top_k]  # (N, k)
    choice_b = np.argsort(-b, axis=-1, kind="stable")[:, :top_k]  # (N, k)
    agree = np.all(choice_a == choice_b, axis=-1)  # (N,)
    tie = near_ties(a, top_k, threshold) | near_ties(b, top_k, threshold)  # (N,)
    counts = Agreement(len(a), int(agree.sum()), int(tie.sum()), int((~agree & ~tie).sum()))
    return counts, ~agree & tie
