"""The position-wise feed-forward network: fc1 -> exact GELU -> dropout -> fc2."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class FeedForward(nn.Module):
    """Two linear layers with an exact (erf) GELU between them."""

    d_model: int
    d_ff: int
    dropout: float = 0.1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """x (..., d_model) -> (..., d_model)."""
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = jax.nn.gelu(nn.Dense(self.d_ff, name="fc1", **dense)(x), approximate=False)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return nn.Dense(self.d_model, name="fc2", **dense)(h)
