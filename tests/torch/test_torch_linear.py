"""torch_block.linear.linear: F.linear's product, through oneDNN for large float32 weights in
inference (accurate to float32 against a float64 reference), F.linear itself otherwise (bit for
bit: the original project's arithmetic at its sizes, and every training step)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torch_block.linear import LARGE_WEIGHT, linear

IN = 1024
LARGE_OUT = LARGE_WEIGHT // IN + 4  # just over the threshold


def tensors(out: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, IN, generator=generator).to(dtype)
    weight = (torch.randn(out, IN, generator=generator) / IN**0.5).to(dtype)
    bias = torch.randn(out, generator=generator).to(dtype)
    return x, weight, bias


@pytest.mark.parametrize("with_bias", [True, False])
def test_large_float32_weight_in_inference_is_the_float64_product(with_bias):
    x, weight, bias = tensors(LARGE_OUT)
    bias = bias if with_bias else None
    with torch.inference_mode():
        out = linear(x, weight, bias)
    expected = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    assert out.shape == (3, 5, LARGE_OUT) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5)


def test_small_weights_and_training_keep_f_linear_bit_for_bit():
    x, weight, bias = tensors(64)
    with torch.inference_mode():
        assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))
    x, weight, bias = tensors(LARGE_OUT)
    weight.requires_grad_(True)
    out = linear(x, weight, bias)  # autograd on: F.linear, with its gradient
    assert torch.equal(out, F.linear(x, weight, bias))
    out.sum().backward()
    torch.testing.assert_close(weight.grad, x.reshape(-1, IN).sum(0).expand(LARGE_OUT, IN))


def test_large_bfloat16_weight_keeps_f_linear():
    x, weight, bias = tensors(LARGE_OUT, torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))
