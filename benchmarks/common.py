"""What every benchmark shares: timing, the machine's description, the table, JSON, the plot
and `--check`.

Imports neither torch nor jax at module level, so that a measuring subprocess loads only the
framework it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Target:
    """A ratio that must reach `threshold`: value >= threshold, or <= when not higher_is_better."""

    name: str
    value: float
    threshold: float
    higher_is_better: bool = True

    @property
    def met(self) -> bool:
        if self.higher_is_better:
            return self.value >= self.threshold
        return self.value <= self.threshold

    @property
    def goal(self) -> str:
        return f"{'>=' if self.higher_is_better else '<='} {self.threshold:g}"


@dataclass
class Panel:
    """One bar chart: a bar per (group, series) pair, optional horizontal target lines."""

    title: str
    ylabel: str
    groups: list[str]
    series: dict[str, list[float]]
    lines: list[tuple[float, str]] = field(default_factory=list)


@dataclass
class Result:
    """What one benchmark measured: a table of rows, its targets, notes and plot panels."""

    name: str
    title: str
    columns: list[str]
    rows: list[dict]
    targets: list[Target]
    panels: list[Panel] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    quick: bool = False
    machine: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def all_met(self) -> bool:
        return all(target.met for target in self.targets)


# --------------------------------------------------------------------------- timing
def block(value):
    """Wait for JAX's asynchronous dispatch to finish computing `value`; returns it."""
    if "jax" in sys.modules:
        import jax

        return jax.block_until_ready(value)
    return value


def compare_times(
    runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, dict]:
    """Median wall time of each run, measured round-robin so that load drifts hit all alike.

    Each run must return only when its work is done (call `block` on JAX results). Returns
    {name: {"median": s, "min": s, "max": s, "times": [...]}}.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {
        name: {
            "median": statistics.median(ts),
            "min": min(ts),
            "max": max(ts),
            "times": ts,
        }
        for name, ts in times.items()
    }


class CompileLog:
    """Counts JAX compilations, and their trace + lowering + XLA time, while it is entered.

    `count(name)` and `seconds(name)` cover the jitted functions whose name contains `name`.
    """

    EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def __init__(self) -> None:
        self.events: list[tuple[str, str, float]] = []  # (event, function name, seconds)

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event in self.EVENTS:
            self.events.append((event, str(kwargs.get("fun_name", "")), duration))

    def __enter__(self) -> CompileLog:
        from jax import monitoring

        monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        from jax._src import monitoring

        monitoring.unregister_event_duration_listener(self._listen)

    def count(self, name: str) -> int:
        """XLA compilations of functions named like `name`."""
        return sum(1 for e, f, _ in self.events if e == self.EVENTS[-1] and name in f)

    def seconds(self, name: str) -> float:
        """Tracing, lowering and XLA compilation time of functions named like `name`."""
        return sum(d for _, f, d in self.events if name in f)


# --------------------------------------------------------------------------- the machine
def machine_info() -> dict:
    """CPU, core count, load, library versions and thread settings of this run."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for package in ("numpy", "jax", "jaxlib", "flax", "torch"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    if "jax" in sys.modules:
        device = sys.modules["jax"].devices()[0]
        info["jax_device"] = f"{device.platform}: {device.device_kind}"
    if os.environ.get("XLA_FLAGS"):
        info["XLA_FLAGS"] = os.environ["XLA_FLAGS"]
    return info


def describe_machine(machine: dict) -> str:
    """One line: CPU, cores, the load averages at the start and end of the run."""
    load = machine.get("load_average", [])
    end = machine.get("load_average_end", [])
    text = f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores"
    if load:
        text += f", load average {load[0]:.2f} at start"
    if end:
        text += f", {end[0]:.2f} at end"
    return text


# --------------------------------------------------------------------------- output
def format_value(value) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 100_000:
            return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
        return f"{value:.3g}"
    return str(value)


