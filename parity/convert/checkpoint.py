"""Checkpoint files: safetensors (the project's format), torch .pt and Flax msgpack, both ways.

Every format holds one module: its name, its configuration and its weights, so that one file
rebuilds the module in either framework. safetensors metadata (string -> string):
`format` ("twin-block/1"), `module` (a key of `parity.convert.PAIRS`), `config` (JSON of the
module's `twin_core` config, `BlockConfig.to_dict()` or `LMConfig.to_dict()`), `sha256`
(`twin_core.files.digest` of the weights), for Flax parameter paths only, `naming: flax`, and
for a model read from a Hugging Face folder, `hf_metadata` (JSON: its token ids, generation
config and tokenizer files, see `parity.hf.metadata`; .pt and .msgpack files hold the same
entries). `load` puts it back on the model (`parity.convert.carried`).
Files written before the family fields existed (13 config keys) load with the defaults.

The framework is named "torch" or "jax"; "flax" is accepted for "jax" wherever one is named.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import torch
from flax import linen as nn
from flax import serialization
from flax.traverse_util import flatten_dict, unflatten_dict

from jax_block.scan import per_layer, scanned
from twin_core import BlockConfig, LMConfig
from twin_core.files import atomic_write, digest, safetensors_dtype, write_safetensors
from twin_core.run_files import framework_name

from ..dtypes import DTYPES, JAX_DTYPES, TORCH_DTYPES, dtype_name
from ..errors import ArgumentMismatch, ConfigNeeded, UnknownSuffix
from .carried import ATTRIBUTE, carried, carry, from_metadata, metadata_entries
from .weights import PAIRS, config_of, flax_to_torch, to_numpy, to_torch_tensor, torch_to_flax

FORMAT = "twin-block/1"
FORMATS = ("safetensors", "pt", "msgpack")
SUFFIXES = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt", ".msgpack": "msgpack"}
_NATIVE_NAMING = {"safetensors": "torch", "pt": "torch", "msgpack": "jax"}
_STORED_NAMING = {"torch": "torch", "jax": "flax"}  # metadata "naming": names of Flax paths

Config = BlockConfig | LMConfig


@dataclass(frozen=True)
class _Checkpoint:
    """What every format holds: which module, its configuration, its weights."""

    module: str  # a key of PAIRS
    config: Config
    naming: str  # "torch": weights is a state_dict; "jax": weights is the nested Flax params
    weights: dict
    from_module: bool = False  # weights read from a live torch module: consistent by construction
    hf_metadata: dict | None = None  # what the model carries from a Hugging Face folder


# --------------------------------------------------------------------------- public API
def save(
    path: str | os.PathLike,
    obj: Any,
    flax_module: nn.Module | None = None,
    *,
    format: str | None = None,
    naming: str | None = None,
) -> None:
    """Write a module's configuration and weights to `path`, atomically.

    `obj` is a torch_block module, a `(flax_module, params)` tuple, or Flax params with
    `flax_module`. The format comes from the suffix (.safetensors, .pt/.pth, .msgpack) or from
    `format` ("safetensors", "pt", "msgpack"). safetensors tensors carry torch state_dict keys,
    or with `naming="jax"` (or "flax") Flax parameter paths joined by "/".
    """
    path = Path(path)
    fmt = _format_of(path, format)
    _write(path, fmt, _naming_of(fmt, naming), _checkpoint_of(obj, flax_module))


def load(
    path: str | os.PathLike,
    framework: str = "torch",
    *,
    config: Config | Mapping[str, Any] | None = None,
    module: str | None = None,
    format: str | None = None,
    scan_layers: bool = False,
) -> torch.nn.Module | tuple[nn.Module, dict]:
    """A checkpoint file of any format as a torch module in eval mode, or `(flax_module, params)`
    for `framework="jax"` (or "flax"); with `scan_layers`, a Flax TransformerLM that scans its
    layers, its params stacked (`jax_block.scan`; files hold one entry per layer).

    `config` (a BlockConfig/LMConfig, or its fields as a dict) and `module` (e.g.
    "TransformerBlock"; by default told from the config's fields) are needed only for files that
    carry weights alone, such as a plain torch state_dict; given for a file that has its own
    configuration, they must agree with it.
    """
    framework = framework_name(framework, "framework")
    path = Path(path)
    checkpoint = _read(path, format, config, module)
    try:
        model = _torch_module(checkpoint) if framework == "torch" else _flax_params(checkpoint)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    if scan_layers:
        if framework == "torch":
            raise ValueError("scan_layers=True is for framework='jax', got framework='torch'")
        model = scanned(*model)
    carry(model, checkpoint.hf_metadata)
    return model


def convert_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    *,
    config: Config | Mapping[str, Any] | None = None,
    module: str | None = None,
) -> None:
    """Rewrite checkpoint `src` as `dst` with `to`'s names: "torch" writes .safetensors or .pt,
    "jax" (or "flax") writes .msgpack or .safetensors (Flax paths). `config`/`module` as for
    `load`."""
    to = framework_name(to, "to")
    src, dst = Path(src), Path(dst)
    fmt = _format_of(dst, None, format_argument=False)
    allowed = {"torch": ("safetensors", "pt"), "jax": ("msgpack", "safetensors")}[to]
    if fmt not in allowed:
        suffixes = " or ".join(f".{f}" for f in allowed)
        raise ArgumentMismatch(f"{{argument}} writes a {suffixes} file, got {dst}", "to", to)
    checkpoint = _read(src, None, config, module, format_argument=False)
    try:
        _write(dst, fmt, to, checkpoint)
    except ValueError as err:
        raise ValueError(f"{src}: {err}") from err


# --------------------------------------------------------------------------- formats
def _format_of(path: Path, format: str | None, format_argument: bool = True) -> str:
    """The format `format` names, or else the one of `path`'s suffix. `format_argument`: the
    caller takes format= (the error for an unknown suffix then says so)."""
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        return format
    if path.suffix.lower() in SUFFIXES:
        return SUFFIXES[path.suffix.lower()]
    raise UnknownSuffix(path, tuple(SUFFIXES), format_argument)


def _naming_of(fmt: str, naming: str | None) -> str:
    native = _NATIVE_NAMING[fmt]
    if naming is None:
        return native
    naming = framework_name(naming, "naming")
    if fmt != "safetensors" and naming != native:
        raise ValueError(f"{fmt} files hold {native} names; naming={naming!r} is for safetensors")
    return naming


def _stored_naming(path: Path, value: str) -> str:
    """The framework whose names a file's metadata "naming" says it holds."""
    if value not in ("torch", "jax", "flax"):
        raise ValueError(f"{path}: metadata naming must be 'torch' or 'flax', got {value!r}")
    return framework_name(value)


# --------------------------------------------------------------------------- writing
def _checkpoint_of(obj: Any, flax_module: nn.Module | None) -> _Checkpoint:
    """The checkpoint of a torch module, `(flax_module, params)` or params with `flax_module`."""
    if flax_module is None and isinstance(obj, tuple) and len(obj) == 2:
        flax_module, obj = obj
    for name, pair in PAIRS.items():
        if isinstance(obj, pair.torch_cls):
            if flax_module is not None:
                raise TypeError("flax_module goes with Flax params, got a torch module")
            return _Checkpoint(
                name, config_of(obj), "torch", dict(obj.state_dict()), True, carried(obj)
            )
    name = next((n for n, p in PAIRS.items() if isinstance(flax_module, p.flax_cls)), None)
    if name is None or not isinstance(obj, Mapping):
        raise TypeError(
            f"expected a torch module of {sorted(PAIRS)}, a (flax_module, params) tuple, or "
            f"params with flax_module=; got {type(obj).__name__} with flax_module="
            f"{type(flax_module).__name__}"
        )
    params = obj["params"] if set(obj) == {"params"} else obj  # a variables dict is accepted
    metadata = carried(flax_module)
    flax_module, params = per_layer(flax_module, params)  # files hold one entry per layer
    return _Checkpoint(name, config_of(flax_module), "jax", params, False, metadata)


def _write(path: Path, fmt: str, naming: str, checkpoint: _Checkpoint) -> None:
    """Convert to `naming` (checking the weights against the config), then write atomically."""
    if naming == "torch":
        weights = _state_dict(checkpoint)
    else:
        weights = jax.tree.map(np.asarray, _flax_params(checkpoint)[1])
    config = checkpoint.config.to_dict()
    carried_entries = metadata_entries(checkpoint.hf_metadata)
    header = {"format": FORMAT, "module": checkpoint.module, **carried_entries}
    if fmt == "safetensors":
        if naming == "torch":
            tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        else:
            tensors = {k: to_torch_tensor(v) for k, v in flatten_dict(weights, sep="/").items()}
        metadata = {**header, "config": json.dumps(config), "sha256": digest(tensors)}
        if naming == "jax":
            metadata["naming"] = _STORED_NAMING["jax"]
        entries = [
            (k, lambda v=v: v, tuple(v.shape), safetensors_dtype(v)) for k, v in tensors.items()
        ]
        write_safetensors(path, entries, metadata)
    elif fmt == "pt":
        state = {**header, "config": config, "sha256": digest(weights)}
        atomic_write(path, lambda f: torch.save({**state, "state_dict": weights}, f))
    else:
        state = {**header, "config": config, "sha256": digest(flatten_dict(weights, sep="/"))}
        atomic_write(
            path, lambda f: f.write(serialization.msgpack_serialize({**state, "params": weights}))
        )


# --------------------------------------------------------------------------- reading
def _read(
    path: Path,
    format: str | None,
    config: Config | Mapping[str, Any] | None,
    module: str | None,
    format_argument: bool = True,
) -> _Checkpoint:
    """Parse `path` (checksum included) and settle its module and configuration."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    fmt = _format_of(path, format, format_argument)
    reader = {"safetensors": _read_safetensors, "pt": _read_pt, "msgpack": _read_msgpack}[fmt]
    meta, naming, weights = reader(path)
    if module is not None and module not in PAIRS:
        raise ValueError(f"unknown module {module!r}: expected one of {sorted(PAIRS)}")
    if meta is None:
        if config is None:
            raise ConfigNeeded(path)
        name = module if module is not None else _module_for(path, config)
        return _Checkpoint(name, _config_from(path, name, config), naming, weights)

    if meta["format"] != FORMAT:
        raise ValueError(f"{path}: expected format {FORMAT!r}, got {meta['format']!r}")
    name = meta["module"]
    if name not in PAIRS:
        raise ValueError(f"{path}: expected a module of {sorted(PAIRS)}, got {name!r}")
    if module is not None and module != name:
        raise ArgumentMismatch(
            f"{path} holds a {name}, but {{argument}} asks for another", "module", module
        )
    stored = _config_from(path, name, meta["config"])
    if config is not None:
        _check_agrees(path, stored, config)
    hf_metadata = from_metadata(path, meta)
    return _Checkpoint(name, stored, naming, weights, hf_metadata=hf_metadata)


def _config_from(path: Path, name: str, config: Config | Mapping[str, Any] | Any) -> Config:
    """`name`'s config class from a config or its fields; ValueError naming what is wrong."""
    config_cls = PAIRS[name].config_cls
    if isinstance(config, (BlockConfig, LMConfig)):
        if not isinstance(config, config_cls):
            raise ValueError(f"{path}: a {name} needs a {config_cls.__name__}, got {config}")
        return config
    try:
        return config_cls.from_dict(config)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: config of the {name}: {err}") from err


def _module_for(path: Path, config: Config | Mapping[str, Any]) -> str:
    """The module a configuration is for, told by its fields (only an LMConfig has
    vocab_size): the one of PAIRS whose config class has every given field and needs no
    other."""
    if isinstance(config, (BlockConfig, LMConfig)):
        return next(n for n, p in PAIRS.items() if isinstance(config, p.config_cls))
    if not isinstance(config, Mapping):
        raise ValueError(
            "config= must be a BlockConfig, an LMConfig or a dict of their fields, got "
            f"{type(config).__name__}"
        )
    fits = [name for name, pair in PAIRS.items() if _fits(pair.config_cls, config)]
    if len(fits) == 1:
        return fits[0]
    if not fits:  # let the likelier class say which keys are wrong or missing
        return "TransformerLM" if "vocab_size" in config else "TransformerBlock"
    raise ArgumentMismatch(
        f"{path}: cannot tell which module config {dict(config)} is for (fits {fits}); "
        f"pass {{argument}} one of {sorted(PAIRS)}",
        "module",
    )


def _fits(config_cls: type, config: Mapping[str, Any]) -> bool:
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    required = {
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    return required <= set(config) <= set(fields)


def _check_agrees(path: Path, stored: Config, config: Config | Mapping[str, Any]) -> None:
    """ValueError listing every field where the given config and the file's disagree."""
    given = config.to_dict() if isinstance(config, (BlockConfig, LMConfig)) else config
    if not isinstance(given, Mapping):
        raise ValueError(
            "config= must be a BlockConfig, an LMConfig or a dict of their fields, got "
            f"{type(config).__name__}"
        )
    fields = stored.to_dict()
    disagree = [
        f"{k}: given {v!r}, file {fields.get(k, '(no such field)')!r}"
        for k, v in given.items()
        if k not in fields or fields[k] != v
    ]
    if disagree:
        raise ArgumentMismatch(
            f"{path}: {{argument}} disagrees with the file's: {'; '.join(disagree)}", "config"
        )


def _read_safetensors(path: Path) -> tuple[dict | None, str, dict]:
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors has its own error types for malformed files
        raise _unreadable(path, "safetensors", err) from err
    if "format" not in metadata:
        return None, "torch", tensors
    _check_digest(path, metadata.get("sha256"), tensors)
    naming = _stored_naming(path, metadata.get("naming", "torch"))
    try:
        config = json.loads(metadata.get("config", "null"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata config is not valid JSON: {err}") from err
    meta = {"format": metadata["format"], "module": metadata.get("module"), "config": config}
    meta[ATTRIBUTE] = metadata.get(ATTRIBUTE)
    if naming == "jax":
        return meta, naming, unflatten_dict({k: to_numpy(v) for k, v in tensors.items()}, sep="/")
    return meta, naming, tensors


def _read_pt(path: Path) -> tuple[dict | None, str, dict]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} refused: torch.load(weights_only=True) cannot read it; it is corrupt or "
            f"holds pickled objects other than tensors and plain containers, possibly code, "
            f"which was not run. ({str(err).splitlines()[0]})"
        ) from err
    except Exception as err:  # torch raises RuntimeError, EOFError, ... for damaged files
        raise _unreadable(path, "torch .pt", err) from err
    ours = isinstance(obj, Mapping) and "format" in obj
    state_dict = obj.get("state_dict") if ours else obj
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise ValueError(
            f"{path}: expected a twin-block checkpoint or a state_dict (str -> tensor), "
            f"got {type(obj).__name__}"
        )
    if not ours:
        return None, "torch", dict(state_dict)
    _check_digest(path, obj.get("sha256"), state_dict)
    meta = {k: obj.get(k) for k in ("format", "module", "config", ATTRIBUTE)}
    return meta, "torch", dict(state_dict)


def _read_msgpack(path: Path) -> tuple[dict | None, str, dict]:
    try:
        obj = serialization.msgpack_restore(path.read_bytes())
    except Exception as err:  # msgpack raises ValueError, ExtraData, TypeError, ...
        raise _unreadable(path, "Flax msgpack", err) from err
    ours = isinstance(obj, dict) and "format" in obj
    params = obj.get("params") if ours else obj
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]  # a variables dict
    flat = flatten_dict(params, sep="/") if isinstance(params, dict) else None
    if flat is None or not all(isinstance(v, np.ndarray) for v in flat.values()):
        raise ValueError(
            f"{path}: expected a twin-block checkpoint or Flax params (nested dict of arrays), "
            f"got {type(obj).__name__}"
        )
    if not ours:
        return None, "jax", params
    _check_digest(path, obj.get("sha256"), flat)
    meta = {k: obj.get(k) for k in ("format", "module", "config", ATTRIBUTE)}
    return meta, "jax", params


def _unreadable(path: Path, kind: str, err: Exception) -> ValueError:
    first = str(err).splitlines()[0] if str(err) else ""
    return ValueError(
        f"{path} is not a readable {kind} file (truncated or corrupt? the format comes from "
        f"the suffix): {type(err).__name__}: {first}"
    )


def _check_digest(path: Path, expected: str | None, arrays: Mapping[str, Any]) -> None:
    if expected is not None and digest(arrays) != expected:
        raise ValueError(f"{path} is corrupt: its weights do not match their stored sha256")


# --------------------------------------------------------------------------- building
def _dtype_of(checkpoint: _Checkpoint) -> str:
    """The one dtype, "float32" or "bfloat16", of all weights (torch-only buffers aside)."""
    if checkpoint.naming == "torch":
        buffers = PAIRS[checkpoint.module].torch_buffers(checkpoint.config)
        arrays = [v for k, v in checkpoint.weights.items() if k not in buffers]
    else:
        arrays = list(flatten_dict(checkpoint.weights).values())
    dtypes = {dtype_name(a.dtype) for a in arrays} or {"float32"}
    if len(dtypes) != 1 or not dtypes <= set(DTYPES):
        raise ValueError(
            f"expected every weight float32 or every weight bfloat16, got {sorted(dtypes)}"
        )
    return dtypes.pop()


def _flax_module(checkpoint: _Checkpoint) -> nn.Module:
    dtype = JAX_DTYPES[_dtype_of(checkpoint)]
    flax_cls = PAIRS[checkpoint.module].flax_cls
    return flax_cls.from_config(checkpoint.config, dtype=dtype, param_dtype=dtype)


def _state_dict(checkpoint: _Checkpoint) -> dict[str, torch.Tensor]:
    """The torch state_dict, checked against the configuration (ValueError lists mismatches)."""
    if checkpoint.from_module:
        return checkpoint.weights
    flax_module = _flax_module(checkpoint)
    if checkpoint.naming == "jax":
        state_dict = flax_to_torch(checkpoint.weights, flax_module)
        # torch-only buffers follow the weights' dtype, as after .to(dtype)
        dtype = TORCH_DTYPES[_dtype_of(checkpoint)]
        buffers = PAIRS[checkpoint.module].torch_buffers(checkpoint.config)
        return {k: v.to(dtype) if k in buffers else v for k, v in state_dict.items()}
    torch_to_flax(checkpoint.weights, flax_module)  # raises ValueError on any mismatch
    return checkpoint.weights


def _flax_params(checkpoint: _Checkpoint) -> tuple[nn.Module, dict]:
    """`(flax_module, params)`, checked against the configuration."""
    flax_module = _flax_module(checkpoint)
    if checkpoint.naming == "torch":
        return flax_module, torch_to_flax(checkpoint.weights, flax_module)
    flax_to_torch(checkpoint.weights, flax_module)  # raises ValueError on any mismatch
    return flax_module, jax.tree.map(jnp.asarray, checkpoint.weights)


def _torch_module(checkpoint: _Checkpoint) -> torch.nn.Module:
    state_dict = _state_dict(checkpoint)
    module = PAIRS[checkpoint.module].torch_cls.from_config(checkpoint.config)
    module = module.to(TORCH_DTYPES[_dtype_of(checkpoint)])
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(f"the weights do not load into {checkpoint.module}: {err}") from err
    return module.eval()
