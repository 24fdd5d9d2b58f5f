"""`python -m parity`: the parity report (`check`, the default), `convert`, `generate` and `train`.

Each command is added by one `add_*_command(subparsers)` function listed in COMMANDS and runs as
`args.run(args) -> exit code`; a new command is one more such function.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

from .arguments import PROG
from .check import add_check_command, add_check_options
from .convert import add_convert_command
from .generate import add_generate_command
from .train import add_train_command

DESCRIPTION = """\
Check that torch_block and jax_block compute the same thing, convert checkpoints, generate
and train.

With no command, runs `check` over every built-in case (all configurations, all dtypes) and
prints a table: case, configuration, dtype, max absolute and relative error of JAX against
torch, the tolerance (docs/design.md section 7), MoE routing agreement and PASS/FAIL.

exit codes: 0 every case passed (or the command succeeded), 1 a case failed (or a file could
not be written), 2 bad arguments or an unreadable or mismatched file."""

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_check_command,
    add_convert_command,
    add_generate_command,
    add_train_command,
]


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (and exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command of COMMANDS."""
    parser = OneLineParser(
        prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
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
