"""The parity report as text: header line, aligned table and summary, or one JSON document."""

from __future__ import annotations

import json
import platform

import flax
import jax
import numpy as np
import torch

from .compare import Row


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
