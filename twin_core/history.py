"""A run's loss history: one JSON file per run, a record per step."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .files import atomic_write
from .run_files import framework_name

LABELS = {"jax": "JAX / optax", "torch": "PyTorch / torch.optim"}


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
