"""MXFP4 expert weights of GPT-OSS checkpoints: `*_blocks` and `*_scales` dequantized on load.

A weight (E, in, out) is stored as `{name}_blocks` (E, out, in / 32, 16) uint8, two 4-bit
values a byte (the low nibble first), and `{name}_scales` (E, out, in / 32) uint8, one power
of two per group of 32 values (the exponent biased by 127). Dequantized exactly as
transformers' MXFP4 integration does (`convert_moe_packed_tensors`): each nibble through the
FP4 table in the target dtype, times 2 ** (scale - 127) (`torch.ldexp`, rounded once into the
target dtype), the groups joined and the last two axes swapped.
"""

from __future__ import annotations

import torch

# the 16 values of a 4-bit E2M1 float, by its bits (sign, two exponent bits, one mantissa bit)
FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)
GROUP = 32  # values per scale: 16 bytes of blocks
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"


def dequantized_shape(blocks: tuple[int, ...], scales: tuple[int, ...]) -> tuple[int, ...]:
    """The shape (..., G * 32, R) of the weight that blocks (..., R, G, 16) and scales
    (..., R, G) hold; ValueError when they do not fit each other."""
    if len(blocks) < 3 or blocks[-1] != GROUP // 2 or tuple(blocks[:-1]) != tuple(scales):
        raise ValueError(
            f"MXFP4 blocks of shape {tuple(blocks)} and scales of shape {tuple(scales)} do not "
            f"fit: expected blocks (..., R, G, {GROUP // 2}) and scales (..., R, G)"
        )
    return (*blocks[:-3], blocks[-2] * GROUP, blocks[-3])


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The weight (..., G * 32, R) in `dtype` of uint8 blocks (..., R, G, 16) and uint8 scales
    (..., R, G), bit for bit as transformers dequantizes it."""
    for name, tensor in (("blocks", blocks), ("scales", scales)):
        if tensor.dtype != torch.uint8:
            raise TypeError(f"MXFP4 {name} must be uint8, got {tensor.dtype}")
    shape = dequantized_shape(tuple(blocks.shape), tuple(scales.shape))
    table = torch.tensor(FP4_VALUES, dtype=dtype)
    values = torch.empty((*blocks.shape[:-1], GROUP), dtype=dtype)  # (..., R, G, 32)
    values[..., 0::2] = table[(blocks & 0x0F).long()]
    values[..., 1::2] = table[(blocks >> 4).long()]
    exponents = scales.to(torch.int32)[..., None] - 127  # (..., R, G, 1)
    torch.ldexp(values, exponents, out=values)
    rows = values.reshape(*blocks.shape[:-2], shape[-2])  # (..., R, G * 32)
    return rows.transpose(-1, -2).contiguous()  # (..., G * 32, R)
