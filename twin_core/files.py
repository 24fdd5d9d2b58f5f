"""Atomic file writes and the weights digest that every checkpoint file carries."""

from __future__ import annotations

import contextlib
import hashlib
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
