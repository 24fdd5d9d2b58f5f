"""Rotary position embedding constants, computed once in NumPy for both frameworks.

The arithmetic is transformers' (`ROPE_INIT_FUNCTIONS` and the default rope of its models),
in float32 where transformers computes in float32 and in Python floats where it does. What
depends on the sequence length (dynamic NTK, longrope's long factors) is left to the twins'
`rope.frequencies`, from the constants of `RopeTables` (docs/design.md section 8).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .config import RopeScaling, rotary_dims


class DynamicNTK(NamedTuple):
    """Dynamic NTK frequencies at sequence length s > the original length L:
    1 / base(s) ** exponent, base(s) = theta * (factor * s / L - (factor - 1)) ** power."""

    theta: float
    factor: float
    power: float  # dims / (dims - 2)
    exponent: Any  # (dims / 2,) float32: arange(0, dims, 2) / dims

    def inv_freq(self, seq_len: Any, original_length: int) -> Any:
        """The frequencies 1 / base(s) ** exponent at float32 lengths `seq_len` (an array of
        either framework, (..., 1)): (..., dims / 2), in the array's framework."""
        scale = self.factor * seq_len / original_length - (self.factor - 1)
        base = self.theta * scale**self.power  # (..., 1) float32
        return 1.0 / base**self.exponent


class RopeTables(NamedTuple):
    """How rope rotates a head: its first `rotary_dims` dims by angles position * inv_freq, cos
    and sin multiplied by `attention_factor`, the other dims unchanged.

    With `original_length` (dynamic, longrope) a sequence longer than it (max position + 1 >
    original_length) rotates with other frequencies: `long_inv_freq` (longrope), or those of
    `ntk` (dynamic). The arrays are NumPy here; the torch twin holds them as tensors.
    """

    rotary_dims: int
    inv_freq: Any  # (rotary_dims / 2,) float32
    attention_factor: float = 1.0
    original_length: int | None = None
    long_inv_freq: Any = None  # (rotary_dims / 2,) float32, longrope
    ntk: DynamicNTK | None = None

    def inv_freq_at(self, seq_len: Any, where: Callable[[Any, Any, Any], Any]) -> Any:
        """The frequencies of rows of float32 lengths `seq_len` (B|1, 1, 1), an array of either
        framework: `inv_freq` up to `original_length`, beyond it `long_inv_freq` or `ntk`'s, as
        transformers' `dynamic_rope_update` picks them; `where` is the framework's where."""
        if self.ntk is None:
            beyond = self.long_inv_freq
        else:
            beyond = self.ntk.inv_freq(seq_len, self.original_length)  # (B|1, 1, n)
        return where(seq_len > self.original_length, beyond, self.inv_freq)


def _default(dims: int, theta: float) -> np.ndarray:
    """theta^(-2i/dims), i < dims / 2, in float32."""
    exponent = np.arange(0, dims, 2, dtype=np.int64).astype(np.float32) / np.float32(dims)
    return (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)


def _llama3(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    old_context = s.original_max_position_embeddings
    low_freq_wavelen = old_context / s.low_freq_factor
    high_freq_wavelen = old_context / s.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(s.factor), inv_freq)
    smooth = (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_softmax_scale(qk_head_dim: int, scaling: RopeScaling | None) -> float:
    """MLA's score factor: qk_head_dim ** -0.5, times mscale^2 where a yarn scaling has
    mscale_all_dim (mscale = 0.1 * mscale_all_dim * ln(factor) + 1), as transformers'
    `yarn_apply_mscale` folds it in."""
    scale = qk_head_dim**-0.5
    if scaling is not None and scaling.rope_type == "yarn" and scaling.mscale_all_dim:
        mscale = _mscale(scaling.factor, scaling.mscale_all_dim)
        scale = scale * mscale * mscale
    return scale


def _yarn(dims: int, theta: float, s: RopeScaling) -> tuple[np.ndarray, float]:
    factor = s.factor
    if s.attention_factor is not None:
        attention_factor = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attention_factor = float(_mscale(factor, s.mscale) / _mscale(factor, s.mscale_all_dim))
    else:
        attention_factor = _mscale(factor)
    beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1
    original = s.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dims * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.truncate is None or s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    exponent = np.arange(0, dims, 2).astype(np.float32) / np.float32(dims)
    pos_freqs = np.power(np.float32(theta), exponent).astype(np.float32)
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    ramp = (np.arange(dims // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    extrapolation_factor = np.float32(1) - np.clip(ramp, 0, 1).astype(np.float32)
    inv_freq = (
        interpolation * (np.float32(1) - extrapolation_factor)
        + extrapolation * extrapolation_factor
    )
    return inv_freq.astype(np.float32), attention_factor


def _longrope_factor(s: RopeScaling) -> float:
    if s.attention_factor is not None:
        return s.attention_factor
    if s.factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(s.factor) / math.log(s.original_max_position_embeddings))


def _scaled_by(factors: tuple[float, ...], dims: int, theta: float) -> np.ndarray:
    exponent = np.arange(0, dims, 2, dtype=np.int64).astype(np.float32) / np.float32(dims)
    powers = np.power(np.float32(theta), exponent).astype(np.float32)
    return (np.float32(1.0) / (np.asarray(factors, np.float32) * powers)).astype(np.float32)


def rope_tables(
    head_dim: int,
    theta: float,
    scaling: RopeScaling | None,
    partial_rotary_factor: float = 1.0,
) -> RopeTables:
    """The constants of rope over heads of `head_dim` with base `theta` and `scaling`."""
    dims = rotary_dims(head_dim, partial_rotary_factor)
    if scaling is None:
        return RopeTables(dims, _default(dims, theta))
    kind = scaling.rope_type
    if kind == "llama3":
        return RopeTables(dims, _llama3(_default(dims, theta), scaling))
    if kind == "linear":
        return RopeTables(dims, (_default(dims, theta) / np.float32(scaling.factor)))
    original = scaling.original_max_position_embeddings
    if kind == "dynamic":
        factor, power = scaling.factor, dims / (dims - 2)
        # at the original length, as transformers computes it at init (in Python floats)
        base = theta * ((factor * original / original) - (factor - 1)) ** power
        exponent = np.arange(0, dims, 2, dtype=np.int64).astype(np.float32) / np.float32(dims)
        ntk = DynamicNTK(theta, factor, power, exponent)
        return RopeTables(dims, _default(dims, base), original_length=original, ntk=ntk)
    if kind == "yarn":
        inv_freq, attention_factor = _yarn(dims, theta, scaling)
        return RopeTables(dims, inv_freq, attention_factor)
    return RopeTables(  # longrope
        dims,
        _scaled_by(scaling.short_factor, dims, theta),
        _longrope_factor(scaling),
        original_length=original,
        long_inv_freq=_scaled_by(scaling.long_factor, dims, theta),
    )


def inv_frequencies(
    head_dim: int,
    theta: float,
    scaling: RopeScaling | None,
    partial_rotary_factor: float = 1.0,
) -> np.ndarray:
    """inv_freq (rotated dims / 2,) float32 of sequences no longer than the original length
    (every sequence for the types that do not depend on it)."""
    return rope_tables(head_dim, theta, scaling, partial_rotary_factor).inv_freq


def recompute_position(scaling: RopeScaling | None) -> int | None:
    """The position at which `generate` recomputes a row's whole sequence (longrope: the
    original length, where the long factors take over, as transformers' Phi-3 generate
    does); None for the other types, whose cached keys keep the rotation they were written
    with."""
    if scaling is None or scaling.rope_type != "longrope":
        return None
    return scaling.original_max_position_embeddings
