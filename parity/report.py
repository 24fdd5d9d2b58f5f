"""The parity report: every registered case, run in torch and JAX, gathered into rows.

Cases are functions `Setup -> list[Row]` registered with `@parity.cases.case(...)` in the
modules of CASE_MODULES, which are imported on first use (so a case module may import this
one). Adding a case module is one more line in CASE_MODULES.

Every case runs under `parity.precision.full_precision()` (JAX's default matmul precision
"highest", torch's TF32 off, both restored afterwards), so the float32 tolerances hold on GPUs,
whose float32 matmuls default to TF32, as well as on CPUs. `parity.render` renders the rows.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterator

import torch

from .cases import CASES, CONFIGS, Case, Setup
from .compare import DTYPES, Row, Tolerance, compare
from .precision import full_precision

__all__ = [
    "CASE_MODULES",
    "Row",
    "Setup",
    "Tolerance",
    "all_cases",
    "compare",
    "one_torch_thread",
    "run_case",
    "run_cases",
]

# The modules whose registered cases make the report, in the order of its table.
CASE_MODULES: tuple[str, ...] = (
    "parity.cases",
    "parity.lm_cases",
    "parity.train_cases",
)


def all_cases() -> list[Case]:
    """The cases registered by CASE_MODULES, module by module, each in registration order."""
    for name in CASE_MODULES:
        importlib.import_module(name)
    return [entry for name in CASE_MODULES for entry in CASES if entry.run.__module__ == name]


def run_cases(config: str = "all", dtype: str = "all", seed: int = 0) -> list[Row]:
    """Rows of every registered case that covers `config` and `dtype` ("all": every one)."""
    configs = _select(config, tuple(CONFIGS), "config")
    dtypes = _select(dtype, DTYPES, "dtype")
    cases = all_cases()
    rows = []
    with one_torch_thread():
        for config_name in configs:
            for dtype_name in dtypes:
                for entry in cases:
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
    """The rows of one case, run under full_precision(); a case that raises gives one failing
    row carrying the error."""
    try:
        with full_precision():
            return entry.run(setup)
    except Exception as error:  # reported as a failing row, so the report always finishes
        nan = math.nan
        note = f"error: {type(error).__name__}: {error}"
        return [
            Row(entry.name, setup.config, setup.dtype, nan, nan, setup.tolerance, False, None, note)
        ]
