"""`python -m parity check` (the default command): the parity report of the built-in cases, or
with `--hf DIR` of a Hugging Face folder's model three ways (torch_block, jax_block and, when
installed, transformers)."""

from __future__ import annotations

import argparse
import textwrap
import time
from pathlib import Path

from ..dtypes import DTYPES
from ..hf import HFCheckpoint
from ..report import runner
from ..report.cases.hf import hf_report
from ..report.cases.lm import LM_CONFIGS, NEW_TOKENS, PROMPT_LENGTHS
from ..report.compare import NEAR_TIES
from ..report.registry import BATCH, CONFIGS, NAMED_FAMILIES, SEQ_LEN
from ..report.render import environment, render_json, render_report
from .arguments import EXIT_FAILED, EXIT_OK, error


def add_check_command(subparsers: argparse._SubParsersAction) -> None:
    """`check`: run the built-in parity cases (or an HF folder's) and print the table or JSON."""
    parser = subparsers.add_parser(
        "check",
        help="run the built-in parity cases (the default command)",
        description=textwrap.fill(
            "Run the built-in parity cases in torch and JAX on the same weights and input, "
            "and print one row per comparison (JAX against torch). Routing agreement counts "
            "tokens whose top-k experts agree; near ties (adjacent top-(k+1) probabilities "
            f"within {NEAR_TIES['float32']:g} in float32, "
            f"{NEAR_TIES['bfloat16']:g} in bfloat16) are counted, not failed, and a "
            "token they route apart is left out of the output error. Exit 1 when any row fails.",
            width=90,
        ),
        epilog=case_list(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_check_options(parser, argparse.SUPPRESS)  # keeps values given before `check`
    parser.add_argument(
        "--hf",
        type=Path,
        metavar="DIR",
        help="check a Hugging Face checkpoint folder three ways instead of the built-in cases: "
        "torch_block, jax_block and transformers (when installed): logits, cached decode, "
        "greedy tokens (in bfloat16 identical up to a near tie), on left-padded prompts "
        "seeded by --seed; --dtype all keeps the checkpoint's dtype",
    )


def case_list() -> str:
    """The registered cases and configurations, for --help."""
    lines = ["cases (each gives the rows of its name, or those listed):"]
    for entry in runner.all_cases():
        covers = f"{', '.join(entry.configs)}; {', '.join(entry.dtypes)}"
        doc = (entry.run.__doc__ or "").strip().splitlines()
        lines.append(f"  {entry.name:22} {doc[0] if doc else ''}".rstrip())
        if entry.row_names != (entry.name,):
            lines.append(f"  {'':22} rows: {', '.join(entry.row_names)}")
        lines.append(f"  {'':22} ({covers})")
    lines.append("configurations:")
    for name in CONFIGS:
        for module, config in (("TransformerBlock", CONFIGS), ("TransformerLM", LM_CONFIGS)):
            arguments = ", ".join(f"{k}={v}" for k, v in config[name].items())
            lines.append(f"  {name:8} {module}({arguments})")
    lengths = ", ".join(map(str, PROMPT_LENGTHS))
    lines.append(
        f"inputs: block: batch {BATCH}, sequence {SEQ_LEN}, unit normal; LM: left-padded prompts "
        f"of {lengths} tokens, {NEW_TOKENS} new tokens; seeded by --seed"
    )
    return "\n".join(lines)


def add_check_options(parser: argparse.ArgumentParser, default: object = None) -> None:
    """The options of `check`, also accepted with no command. `default` replaces every default
    (argparse.SUPPRESS: leave what the main parser set)."""

    def given(value: object) -> object:
        return value if default is None else default

    parser.add_argument(
        "--config",
        choices=(*CONFIGS, "all"),
        default=given("all"),
        help="configuration (block and language model) to check (default: all, the default "
        f"report; {', '.join(NAMED_FAMILIES)} run only when named)",
    )
    parser.add_argument(
        "--dtype",
        choices=(*DTYPES, "all"),
        default=given("all"),
        help="dtype of weights and inputs (default: all)",
    )
    parser.add_argument(
        "--seed", type=int, default=given(0), help="seed of weights and inputs (default: 0)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=given(False),
        help="print the report as JSON instead of a table",
    )
    parser.set_defaults(run=run_check)


def run_check(args: argparse.Namespace) -> int:
    """Run the selected cases (or check args.hf), print the report; 0 if all pass, else 1."""
    start = time.perf_counter()
    if getattr(args, "hf", None) is not None:
        if args.config != "all":
            return error("check", "--config picks built-in configurations; --hf checks a folder")
        try:
            checkpoint = HFCheckpoint(args.hf, None if args.dtype == "all" else args.dtype)
            rows, env = hf_report(checkpoint, args.seed)
        except (OSError, ValueError) as err:
            return error("check", str(err))
        timing = f"(transformers: {env['transformers']}; {time.perf_counter() - start:.1f} s)"
    else:
        rows = runner.run_cases(args.config, args.dtype, args.seed, workers=runner.WORKERS)
        env = environment()
        timing = f"({time.perf_counter() - start:.1f} s)"
    if args.json:
        print(render_json(rows, env, args.seed))
    else:
        print(render_report(rows, env, args.seed))
        print(timing)
    return EXIT_OK if rows and all(row.passed for row in rows) else EXIT_FAILED
