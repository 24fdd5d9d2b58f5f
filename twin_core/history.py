"""A run's loss history: one JSON file per run (a record per step), and a PNG of the curves.

matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .files import atomic_write

FRAMEWORK_ALIASES = {"torch": "torch", "jax": "jax", "flax": "jax"}  # older files say "flax"
LABELS = {"jax": "JAX / optax", "torch": "PyTorch / torch.optim"}


def framework_name(name: str) -> str:
    """The user-facing name of a framework: "torch" or "jax" ("flax" is read as "jax")."""
    if name not in FRAMEWORK_ALIASES:
        raise ValueError(f"framework must be 'torch' or 'jax' (or 'flax'), got {name!r}")
    return FRAMEWORK_ALIASES[name]


def save_history(
    path: str | os.PathLike,
    framework: str,
    lm_config: Mapping[str, Any],
    train_config: Mapping[str, Any],
    history: list[dict],
) -> None:
    """The loss history (one record per step) as JSON, written atomically."""
    record = {
        "framework": framework_name(framework),
        "config": dict(lm_config),
        "train_config": dict(train_config),
        "history": history,
    }
    atomic_write(path, json.dumps(record, indent=1).encode())


def load_history(path: str | os.PathLike) -> tuple[str, list[dict]]:
    """(framework, records) of a history file; a missing or malformed file is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no history file at {path}")
    try:
        record = json.loads(path.read_text())
        framework, history = framework_name(record["framework"]), record["history"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a loss history file: {type(err).__name__}: {err}") from err
    if not isinstance(history, list) or not all(
        isinstance(r, dict) and {"step", "loss"} <= set(r) for r in history
    ):
        raise ValueError(f"{path}: 'history' must be a list of records with 'step' and 'loss'")
    return framework, history


def plot_histories(path: str | os.PathLike, runs: list[tuple[str, list[dict]]]) -> None:
    """A PNG of the loss curves of (label, history) runs, written atomically."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.subplots()
    for label, history in runs:
        ax.plot([r["step"] for r in history], [r["loss"] for r in history], label=label, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats per byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
