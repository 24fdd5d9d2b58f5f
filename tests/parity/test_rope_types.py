"""Every rope type and partial rotary against transformers' own rotary embeddings, in both twins.

transformers is the reference: its `ROPE_INIT_FUNCTIONS` give the frequencies and attention
factor, and its rotary embedding module (stateful: `dynamic_rope_update` recomputes the
frequencies per call) with its `apply_rotary_pos_emb` rotates q through a prefill and decode
steps that cross the original length. Ours: `twin_core.rope_tables` and each twin's
`apply_rope`, whose frequencies depend on the positions of the call alone.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_block.rope
import torch_block.rope
from torch_block.attention import MultiHeadAttention
from twin_core import RopeScaling, rope_tables

ORIGINAL = 16  # the original (pretraining) length of the scaled types
STEPS = 6  # decode steps after a prefill of ORIGINAL - 3 positions: the last ones are past it

# name -> (transformers' rope parameters without rope_theta, head_dim, theta, partial factor)
CASES = {
    "linear 2": (dict(rope_type="linear", factor=2.0), 8, 10000.0, 1.0),
    "linear 4.5": (dict(rope_type="linear", factor=4.5), 16, 500.0, 1.0),
    "dynamic 2": (dict(rope_type="dynamic", factor=2.0), 8, 10000.0, 1.0),
    "dynamic 3.5": (dict(rope_type="dynamic", factor=3.5), 16, 100.0, 1.0),
    "yarn": (dict(rope_type="yarn", factor=4.0), 16, 10000.0, 1.0),
    "yarn betas no truncate": (
        dict(rope_type="yarn", factor=8.0, beta_fast=8.0, beta_slow=2.0, truncate=False),
        16,
        1000.0,
        1.0,
    ),
    "yarn mscale": (
        dict(rope_type="yarn", factor=4.0, mscale=1.0, mscale_all_dim=0.5),
        8,
        10000.0,
        1.0,
    ),
    "yarn attention factor": (
        dict(rope_type="yarn", factor=2.0, attention_factor=1.3),
        8,
        10000.0,
        1.0,
    ),
    "llama3": (
        dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
        8,
        10000.0,
        1.0,
    ),
    "longrope": ("longrope", 8, 10000.0, 1.0),
    "longrope partial 0.5 attention factor": ("longrope", 16, 1000.0, 0.5),
    "default partial 0.75": (dict(rope_type="default"), 8, 10000.0, 0.75),
}


def longrope_parameters(n: int, attention_factor: float | None) -> dict:
    rng = np.random.default_rng(n)
    out = dict(
        rope_type="longrope",
        factor=4.0,
        short_factor=(1 + rng.random(n)).round(3).tolist(),
        long_factor=(1 + 8 * rng.random(n)).round(3).tolist(),
    )
    if attention_factor is not None:
        out["attention_factor"] = attention_factor
    return out


def case(name: str):
    """(transformers config, our RopeScaling or None, head_dim, theta, partial factor)."""
    from transformers import LlamaConfig, Phi3Config

    params, head_dim, theta, partial = CASES[name]
    dims = int(head_dim * partial)
    if params == "longrope":
        params = longrope_parameters(dims // 2, 1.2 if partial != 1.0 else None)
    params = dict(params)
    sizes = dict(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim)
    if params["rope_type"] in ("yarn", "llama3", "longrope"):
        params["original_max_position_embeddings"] = ORIGINAL
    hf_params = {**params, "rope_theta": theta}
    if partial != 1.0:  # Phi-3 rotates part of each head; its original length is top-level
        hf_params["partial_rotary_factor"] = partial
        config = Phi3Config(
            **sizes,
            max_position_embeddings=4 * ORIGINAL,
            original_max_position_embeddings=ORIGINAL,
            rope_parameters=hf_params,
        )
    else:
        config = LlamaConfig(
            **sizes,
            max_position_embeddings=ORIGINAL if params["rope_type"] == "dynamic" else 4 * ORIGINAL,
            rope_parameters=hf_params,
        )
    if params["rope_type"] == "default":
        return config, None, head_dim, theta, partial
    if params["rope_type"] == "dynamic":  # its original length is max_position_embeddings
        params["original_max_position_embeddings"] = ORIGINAL
    return config, RopeScaling(**params), head_dim, theta, partial


def hf_modules(config):
    """transformers' rotary embedding class and rotation function for this config."""
    if config.model_type == "phi3":
        from transformers.models.phi3 import modeling_phi3 as modeling

        return modeling.Phi3RotaryEmbedding(config), modeling.apply_rotary_pos_emb
    from transformers.models.llama import modeling_llama as modeling

    return modeling.LlamaRotaryEmbedding(config), modeling.apply_rotary_pos_emb


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("default")])
def test_frequencies_and_attention_factor_match_transformers(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config, scaling, head_dim, theta, partial = case(name)
    want, factor = ROPE_INIT_FUNCTIONS[scaling.rope_type](config, "cpu")
    tables = rope_tables(head_dim, theta, scaling, partial)
    np.testing.assert_allclose(tables.inv_freq, want.numpy(), rtol=1e-6)
    assert tables.attention_factor == pytest.approx(factor, rel=1e-12)
    if scaling.rope_type == "longrope":
        long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=ORIGINAL + 1)
        np.testing.assert_allclose(tables.long_inv_freq, long.numpy(), rtol=1e-6)


