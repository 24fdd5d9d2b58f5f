"""The dtypes the twins are compared, converted and stored in, by name, in each framework."""

from __future__ import annotations

import jax.numpy as jnp
import torch

DTYPES = ("float32", "bfloat16")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_name(dtype: object) -> str:
    """The name of a torch, JAX or NumPy dtype: "float32", "bfloat16", ..."""
    return str(dtype).removeprefix("torch.")
