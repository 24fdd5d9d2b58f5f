"""Every benchmark, each in its own process, then one table of all targets.

    python -m benchmarks.all [--quick] [--check] [--only decode,moe] [--docs] [--report-only]

--docs also writes docs/benchmarks.md (a table per benchmark, the machine and its load, and
the paragraph given with --note) and copies the plots to docs/bench_NAME.png; --report-only
skips running and summarises the JSON already in the results folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from .common import RESULTS_DIR, describe_machine, markdown_table, table

BENCHMARKS = [
    "decode",
    "bandwidth",
    "moe",
    "moe_decode",
    "cache",
    "memory",
    "vs_transformers",
    "long_prompt",
    "compile_depth",
    "real_size",  # builds checkpoints of up to 7 GB once, then minutes per row
]
ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def run_one(name: str, quick: bool, out: Path) -> int:
    """Run `python -m benchmarks.NAME` in a fresh process; its exit status."""
    command = [sys.executable, "-m", f"benchmarks.{name}", "--out", str(out)]
    if quick:
        command.append("--quick")
    print(f"\n$ {' '.join(command[1:])}", flush=True)
    return subprocess.run(command, cwd=ROOT).returncode


def load(name: str, quick: bool, out: Path) -> dict | None:
    path = out / f"{name}{'_quick' if quick else ''}.json"
    return json.loads(path.read_text()) if path.exists() else None


def summary_rows(results: dict[str, dict]) -> list[dict]:
    rows = []
    for name, result in results.items():
        for target in result["targets"]:
            goal = (">= " if target["higher_is_better"] else "<= ") + f"{target['threshold']:g}"
            rows.append(
                {
                    "benchmark": name,
                    "target": target["name"].split(": ", 1)[-1],
                    "value": target["value"],
                    "goal": goal,
                    "met": "yes" if target["met"] else "NO",
                }
            )
    return rows


def markdown(results: dict[str, dict], note: str = "") -> str:
    """docs/benchmarks.md: the summary, then per benchmark its machine, table, targets, plot."""
    parts = [
        "# Benchmarks",
        "",
        "Written by `python -m benchmarks.all --docs`; every figure is a ratio of two "
        "measurements taken side by side in the same run. See `benchmarks/README.md` for "
        "what each one measures. Each section names the load average during its own run; on "
        "this 2-core machine the benchmark's own threads account for about 1 to 2 of it.",
        *(["", note] if note else []),
        "",
        "## All targets",
        "",
        markdown_table(["benchmark", "target", "value", "goal", "met"], summary_rows(results)),
    ]
    for name, result in results.items():
        machine = result["machine"]
        versions = ", ".join(
            f"{k} {machine[k]}" for k in ("python", "numpy", "jax", "flax", "torch") if k in machine
        )
        threads = machine.get("torch_threads")
        parts += [
            "",
            f"## {name}: {result['title']}",
            "",
            f"Machine: {describe_machine(machine)}; {versions}"
            + (f"; torch threads {threads}" if threads else "")
            + f"; {result['seconds']:.0f} s.",
            "",
            markdown_table(result["columns"], result["rows"]),
            "",
            markdown_table(["target", "value", "goal", "met"], summary_rows({name: result})),
            "",
            *(f"- {note}" for note in result["notes"]),
            "",
            f"![{name}](bench_{name}.png)",
        ]
    return "\n".join(parts) + "\n"


def write_docs(results: dict[str, dict], quick: bool, out: Path, note: str = "") -> None:
    DOCS.mkdir(exist_ok=True)
    (DOCS / "benchmarks.md").write_text(markdown(results, note))
    for name in results:
        png = out / f"{name}{'_quick' if quick else ''}.png"
        if png.exists():
            shutil.copyfile(png, DOCS / f"bench_{name}.png")
    print(f"wrote {DOCS / 'benchmarks.md'} and docs/bench_*.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.all", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="fast smoke runs")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated names")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="JSON and PNG folder")
    parser.add_argument("--docs", action="store_true", help="write docs/benchmarks.md")
    parser.add_argument("--report-only", action="store_true", help="summarise existing JSON")
    parser.add_argument("--note", default="", help="a paragraph for docs/benchmarks.md")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {BENCHMARKS}")
    failed = []
    if not args.report_only:
        failed = [n for n in names if run_one(n, args.quick, args.out) != 0]
    results = {n: r for n in names if (r := load(n, args.quick, args.out)) is not None}
    missing = [n for n in names if n not in results]
    print("\n== All targets" + (" (quick)" if args.quick else ""))
    print(table(["benchmark", "target", "value", "goal", "met"], summary_rows(results)))
    if failed or missing:
        print(f"crashed: {failed}; no results: {missing}")
    if args.docs:
        write_docs(results, args.quick, args.out, args.note)
    all_met = all(t["met"] for r in results.values() for t in r["targets"])
    if failed or missing:
        return 2
    return 1 if args.check and not all_met else 0


if __name__ == "__main__":
    raise SystemExit(main())
