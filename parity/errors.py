"""The errors parity's library raises with the facts of what went wrong.

Messages name the keyword arguments of the Python API; `python -m parity` words the same facts
with its flags (parity/cli/wording.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXAMPLE_FIELDS = {"d_model": 64, "n_heads": 4, "d_ff": 128}  # a configuration, for messages


def python_argument(name: str, value: Any = None) -> str:
    """An argument as Python code names it: "config=", or with its value "to='jax'"."""
    return f"{name}=" if value is None else f"{name}={value!r}"


class CheckpointError(ValueError):
    """A checkpoint file, or an argument given to read or write one, that cannot be used."""


class ArgumentMismatch(CheckpointError):
    """An argument that does not fit the file: `argument` (its keyword) given as `value`.

    `template` is the message with "{argument}" where the argument is named."""

    def __init__(self, template: str, argument: str, value: Any = None):
        self.template, self.argument, self.value = template, argument, value
        super().__init__(self.worded(python_argument))

    def worded(self, name: Callable[[str, Any], str]) -> str:
        """The message, the argument named by `name(argument, value)`."""
        return self.template.format(argument=name(self.argument, self.value))


class UnknownSuffix(CheckpointError):
    """A path whose suffix names no checkpoint format; `format_argument`: the caller could have
    passed format= instead."""

    def __init__(self, path: Path, known: tuple[str, ...], format_argument: bool):
        self.path, self.known, self.format_argument = path, known, format_argument
        super().__init__(self.worded(format_hint=format_argument))

    def worded(self, format_hint: bool) -> str:
        """The message, with or without the hint to pass format=."""
        suffix = f"unknown suffix {self.path.suffix!r}" if self.path.suffix else "no suffix"
        hint = " (or pass format=)" if format_hint else ""
        known = ", ".join(self.known)
        return f"{self.path}: {suffix}; a checkpoint file's suffix gives its format: {known}{hint}"


class ConfigNeeded(CheckpointError):
    """A file of weights alone (`path`), read without the module's configuration."""

    def __init__(self, path: Path):
        self.path = path
        fields = ", ".join(f"{k}={v}" for k, v in EXAMPLE_FIELDS.items())
        example = f"BlockConfig({fields}) or dict({fields})"
        super().__init__(
            f"{self.what}: pass config= (the module's fields, e.g. {example}) to read it"
        )

    @property
    def what(self) -> str:
        """What is wrong, without what to do about it."""
        return f"{self.path} holds weights without a configuration"

    @staticmethod
    def example_json() -> str:
        """EXAMPLE_FIELDS as JSON, quoted for a shell."""
        return f"'{json.dumps(EXAMPLE_FIELDS)}'"


class FolderConflict(ValueError):
    """Writing a Hugging Face folder would replace files there (`names`) with different ones;
    `details` says how each differs. Nothing was written."""

    def __init__(self, directory: Path, names: list[str], details: list[str]):
        self.directory, self.names, self.details = directory, names, details
        super().__init__(
            f"{directory} holds files that differ from the model's: {'; '.join(details)}; "
            "nothing was written: export into a new folder, or remove those files to write "
            "the model's"
        )


class WeightsMismatch(CheckpointError):
    """Tensors of `directory`'s weight files (`kind`) that contradict its config.json
    (`family`): every problem in `problems` (missing, unexpected or mis-shaped tensors); the
    message lists the first SHOWN and the count."""

    SHOWN = 3

    def __init__(self, directory: Path, kind: str, family: str, problems: list[str]):
        self.directory, self.kind, self.family = directory, kind, family
        self.problems = list(problems)
        shown = self.problems[: self.SHOWN]
        if len(self.problems) > self.SHOWN:
            shown.append(f"... and {len(self.problems) - self.SHOWN} more")
        super().__init__(
            f"{directory}: the weights ({kind}) do not match config.json ({family}): "
            f"{len(self.problems)} problem(s): {'; '.join(shown)}"
        )
