"""Atomic file writes, the weights digest that every checkpoint file carries, and safetensors
files read header first and written one tensor at a time (NumPy or raw bytes, no framework)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import secrets
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any] | bytes) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over `path`.

    `write` is the bytes, or a function that writes to the open file. On any error the
    temporary file is removed and `path` is left as it was. A missing folder is a
    FileNotFoundError naming the folder.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {str(path.parent)!r} does not exist (writing {path})")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(write, (bytes, bytearray)):
                f.write(write)
            else:
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


def digest(arrays: Mapping[str, Any]) -> str:
    """sha256 over names, shapes and raw bytes of arrays (NumPy, or anything with .numpy()).

    bfloat16 arrays are hashed by their raw bytes, so a torch tensor and its NumPy copy give
    the same digest.
    """
    h = hashlib.sha256()
    for name in sorted(arrays):
        raw = raw_bytes(arrays[name])
        h.update(f"{name} {tuple(arrays[name].shape)} {raw.size}\n".encode())
        h.update(raw)
    return h.hexdigest()


def raw_bytes(array: Any) -> np.ndarray:
    """The array's bytes as a flat uint8 NumPy array (torch tensors of any dtype included)."""
    if hasattr(array, "detach"):  # a torch tensor: bytes through a uint8 view, bfloat16 too
        tensor = array.detach().cpu().contiguous().reshape(-1)
        return tensor.view(sys.modules["torch"].uint8).numpy()
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


# --------------------------------------------------------------------------- safetensors
SAFETENSORS_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
SAFETENSORS_NAMES = {  # an array's dtype name (NumPy, ml_dtypes or torch) -> safetensors' name
    "float64": "F64",
    "float32": "F32",
    "bfloat16": "BF16",
    "float16": "F16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor of a safetensors file lies: safetensors dtype name, shape, and its
    bytes as (first byte counted from the file's start, byte count)."""

    dtype: str
    shape: tuple[int, ...]
    first: int
    count: int


@dataclasses.dataclass(frozen=True)
class SafetensorsHeader:
    """A safetensors file's header: its tensors (name -> TensorEntry) and `__metadata__`."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """The header of a safetensors file, checked against the file's size before any tensor is
    read (so a truncated file is refused before a large allocation); ValueError naming what is
    wrong."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated: {size} bytes, no safetensors header")
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise ValueError(
                f"{path}: truncated or not safetensors: header of {length} bytes, file of {size}"
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: safetensors header is not valid JSON: {err}") from err
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: safetensors __metadata__ must be a JSON object")
    data_bytes = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            numel = math.prod(shape)
            ok = all(isinstance(n, int) and n >= 0 for n in (*shape, start, end))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok or dtype not in SAFETENSORS_ITEMSIZE:
            raise ValueError(f"{path}: malformed header entry for {name!r}: {entry!r}")
        if end - start != numel * SAFETENSORS_ITEMSIZE[dtype]:
            raise ValueError(f"{path}: malformed header entry for {name!r}: {entry!r}")
        if end > data_bytes:
            raise ValueError(
                f"{path}: truncated: {name!r} ends at byte {end} of the data, "
                f"the file holds {data_bytes}"
            )
        tensors[name] = TensorEntry(dtype, tuple(shape), 8 + length + start, end - start)
    return SafetensorsHeader(tensors, dict(metadata))


def safetensors_dtype(array: Any) -> str:
    """The safetensors name of an array's dtype (NumPy, ml_dtypes or torch): "F32", "BF16"..."""
    return SAFETENSORS_NAMES[str(array.dtype).removeprefix("torch.")]


def write_safetensors(
    path: str | os.PathLike,
    tensors: list[tuple[str, Callable[[], Any], tuple[int, ...], str]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write (name, make array, shape, safetensors dtype name) entries as one safetensors file,
    atomically, making and writing one array at a time (no copy of the whole file in memory);
    returns the bytes of tensor data. Arrays are NumPy arrays or anything `raw_bytes` reads.
    `metadata` defaults to transformers' {"format": "pt"}."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"} if metadata is None else metadata}
    offset = 0
    for name, _, shape, dtype in tensors:
        nbytes = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    if len(encoded) > MAX_HEADER_BYTES:  # a file no reader would open: refused before writing
        raise ValueError(
            f"{path}: the safetensors header (names, shapes, metadata) would be {len(encoded)} "
            f"bytes, above the format's limit of {MAX_HEADER_BYTES}"
        )

    def write(f: BinaryIO) -> None:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name, make, shape, dtype in tensors:
            array = make()
            made = (tuple(array.shape), safetensors_dtype(array))
            if made != (tuple(shape), dtype):
                raise ValueError(f"{name}: made {made[0]} {made[1]}, expected {shape} {dtype}")
            f.write(raw_bytes(array).data)

    atomic_write(path, write)
    return offset
