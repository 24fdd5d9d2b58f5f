"""Library errors worded for the command line: flags where the library names keyword arguments."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ..errors import ArgumentMismatch, ConfigNeeded, UnknownSuffix


def flag(name: str, value: Any = None) -> str:
    """An argument as the command line names it: "--config", or with its value "--to jax"."""
    return f"--{name}" if value is None else f"--{name} {value}"


def worded(err: Exception, flags: Collection[str]) -> str:
    """The message of `err` for a command that has `flags` (among "config", "module", "to")."""
    if isinstance(err, ArgumentMismatch):
        return err.worded(flag)
    if isinstance(err, UnknownSuffix):
        return err.worded(format_hint=False)  # the command line has no format flag
    if isinstance(err, ConfigNeeded):
        example = ConfigNeeded.example_json()
        if "config" in flags:
            return f"{err.what}: pass --config (its fields as JSON, e.g. {example}) to read it"
        return (
            f"{err.what}: write it with one first: python -m parity convert {err.path} "
            f"OUT.safetensors --to torch --config {example}"
        )
    return str(err)
