"""DeepSeek-V3 (`deepseek_v3`) against transformers' own tiny model, in both frameworks:
multi-head latent attention decoding from the latent cache, grouped sigmoid routing with the
score-correction bias, shared experts, a dense first layer, yarn's mscale."""

from __future__ import annotations

import json
import shutil

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

import jax_block
import parity
import torch_block

VOCAB = 96
PROMPTS = ([5, 17, 33], [9, 2, 41, 77, 3, 60, 12])
NEW_TOKENS = 10
IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=16,
    mscale=1.0,
    mscale_all_dim=1.0,
)
VARIANTS = {
    # q through q_a_proj/q_b_proj; yarn with mscale_all_dim (softmax scale times mscale^2)
    "lora_yarn": dict(q_lora_rank=24, rope_parameters=YARN),
    "q_proj": dict(q_lora_rank=None),  # q through q_proj
}


def build(variant: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=2,
        n_routed_experts=8,
        routed_scaling_factor=2.5,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        qk_nope_head_dim=8,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=64,
        num_nextn_predict_layers=0,
        **hf_models.NO_TOKENS,
        **VARIANTS[variant],
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    hf_models.rescale(model, 0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a bias that moves choices: the routing must read it
        for layer in model.model.layers[1:]:
            bias = layer.mlp.gate.e_score_correction_bias
            bias.copy_(0.5 * torch.randn(bias.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """variant -> (directory, transformers model, torch LM, (Flax LM, params)), built once."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            model = build(variant)
            directory = hf_models.save(model, tmp_path_factory.mktemp(variant))
            flax = parity.from_hf(directory, "jax")
            cache[variant] = (directory, model, parity.from_hf(directory), flax)
        return cache[variant]

    return get


@pytest.fixture
def saved(built):
    """The "lora_yarn" variant, which every test but the logits' and round trip's reads."""
    return built("lora_yarn")


# every variant in torch; JAX (slow to compile) on the one variant too where it matters
BOTH = [("lora_yarn", "torch"), ("lora_yarn", "jax"), ("q_proj", "torch"), ("q_proj", "jax")]


def _logits(model, ids: torch.Tensor) -> np.ndarray:
    if isinstance(model, tuple):
        lm, params = model  # jitted: one compilation costs less than op-by-op dispatch
        return np.asarray(
            jax.jit(lm.apply)({"params": params}, jnp.asarray(ids.numpy(), jnp.int32))
        )
    with torch.no_grad():
        return model(ids).numpy()


def test_config_reads_latent_attention_and_routing(saved):
    _, _, lm, _ = saved
    c = lm.config
    assert (c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (16, 8, 8, 12)
    assert (c.router, c.n_group, c.topk_group, c.routed_scaling_factor) == (
        "grouped_sigmoid",
        4,
        2,
        2.5,
    )
    assert (c.dense_layers, c.dense_d_ff, c.d_ff, c.shared_expert_d_ff) == ((0,), 48, 16, 32)


@pytest.mark.parametrize("variant, framework", BOTH)
def test_logits_match_transformers(built, variant, framework):
    _, model, lm, flax = built(variant)
    with torch.no_grad():
        expected = model(IDS).logits.numpy()
    assert np.abs(expected).max() > 1.0  # unit-scale weights: a real spread of logits
    ours = _logits(lm if framework == "torch" else flax, IDS)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_cached_decode_from_the_latent_cache_equals_the_full_forward(saved, framework):
    """A prefill of 9 tokens, one token (kv_b_proj absorbed), a chunk of 6 (expanded); the
    cache holds per token the latent and one rope key, nothing per head."""
    _, _, lm, (flax_lm, params) = saved
    full = _logits(lm if framework == "torch" else (flax_lm, params), IDS)
    pieces = [(0, 9), (9, 10), (10, 16)]
    outs = []
    if framework == "torch":
        cache = lm.create_kv_cache(2, 24)
        with torch.no_grad():
            for a, b in pieces:
                outs.append(lm(IDS[:, a:b], kv_cache=cache)[0].numpy())
        latent, rope_key = cache[1].latent, cache[1].rope_key
    else:
        cache = flax_lm.create_kv_cache(2, 24)
        apply = jax.jit(flax_lm.apply)
        for a, b in pieces:
            ids = jnp.asarray(IDS[:, a:b].numpy(), jnp.int32)
            logits, cache = apply({"params": params}, ids, kv_cache=cache)
            outs.append(np.asarray(logits))
        latent, rope_key = cache[1].latent, cache[1].rope_key
    assert tuple(latent.shape) == (2, 24, 16) and tuple(rope_key.shape) == (2, 24, 8)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_greedy_left_padded_batch_matches_transformers_alone(saved, framework):
    _, model, lm, (flax_lm, params) = saved
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    if framework == "torch":
        tokens = torch_block.generate(lm, ids, mask, max_new_tokens=NEW_TOKENS).tolist()
    else:
        out = jax_block.generate(
            flax_lm, params, ids.numpy(), mask.numpy(), max_new_tokens=NEW_TOKENS
        )
        tokens = np.asarray(out).tolist()
    expected = [hf_models.hf_greedy(model, list(p), NEW_TOKENS) for p in PROMPTS]
    assert tokens == expected


@pytest.mark.parametrize("variant, framework", BOTH)
def test_round_trip_to_hf_is_bit_identical(built, tmp_path, variant, framework):
    directory, _, lm, flax = built(variant)
    parity.to_hf(lm if framework == "torch" else flax, tmp_path / "out")
    before = load_file(directory / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    reloaded = hf_models.load(tmp_path / "out")
    assert reloaded.config.model_type == "deepseek_v3"


def test_unsupported_options_are_refused(saved, tmp_path):
    directory = saved[0]
    for key, value in (("attention_bias", True), ("rope_interleave", False)):
        copy = tmp_path / key
        shutil.copytree(directory, copy)
        config = json.loads((copy / "config.json").read_text())
        config[key] = value
        (copy / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=key):
            parity.from_hf(copy)
