"""Comparing generated token ids: identical tokens, or (where rounding may flip a choice, as in
bfloat16) identical until each row parts at a near tie of the logits.

Greedy decoding picks the largest logit. Two frameworks whose logits agree within a tolerance
may still pick different tokens where two logits are closer than that tolerance; after that
step the rows continue different text, so their later tokens are not comparable. A row that
parts is therefore judged at its first difference only: both frameworks' logits at that step
(on the same prefix) must hold the two chosen tokens within `tie * max|logits|` of each other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .compare import IDENTICAL, Row, Tolerance, compare, to_float64

TIE = "tie"  # the Tolerance kind of token rows that may part at near ties


@dataclass(frozen=True)
class Parting:
    """Where one row's tokens first differ: `index` among the new tokens, the two `tokens`
    (expected, actual), `margin` (the larger of the two frameworks' logit gaps between them)
    and the `bound` it is held to (the relative tie bound times the logits' scale there)."""

    row: int
    index: int
    tokens: tuple[int, int]
    margin: float
    bound: float

    @property
    def near_tie(self) -> bool:
        """The margin is within the bound (False for NaN)."""
        return self.margin <= self.bound

    def __str__(self) -> str:
        where = f"row {self.row} parts at token {self.index}"
        if self.near_tie:
            return f"{where}, a near tie: margin {self.margin:.2g} <= {self.bound:.2g}"
        return f"{where}, not a near tie: margin {self.margin:.3g} > {self.bound:.2g}"


def partings(expected: Any, actual: Any, step_logits: tuple[Any, Any], tie: float) -> list[Parting]:
    """The first difference of each row of (B, N) token ids that differ, judged on
    `step_logits`: each framework's logits (B, N, V) for choosing new token i after the prompt
    and the expected tokens before i (the same prefix in both, up to a row's first difference)."""
    a, b = to_float64(expected), to_float64(actual)  # (B, N) each
    logits_a, logits_b = (to_float64(logits) for logits in step_logits)  # (B, N, V) each
    found = []
    for row in np.flatnonzero(np.any(a != b, axis=1)):
        index = int(np.argmax(a[row] != b[row]))
        token_a, token_b = int(a[row, index]), int(b[row, index])
        steps = (logits_a[row, index], logits_b[row, index])  # (V,) each
        margin = max(abs(step[token_a] - step[token_b]) for step in steps)
        scale = max(float(np.max(np.abs(step))) for step in steps)
        found.append(Parting(int(row), index, (token_a, token_b), float(margin), tie * scale))
    return found


def compare_tokens(
    case: str,
    config: str,
    dtype: str,
    expected: Any,
    actual: Any,
    note: str = "",
    tie: float | None = None,
    step_logits: tuple[Any, Any] | None = None,
) -> Row:
    """A row comparing token ids (B, N): without `tie`, passes only when every token is
    identical; with `tie` (a bound relative to the logits' scale), also when every row that
    differs parts at a near tie (see `partings`; `step_logits` is needed when tokens differ).

    The note and details say how many tokens are identical out of how many and where rows
    first differ; the error columns hold no number (NaN): token ids are not measurements.
    """
    a, b = to_float64(expected), to_float64(actual)  # (B, N) each
    tolerance = IDENTICAL if tie is None else Tolerance(TIE, tie)
    if a.shape != b.shape:
        return compare(case, config, dtype, a, b, tolerance, note=note)
    same = a == b  # (B, N)
    identical, total = int(same.sum()), same.size
    details: dict[str, Any] = {"tokens_identical": identical, "tokens": total}
    text = f"{identical}/{total} tokens identical"
    passed = identical == total
    if not passed:
        row, index = (int(i) for i in np.argwhere(~same)[0])
        details["first_difference"] = [row, index]
        if tie is None:
            text += f", first difference row {row} token {index}"
        elif step_logits is None:
            text += f", first difference row {row} token {index}; no logits to judge a near tie"
        else:
            found = partings(a, b, step_logits, tie)
            details["partings"] = [dict(asdict(p), near_tie=p.near_tie) for p in found]
            text = "; ".join([text, *map(str, found)])
            passed = all(p.near_tie for p in found)
    note = "; ".join(filter(None, (text, note)))
    nan = math.nan
    return Row(case, config, dtype, nan, nan, tolerance, passed, None, note, details)
