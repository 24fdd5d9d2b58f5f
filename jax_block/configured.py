"""The base of the Linen modules that hold a twin_core config as their one model field."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from .sharding import AxisNamedModule


class ConfiguredModule(AxisNamedModule):
    """A module whose subclass declares `config: <config_type>`, `dtype` and `param_dtype`;
    built from a config (`from_config`) or from config fields by keyword (`create`)."""

    config_type: ClassVar[type]

    def __post_init__(self) -> None:
        if not isinstance(self.config, self.config_type):
            raise TypeError(
                f"{type(self).__name__}.config must be a twin_core.{self.config_type.__name__}, "
                f"got {type(self.config).__name__}"
            )
        super().__post_init__()

    @classmethod
    def create(cls, **kwargs: Any):
        """The module of the config fields given by keyword (the rest at their defaults); the
        module's own fields (dtype, param_dtype, name, parent, ...) go to the module. TypeError
        on any other keyword."""
        fields = [f.name for f in dataclasses.fields(cls.config_type)]
        own = [f.name for f in dataclasses.fields(cls) if f.name != "config"]
        unknown = sorted(set(kwargs) - set(fields) - set(own))
        if unknown:
            raise TypeError(
                f"{cls.__name__}.create: unknown keyword(s) {unknown}; it takes the "
                f"{cls.config_type.__name__} fields {fields} and {own}"
            )
        module_args = {k: v for k, v in kwargs.items() if k in own}
        config = cls.config_type(**{k: v for k, v in kwargs.items() if k not in own})
        return cls(config, **module_args)

    @classmethod
    def from_config(cls, config: Any, **module_args: Any):
        """The module that `config` describes; `module_args`: the module's own fields (dtype,
        param_dtype, name, parent, ...)."""
        return cls(config, **module_args)
