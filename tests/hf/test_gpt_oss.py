"""GPT-OSS's MXFP4 expert weights (parity.hf.mxfp4), against transformers' own dequantization.

The family itself (sinks, clamped SwiGLU, router bias, stacked experts, sliding and full
layers, yarn) is in test_hf.py's every-family tests (logits, greedy, round trips); here: the
MXFP4 blocks and scales, read from a folder built in the test, and what is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import hf_models
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import parity
from parity.hf import HFCheckpoint
from parity.hf.mxfp4 import dequantize_mxfp4
from parity.report.cases import hf as hf_cases

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
IDS = torch.randint(0, hf_models.VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))


def random_mxfp4(shape: tuple[int, ...], generator: torch.Generator, low: int = 0, high: int = 256):
    """Random blocks (..., G, 16) and scales (...) of uint8 for a weight of `shape`'s rows."""
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(low, high, shape, dtype=torch.uint8, generator=generator)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_is_bit_exact_to_transformers(dtype):
    """Every nibble and every exponent (scales over all of uint8: 2 ** -127 .. 2 ** 128, so
    underflow, overflow to inf and 0 * 2 ** 128 are all met), in each dtype."""
    generator = torch.Generator().manual_seed(0)
    blocks, scales = random_mxfp4((3, 40, 2), generator)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    ours = dequantize_mxfp4(blocks, scales, dtype)
    assert ours.dtype == expected.dtype == dtype and ours.shape == expected.shape == (3, 64, 40)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(ours.view(bits), expected.view(bits))


def test_dequantize_refuses_what_does_not_fit():
    blocks, scales = random_mxfp4((2, 4, 1), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="do not fit"):
        dequantize_mxfp4(blocks, scales[:, :3], torch.float32)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_mxfp4(blocks.int(), scales, torch.float32)


@pytest.fixture(scope="module")
def mxfp4_folder(tmp_path_factory):
    """(MXFP4 folder, transformers' model holding the dequantized experts): a tiny GPT-OSS
    (widths multiples of 32) whose experts are random MXFP4 blocks and scales near 2 ** 0."""
    model = hf_models.build("gpt_oss", intermediate_size=32)
    directory = hf_models.save(model, tmp_path_factory.mktemp("gpt_oss_mxfp4"))
    tensors = load_file(directory / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for name in EXPERT_WEIGHTS:
                weight = getattr(layer.mlp.experts, name)  # (E, in, out)
                E, fan_in, out = weight.shape
                blocks, scales = random_mxfp4((E, out, fan_in // 32), generator, 124, 127)
                weight.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
                key = f"model.layers.{i}.mlp.experts.{name}"
                del tensors[key]
                tensors[f"{key}_blocks"], tensors[f"{key}_scales"] = blocks, scales
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router"],
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory, model


def test_mxfp4_folder_loads_as_the_dequantized_model(mxfp4_folder, tmp_path):
    """Both frameworks, float32 logits within 1e-5 of transformers' model on the dequantized
    experts; the export is plain float32, which transformers reads back to the same logits."""
    directory, reference = mxfp4_folder
    with torch.no_grad():
        expected = reference(IDS).logits.numpy()
    assert np.abs(expected).max() > 1.0
    lm = parity.from_hf(directory)
    with torch.no_grad():
        np.testing.assert_allclose(lm(IDS).numpy(), expected, atol=1e-5, rtol=1e-6)
    flax_lm, params = parity.from_hf(directory, "jax")
    jax_logits = flax_lm.apply({"params": params}, jnp.asarray(IDS.numpy(), jnp.int32))
    np.testing.assert_allclose(np.asarray(jax_logits), expected, atol=1e-5, rtol=1e-6)

    parity.to_hf(lm, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert not any(k.endswith(("_blocks", "_scales")) for k in written)
    for name in EXPERT_WEIGHTS:
        stored = written[f"model.layers.1.mlp.experts.{name}"]
        assert torch.equal(stored, getattr(reference.model.layers[1].mlp.experts, name))
    reloaded = hf_models.load(tmp_path / "out")
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(IDS).logits.numpy(), expected)


def test_mxfp4_dequantizes_into_the_requested_dtype(mxfp4_folder):
    """bfloat16: the experts are transformers' bfloat16 dequantization, bit for bit (not the
    float32 one rounded)."""
    directory, _ = mxfp4_folder
    lm = parity.from_hf(directory, dtype="bfloat16")
    tensors = load_file(directory / "model.safetensors")
    key = "model.layers.0.mlp.experts.gate_up_proj"
    expected = convert_moe_packed_tensors(
        tensors[f"{key}_blocks"], tensors[f"{key}_scales"], dtype=torch.bfloat16
    )  # (E, d_model, 2 d_ff), gate and up interleaved
    expert = lm.blocks[0].feed_forward.experts[1]
    assert expert.fc1.weight.dtype == torch.bfloat16
    assert torch.equal(expert.fc1.weight, expected[1, :, 0::2].t())
    assert torch.equal(expert.fc3.weight, expected[1, :, 1::2].t())


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantized weights"),
        ({"quantization_config": None}, "is uint8"),  # blocks without the config that says so
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_refused(mxfp4_folder, tmp_path, edit, match):
    directory, _ = mxfp4_folder
    copy = Path(tmp_path / "copy")
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    config = {**json.loads((directory / "config.json").read_text()), **edit}
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        parity.from_hf(copy)


def test_check_hf_on_an_mxfp4_folder(mxfp4_folder, monkeypatch):
    """`check --hf`'s report on an MXFP4 folder: the transformers model it compares against
    holds the dequantized experts (the fixture's, bit for bit), and every row (logits, cached
    decode, greedy; both twins against transformers and each other) passes in float32."""
    directory, reference = mxfp4_folder
    loaded = []
    load = hf_cases._transformers
    monkeypatch.setattr(hf_cases, "_transformers", lambda *a: loaded.append(load(*a)) or loaded[0])
    rows, env = hf_cases.hf_report(HFCheckpoint(directory), seed=0)
    for ours, theirs in zip(loaded[0].model.layers, reference.model.layers, strict=True):
        for name in EXPERT_WEIGHTS:
            weight = getattr(ours.mlp.experts, name)
            assert weight.dtype == torch.float32
            assert torch.equal(weight, getattr(theirs.mlp.experts, name))
    assert env["transformers"] != "not installed"
    assert [row.case for row in rows if "transformers" in row.case] == [
        "logits: torch_block vs transformers",
        "logits: jax_block vs transformers",
        "cached decode: torch_block vs transformers",
        "cached decode: jax_block vs transformers",
        "greedy: torch_block vs transformers",
        "greedy: jax_block vs transformers",
    ]
    assert len(rows) == 8 and all(row.passed for row in rows), [
        (row.case, row.max_abs_error) for row in rows if not row.passed
    ]
