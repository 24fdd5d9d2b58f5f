"""Checkpoint files: safetensors (the project's format), torch .pt and Flax msgpack, both ways.

Every format holds one module: its name, its configuration and its weights, so that one file
rebuilds the module in either framework. safetensors metadata (string -> string):
`format` ("twin-block/1"), `module` (a key of `parity.convert.PAIRS`), `config` (JSON of the
constructor arguments), `sha256` (checksum of the weights) and, for Flax names only, `naming`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import pickle
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.torch
import torch
from flax import linen as nn
from flax import serialization
from flax.traverse_util import flatten_dict, unflatten_dict

from .convert import PAIRS, config_of, flax_to_torch, to_numpy, to_torch_tensor, torch_to_flax

FORMAT = "twin-block/1"
FORMATS = ("safetensors", "pt", "msgpack")
FRAMEWORKS = ("torch", "flax")
_SUFFIXES = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt", ".msgpack": "msgpack"}
_NATIVE_NAMING = {"safetensors": "torch", "pt": "torch", "msgpack": "flax"}
_DTYPES = {"float32": (torch.float32, jnp.float32), "bfloat16": (torch.bfloat16, jnp.bfloat16)}


@dataclass(frozen=True)
class _Checkpoint:
    """What every format holds: which module, its full configuration, its weights."""

    module: str  # a key of PAIRS
    config: dict
    naming: str  # "torch": weights is a state_dict; "flax": weights is the nested Flax params
    weights: dict
    from_module: bool = False  # weights read from a live torch module: consistent by construction


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
    `flax_module`. The format comes from the suffix (.safetensors, .pt/.pth, .msgpack; any other
    suffix: safetensors) or from `format` ("safetensors", "pt", "msgpack"). safetensors tensors
    carry torch state_dict keys, or with `naming="flax"` Flax parameter paths joined by "/".
    """
    path = Path(path)
    fmt = _format_of(path, format)
    _write(path, fmt, _naming_of(fmt, naming), _checkpoint_of(obj, flax_module))


