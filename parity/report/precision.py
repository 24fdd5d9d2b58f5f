"""Full float32 matmul precision in JAX and torch for the duration of a `with` block.

float32 parity needs float32 matmuls. On GPUs, JAX computes float32 matmuls in TF32 (a 10-bit
mantissa) by default, which alone gives errors near 1e-3; torch does so after
`torch.backends.cuda.matmul.allow_tf32 = True` or `torch.set_float32_matmul_precision("high")`,
and "medium" gives bfloat16 matmuls through oneDNN on CPUs too. `full_precision()` sets JAX's
default matmul precision to "highest" and torch's float32 matmul precision to "highest"
(`allow_tf32` False, every backend IEEE float32), then restores each setting as it was: the
global precision and, on torch >= 2.9, each backend's `fp32_precision`. Every report case and
`assert_parity` run inside it; on a CPU with default settings it changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import torch


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """float32 matmuls at full precision in JAX and torch inside the block; settings restored."""
    with _torch_full_precision(), jax.default_matmul_precision("highest"):
        yield


def _matmul_backends() -> tuple:
    """torch's per-backend float32 matmul settings (torch >= 2.9), or () before them."""
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    return backends if all(hasattr(b, "fp32_precision") for b in backends) else ()


def _global_precision() -> str | None:
    """torch's global float32 matmul precision, or None where torch refuses to read it (the
    per-backend settings contradict it)."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


@contextlib.contextmanager
def _torch_full_precision() -> Iterator[None]:
    backends = _matmul_backends()
    per_backend = [backend.fp32_precision for backend in backends]
    precision = _global_precision()
    allow_tf32 = None if backends else torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")  # every backend IEEE float32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        if precision is not None:
            torch.set_float32_matmul_precision(precision)
        if allow_tf32 is not None:  # torch < 2.9 keeps it apart from the precision
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        for backend, value in zip(backends, per_backend, strict=True):
            backend.fp32_precision = value
