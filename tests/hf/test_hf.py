"""Hugging Face checkpoints in and out (parity.from_hf, parity.to_hf), against transformers.

transformers is the independent reference: each tiny model is built and saved by
transformers itself, and every exported directory is loaded back by transformers.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from hf_models import FAMILIES, LAYER_VARIANTS, ROPE_MODELS, VOCAB, WINDOW

import jax_block
import parity
import torch_block
from parity.errors import WeightsMismatch
from parity.hf.config import family_of
from parity.hf.mapping import markdown_tables

PROMPTS = ([5, 17, 33], [9, 2, 41, 77, 3, 60, 12])  # left-padded into one batch
NEW_TOKENS = 12  # 7 + 12 = 19 positions: past every window of WINDOW and the ropes' ORIGINAL
# every family; per-layer windows and dense layers; the rope types and partial rotary
MODELS = (*FAMILIES, *LAYER_VARIANTS, *ROPE_MODELS)
IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (directory, transformers model) for every tiny model, built once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = hf_models.build(name)
            cache[name] = (hf_models.save(model, tmp_path_factory.mktemp(name)), model)
        return cache[name]

    return get


def hf_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(ids).logits.float().numpy()


def our_logits(model, ids=IDS) -> np.ndarray:
    """Logits of a torch_block LM or of a (Flax LM, params) pair, as float32 NumPy."""
    if isinstance(model, tuple):
        lm, params = model
        out = lm.apply({"params": params}, jnp.asarray(ids.numpy(), jnp.int32))
        return np.asarray(out.astype(jnp.float32))
    with torch.no_grad():
        return model(ids).float().numpy()


def left_padded(prompts=PROMPTS) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


# --------------------------------------------------------------------------- reading
@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("name", [*MODELS, "llama_options"])
def test_logits_match_transformers(saved, name, framework):
    """16 positions: past the scaled ropes' original length (dynamic and longrope switch).
    Within 1e-5 plus float32's relative rounding of logits near 10."""
    directory, reference = saved(name)
    model = parity.from_hf(directory, framework)
    expected = hf_logits(reference)
    assert np.abs(expected).max() > 1.0  # unit-scale weights: a real spread of logits
    np.testing.assert_allclose(our_logits(model), expected, atol=1e-5, rtol=1e-6)


def test_from_hf_reads_the_config(saved):
    lm = parity.from_hf(saved("mistral")[0])
    config = lm.config
    assert (config.norm, config.positions, config.gated_ffn, config.activation) == (
        "rmsnorm",
        "rope",
        True,
        "silu",
    )
    assert (config.n_kv_heads, config.sliding_window, config.qkv_bias) == (2, WINDOW, False)
    assert not lm.training and next(lm.parameters()).dtype == torch.float32
    moe = parity.from_hf(saved("qwen2_moe")[0]).config
    assert (moe.num_experts, moe.top_k_experts, moe.d_ff, moe.shared_expert_d_ff) == (4, 2, 24, 40)
    assert moe.norm_topk_prob is False and moe.shared_expert_gate and moe.qkv_bias
    assert moe.expert_capacity_factor is None  # dropless, as transformers


def test_from_hf_reads_gemma(saved):
    gemma2 = parity.from_hf(saved("gemma2")[0]).config
    assert (gemma2.norm, gemma2.activation, gemma2.sandwich_norms, gemma2.embed_scale) == (
        "gemma_rmsnorm",
        "gelu_tanh",
        True,
        True,
    )
    assert (gemma2.query_pre_attn_scalar, gemma2.attn_logit_softcap) == (6, 2.0)
    assert (gemma2.final_logit_softcap, gemma2.qk_norm, gemma2.local_rope_theta) == (
        5.0,
        None,
        None,
    )
    assert gemma2.layer_types == tuple(hf_models.ALTERNATING) and gemma2.sliding_window == WINDOW
    gemma3 = parity.from_hf(saved("gemma3_text")[0]).config
    assert (gemma3.qk_norm, gemma3.attn_logit_softcap, gemma3.final_logit_softcap) == (
        "head",
        None,
        None,
    )
    assert (gemma3.rope_theta, gemma3.local_rope_theta) == (1e6, 1e4)  # full, sliding layers
    assert (gemma3.rope_scaling.rope_type, gemma3.rope_scaling.factor) == ("linear", 8.0)
    assert gemma3.tie_embeddings and gemma3.layer_types == tuple(hf_models.ALTERNATING)


