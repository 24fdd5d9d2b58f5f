"""What every command of `python -m parity` shares: exit codes, one-line errors, argparse types."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable

from twin_core.run_files import FRAMEWORKS, framework_name

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROG = "python -m parity"


def error(command: str | None, message: str) -> int:
    """Print `message` as one line on stderr, naming the command; returns EXIT_USAGE."""
    name = PROG if command is None else f"{PROG} {command}"
    print(f"{name}: error: {message}".replace("\n", " "), file=sys.stderr)
    return EXIT_USAGE


def add_framework_option(parser: argparse.ArgumentParser, help: str) -> None:
    """--framework torch|jax ('flax' is read as jax), default torch."""
    parser.add_argument(
        "--framework",
        type=framework,
        metavar="{" + ",".join(FRAMEWORKS) + "}",
        default="torch",
        help=f"{help} ('flax' is read as jax) (default: %(default)s)",
    )


def framework(text: str) -> str:
    """An argparse type: 'torch' or 'jax' ('flax' is read as 'jax')."""
    try:
        return framework_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def json_object(text: str) -> dict:
    """An argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def token_ids(text: str) -> list[int]:
    """An argparse type: '1,2,3' -> [1, 2, 3]."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    if min(ids) < 0:
        raise argparse.ArgumentTypeError(f"token ids are >= 0, got {min(ids)}")
    return ids


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def temperature(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    value = _number(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
