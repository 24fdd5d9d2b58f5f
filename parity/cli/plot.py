"""Loss curves of training runs, drawn to a PNG; matplotlib is imported only when one is drawn."""

from __future__ import annotations

import os

from twin_core.files import atomic_write


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
