"""The position-wise feed-forward network: fc1 -> activation [* fc3] -> dropout -> fc2."""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from .sharding import AxisNamedModule, constrain, dense_axes

ACTIVATIONS = {
    "gelu": partial(jax.nn.gelu, approximate=False),  # exact (erf)
    "gelu_tanh": partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def clamped_swiglu(gate: jax.Array, up: jax.Array, limit: float, alpha: float) -> jax.Array:
    """GPT-OSS's gated unit: (clamp(up, -l, l) + 1) * g * sigmoid(alpha * g), g = clamp(gate,
    max=l)."""
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))


class FeedForward(AxisNamedModule):
    """fc2(dropout(act(fc1(x)))), or with `gated` fc2(dropout(act(fc1(x)) * fc3(x))) (SwiGLU).

    The default is the original project's: exact GELU, not gated, with biases. With
    `swiglu_limit` (gated) the unit is GPT-OSS's `clamped_swiglu` of fc1 (gate) and fc3 (up).
    The hidden units (logical axis "mlp") are what tensor parallelism splits: fc1 and fc3 by
    columns, fc2 by rows, so one all-reduce joins the partial sums after fc2.
    """

    d_model: int
    d_ff: int
    dropout: float = 0.1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    activation: str = "gelu"
    gated: bool = False
    bias: bool = True
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """x (..., d_model) -> (..., d_model)."""
        dense = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype)
        up = dict(features=self.d_ff, **dense, **dense_axes("embed", "mlp"))
        if self.swiglu_limit is not None and not self.gated:
            raise ValueError("swiglu_limit needs gated=True (the clamped SwiGLU has an up path)")
        if self.swiglu_limit is not None:
            gate, h_up = nn.Dense(name="fc1", **up)(x), nn.Dense(name="fc3", **up)(x)
            h = clamped_swiglu(gate, h_up, self.swiglu_limit, self.swiglu_alpha)
        else:
            h = ACTIVATIONS[self.activation](nn.Dense(name="fc1", **up)(x))
            if self.gated:
                h = h * nn.Dense(name="fc3", **up)(x)
        if h.ndim == 3:
            h = constrain(h, ("batch", "length", "mlp"))  # (B, T, d_ff)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return nn.Dense(self.d_model, name="fc2", **dense, **dense_axes("mlp", "embed"))(h)