GEMMA3_SPELLINGS = {
    # no layer_types: Gemma 3 slides but every sliding_window_pattern-th layer
    "sliding_window_pattern": (
        lambda c: c.update(layer_types=None, sliding_window_pattern=2),
        (1e6, 1e4),
    ),
    # transformers 4's spelling of the rope bases: the full layers', the sliding layers'
    "transformers_4_rope": (
        lambda c: c.update(rope_parameters=None, rope_theta=5e5, rope_local_base_freq=50.0),
        (5e5, 50.0),
    ),
}


@pytest.mark.parametrize("case", GEMMA3_SPELLINGS)
def test_gemma3_config_spellings(saved, tmp_path, case):
    """Read as transformers reads them: the same layers, bases and logits."""
    edit, thetas = GEMMA3_SPELLINGS[case]
    directory = _copy(saved, "gemma3_text", tmp_path, edit)
    reference = hf_models.load(directory)
    assert reference.config.layer_types == hf_models.ALTERNATING
    ours = parity.from_hf(directory)
    assert ours.config.layer_types == tuple(hf_models.ALTERNATING)
    assert (ours.config.rope_theta, ours.config.local_rope_theta) == thetas
    np.testing.assert_allclose(our_logits(ours), hf_logits(reference), atol=1e-5, rtol=0)


def test_from_hf_reads_the_layers_as_transformers_derives_them(saved):
    """Qwen2's max_window_layers, Qwen2-MoE's decoder_sparse_step and window rule, Qwen3-MoE's
    mlp_only_layers and window on every layer; transformers' own layer_types agree."""
    for name in ("qwen2_sliding", "qwen2_moe_sparse", "qwen3_moe"):
        directory, reference = saved(name)
        config = parity.from_hf(directory).config
        hf = reference.config
        every_layer = ["sliding_attention"] * hf.num_hidden_layers  # Qwen3-MoE: no layer_types
        kinds = [config.layer_type(i) for i in range(config.n_layers)]
        assert kinds == getattr(hf, "layer_types", every_layer)
        if config.use_moe:  # transformers' dense layers have no router
            layers = reference.model.layers
            dense = [i for i, layer in enumerate(layers) if not hasattr(layer.mlp, "gate")]
            assert list(config.dense_layers) == dense
    assert parity.from_hf(saved("qwen2_sliding")[0]).config.layer_types == (
        "full_attention",
        "sliding_attention",
    )
    sparse = parity.from_hf(saved("qwen2_moe_sparse")[0]).config
    assert (sparse.dense_layers, sparse.dense_d_ff, sparse.sliding_window) == ((0,), 48, WINDOW)
    qwen3_moe = parity.from_hf(saved("qwen3_moe")[0]).config
    assert qwen3_moe.layer_types is None and qwen3_moe.sliding_window == WINDOW
    assert qwen3_moe.dense_layers == (1,) and qwen3_moe.qk_norm == "head"
    assert parity.from_hf(saved("olmoe")[0]).config.qk_norm == "projection"


@pytest.mark.parametrize("name", MODELS)
def test_greedy_left_padded_batch_matches_transformers_alone(saved, name):
    directory, reference = saved(name)
    # a fresh model per prompt: transformers' dynamic rope keeps the longest length it has seen
    expected = [hf_models.hf_greedy(hf_models.load(directory), p, NEW_TOKENS) for p in PROMPTS]
    ids, mask = left_padded()
    torch_lm = parity.from_hf(directory)
    torch_tokens = torch_block.generate(torch_lm, ids, mask, max_new_tokens=NEW_TOKENS)
    lm, params = parity.from_hf(directory, "jax")
    jax_tokens = jax_block.generate(
        lm,
        params,
        ids.numpy().astype(np.int32),
        mask.numpy().astype(np.int32),
        max_new_tokens=NEW_TOKENS,
    )
    assert torch_tokens.tolist() == expected
    assert np.asarray(jax_tokens).tolist() == expected


