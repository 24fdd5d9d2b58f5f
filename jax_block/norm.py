"""The two norms a block may use: LayerNorm (scale and bias) and RMSNorm (scale only)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


def make_norm(kind: str, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype, name: str):
    """The norm of `kind` ("layernorm" or "rmsnorm"); statistics in float32.

    LayerNorm uses the two-pass variance, as torch computes it (Flax's default fast variance
    loses digits on inputs with a large mean).
    """
    common = dict(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)
    if kind == "layernorm":
        return nn.LayerNorm(use_fast_variance=False, **common)
    return nn.RMSNorm(**common)