def table(columns: list[str], rows: list[dict]) -> str:
    """A plain-text table of `rows` (dicts keyed by column)."""
    cells = [[format_value(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def targets_table(targets: list[Target]) -> str:
    rows = [
        {"target": t.name, "value": t.value, "goal": t.goal, "met": "yes" if t.met else "NO"}
        for t in targets
    ]
    return table(["target", "value", "goal", "met"], rows)


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    """The same table in Markdown."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_value(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def result_path(result: Result, out_dir: Path, suffix: str) -> Path:
    stem = result.name + ("_quick" if result.quick else "")
    return out_dir / f"{stem}.{suffix}"


def write_json(result: Result, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = result_path(result, out_dir, "json")
    payload = asdict(result)
    payload["all_met"] = result.all_met
    for target, data in zip(result.targets, payload["targets"], strict=True):
        data["met"] = target.met
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def write_plot(result: Result, out_dir: Path) -> Path | None:
    """Grouped bar charts, one panel each, to a PNG; None when there is nothing to plot."""
    if not result.panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(result.panels)
    fig, axes = plt.subplots(1, n, figsize=(4.8 * n, 3.8), squeeze=False)
    for ax, panel in zip(axes[0], result.panels, strict=True):
        width = 0.8 / max(1, len(panel.series))
        for i, (label, values) in enumerate(panel.series.items()):
            xs = [g + (i - (len(panel.series) - 1) / 2) * width for g in range(len(panel.groups))]
            bars = ax.bar(xs, values, width, label=label)
            ax.bar_label(bars, labels=[format_value(v) for v in values], fontsize=7)
        for y, label in panel.lines:
            ax.axhline(y, color="red", linestyle="--", linewidth=1)
            ax.annotate(
                label,
                (0, y),
                xycoords=("axes fraction", "data"),
                fontsize=7,
                color="red",
                va="bottom",
            )
        ax.set_xticks(range(len(panel.groups)), panel.groups, fontsize=8)
        ax.set_ylabel(panel.ylabel)
        ax.set_title(panel.title, fontsize=9)
        if len(panel.series) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"{result.title}\n{describe_machine(result.machine)}", fontsize=9)
    fig.tight_layout()
    path = result_path(result, out_dir, "png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(result: Result) -> str:
    """The printed form of a result: table, targets, notes and the machine."""
    parts = [f"== {result.title}" + (" (quick)" if result.quick else ""), ""]
    parts += [table(result.columns, result.rows), ""]
    if result.targets:
        parts += [targets_table(result.targets), ""]
    parts += [f"note: {note}" for note in result.notes]
    parts.append(f"machine: {describe_machine(result.machine)}; {result.seconds:.0f} s")
    return "\n".join(parts)


def finish(result: Result, out_dir: Path, check: bool) -> int:
    """Print, write JSON and PNG; the exit status: 1 when checking and a target is missed."""
    print(report(result))
    paths = [write_json(result, out_dir), write_plot(result, out_dir)]
    print("wrote " + ", ".join(str(p) for p in paths if p is not None))
    if check and not result.all_met:
        missed = ", ".join(t.name for t in result.targets if not t.met)
        print(f"check failed: missed {missed}")
        return 1
    return 0


def measure(run: Callable[[bool], Result], quick: bool) -> Result:
    """Run one benchmark, with the machine described at its start and end."""
    machine = machine_info()
    start = time.perf_counter()
    result = run(quick)
    result.seconds = time.perf_counter() - start
    result.quick = quick
    result.machine = {**machine, **machine_info(), "load_average": machine["load_average"]}
    result.machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    busiest = max(result.machine["load_average"][0], result.machine["load_average_end"][0])
    if busiest > 0.75 * (os.cpu_count() or 1):
        result.notes.append(
            f"the machine was busy (load average up to {busiest:.1f} on {os.cpu_count()} "
            "cores): timings are noisy, multi-threaded torch ones most of all"
        )
    return result


def command_name(module: str) -> str:
    """`python -m <module>`, by the module's import name even while it runs as __main__."""
    spec = getattr(sys.modules.get(module), "__spec__", None)
    return f"python -m {spec.name if spec is not None else module}"


def arguments(
    description: str, argv: list[str] | None = None, prog: str | None = None
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (fewer tokens)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="JSON and PNG folder")
    return parser.parse_args(argv)


def main(run: Callable[[bool], Result], description: str, argv: list[str] | None = None) -> int:
    """The command line of one benchmark module."""
    args = arguments(description, argv, command_name(run.__module__))
    return finish(measure(run, args.quick), args.out, args.check)
