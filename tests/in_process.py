"""`python -m parity ARGS` run in this process: `parity.cli.main` (what the command runs) in a
given folder, its stdout and stderr captured, its exit code returned as a process's would be.
One import and one compilation cache for every command of a test file; the command as a real
process is run by tests/cli/test_readme.py and tests/cli/test_parity_cli.py."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from pathlib import Path

from parity import cli as parity_cli

ROOT = Path(__file__).resolve().parents[1]


def run_parity(*args: object, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The exit code and output of `python -m parity ARGS` run in folder `cwd`."""
    argv = list(map(str, args))
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = parity_cli.main(argv)
            except SystemExit as exit_:  # argparse's errors and --help
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        os.chdir(previous)
    command = ["python", "-m", "parity", *argv]
    return subprocess.CompletedProcess(command, code, out.getvalue(), err.getvalue())