def load(
    path: str | os.PathLike,
    framework: str = "torch",
    *,
    config: Mapping[str, Any] | None = None,
    module: str | None = None,
    format: str | None = None,
) -> torch.nn.Module | tuple[nn.Module, dict]:
    """A checkpoint file of any format as a torch module in eval mode, or `(flax_module, params)`.

    `config` (constructor arguments) and `module` (e.g. "TransformerBlock") are needed only for
    files that carry weights alone, such as a plain torch state_dict.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
    path = Path(path)
    checkpoint = _read(path, _format_of(path, format), config, module)
    try:
        return _torch_module(checkpoint) if framework == "torch" else _flax_params(checkpoint)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def convert_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    *,
    config: Mapping[str, Any] | None = None,
    module: str | None = None,
) -> None:
    """Rewrite checkpoint `src` as `dst` with `to`'s names: "torch" writes .safetensors or .pt,
    "flax" writes .msgpack or .safetensors (Flax paths). `config`/`module` as for `load`."""
    if to not in FRAMEWORKS:
        raise ValueError(f"to must be one of {FRAMEWORKS}, got {to!r}")
    src, dst = Path(src), Path(dst)
    fmt = _format_of(dst, None)
    allowed = {"torch": ("safetensors", "pt"), "flax": ("msgpack", "safetensors")}[to]
    if fmt not in allowed:
        raise ValueError(f"to={to!r} writes a .{' or .'.join(allowed)} file, got {dst}")
    checkpoint = _read(src, _format_of(src, None), config, module)
    try:
        _write(dst, fmt, to, checkpoint)
    except ValueError as err:
        raise ValueError(f"{src}: {err}") from err


# --------------------------------------------------------------------------- formats
def _format_of(path: Path, format: str | None) -> str:
    if format is None:
        return _SUFFIXES.get(path.suffix.lower(), "safetensors")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    return format


def _naming_of(fmt: str, naming: str | None) -> str:
    native = _NATIVE_NAMING[fmt]
    if naming is None:
        return native
    if naming not in FRAMEWORKS:
        raise ValueError(f"naming must be one of {FRAMEWORKS}, got {naming!r}")
    if fmt != "safetensors" and naming != native:
        raise ValueError(f"{fmt} files hold {native} names; naming={naming!r} is for safetensors")
    return naming


# --------------------------------------------------------------------------- writing
def _checkpoint_of(obj: Any, flax_module: nn.Module | None) -> _Checkpoint:
    """The checkpoint of a torch module, `(flax_module, params)` or params with `flax_module`."""
    if flax_module is None and isinstance(obj, tuple) and len(obj) == 2:
        flax_module, obj = obj
    for name, pair in PAIRS.items():
        if isinstance(obj, pair.torch_cls):
            if flax_module is not None:
                raise TypeError("flax_module goes with Flax params, got a torch module")
            return _Checkpoint(name, config_of(obj), "torch", dict(obj.state_dict()), True)
    name = next((n for n, p in PAIRS.items() if isinstance(flax_module, p.flax_cls)), None)
    if name is None or not isinstance(obj, Mapping):
        raise TypeError(
            f"expected a torch module of {sorted(PAIRS)}, a (flax_module, params) tuple, or "
            f"params with flax_module=; got {type(obj).__name__} with flax_module="
            f"{type(flax_module).__name__}"
        )
    params = obj["params"] if set(obj) == {"params"} else obj  # a variables dict is accepted
    return _Checkpoint(name, config_of(flax_module), "flax", params)


def _write(path: Path, fmt: str, naming: str, checkpoint: _Checkpoint) -> None:
    """Convert to `naming` (checking the weights against the config), then write atomically."""
    if naming == "torch":
        weights = _state_dict(checkpoint)
    else:
        weights = jax.tree.map(np.asarray, _flax_params(checkpoint)[1])
    header = {"format": FORMAT, "module": checkpoint.module}
    if fmt == "safetensors":
        if naming == "torch":
            tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        else:
            tensors = {k: to_torch_tensor(v) for k, v in flatten_dict(weights, sep="/").items()}
        metadata = {**header, "config": json.dumps(checkpoint.config), "sha256": _digest(tensors)}
        if naming == "flax":
            metadata["naming"] = "flax"
        _atomic_write(path, lambda f: f.write(safetensors.torch.save(tensors, metadata)))
    elif fmt == "pt":
        state = {**header, "config": checkpoint.config, "sha256": _digest(weights)}
        _atomic_write(path, lambda f: torch.save({**state, "state_dict": weights}, f))
    else:
        digest = _digest(flatten_dict(weights, sep="/"))
        state = {**header, "config": checkpoint.config, "sha256": digest, "params": weights}
        _atomic_write(path, lambda f: f.write(serialization.msgpack_serialize(state)))


def _atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over `path`.

    On any error the temporary file is removed and `path` is left as it was.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError, AttributeError):  # make the rename durable, where possible
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _digest(arrays: Mapping[str, Any]) -> str:
    """sha256 over names, shapes and raw bytes of torch tensors or numpy arrays."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        array = arrays[name]
        if isinstance(array, torch.Tensor):
            raw = array.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        else:
            raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        h.update(f"{name} {tuple(array.shape)} {raw.size}\n".encode())
        h.update(raw)
    return h.hexdigest()