@pytest.mark.parametrize("name", ["llama", "qwen2_moe"])
def test_bfloat16_checkpoint_stays_bfloat16(saved, tmp_path, name):
    _, reference = saved(name)
    directory = hf_models.save(hf_models.build(name).to(torch.bfloat16), tmp_path / "bf16")
    assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"
    torch_lm = parity.from_hf(directory)
    assert {p.dtype for p in torch_lm.parameters()} == {torch.bfloat16}
    lm, params = parity.from_hf(directory, "jax")
    assert {np.asarray(p).dtype for p in jax.tree.leaves(params)} == {np.dtype(jnp.bfloat16)}
    bf16_reference = hf_models.load(directory)
    expected = hf_logits(bf16_reference)
    scale = np.abs(expected).max()
    for model in (torch_lm, (lm, params)):
        # bfloat16 rounding in three different orders of computation: 5e-2 of the scale (wrong
        # weights miss by the whole scale). transformers computes MoE router logits in
        # bfloat16, DESIGN in float32: a near tie may route one token apart.
        error = np.abs(our_logits(model) - expected).max(axis=-1)  # (B, T) per position
        allowed = 1 if name == "qwen2_moe" else 0
        assert np.sum(error > 5e-2 * scale) <= allowed, error
    # cast on request: the bfloat16 weights widened exactly, as transformers loads them
    widened = hf_models.load(directory, dtype=torch.float32)
    np.testing.assert_allclose(
        our_logits(parity.from_hf(directory, dtype="float32")), hf_logits(widened), atol=1e-4
    )


