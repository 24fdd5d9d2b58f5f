"""The family options in both frameworks at once: bad configurations refused with the same
message, and the float64 references themselves checked against transformers (an independent
implementation) and against variants they must tell apart."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from family_configs import BAD, BAD_LAYERS, BASE, BLOCKS, LLAMA3_SCALING, LMS

import jax_block
import torch_block
from twin_core import LMConfig, inv_frequencies

LM_FIELDS = dict(vocab_size=64, max_seq_len=32, n_layers=1)


# --------------------------------------------------------------------------- bad configurations
@pytest.mark.parametrize("name", BAD)
@pytest.mark.parametrize("module", ["TransformerBlock", "TransformerLM"])
def test_a_bad_configuration_is_refused_with_the_same_message_in_both(name, module):
    fields, words = BAD[name]
    kwargs = {**BASE, **fields, **(LM_FIELDS if module == "TransformerLM" else {})}
    messages = []
    for build in (getattr(torch_block, module), getattr(jax_block, module).create):
        with pytest.raises(ValueError) as info:
            build(**kwargs)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    for word in words:
        assert word in messages[0], (word, messages[0])


@pytest.mark.parametrize("name", BAD_LAYERS)
def test_bad_per_layer_fields_are_refused_with_the_same_message_in_both(name):
    fields, words = BAD_LAYERS[name]
    kwargs = {**BASE, **LM_FIELDS, "n_layers": 2, **fields}
    messages = []
    for build in (torch_block.TransformerLM, jax_block.TransformerLM.create):
        with pytest.raises(ValueError) as info:
            build(**kwargs)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    for word in words:
        assert word in messages[0], (word, messages[0])


def test_block_configs_resolve_the_per_layer_fields():
    config = LMConfig(**LMS["mixed_layers"])
    sliding, dense = config.block_configs()
    assert (sliding.sliding_window, sliding.use_moe, sliding.shared_expert_d_ff) == (3, True, 40)
    assert (dense.sliding_window, dense.use_moe, dense.d_ff) == (None, False, 56)
    assert (dense.shared_expert_d_ff, dense.shared_expert_gate) == (None, False)
    compact = LMConfig(**{**LMS["mixed_layers"], "layer_types": None, "dense_d_ff": None})
    assert {b.sliding_window for b in compact.block_configs()} == {3}  # every layer sliding
    # JSON lists in, tuples kept (the config stays hashable: a static argument of jit)
    data = config.to_dict()
    assert data["layer_types"] == ["sliding_attention", "full_attention"]
    assert data["dense_layers"] == [1]
    assert LMConfig.from_dict(data) == config and hash(LMConfig.from_dict(data)) == hash(config)
    with pytest.raises(ValueError, match="layer_types=3"):
        LMConfig.from_dict({**data, "layer_types": 3})


# --------------------------------------------------------------------------- the references
def test_llama3_frequencies_of_the_reference_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(
        rope_type="llama3",
        rope_theta=10000.0,
        factor=LLAMA3_SCALING.factor,
        low_freq_factor=LLAMA3_SCALING.low_freq_factor,
        high_freq_factor=LLAMA3_SCALING.high_freq_factor,
        original_max_position_embeddings=LLAMA3_SCALING.original_max_position_embeddings,
    )
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=8, rope_parameters=rope)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    default = ref.default_inv_freq(8, 10000.0)
    got = ref.llama3_inv_freq(default, LLAMA3_SCALING)
    np.testing.assert_allclose(got, want.double().numpy(), rtol=1e-6)
    # every branch is taken: one kept, one smoothed (neither kept nor divided), two divided
    kept, divided = got == default, np.isclose(got, default / LLAMA3_SCALING.factor)
    assert kept.tolist() == [True, False, False, False]
    assert divided.tolist() == [False, False, True, True]
    np.testing.assert_allclose(
        inv_frequencies(8, 10000.0, LLAMA3_SCALING), got, rtol=1e-6
    )  # twin_core's float32 table, which both twins read


def test_rotation_of_the_reference_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 2, 5, 8)), rng.standard_normal((2, 2, 5, 8))  # (B, H, T, D)
    positions = np.array([[0, 1, 2, 3, 4], [7, 9, 11, 13, 15]])  # (B, T)
    freq = ref.default_inv_freq(8, 10000.0)
    angles = positions[..., None] * freq  # (B, T, D/2)
    emb = torch.from_numpy(np.concatenate([angles, angles], axis=-1))  # (B, T, D)
    want_q, want_k = apply_rotary_pos_emb(
        torch.from_numpy(q), torch.from_numpy(k), emb.cos(), emb.sin()
    )
    got_q = ref.rotate(q.transpose(0, 2, 1, 3), positions, freq).transpose(0, 2, 1, 3)
    got_k = ref.rotate(k.transpose(0, 2, 1, 3), positions, freq).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(got_q, want_q.numpy(), atol=1e-12)
    np.testing.assert_allclose(got_k, want_k.numpy(), atol=1e-12)


def test_partial_rotation_of_the_reference_matches_transformers_phi3():
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 2, 5, 8)), rng.standard_normal((2, 2, 5, 8))  # (B, H, T, D)
    positions = np.array([[0, 1, 2, 3, 4], [7, 9, 11, 13, 15]])  # (B, T)
    freq = ref.inv_freq(ref.spec(d_model=16, n_heads=2, partial_rotary_factor=0.75))  # 6 of 8
    assert freq.shape == (3,)
    angles = positions[..., None] * freq  # (B, T, 3)
    emb = torch.from_numpy(np.concatenate([angles, angles], axis=-1))  # (B, T, 6)
    want_q, want_k = apply_rotary_pos_emb(
        torch.from_numpy(q), torch.from_numpy(k), emb.cos(), emb.sin()
    )
    got_q = ref.rotate(q.transpose(0, 2, 1, 3), positions, freq).transpose(0, 2, 1, 3)
    got_k = ref.rotate(k.transpose(0, 2, 1, 3), positions, freq).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(got_q, want_q.numpy(), atol=1e-12)
    np.testing.assert_allclose(got_k, want_k.numpy(), atol=1e-12)
    np.testing.assert_array_equal(got_q[..., 6:], q[..., 6:])  # the last 2 dims pass through


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemma_norm_of_both_twins_is_transformers(dtype):
    """x * rsqrt(mean(x^2) + eps) * (1 + w) in float32, rounded once: torch's bit for bit with
    transformers' Gemma2RMSNorm (Gemma 3's is the same), JAX's within a rounding of it."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    rng = np.random.default_rng(0)
    x = torch.from_numpy(3 * rng.standard_normal((2, 5, 32), np.float32)).to(getattr(torch, dtype))
    weight = torch.from_numpy(0.5 * rng.standard_normal(32, np.float32)).to(x.dtype)
    want = []
    for module in (Gemma2RMSNorm(32, eps=1e-6), Gemma3RMSNorm(32, eps=1e-6)):
        module = module.to(x.dtype)
        with torch.no_grad():
            module.weight.copy_(weight)
            want.append(module(x))
    assert torch.equal(want[0], want[1])
    ours = torch_block.norm.make_norm("gemma_rmsnorm", 32, 1e-6).to(x.dtype)
    assert not ours.weight.detach().any()  # starts at 0: (1 + w) = 1
    with torch.no_grad():
        ours.weight.copy_(weight)
        got = ours(x)
    assert got.dtype == x.dtype and torch.equal(got, want[0])
    import jax.numpy as jnp

    jax_dtype = getattr(jnp, dtype)
    module = jax_block.norm.make_norm("gemma_rmsnorm", 1e-6, jax_dtype, jax_dtype, "norm")
    scale = jnp.asarray(weight.float().numpy(), jax_dtype)
    jax_x = jnp.asarray(x.float().numpy(), jax_dtype)
    jax_got = np.asarray(module.apply({"params": {"scale": scale}}, jax_x).astype(jnp.float32))
    ulp = 1e-6 if dtype == "float32" else 2**-7  # one rounding of a value of size < 2
    np.testing.assert_allclose(jax_got, want[0].float().numpy(), rtol=ulp, atol=ulp)
    reference = ref.norm(
        x.double().numpy(),
        {"weight": weight.double().numpy()},
        "",
        {"norm": "gemma_rmsnorm", "norm_eps": 1e-6},
    )
    np.testing.assert_allclose(reference, want[0].double().numpy(), rtol=ulp, atol=ulp)