# --------------------------------------------------------------------------- reading
def _read(
    path: Path, fmt: str, config: Mapping[str, Any] | None, module: str | None
) -> _Checkpoint:
    """Parse `path` (checksum included) and settle its module and full configuration."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    reader = {"safetensors": _read_safetensors, "pt": _read_pt, "msgpack": _read_msgpack}[fmt]
    meta, naming, weights = reader(path)
    if meta is None:
        if config is None:
            raise ValueError(
                f"{path} holds weights without a configuration: pass config= (the constructor "
                f"arguments, e.g. dict(d_model=..., n_heads=..., d_ff=...)) to load it"
            )
        name = module if module is not None else _module_for(path, config)
        if name not in PAIRS:
            raise ValueError(f"module must be one of {sorted(PAIRS)}, got {name!r}")
        return _Checkpoint(name, _full_config(path, name, config), naming, weights)

    if meta["format"] != FORMAT:
        raise ValueError(f"{path}: expected format {FORMAT!r}, got {meta['format']!r}")
    name = meta["module"]
    if name not in PAIRS:
        raise ValueError(f"{path}: expected a module of {sorted(PAIRS)}, got {name!r}")
    if module is not None and module != name:
        raise ValueError(f"{path} holds a {name}, but module={module!r} was asked for")
    stored = _full_config(path, name, meta["config"])
    if config is not None:
        disagree = [
            f"{k}: given {v!r}, file {stored.get(k, '(none)')!r}"
            for k, v in config.items()
            if k not in stored or stored[k] != v
        ]
        if disagree:
            raise ValueError(f"{path}: config= disagrees with the file's: {'; '.join(disagree)}")
    return _Checkpoint(name, stored, naming, weights)


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
    naming = metadata.get("naming", "torch")
    if naming not in FRAMEWORKS:
        raise ValueError(f"{path}: metadata naming must be one of {FRAMEWORKS}, got {naming!r}")
    try:
        config = json.loads(metadata.get("config", "null"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata config is not valid JSON: {err}") from err
    meta = {"format": metadata["format"], "module": metadata.get("module"), "config": config}
    if naming == "flax":
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
    meta = {"format": obj["format"], "module": obj.get("module"), "config": obj.get("config")}
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
        return None, "flax", params
    _check_digest(path, obj.get("sha256"), flat)
    meta = {"format": obj["format"], "module": obj.get("module"), "config": obj.get("config")}
    return meta, "flax", params


def _unreadable(path: Path, kind: str, err: Exception) -> ValueError:
    first = str(err).splitlines()[0] if str(err) else ""
    return ValueError(
        f"{path} is not a readable {kind} file (truncated or corrupt?; the format comes from "
        f"the suffix, pass format= for another): {type(err).__name__}: {first}"
    )


def _check_digest(path: Path, expected: str | None, arrays: Mapping[str, Any]) -> None:
    if expected is not None and _digest(arrays) != expected:
        raise ValueError(f"{path} is corrupt: its weights do not match their stored sha256")


def _signature(name: str) -> dict[str, inspect.Parameter]:
    params = inspect.signature(PAIRS[name].torch_cls.__init__).parameters
    return {k: p for k, p in params.items() if k != "self"}


def _full_config(path: Path, name: str, config: Any) -> dict:
    """`config` checked against `name`'s constructor, with defaults filled in."""
    signature = _signature(name)
    if not isinstance(config, Mapping):
        raise ValueError(
            f"{path}: config must be a dict of {name}'s arguments {list(signature)}, "
            f"got {type(config).__name__}"
        )
    unknown = sorted(set(config) - set(signature))
    missing = [k for k, p in signature.items() if p.default is p.empty and k not in config]
    if unknown or missing:
        raise ValueError(
            f"{path}: config for {name} has unknown keys {unknown} and lacks {missing}; "
            f"expected keys among {list(signature)}"
        )
    return {k: config.get(k, p.default) for k, p in signature.items()}


def _module_for(path: Path, config: Mapping[str, Any]) -> str:
    """The one module of PAIRS whose constructor takes exactly these arguments."""
    fits = []
    for name in PAIRS:
        signature = _signature(name)
        required = {k for k, p in signature.items() if p.default is p.empty}
        if required <= set(config) <= set(signature):
            fits.append(name)
    fits = fits or list(PAIRS)  # none fits: the only module's own check says why
    if len(fits) != 1:
        raise ValueError(
            f"{path}: cannot tell which module config {dict(config)} is for "
            f"(fits {fits}); pass module= one of {sorted(PAIRS)}"
        )
    return fits[0]


# --------------------------------------------------------------------------- building
def _dtype_of(checkpoint: _Checkpoint) -> str:
    """The one dtype, "float32" or "bfloat16", of all weights (torch-only buffers aside)."""
    if checkpoint.naming == "torch":
        buffers = PAIRS[checkpoint.module].torch_buffers(checkpoint.config)
        arrays = [v for k, v in checkpoint.weights.items() if k not in buffers]
    else:
        arrays = list(flatten_dict(checkpoint.weights).values())
    dtypes = {str(a.dtype).removeprefix("torch.") for a in arrays} or {"float32"}
    if len(dtypes) != 1 or not dtypes <= set(_DTYPES):
        raise ValueError(
            f"expected every weight float32 or every weight bfloat16, got {sorted(dtypes)}"
        )
    return dtypes.pop()


def _flax_module(checkpoint: _Checkpoint) -> nn.Module:
    dtype = _DTYPES[_dtype_of(checkpoint)][1]
    flax_cls = PAIRS[checkpoint.module].flax_cls
    return flax_cls(**checkpoint.config, dtype=dtype, param_dtype=dtype)


def _state_dict(checkpoint: _Checkpoint) -> dict[str, torch.Tensor]:
    """The torch state_dict, checked against the configuration (ValueError lists mismatches)."""
    if checkpoint.from_module:
        return checkpoint.weights
    flax_module = _flax_module(checkpoint)
    if checkpoint.naming == "flax":
        state_dict = flax_to_torch(checkpoint.weights, flax_module)
        dtype = _DTYPES[_dtype_of(checkpoint)][0]  # torch-only buffers follow, as after .to(dtype)
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
    module = PAIRS[checkpoint.module].torch_cls(**checkpoint.config)
    module = module.to(_DTYPES[_dtype_of(checkpoint)][0])
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(f"the weights do not load into {checkpoint.module}: {err}") from err
    return module.eval()