def test_sharded_checkpoint_loads(saved, tmp_path):
    directory, reference = saved("mixtral")
    sharded = hf_models.save(reference, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    single = our_logits(parity.from_hf(directory))
    np.testing.assert_array_equal(our_logits(parity.from_hf(sharded)), single)
    np.testing.assert_array_equal(
        our_logits(parity.from_hf(sharded, "jax")), our_logits(parity.from_hf(directory, "jax"))
    )


def test_pytorch_model_bin_loads(saved, tmp_path):
    directory, reference = saved("llama")
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    np.testing.assert_allclose(
        our_logits(parity.from_hf(tmp_path)), hf_logits(reference), atol=1e-4
    )


def test_torch_weights_read_by_map_behave_as_a_copy(saved, tmp_path):
    """torch weights map the file copy-on-write: a file replaced by rename (as to_hf and
    parity.save write) leaves the loaded model as it was, and changing the model in place
    leaves the file as it was."""
    directory, reference = saved("llama")
    folder = hf_models.save(reference, tmp_path / "mapped")
    lm = parity.from_hf(folder)
    np.testing.assert_allclose(our_logits(lm), hf_logits(reference), atol=1e-5)
    other = hf_models.build("llama")
    with torch.no_grad():
        for weight in other.parameters():
            weight.mul_(-1.5)
    replacement = hf_models.save(other, tmp_path / "other") / "model.safetensors"
    replacement.replace(folder / "model.safetensors")
    np.testing.assert_allclose(our_logits(lm), hf_logits(reference), atol=1e-5)
    written = (folder / "model.safetensors").read_bytes()
    with torch.no_grad():
        for weight in lm.parameters():
            weight.mul_(2.0)
    assert np.abs(our_logits(lm) - hf_logits(reference)).max() > 1e-2  # the writes took
    assert (folder / "model.safetensors").read_bytes() == written
    np.testing.assert_allclose(our_logits(parity.from_hf(folder)), hf_logits(other), atol=1e-5)


def test_transformers_4_config_spelling(saved, tmp_path):
    """rope_theta and rope_scaling at the top level, torch_dtype: read as transformers reads
    them (transformers 5 still reads this spelling)."""
    directory, _ = saved("llama_options")
    config = json.loads((directory / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    config["torch_dtype"] = config.pop("dtype")
    shutil.copy(directory / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = parity.from_hf(tmp_path)
    assert ours.config.rope_theta == 500.0 and ours.config.rope_scaling.factor == 4.0
    np.testing.assert_allclose(our_logits(ours), hf_logits(hf_models.load(tmp_path)), atol=1e-4)


# --------------------------------------------------------------------------- writing
@pytest.mark.parametrize("source", ["torch", "jax"])
@pytest.mark.parametrize("name", [*MODELS, "llama_options"])
def test_round_trip_to_hf(saved, tmp_path, name, source):
    directory, reference = saved(name)
    out = parity.to_hf(parity.from_hf(directory, source), tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == reference.config.model_type  # phi3 stays phi3
    reloaded = hf_models.load(out)
    if hasattr(reference.config, "layer_types"):  # written as transformers' list
        assert config["layer_types"] == reloaded.config.layer_types == reference.config.layer_types
    expected = reference.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    np.testing.assert_array_equal(hf_logits(reloaded), hf_logits(hf_models.load(directory)))


def test_project_default_lm_exports_as_gpt2_with_exact_gelu(tmp_path):
    torch.manual_seed(0)
    lm = torch_block.TransformerLM(
        vocab_size=VOCAB, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0
    ).eval()
    for source, folder in ((lm, "torch"), (parity.from_torch(lm), "jax")):
        out = parity.to_hf(source, tmp_path / folder)
        config = json.loads((out / "config.json").read_text())
        assert (config["model_type"], config["activation_function"]) == ("gpt2", "gelu")
        np.testing.assert_allclose(
            hf_logits(hf_models.load(out)), our_logits(lm), atol=1e-5, rtol=0
        )


def test_to_hf_shards_above_the_size_limit(saved, tmp_path):
    directory, reference = saved("qwen2_moe")
    out = parity.to_hf(
        parity.from_hf(directory),
        tmp_path / "out",
        max_shard_size="30KB",
        token_ids={"eos_token_id": 7},
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).stat().st_size < 40_000 for s in shards)
    generation = json.loads((directory / "generation_config.json").read_text())
    written = json.loads((out / "generation_config.json").read_text())
    assert written == {**generation, "eos_token_id": 7}  # the folder's, with the id given
    np.testing.assert_array_equal(hf_logits(hf_models.load(out)), hf_logits(reference))
    # a second, unsharded save into the same folder replaces the shards
    parity.to_hf(parity.from_hf(directory), out)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_original_moe_matches_no_family_and_writes_nothing(tmp_path):
    lm = torch_block.TransformerLM(
        vocab_size=VOCAB,
        max_seq_len=16,
        d_model=32,
        n_layers=1,
        n_heads=4,
        d_ff=64,
        use_moe=True,
        num_experts=2,
    )
    with pytest.raises(ValueError, match="no Hugging Face family matches") as error:
        parity.to_hf(lm, tmp_path / "out")
    message = str(error.value)
    assert all(f"  {family}:" in message for family in FAMILIES)
    assert "gpt2: use_moe=True (needs False)" in message
    assert "mixtral: norm='layernorm' (needs 'rmsnorm')" in message
    assert not (tmp_path / "out").exists()


def test_readme_holds_the_mapping_tables():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert markdown_tables() in readme


def test_family_of_prefers_the_plainest_layout():
    from twin_core import LMConfig

    base = dict(
        vocab_size=8,
        max_seq_len=8,
        d_model=8,
        n_layers=1,
        n_heads=2,
        d_ff=8,
        norm="rmsnorm",
        positions="rope",
        gated_ffn=True,
        ffn_bias=False,
        qkv_bias=False,
        out_bias=False,
    )
    assert family_of(LMConfig(**base)) == "llama"
    assert family_of(LMConfig(**base, sliding_window=4)) == "mistral"
    assert family_of(LMConfig(**{**base, "qkv_bias": True})) == "qwen2"
    assert family_of(LMConfig(**{**base, "qkv_bias": True}, sliding_window=4)) == "qwen2"
    assert family_of(LMConfig(**base, use_moe=True, num_experts=2)) == "mixtral"
    assert family_of(LMConfig(**base, partial_rotary_factor=0.5)) == "phi3"
    assert family_of(LMConfig(**base), preferred="phi3") == "phi3"  # read from a phi3 folder
    assert (
        family_of(
            LMConfig(
                **base,
                use_moe=True,
                num_experts=2,
                norm_topk_prob=False,
                shared_expert_d_ff=8,
                shared_expert_gate=True,
            )
        )
        == "qwen2_moe"
    )


@pytest.mark.parametrize("name", ["qwen2", "qwen2_moe"])
def test_sliding_window_exports_for_qwen(tmp_path, name):
    """A window on every layer is spelled out as layer_types; transformers computes it."""
    from twin_core import LMConfig

    moe = (
        dict(
            use_moe=True,
            num_experts=2,
            norm_topk_prob=False,
            shared_expert_d_ff=16,
            shared_expert_gate=True,
        )
        if name == "qwen2_moe"
        else {}
    )
    config = LMConfig(
        vocab_size=VOCAB,
        max_seq_len=32,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=32,
        norm="rmsnorm",
        positions="rope",
        gated_ffn=True,
        ffn_bias=False,
        qkv_bias=True,
        out_bias=False,
        activation="silu",
        sliding_window=3,
        dropout=0.0,
        **moe,
    )
    torch.manual_seed(0)
    lm = torch_block.TransformerLM.from_config(config).eval()
    reloaded = hf_models.load(parity.to_hf(lm, tmp_path / "out"))
    assert parity.from_hf(tmp_path / "out").config.sliding_window == 3
    ids = IDS[:, :12]
    np.testing.assert_allclose(hf_logits(reloaded, ids), our_logits(lm, ids), atol=1e-5)


# --------------------------------------------------------------------------- refusals
def _copy(saved, name, tmp_path, edit=None):
    directory, _ = saved(name)
    target = tmp_path / "ckpt"
    shutil.copytree(directory, target)
    if edit is not None:
        config = json.loads((target / "config.json").read_text())
        edit(config)
        (target / "config.json").write_text(json.dumps(config))
    return target


CONFIG_REFUSALS = {
    "unknown model_type": (
        "llama",
        lambda c: c.update(model_type="bert"),
        "unsupported model_type 'bert'; supported: gpt2, llama, mistral",
    ),
    "rope type": (
        "llama",
        lambda c: c["rope_parameters"].update(rope_type="proportional"),
        "rope type 'proportional' is not supported",
    ),
    "phi3 rope type": (
        "phi3",
        lambda c: c["rope_parameters"].update(rope_type="linear", factor=2.0),
        r"\(phi3\): rope type 'linear' is not supported \(supported: default, longrope\)",
    ),
    "longrope factors": (
        "phi3_longrope",
        lambda c: c["rope_parameters"].update(short_factor=[1.0, 2.0]),
        r"short_factor \(2\) and long_factor \(4\) must have one entry per frequency",
    ),
    "partial rotary": ("llama", lambda c: c.update(partial_rotary_factor=0.5), "partial rotary"),
    "softcapping": (
        "llama",
        lambda c: c.update(attn_logit_softcapping=50.0),
        "attention logit softcapping",
    ),
    "negative size": (
        "llama",
        lambda c: c.update(vocab_size=-5),
        r"vocab_size must be an int in \[1, 16777216\], got -5",
    ),
    "absurd size": (
        "qwen2",
        lambda c: c.update(hidden_size=10**12),
        "hidden_size must be an int in",
    ),
    "shape contradicts config": (
        "llama",
        lambda c: c.update(intermediate_size=64),
        "the config says shape \\(64, 32\\), the file holds \\(48, 32\\)",
    ),
    "no layer count": (
        "qwen2",  # its layer_types lists the layers: the count is what is missing
        lambda c: c.pop("num_hidden_layers"),
        "config.json: num_hidden_layers is missing",
    ),
    "no gpt2 layer count": ("gpt2", lambda c: c.pop("n_layer"), "n_layer is missing"),
    "no decoder_sparse_step": (
        "qwen2_moe",
        lambda c: c.update(decoder_sparse_step=0),
        r"decoder_sparse_step must be an int in \[1,",
    ),
    "mlp_only_layers not a list": (
        "qwen2_moe",
        lambda c: c.update(mlp_only_layers="0"),
        "mlp_only_layers must be a list of layer indices",
    ),
    "sliding layer without a window": (
        "qwen2",
        lambda c: c.update(layer_types=["full_attention", "sliding_attention"]),
        r"layers \[1\] are sliding_attention but no window is set \(use_sliding_window=False",
    ),
    "unknown layer type": (
        "qwen3",
        lambda c: c.update(layer_types=["full_attention", "chunked_attention"]),
        r"unsupported layer types \['chunked_attention'\]",
    ),
    "olmoe clip_qkv": ("olmoe", lambda c: c.update(clip_qkv=8.0), r"clip_qkv=8.0 \(clamping"),
    "olmoe head_dim": (
        "olmoe",
        lambda c: c.update(head_dim=16),
        "head_dim=16 must be hidden_size // num_attention_heads = 8",
    ),
    "gpt2 layer scaling": (
        "gpt2",
        lambda c: c.update(scale_attn_by_inverse_layer_idx=True),
        "scale_attn_by_inverse_layer_idx",
    ),
    "unknown activation": (
        "llama",
        lambda c: c.update(hidden_act="quick_gelu"),
        "hidden_act='quick_gelu' is not supported",
    ),
    "gemma3 attention softcapping": (
        "gemma3_text",  # transformers' Gemma 3 reads it but never applies it
        lambda c: c.update(attn_logit_softcapping=30.0),
        "attn_logit_softcapping=30.0 is set, but transformers' Gemma 3 does not apply it",
    ),
    "gemma bidirectional": (
        "gemma2",
        lambda c: c.update(use_bidirectional_attention=True),
        "use_bidirectional_attention=true",
    ),
    "gemma3 scaled sliding rope": (
        "gemma3_text",
        lambda c: c["rope_parameters"]["sliding_attention"].update(rope_type="linear", factor=2.0),
        "rope type 'linear' of the sliding_attention layers is not supported",
    ),
    "quantized": (
        "llama",
        lambda c: c.update(quantization_config={"quant_method": "gptq"}),
        "quantized weights",
    ),
}


@pytest.mark.parametrize("case", CONFIG_REFUSALS)
def test_unsupported_config_is_refused(saved, tmp_path, case):
    name, edit, message = CONFIG_REFUSALS[case]
    with pytest.raises(ValueError, match=message):
        parity.from_hf(_copy(saved, name, tmp_path, edit))


def test_wrong_width_lists_a_few_tensors_and_keeps_them_all(saved, tmp_path):
    directory = _copy(saved, "llama", tmp_path, lambda c: c.update(hidden_size=48))
    with pytest.raises(WeightsMismatch) as info:
        parity.from_hf(directory)
    err = info.value
    assert len(err.problems) > WeightsMismatch.SHOWN + 1
    message = str(err)
    assert message.count("the config says shape") == WeightsMismatch.SHOWN
    assert f"{len(err.problems)} problem(s)" in message
    assert message.endswith(f"... and {len(err.problems) - WeightsMismatch.SHOWN} more")
    assert "\n" not in message and isinstance(err, ValueError)


def test_missing_files_are_refused(saved, tmp_path):
    directory = _copy(saved, "llama", tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights: expected model.safetensors"):
        parity.from_hf(directory)
    (directory / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        parity.from_hf(directory)
    with pytest.raises(ValueError, match="not a directory"):
        parity.from_hf(tmp_path / "nowhere")


def test_missing_shard_is_refused(saved, tmp_path):
    directory = hf_models.save(saved("llama")[1], tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ValueError, match=f"named in the index but missing: \\['{shard.name}'\\]"):
        parity.from_hf(directory)


def test_truncated_file_is_refused_before_reading(saved, tmp_path):
    directory = _copy(saved, "llama", tmp_path)
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        parity.from_hf(directory)
    # a header that promises 400 GB in a file of a few bytes: refused from the header alone
    header = json.dumps(
        {
            "lm_head.weight": {
                "dtype": "F32",
                "shape": [10**6, 10**5],
                "data_offsets": [0, 4 * 10**11],
            }
        }
    ).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(ValueError, match="truncated"):
        parity.from_hf(directory)


def test_pickled_code_in_bin_is_refused_and_not_run(saved, tmp_path):
    directory = _copy(saved, "llama", tmp_path)
    (directory / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"x": _Payload(str(marker))}, directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"torch.load\(weights_only=True\) cannot read it"):
        parity.from_hf(directory)
    assert not marker.exists()


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bad_dtype_and_framework(saved):
    directory = saved("llama")[0]
    with pytest.raises(ValueError, match="dtype must be one of"):
        parity.from_hf(directory, dtype="float64")
    with pytest.raises(ValueError, match="framework must be one of"):
        parity.from_hf(directory, "tensorflow")
    with pytest.raises(TypeError, match="model must be a torch_block.TransformerLM"):
        parity.to_hf(object(), directory)


def test_from_hf_scanned_reads_each_layer_into_its_row(tmp_path):
    """from_hf(..., scan_layers=True) on a 3-layer Llama: one group, each array's row r the
    weight of layer r as the per-layer load has it, bit for bit; logits as transformers'."""
    reference = hf_models.build("llama", num_hidden_layers=3)
    directory = hf_models.save(reference, tmp_path / "llama3")
    lm, params = parity.from_hf(directory, "jax", scan_layers=True)
    assert lm.scan_layers and sorted(k for k in params if k.startswith("blocks_")) == ["blocks_0_3"]
    per_layer = parity.from_hf(directory, "jax")[1]
    stacked = flatten_dict(params["blocks_0_3"]["block_0"], sep="/")
    for r in range(3):
        for path, array in flatten_dict(per_layer[f"blocks_{r}"], sep="/").items():
            np.testing.assert_array_equal(np.asarray(stacked[path][r]), np.asarray(array))
    np.testing.assert_allclose(our_logits((lm, params)), hf_logits(reference), atol=1e-5, rtol=1e-6)