def test_gemma_embedding_scale_is_rounded_to_the_dtype_as_transformers():
    """sqrt(d_model) in float32, then the weights' dtype (bfloat16: sqrt(32) = 5.65625)."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2TextScaledWordEmbedding

    hf = Gemma2TextScaledWordEmbedding(16, 32, None, embed_scale=32**0.5).to(torch.bfloat16)
    ours = torch_block.TransformerLM(16, 8, 32, 1, 4, 32, positions="rope", embed_scale=True).to(
        torch.bfloat16
    )
    with torch.no_grad():
        hf.weight.copy_(ours.token_embedding.weight)
    ids = torch.arange(16)[None, :]
    params = ours.embedding_params()
    assert params.scale == 5.65625 != 32**0.5
    got = torch_block.lm.embed(ids, torch.zeros_like(ids), params)
    with torch.no_grad():
        assert torch.equal(got, hf(ids))


def test_reference_masks_follow_the_window_rule():
    assert ref.allowed_keys(5, 8, causal=True, window=None).tolist() == [1] * 6 + [0] * 2
    assert ref.allowed_keys(5, 8, causal=True, window=3).tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    assert ref.allowed_keys(0, 4, causal=True, window=1).tolist() == [1, 0, 0, 0]
    assert ref.allowed_keys(1, 3, causal=False, window=None).tolist() == [1, 1, 1]


def test_reference_gqa_maps_consecutive_query_heads_to_one_kv_head():
    s = ref.spec(**BLOCKS["llama"])  # 8 query heads, 2 kv heads
    assert [ref.kv_head(h, s) for h in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]


# Each option changes the reference's output by more than the twins' float32 tolerance: a twin
# that ignored it would fail the tests.
VARIANTS = {
    "llama": [
        dict(norm_eps=1e-1),
        dict(activation="gelu"),
        dict(gated_ffn=False),
        dict(positions="learned"),
        dict(rope_theta=100.0),
        dict(rope_scaling=LLAMA3_SCALING),
        dict(partial_rotary_factor=0.5),
        dict(sliding_window=2),
    ],
    "qwen2_moe": [dict(norm_topk_prob=True), dict(shared_expert_gate=False)],
    "gpt2": [dict(activation="gelu"), dict(activation="relu"), dict(norm="rmsnorm")],
    "gemma2": [
        dict(norm="rmsnorm"),
        dict(sandwich_norms=False),
        dict(query_pre_attn_scalar=None),
        dict(attn_logit_softcap=None),
    ],
    "gemma3": [dict(qk_norm=None)],
}


@pytest.mark.parametrize("name", VARIANTS)
def test_every_option_changes_the_reference_output(name):
    rng = np.random.default_rng(0)
    base = ref.spec(**BLOCKS[name])
    weights = {
        key: ref.random_array(key, shape, rng) for key, shape in reference_shapes(base).items()
    }
    x = rng.standard_normal((2, 9, base["d_model"]))
    y, _ = ref.block(x, weights, base)
    for variant in VARIANTS[name]:
        changed, _ = ref.block(x, weights, {**base, **variant})
        assert np.max(np.abs(changed - y)) > 10 * 1e-5, variant  # 10x the float32 tolerance


def reference_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    """torch-named weight shapes of a block spec, with every optional weight present (the
    variants that drop one simply do not read it)."""
    d, H, KV, D, ff = s["d_model"], s["n_heads"], s["n_kv_heads"], s["head_dim"], s["d_ff"]
    shapes = {
        "attention.q_proj.weight": (H * D, d),
        "attention.k_proj.weight": (KV * D, d),
        "attention.v_proj.weight": (KV * D, d),
        "attention.out_proj.weight": (d, H * D),
    }
    for norm in ("norm1", "norm2", "post_attention_norm", "post_feed_forward_norm"):
        shapes[f"{norm}.weight"] = shapes[f"{norm}.bias"] = (d,)
    per_head = s["qk_norm"] == "head"
    shapes["attention.q_norm.weight"] = (D,) if per_head else (H * D,)
    shapes["attention.k_norm.weight"] = (D,) if per_head else (KV * D,)
    ffns = ["feed_forward"]
    if s["use_moe"]:
        shapes["feed_forward.gate.weight"] = (s["num_experts"], d)
        ffns = [f"feed_forward.experts.{e}" for e in range(s["num_experts"])]
        shapes["feed_forward.shared_expert_gate.weight"] = (1, d)
    for ffn in ffns:
        for layer, shape in (("fc1", (ff, d)), ("fc3", (ff, d)), ("fc2", (d, ff))):
            shapes[f"{ffn}.{layer}.weight"] = shape
    if s["shared_expert_d_ff"]:
        sff = s["shared_expert_d_ff"]
        for layer, shape in (("fc1", (sff, d)), ("fc3", (sff, d)), ("fc2", (d, sff))):
            shapes[f"feed_forward.shared_expert.{layer}.weight"] = shape
    return shapes


def test_config_options_name_every_option_keyword_of_both_twins():
    """attention_options(), feed_forward_options() and moe_options() of a config are exactly
    the option keywords of each twin's module, so a new option reaches both blocks."""
    import dataclasses
    import inspect

    from jax_block.attention import MultiHeadAttention as FlaxAttention
    from jax_block.feed_forward import FeedForward as FlaxFeedForward
    from jax_block.moe import MixtureOfExperts as FlaxMoE
    from twin_core import BlockConfig

    def torch_keywords(module, sizes: set[str]) -> set[str]:
        parameters = inspect.signature(module).parameters.items()
        return {n for n, p in parameters if p.kind is p.KEYWORD_ONLY} - sizes

    def flax_options(module) -> set[str]:
        names = [f.name for f in dataclasses.fields(module)]
        return set(names[names.index("param_dtype") + 1 :]) - {"parent", "name"}

    config = BlockConfig(d_model=8, n_heads=2, d_ff=16, use_moe=True)
    attention, ffn, moe = (
        set(config.attention_options()),
        set(config.feed_forward_options()),
        set(config.moe_options()),
    )
    assert attention == torch_keywords(torch_block.MultiHeadAttention, {"causal"})
    assert attention == flax_options(FlaxAttention)
    assert ffn == torch_keywords(torch_block.feed_forward.FeedForward, set())
    assert ffn == flax_options(FlaxFeedForward)
    assert moe | ffn == torch_keywords(torch_block.MixtureOfExperts, {"router_z_loss_coef"})
    assert moe | ffn == flax_options(FlaxMoE)
    assert len(moe | ffn) == len(moe) + len(ffn)
