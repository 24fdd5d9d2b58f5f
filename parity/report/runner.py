"""The parity report: every registered case, run in torch and JAX, gathered into rows.

Cases are functions `Setup -> list[Row]` registered with `@parity.report.registry.case(...)` in the
modules of CASE_MODULES, which are imported on first use (so a case module may import this
one). Adding a case module is one more line in CASE_MODULES.

Every case runs under `parity.report.precision.full_precision()` (JAX's default matmul precision
"highest", torch's TF32 off, both restored afterwards), so the float32 tolerances hold on GPUs,
whose float32 matmuls default to TF32, as well as on CPUs. `parity.report.render` renders the rows.
`python -m parity` spreads its configurations over WORKERS spawned processes.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import torch

from ..dtypes import DTYPES
from .compare import Row
from .precision import full_precision
from .registry import CASES, CONFIGS, DEFAULT_CONFIGS, ORIGINAL, Case, Setup

# The modules whose registered cases make the report, in the order of its table.
CASE_MODULES: tuple[str, ...] = (
    "parity.report.cases.block",
    "parity.report.cases.lm",
    "parity.report.cases.train",
)


def all_cases() -> list[Case]:
    """The cases registered by CASE_MODULES, module by module, each in registration order."""
    return _cases_of(CASE_MODULES)


def _cases_of(modules: tuple[str, ...]) -> list[Case]:
    for name in modules:
        importlib.import_module(name)
    return [entry for name in modules for entry in CASES if entry.run.__module__ == name]


# Worker processes of a run over several configurations: XLA compiles a function on one core,
# so two configurations compiling side by side use both cores of a small machine.
WORKERS = min(2, os.cpu_count() or 1)


def run_cases(
    config: str = "all", dtype: str = "all", seed: int = 0, workers: int = 1
) -> list[Row]:
    """Rows of every registered case that covers `config` and `dtype`, in the order of CONFIGS,
    then DTYPES, then the cases. `config` "all" is the default report's DEFAULT_CONFIGS (the
    NAMED_FAMILIES run when named); `dtype` "all" every dtype.

    With `workers` > 1 (`python -m parity` passes WORKERS) several configurations run in that
    many spawned processes, one configuration at a time each (the original two and the MoE
    ones first: they take longest); the workers import CASE_MODULES themselves. Every case
    seeds its own weights and inputs, so the rows are those of a run in this process. Spawned
    workers re-import the calling script: call it under `if __name__ == "__main__":`.
    """
    configs = DEFAULT_CONFIGS if config == "all" else _select(config, tuple(CONFIGS), "config")
    dtypes = _select(dtype, DTYPES, "dtype")
    workers = min(workers, len(configs))
    if workers <= 1:
        return [row for name in configs for row in run_config(name, dtypes, seed)]
    longest_first = sorted(configs, key=lambda name: (name not in ORIGINAL, not _is_moe(name)))
    spawn = multiprocessing.get_context("spawn")  # JAX's threads make fork unsafe
    with _no_preallocation(), ProcessPoolExecutor(workers, mp_context=spawn) as pool:
        futures = {
            name: pool.submit(run_config, name, dtypes, seed, CASE_MODULES)
            for name in longest_first
        }
        return [row for name in configs for row in futures[name].result()]


def run_config(
    config: str, dtypes: tuple[str, ...], seed: int, case_modules: tuple[str, ...] | None = None
) -> list[Row]:
    """Rows of the cases that cover `config`, dtype by dtype: those of `case_modules`
    (default: `all_cases()`)."""
    cases = all_cases() if case_modules is None else _cases_of(case_modules)
    rows = []
    with one_torch_thread():
        for dtype_name in dtypes:
            for entry in cases:
                if config in entry.configs and dtype_name in entry.dtypes:
                    rows += run_case(entry, Setup(config, dtype_name, seed))
    return rows


@contextlib.contextmanager
def _no_preallocation() -> Iterator[None]:
    """Workers spawned inside take GPU memory as they need it: by default every JAX process on
    a GPU reserves 75% of its memory, which would leave none for the second worker."""
    key = "XLA_PYTHON_CLIENT_PREALLOCATE"
    before = os.environ.get(key)
    os.environ.setdefault(key, "false")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key)


def _is_moe(config: str) -> bool:
    return bool(CONFIGS[config].get("use_moe"))


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
