"""The parity report as text: header line, aligned table and summary, or one JSON document."""

from __future__ import annotations

import json
import platform
import textwrap

import flax
import jax
import numpy as np
import torch

from .compare import Row

TOKEN_KINDS = ("exact", "tie")  # tolerances of token-id rows (parity.report.tokens)


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
    "abs err",
    "rel err",
    "tolerance",
    "routing",
    "result",
    "note",
)
NUMERIC_COLUMNS = {"abs err", "rel err"}  # max |a - b| and that / max |a|; right-aligned
WIDTH = 100  # the table's lines stay within this many columns where the other columns allow
NOTE_INDENT = "    "  # notes too long for their row go beneath it, indented


def _cells(row: Row) -> dict[str, str]:
    tokens = row.tolerance.kind in TOKEN_KINDS  # token ids: no numeric error
    return {
        "case": row.case,
        "config": row.config,
        "dtype": row.dtype,
        "abs err": "-" if tokens else f"{row.max_abs_error:.2e}",
        "rel err": "-" if tokens else f"{row.max_rel_error:.2e}",
        "tolerance": str(row.tolerance),
        "routing": "-" if row.routing is None else str(row.routing),
        "result": "PASS" if row.passed else "FAIL",
        "note": row.note,
    }


def render_table(rows: list[Row], width: int = WIDTH) -> str:
    """Aligned columns: case, config, dtype, errors, tolerance, routing (when a row has one),
    result and note. When a line would pass `width` columns, every note goes beneath its row
    instead, indented and wrapped at `width`."""
    cells = [_cells(row) for row in rows]
    titles = [t for t in COLUMNS if t != "routing" or any(r.routing is not None for r in rows)]
    widths = {t: max(len(t), *(len(c[t]) for c in cells)) for t in titles}
    inline = sum(widths.values()) + 2 * (len(titles) - 1) <= width
    if not inline:
        titles.remove("note")

    def line(values: dict[str, str]) -> str:
        return "  ".join(
            values[t].rjust(widths[t]) if t in NUMERIC_COLUMNS else values[t].ljust(widths[t])
            for t in titles
        ).rstrip()

    lines = [line({t: t for t in titles}), "  ".join("-" * widths[t] for t in titles)]
    for values in cells:
        lines.append(line(values))
        if not inline and values["note"]:
            lines += textwrap.wrap(
                values["note"],
                width,
                initial_indent=NOTE_INDENT,
                subsequent_indent=NOTE_INDENT,
                break_on_hyphens=False,
            )
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