def calls() -> list[np.ndarray]:
    """The position ids of a generation: a prefill, then one position per step past ORIGINAL."""
    prefill = np.arange(ORIGINAL - 3)[None, :]
    return [prefill] + [np.array([[p]]) for p in range(ORIGINAL - 3, ORIGINAL - 3 + STEPS)]


@pytest.mark.parametrize("name", CASES)
def test_rotation_through_a_generation_matches_transformers(name):
    config, scaling, head_dim, theta, partial = case(name)
    rotary, apply_rotary_pos_emb = hf_modules(config)
    module = MultiHeadAttention(
        4 * head_dim,
        4,
        positions="rope",
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial,
    )
    rope = module.rope_params()
    numpy_rope = rope_tables(head_dim, theta, scaling, partial)
    rng = np.random.default_rng(0)
    for positions in calls():
        T = positions.shape[1]
        q = torch.from_numpy(rng.standard_normal((1, 2, T, head_dim)).astype(np.float32))
        ids = torch.from_numpy(positions)
        with torch.no_grad():
            cos, sin = rotary(q, ids)
            want, _ = apply_rotary_pos_emb(q, q, cos, sin)
        got_torch = torch_block.rope.apply_rope(q, ids, rope)
        got_jax = jax_block.rope.apply_rope(
            jnp.asarray(q.numpy().transpose(0, 2, 1, 3)), jnp.asarray(positions), numpy_rope
        )
        np.testing.assert_allclose(got_torch.numpy(), want.numpy(), atol=2e-6, rtol=0)
        np.testing.assert_allclose(
            np.asarray(got_jax).transpose(0, 2, 1, 3), want.numpy(), atol=2e-6, rtol=0
        )


def test_dynamic_and_longrope_change_past_the_original_length():
    """The generation above crosses the switch: the frequencies differ before and after."""
    for name in ("dynamic 2", "longrope"):
        _, scaling, head_dim, theta, partial = case(name)
        tables = rope_tables(head_dim, theta, scaling, partial)
        short = np.asarray(jax_block.rope.frequencies(jnp.array([[ORIGINAL - 1]]), tables))
        long = np.asarray(jax_block.rope.frequencies(jnp.array([[ORIGINAL]]), tables))
        np.testing.assert_array_equal(short.reshape(-1), tables.inv_freq)
        assert np.all(long.reshape(-1)[1:] < tables.inv_freq[1:]), name


BAD_SCALINGS = {
    "unknown type": (dict(rope_type="ntk", factor=2.0), "rope_type must be one of"),
    "field of another type": (
        dict(rope_type="linear", factor=2.0, low_freq_factor=1.0),
        r"not read by this type \['low_freq_factor'\]",
    ),
    "missing field": (dict(rope_type="yarn", factor=2.0), r"missing \['original_max_posi"),
    "zero factor": (dict(rope_type="linear", factor=0.0), "factor must be > 0"),
    "uneven longrope factors": (
        dict(
            rope_type="longrope",
            factor=2.0,
            original_max_position_embeddings=8,
            short_factor=[1.0],
            long_factor=[1.0, 2.0],
        ),
        "one entry per frequency",
    ),
}


@pytest.mark.parametrize("name", BAD_SCALINGS)
def test_bad_scalings_are_refused(name):
    fields, message = BAD_SCALINGS[name]
    with pytest.raises(ValueError, match=message):
        RopeScaling(**fields)


def test_old_llama3_dicts_load_and_new_types_round_trip():
    from twin_core import LMConfig

    base = dict(vocab_size=8, max_seq_len=8, d_model=16, n_layers=1, n_heads=2, d_ff=8)
    old = dict(
        base,
        positions="rope",
        rope_scaling=dict(
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
            rope_type="llama3",
        ),
    )
    assert LMConfig.from_dict(old).rope_scaling.factor == 8.0
    longrope = RopeScaling(
        rope_type="longrope",
        factor=2.0,
        original_max_position_embeddings=4,
        short_factor=[1.0] * 2,
        long_factor=[2.0] * 2,
    )
    config = LMConfig(**base, positions="rope", rope_scaling=longrope, partial_rotary_factor=0.5)
    assert LMConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="one entry per frequency"):
        LMConfig(**base, positions="rope", rope_scaling=longrope)  # 8 dims: 4 frequencies
    with pytest.raises(ValueError, match="partial_rotary_factor is set but positions"):
        LMConfig(**base, partial_rotary_factor=0.5)
    with pytest.raises(ValueError, match=r"int\(8 \* 0.4\) = 3"):
        LMConfig(**base, positions="rope", partial_rotary_factor=0.4)
