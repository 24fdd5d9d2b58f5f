"""`python -m parity`: the parity report (`check`, the default), `convert` and `generate`.

Each subcommand is added by one `add_*_command(subparsers)` function listed in COMMANDS, and
runs as `args.run(args) -> exit code`; a new subcommand is one more such function.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from . import report
from .cases import BATCH, CONFIGS, SEQ_LEN
from .checkpoint import ALIASES, FRAMEWORKS, SUFFIXES, command_line_errors, convert_file
from .compare import DTYPES, NEAR_TIES
from .convert import PAIRS
from .generate_cli import add_generate_command
from .hf_cli import add_hf_commands
from .lm_cases import LM_CONFIGS, NEW_TOKENS, PROMPT_LENGTHS
from .render import environment, render_json, render_report

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
Check that torch_block and jax_block compute the same thing, and convert checkpoints.

With no command, runs `check` over every built-in case (all configurations, all dtypes) and
prints a table: case, configuration, dtype, max absolute and relative error of JAX against
torch, the tolerance (docs/design.md section 7), MoE routing agreement and PASS/FAIL.

exit codes: 0 every case passed (or the conversion succeeded), 1 a case failed,
2 bad arguments or an unreadable or mismatched file."""


def add_check_command(subparsers: argparse._SubParsersAction) -> None:
    """`check`: run the built-in parity cases and print the table (or JSON)."""
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


def case_list() -> str:
    """The registered cases and configurations, for --help."""
    lines = ["cases (each gives the rows of its name, or those listed):"]
    for entry in report.all_cases():
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
        help="configuration (block and language model) to check (default: all)",
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
    """Run the selected cases, print the report, return 0 if all pass and 1 otherwise."""
    start = time.perf_counter()
    rows = report.run_cases(args.config, args.dtype, args.seed, workers=report.WORKERS)
    env = environment()
    if args.json:
        print(render_json(rows, env, args.seed))
    else:
        print(render_report(rows, env, args.seed))
        print(f"({time.perf_counter() - start:.1f} s)")
    return EXIT_OK if rows and all(row.passed for row in rows) else EXIT_FAILED


def add_convert_command(subparsers: argparse._SubParsersAction) -> None:
    """`convert IN OUT --to {torch,jax}`: rewrite a checkpoint file for the other framework."""
    parser = subparsers.add_parser(
        "convert",
        help="convert a checkpoint file between torch and JAX",
        description=(
            "Convert a checkpoint file (safetensors with the twin-block configuration, torch "
            ".pt state_dict, or Flax msgpack) for the framework named by --to, through "
            "parity.checkpoint.convert_file. The suffix gives each file's format "
            f"({', '.join(SUFFIXES)}): --to torch writes .safetensors or .pt, --to jax "
            "writes .msgpack or .safetensors (Flax parameter paths). The input is never "
            "modified; the output is written atomically. A file that carries weights alone "
            "(a plain torch state_dict) needs --config."
        ),
        epilog="example: python -m parity convert block.safetensors block.msgpack --to jax",
    )
    parser.add_argument("input", type=Path, metavar="IN", help="checkpoint file to read")
    parser.add_argument("output", type=Path, metavar="OUT", help="checkpoint file to write")
    parser.add_argument(
        "--to",
        required=True,
        type=lambda name: ALIASES.get(name, name),
        choices=FRAMEWORKS,
        help="framework of the output file ('flax' is read as jax)",
    )
    parser.add_argument(
        "--config",
        type=json_object,
        help="the module's configuration (BlockConfig or LMConfig fields) as JSON, for files "
        'without one, e.g. \'{"d_model": 64, "n_heads": 4, "d_ff": 128}\'; vocab_size makes '
        "it a TransformerLM",
    )
    parser.add_argument(
        "--module",
        choices=sorted(PAIRS),
        help="module class, for files without one (default: told by the --config fields)",
    )
    parser.set_defaults(run=run_convert)


def json_object(text: str) -> dict:
    """A JSON object for --config; anything else is a usage error (exit 2)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def run_convert(args: argparse.Namespace) -> int:
    """Convert args.input to args.output; exit 2 with a message on a bad file."""
    if args.input.is_dir():
        return _error(f"IN must be a checkpoint file, got the folder {args.input}")
    if not args.input.is_file():
        return _error(f"input file not found: {args.input}")
    if args.output.is_dir():
        return _error(f"OUT must be a checkpoint file, got the folder {args.output}")
    if args.input.resolve() == args.output.resolve():
        return _error(f"input and output are the same file: {args.input}")
    try:
        with command_line_errors():
            convert_file(args.input, args.output, args.to, config=args.config, module=args.module)
    except (OSError, ValueError, TypeError) as error:
        return _error(f"cannot convert {args.input}: {error}")
    print(f"wrote {args.output} ({args.to})")
    return EXIT_OK


def _error(message: str) -> int:
    print(f"python -m parity: error: {message}", file=sys.stderr)
    return EXIT_USAGE


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_check_command,
    add_convert_command,
    add_generate_command,
    add_hf_commands,  # last: extends convert, generate and check with Hugging Face folders
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand of COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="python -m parity",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_check_options(parser)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the command, return its exit code."""
    args = build_parser().parse_args(argv)
    return args.run(args)
