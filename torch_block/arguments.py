"""A config dataclass built from a constructor's own arguments."""

from __future__ import annotations

from typing import Any, TypeVar

Config = TypeVar("Config")

NOT_ARGUMENTS = ("self", "__class__", "architecture")  # locals() of a constructor calling super()


def config_from_arguments(config_type: type[Config], arguments: dict[str, Any]) -> Config:
    """`config_type` of a constructor's `locals()`, read before it sets any local: its named
    arguments and the fields given in its `**architecture`."""
    named = {name: value for name, value in arguments.items() if name not in NOT_ARGUMENTS}
    return config_type(**named, **arguments["architecture"])
