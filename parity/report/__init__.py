"""The parity report: cases that run both twins on the same weights and input, the comparison
of their outputs against tolerances, and the rendered table."""

from .run import assert_parity
from .runner import WORKERS, all_cases, one_torch_thread, run_case, run_cases, run_config

__all__ = [
    "WORKERS",
    "all_cases",
    "assert_parity",
    "one_torch_thread",
    "run_case",
    "run_cases",
    "run_config",
]
