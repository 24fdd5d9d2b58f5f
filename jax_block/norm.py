"""The two norms a block may use: LayerNorm (scale and bias) and RMSNorm (scale only)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from .sharding import named_init


def make_norm(
    kind: str,
    eps: float,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    name: str,
    axis: str = "embed",
):
    """The norm of `kind` ("layernorm" or "rmsnorm") over the last axis, whose logical name is
    `axis`; statistics in float32.

    LayerNorm uses the two-pass variance, as torch computes it (Flax's default fast variance
    loses digits on inputs with a large mean).
    """
    common = dict(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)
    scale_init = named_init(nn.initializers.ones_init(), axis)
    if kind == "layernorm":
        bias_init = named_init(nn.initializers.zeros_init(), axis)
        return nn.LayerNorm(
            use_fast_variance=False, scale_init=scale_init, bias_init=bias_init, **common
        )
    return nn.RMSNorm(scale_init=scale_init, **common)
