"""The norms a block may use: LayerNorm (scale and bias), RMSNorm and Gemma's RMSNorm (scale
only)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .sharding import AxisNamedModule, named_init


class GemmaRMSNorm(AxisNamedModule):
    """x * rsqrt(mean(x^2) + eps) * (1 + scale) in float32, rounded once to `dtype`; the scale
    starts at 0."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    axis: str = "embed"  # the logical name of the normed axis

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., dim) -> (..., dim) in `dtype`."""
        init = named_init(nn.initializers.zeros_init(), self.axis)
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(
            jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon
        )
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)


def make_norm(
    kind: str,
    eps: float,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    name: str,
    axis: str = "embed",
):
    """The norm of `kind` ("layernorm", "rmsnorm" or "gemma_rmsnorm") over the last axis, whose
    logical name is `axis`; statistics in float32.

    LayerNorm uses the two-pass variance, as torch computes it (Flax's default fast variance
    loses digits on inputs with a large mean).
    """
    common = dict(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)
    if kind == "gemma_rmsnorm":
        return GemmaRMSNorm(axis=axis, **common)
    scale_init = named_init(nn.initializers.ones_init(), axis)
    if kind == "layernorm":
        bias_init = named_init(nn.initializers.zeros_init(), axis)
        return nn.LayerNorm(
            use_fast_variance=False, scale_init=scale_init, bias_init=bias_init, **common
        )
    return nn.RMSNorm(scale_init=scale_init, **common)
