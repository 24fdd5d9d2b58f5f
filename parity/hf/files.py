"""The files of a Hugging Face directory: config.json and the weights, read one tensor at a time.

Weights are model.safetensors, sharded safetensors with model.safetensors.index.json, or
pytorch_model.bin (sharded or not), which is read only through torch.load(weights_only=True).
Every safetensors header is checked against the file's size before any tensor is read
(`twin_core.files.read_safetensors_header`), so a truncated file is refused before a large
allocation. A tensor is then either read with a plain file read at its offset (`get`,
`read_into`) or mapped copy-on-write (`mapped`: torch_block's weights, as transformers and
safetensors load them).
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twin_core.files import SAFETENSORS_NAMES, read_safetensors_header

from .config import CHECKPOINT_DTYPES

CONFIG = "config.json"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
MAX_JSON_BYTES = 64 << 20
ST_DTYPES = {SAFETENSORS_NAMES[name]: getattr(torch, name) for name in CHECKPOINT_DTYPES}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
QUANTIZED_ST_DTYPES = {"U8": torch.uint8}  # read only as MXFP4 blocks and scales (parity.hf.mxfp4)


def read_json(path: Path, what: str) -> Any:
    """A JSON file, refused with a ValueError when missing, too large or malformed."""
    if not path.is_file():
        raise ValueError(f"{path.parent}: no {path.name} ({what})")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes is too large for {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err


class WeightFiles:
    """The tensors of an HF directory: `shapes` (name -> (shape, dtype)) from the headers alone,
    and `get(name)` reading one tensor."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._file_of: dict[str, Path] = {}
        self._spans: dict[tuple[Path, str], tuple[int, int]] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self.kind = self._find()

    def _find(self) -> str:
        d = self.directory
        if (d / SAFETENSORS_INDEX).is_file():
            self._index(d / SAFETENSORS_INDEX, self._add_safetensors)
            return "sharded safetensors"
        if (d / SAFETENSORS).is_file():
            self._add_safetensors(d / SAFETENSORS, None)
            return "safetensors"
        if (d / BIN_INDEX).is_file():
            self._index(d / BIN_INDEX, self._add_bin)
            return "sharded pytorch_model.bin"
        if (d / BIN).is_file():
            self._add_bin(d / BIN, None)
            return "pytorch_model.bin"
        raise ValueError(
            f"{d}: no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or {BIN_INDEX}"
        )

    def _index(self, path: Path, add: Callable[[Path, set[str] | None], None]) -> None:
        index = read_json(path, "the shard index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise ValueError(f"{path}: expected {{'weight_map': {{tensor name: shard file}}}}")
        shards: dict[str, set[str]] = {}
        for name, shard in weight_map.items():
            if Path(shard).name != shard or shard in ("", ".", ".."):
                raise ValueError(f"{path}: shard {shard!r} must be a file name in {path.parent}")
            shards.setdefault(shard, set()).add(name)
        missing = sorted(s for s in shards if not (self.directory / s).is_file())
        if missing:
            raise ValueError(f"{path}: shard(s) named in the index but missing: {missing}")
        for shard, names in shards.items():
            add(self.directory / shard, names)

    def _add(self, path: Path, found: dict, listed: set[str] | None) -> None:
        if listed is not None:
            absent = sorted(listed - set(found))
            if absent:
                raise ValueError(f"{path}: tensors the index puts here are not in it: {absent[:5]}")
            found = {k: v for k, v in found.items() if k in listed}
        for name, shape_dtype in found.items():
            if name in self.shapes:
                raise ValueError(f"{path}: tensor {name!r} is also in {self._file_of[name]}")
            self.shapes[name] = shape_dtype
            self._file_of[name] = path

    def _add_safetensors(self, path: Path, listed: set[str] | None) -> None:
        header = safetensors_header(path)
        self._spans.update({(path, name): entry[2:] for name, entry in header.items()})
        self._add(path, {name: entry[:2] for name, entry in header.items()}, listed)

    def _add_bin(self, path: Path, listed: set[str] | None) -> None:
        tensors = load_bin(path)
        self._bins[path] = tensors
        self._add(path, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, listed)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its file into new memory (a plain read, no memory map, so
        the process holds only the tensors it keeps), or the .bin's tensor."""
        path = self._file_of[name]
        if path in self._bins:
            return self._bins[path][name]
        shape, dtype = self.shapes[name]
        first, count = self._spans[(path, name)]
        with open(path, "rb") as f:
            f.seek(first)
            data = bytearray(count)
            if f.readinto(data) != count:
                raise ValueError(f"{path}: truncated while reading {name!r}")
        if count == 0:
            return torch.zeros(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)

    def mapped(self, name: str) -> torch.Tensor:
        """One tensor as a private (copy-on-write) memory map of its bytes in the file: nothing
        is read until the tensor is used, and writes to it stay in this process. The file must
        not be changed in place while the tensor lives (a new file written over it by rename, as
        `to_hf` and `parity.save` do, is safe). A .bin's tensor as `get` gives it."""
        path = self._file_of[name]
        if path in self._bins:
            return self._bins[path][name]
        shape, dtype = self.shapes[name]
        first, count = self._spans[(path, name)]
        if count == 0:
            return torch.zeros(shape, dtype=dtype)
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(
            self._maps[path], dtype=dtype, count=count // dtype.itemsize, offset=first
        )
        return flat.view(shape)

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Read one tensor's bytes straight into `out`, a contiguous NumPy array of as many
        bytes that the caller keeps (its dtype and shape are the caller's): one copy from the
        file, nothing in between."""
        path = self._file_of[name]
        if path in self._bins:
            source = self._bins[path][name].contiguous().view(-1).view(torch.uint8).numpy()
            out.reshape(-1).view(np.uint8)[:] = source
            return
        first, count = self._spans[(path, name)]
        if out.nbytes != count or not out.flags.c_contiguous:
            raise ValueError(f"{name!r} holds {count} bytes, cannot be read into {out.nbytes}")
        with open(path, "rb") as f:
            f.seek(first)
            if count and f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != count:
                raise ValueError(f"{path}: truncated while reading {name!r}")


def safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype, int, int]]:
    """name -> (shape, torch dtype, first byte, byte count) of a safetensors file's float
    tensors (and uint8 ones, which only MXFP4 blocks and scales may be), from its header checked
    against the file's size; other dtypes are refused."""
    out = {}
    dtypes = {**ST_DTYPES, **QUANTIZED_ST_DTYPES}
    for name, entry in read_safetensors_header(path).tensors.items():
        if entry.dtype not in dtypes:
            raise ValueError(
                f"{path}: {name!r} is {entry.dtype}; only float weights ({', '.join(ST_DTYPES)}) "
                "are supported (quantized or integer weights are not, but GPT-OSS's MXFP4)"
            )
        out[name] = (entry.shape, dtypes[entry.dtype], entry.first, entry.count)
    return out


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin state_dict through torch.load(weights_only=True), memory-mapped
    where the file allows; anything but a dict of float tensors is refused."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"{path}: torch.load(weights_only=True) cannot read it: truncated, corrupt, or "
            f"holding objects other than tensors (no code was run): {first}"
        ) from err
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError(f"{path}: expected a state_dict (tensor name -> tensor)")
    bad = sorted(k for k, v in obj.items() if v.dtype not in ST_NAMES)
    if bad:
        raise ValueError(f"{path}: only float weights are supported, got {bad[:3]} of other dtypes")
    return obj


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "200MB", "2GiB" (as save_pretrained)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        units = {
            "KIB": 1 << 10,
            "MIB": 1 << 20,
            "GIB": 1 << 30,
            "KB": 10**3,
            "MB": 10**6,
            "GB": 10**9,
            "B": 1,
        }
        text = size.strip().upper()
        unit = next((u for u in units if text.endswith(u)), None)
        try:
            value = int(float(text[: -len(unit)] if unit else text) * (units[unit] if unit else 1))
        except ValueError:
            value = -1
    else:
        value = -1
    if value < 1:
        raise ValueError(f"max_shard_size must be a positive size such as '5GB', got {size!r}")
    return value


def shard_names(sizes: Iterable[int], limit: int) -> Iterator[int]:
    """The shard number of each tensor, in order: a new shard when the next would pass `limit`."""
    shard, used = 0, 0
    for size in sizes:
        if used and used + size > limit:
            shard, used = shard + 1, 0
        used += size
        yield shard


def remove_stale(directory: Path, keep: set[str]) -> None:
    """Remove weight files of an earlier save that are not in `keep` (as save_pretrained does)."""
    for path in directory.iterdir():
        name = path.name
        is_weights = name in (SAFETENSORS, SAFETENSORS_INDEX, BIN, BIN_INDEX) or (
            name.startswith("model-") and name.endswith(".safetensors")
        )
        if is_weights and name not in keep and path.is_file():
            os.remove(path)
