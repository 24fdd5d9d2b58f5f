"""jax_block on a mesh of 8 CPU devices computes what one device computes (DESIGN section 10).

The sharded runs happen in two subprocesses of tests/jax/sharding_checks.py (XLA_FLAGS must give 8
host devices before jax is imported, and this process keeps its one device); they report
numbers as JSON, and the tests below hold them to one device and to the layout the rules
imply, restated here from the mesh shape and the model sizes. The first tests need no mesh and
run in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from jax_block import TransformerLM
from jax_block.sharding import (
    DEFAULT_RULES,
    LOGICAL_AXES,
    MESH_AXES,
    check_divisible,
    mesh_rules,
    param_axes,
    split_count,
)
from twin_core import LLAMA_OPTIONS

SCRIPT = Path(__file__).with_name("sharding_checks.py")
# Two processes, one per core: the MoE model (and GPT-OSS and DeepSeek-V3 on one mesh) compiles
# about as long as the rest together.
GROUPS = [
    ["dense", "missing_axis", "llama", "decode_step", "bad_inputs", "checkpoint"],
    ["moe", "frontier"],
]
MESHES = ["(8, 1, 1)", "(1, 8, 1)", "(2, 2, 2)", "(1, 2, 4)"]  # (data, tensor, expert)
MODELS = ["dense", "moe", "llama"]
ATOL = 1e-5
# How each parameter splits: per dimension 1 (whole), "t" (over tensor) or "e" (over expert).
# Heads, kv heads, FFN hidden units and the vocabulary go over tensor; experts over expert.
SPLITS = {
    "q_proj/kernel": (1, "t"),
    "q_proj/bias": ("t",),
    "k_proj/kernel": (1, "t"),
    "k_proj/bias": ("t",),
    "v_proj/kernel": (1, "t"),
    "v_proj/bias": ("t",),
    "out_proj/kernel": ("t", 1),
    "experts/fc1/kernel": ("e", 1, "t"),
    "experts/fc1/bias": ("e", "t"),
    "experts/fc3/kernel": ("e", 1, "t"),
    "experts/fc2/kernel": ("e", "t", 1),
    "experts/fc2/bias": ("e", 1),
    "fc1/kernel": (1, "t"),
    "fc1/bias": ("t",),
    "fc3/kernel": (1, "t"),
    "fc2/kernel": ("t", 1),
    "token_embedding/embedding": ("t", 1),
    "lm_head/kernel": (1, "t"),
    "sinks": ("t",),  # GPT-OSS: one per head
    # DeepSeek-V3's latent attention: the heads' side over tensor, the latent side whole
    "q_b_proj/kernel": (1, "t"),
    "kv_b_proj/kernel": (1, "t"),
    "experts/fc3/bias": ("e", "t"),  # GPT-OSS's experts have biases
}


def mesh_sizes(mesh: str) -> dict[str, int]:
    data, tensor, expert = json.loads(mesh.replace("(", "[").replace(")", "]"))
    return {"d": data, "t": tensor, "e": expert}


def expected_shard(path: str, full: list[int], sizes: dict[str, int]) -> list[int]:
    """The shape of one device's piece of parameter `path` of shape `full`."""
    split = next((s for suffix, s in SPLITS.items() if path.endswith(suffix)), (1,) * len(full))
    return [n // (1 if by == 1 else sizes[by]) for n, by in zip(full, split, strict=True)]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """The merged JSON of the check groups, run at once in subprocesses with 8 CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = tmp_path_factory.mktemp("sharding")
    runs = [
        (
            out / f"{i}.json",
            subprocess.Popen(
                [sys.executable, str(SCRIPT), str(out / f"{i}.json"), *names],
                env=env,
                cwd=SCRIPT.parents[2],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
        )
        for i, names in enumerate(GROUPS)
    ]
    merged: dict = {}
    for path, process in runs:
        log, _ = process.communicate(timeout=1200)
        assert process.returncode == 0, log[-4000:]
        merged.update(json.loads(path.read_text()))
    assert merged["devices"] == 8
    return merged


# --------------------------------------------------------------------------- one device
FAMILIES = {
    "dense": dict(n_heads=4, d_ff=48),
    "moe_shared": dict(
        n_heads=4,
        d_ff=16,
        use_moe=True,
        num_experts=4,
        shared_expert_d_ff=8,
        shared_expert_gate=True,
        tie_embeddings=False,
        gated_ffn=True,
    ),
    "llama": dict(
        n_heads=8,
        n_kv_heads=2,
        head_dim=4,
        d_ff=48,
        **LLAMA_OPTIONS,
        tie_embeddings=False,
    ),
    "gpt_oss": dict(
        n_heads=4,
        n_kv_heads=2,
        d_ff=16,
        norm="rmsnorm",
        positions="rope",
        gated_ffn=True,
        activation="silu",
        use_moe=True,
        num_experts=4,
        attention_sinks=True,
        router_bias=True,
        swiglu_limit=7.0,
        tie_embeddings=False,
    ),
    "deepseek_v3": dict(
        n_heads=4,
        d_ff=16,
        **LLAMA_OPTIONS,
        use_moe=True,
        num_experts=4,
        shared_expert_d_ff=16,
        router="grouped_sigmoid",
        n_group=2,
        q_lora_rank=8,
        kv_lora_rank=8,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        v_head_dim=4,
    ),
}
# MLA's latent dims (the q latent, the kv latent and its rope key, their norms) and the router's
# correction bias are on no axis, as is GPT-OSS's router bias (replicated)
UNNAMED = ("['gate']['kernel']", "_gate']['kernel']", "_bias']", "_a_proj']['kernel']")
UNNAMED += ("_a_norm']['scale']", "_b_proj']['kernel']", "['gate']['bias']")  # GPT-OSS's router


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_parameter_has_logical_names_and_init_stays_plain(family):
    sizes = dict(vocab_size=32, max_seq_len=16, d_model=16, n_layers=1)
    lm = TransformerLM.create(**sizes, **FAMILIES[family])
    variables = jax.eval_shape(lm.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    leaves = jax.tree_util.tree_leaves_with_path(variables["params"])
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for _, leaf in leaves)  # no boxes
    axes = jax.tree_util.tree_leaves_with_path(
        param_axes(lm), is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    assert [path for path, _ in axes] == [path for path, _ in leaves]
    for (path, names), (_, leaf) in zip(axes, leaves, strict=True):
        name = jax.tree_util.keystr(path)
        assert len(names) == leaf.ndim, name
        unnamed = [n for n in names if n is None]
        assert all(n in LOGICAL_AXES for n in names if n is not None), name
        # only the router (its bias too) and the shared expert's gate, all tiny, keep one axis
        # unnamed, and MLA's latent dims; the sinks split with the heads (GPT-OSS)
        assert not unnamed or name.endswith(UNNAMED), name
        if name.endswith("['sinks']"):
            assert tuple(names) == ("heads",)


def test_the_rules_map_every_logical_name_onto_the_three_mesh_axes():
    assert [name for name, _ in DEFAULT_RULES] == list(LOGICAL_AXES)
    assert {axis for _, axis in DEFAULT_RULES} == {None, *MESH_AXES}


def test_axes_a_mesh_lacks_or_has_of_size_one_replicate_and_several_axes_multiply():
    mesh = AbstractMesh((2, 4, 1), ("data", "tensor", "other"))  # no expert axis; other: size 1
    rules = dict(mesh_rules(mesh))
    assert rules["batch"] == "data" and rules["heads"] == "tensor" and rules["expert"] is None
    assert split_count("expert", mesh) == 1 and split_count("heads", mesh) == 4
    both = [("batch", ("data", "tensor", "other", "missing"))]
    assert dict(mesh_rules(mesh, both))["batch"] == ("data", "tensor")
    assert split_count("batch", mesh, both) == 8
    with pytest.raises(ValueError, match=r"batch size \(12\) is not divisible by 8.*'data'"):
        check_divisible("batch size", 12, "batch", mesh, both)
    check_divisible("batch size", 16, "batch", mesh, both)
    check_divisible("num_experts", 3, "expert", mesh)  # replicated: anything goes


# --------------------------------------------------------------------------- 8 devices
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("model", MODELS)
def test_logits_and_greedy_tokens_equal_one_device(results, model, mesh):
    case = results[model]["meshes"][mesh]
    assert case["logits_max_abs_diff"] <= ATOL
    assert case["greedy_equal"]


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("model", MODELS)
def test_one_train_step_equals_one_device(results, model, mesh):
    case = results[model]["meshes"][mesh]
    assert case["train_loss_diff"] <= ATOL
    assert case["train_params_max_abs_diff"] <= ATOL
    assert case["train_opt_state_max_abs_diff"] <= ATOL
    assert case["train_shardings_kept"]  # the next step reuses the compilation, in place


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("model", MODELS)
def test_each_device_holds_the_pieces_the_rules_give_it(results, model, mesh):
    """Parameters, the updated parameters and Adam's moments: heads, kv heads, FFN units and
    vocabulary split over tensor, experts over expert, the rest whole."""
    case, sizes = results[model]["meshes"][mesh], mesh_sizes(mesh)
    full = results[model]["full_shapes"]
    expected = {path: expected_shard(path, shape, sizes) for path, shape in full.items()}
    assert case["param_shards"] == expected
    assert case["train_param_shards"] == expected
    assert case["train_mu_shards"] == expected
    if model == "moe":  # E / n experts on each device
        experts = case["param_shards"]["blocks_0/feed_forward/experts/fc1/kernel"][0]
        assert experts == results[model]["config"]["num_experts"] // sizes["e"]
    total = results[model]["param_bytes"]
    assert max(case["param_bytes_per_device"]) < total or sizes["t"] == sizes["e"] == 1


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("model", MODELS)
def test_the_cache_splits_over_data_and_kv_heads_and_is_updated_in_place(results, model, mesh):
    case, sizes = results[model]["meshes"][mesh], mesh_sizes(mesh)
    config = results[model]["config"]
    B, bucket, new = results["shape"]
    heads = config["n_heads"]
    kv = config.get("n_kv_heads", heads)
    head_dim = config.get("head_dim", config["d_model"] // heads)
    assert case["cache_shard"] == [B // sizes["d"], kv // sizes["t"], bucket + new, head_dim]
    layers, positions = config["n_layers"], 4 * config["n_layers"]  # one int32 per layer
    keys_and_values = results[model]["cache_bytes"] - positions
    assert keys_and_values == 2 * layers * B * kv * (bucket + new) * head_dim * 4
    per_device = keys_and_values // (sizes["d"] * sizes["t"]) + positions
    assert case["cache_bytes_per_device"] == [per_device] * 8
    assert case["cache_donated"] and case["cache_in_place"]


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("model", MODELS)
def test_decode_step_collectives(results, model, mesh):
    """Megatron: one all-reduce after attention and one after the FFN per layer (and one for
    the embedding lookup over a vocabulary split over tensor); data parallel alone needs none;
    no all-gather ever brings a whole weight matrix to a device."""
    case, sizes = results[model]["meshes"][mesh], mesh_sizes(mesh)
    counts = case["decode_collectives"]["counts"]
    layers = results[model]["config"]["n_layers"]
    if model != "moe":
        assert counts["all-reduce"] == (2 * layers + 1 if sizes["t"] > 1 else 0)
        assert sum(counts.values()) == counts["all-reduce"]
    elif sizes["t"] > 1 or sizes["e"] > 1:  # experts' outputs are summed across devices
        assert counts["all-reduce"] >= 1
    weights = {tuple(shape) for shape in results[model]["full_shapes"].values()}
    for gathered in case["decode_collectives"]["all_gather_shapes"]:
        dims = tuple(int(d) for d in gathered.split("[")[1].rstrip("]").split(",") if d)
        assert dims not in weights and dims[::-1] not in weights, gathered


@pytest.mark.parametrize("model", MODELS)
def test_generate_on_a_mesh_equals_one_device_and_compiles_once_per_bucket(results, model):
    case = results[model]["meshes"]["(2, 2, 2)"]
    assert case["generate_equal"]
    assert case["generate_compilations"] == 1  # two prompt lengths, one bucket
    assert case["generate_shorter_shape"] == [results["shape"][0], results["shape"][2]]


def test_a_mesh_axis_the_rules_name_but_the_mesh_lacks_replicates(results):
    """A (data=4, expert=2) mesh has no tensor axis: heads, FFN and vocabulary stay whole."""
    case, B = results["missing_axis"], results["shape"][0]
    assert case["logits_max_abs_diff"] <= ATOL and case["greedy_equal"]
    assert case["param_shards"] == results["dense"]["full_shapes"]
    assert case["cache_shard"][0] == B // 4


def test_decode_step_of_a_block_on_a_mesh_equals_one_device(results):
    """A GQA/rope block on (2, 2, 2): prefill, then single tokens; two shapes, two compilations;
    the cache's batch over data (2) and its 8 kv heads over tensor (2)."""
    case = results["decode_step"]
    assert case["max_abs_diff"] <= ATOL
    assert case["compilations"] == 2
    assert case["cache_shard"] == [results["shape"][0] // 2, 4, 8, 4]


@pytest.mark.parametrize(
    "what, numbers",
    [
        ("heads", ("(4)", "8")),
        ("kv_heads", ("(2)", "8")),
        ("kv_heads_cache", ("(2)", "8")),
        ("generate_batch", ("(6)", "8")),
        ("cache_batch", ("(6)", "8")),
        ("cached_forward_batch", ("(6)", "8")),
        ("train_batch", ("(6)", "8")),
    ],
)
def test_sizes_that_do_not_split_evenly_are_refused_before_compiling(results, what, numbers):
    message, compilations = results["bad_inputs"]["errors"][what]
    assert all(n in message for n in numbers), message
    assert compilations == 0


def test_a_checkpoint_saved_on_one_mesh_goes_on_on_another(results):
    """Saved from (2, 2, 2) after one step, restored on (1, 4, 2): the next step's loss and
    weights are those of going on on (2, 2, 2)."""
    case = results["checkpoint"]
    assert case["params_restored_max_abs_diff"] == 0.0
    sizes = {"d": 1, "t": 4, "e": 2}
    expected = {
        path: expected_shard(path, shape, sizes)
        for path, shape in results["dense"]["full_shapes"].items()
    }
    assert case["restored_param_shards"] == expected
    assert case["restored_state_param_shards"] == expected
    assert case["restored_step"] == 1
    assert abs(case["loss"] - case["loss_after_restore"]) <= ATOL
    assert case["params_max_abs_diff"] <= ATOL
    assert case["compilations_for_two_steps"] <= 1


@pytest.mark.parametrize("model", ["gpt_oss", "deepseek_v3"])
def test_frontier_moe_on_a_mesh_equals_one_device(results, model):
    """GPT-OSS and DeepSeek-V3 on (2, 2, 2), decoding the prompts token by token from their
    caches, then greedily: every step's logits and the tokens are those of one device; each
    device holds half the experts (and half the heads), the routers and DeepSeek's latent-side
    weights whole."""
    case, sizes = results["frontier"][model], mesh_sizes("(2, 2, 2)")
    assert case["logits_max_abs_diff"] <= ATOL
    assert case["greedy_equal"]
    expected = {
        path: expected_shard(path, shape, sizes) for path, shape in case["full_shapes"].items()
    }
    assert case["param_shards"] == expected
    experts = case["param_shards"]["blocks_0/feed_forward/experts/fc1/kernel"][0]
    assert experts == case["full_shapes"]["blocks_0/feed_forward/experts/fc1/kernel"][0] // 2
    assert case["cache_donated"] and case["cache_in_place"]


def test_scanned_layers_on_a_mesh_equal_one_device(results):
    """Llama's 3 layers scanned on (2, 2, 2): every decode step's logits and the greedy tokens
    are one device's; each stacked parameter keeps its layer axis whole and splits the rest as
    a layer's parameter; the stacked cache splits batch over data and kv heads over tensor."""
    case, sizes = results["frontier"]["llama_scanned"], mesh_sizes("(2, 2, 2)")
    assert case["logits_max_abs_diff"] <= ATOL
    assert case["greedy_equal"]
    stacked = [path for path in case["full_shapes"] if path.startswith("blocks_0_3/block_0/")]
    assert len(stacked) == len([p for p in case["full_shapes"] if p.startswith("blocks_")]) > 0
    for path, full in case["full_shapes"].items():
        if path in stacked:
            assert full[0] == 3
            want = [3, *expected_shard(path, full[1:], sizes)]
        else:
            want = expected_shard(path, full, sizes)
        assert case["param_shards"][path] == want, path
    B, bucket, new = results["shape"]
    kv_heads, head_dim = 8, 4
    shard = [3, B // 2, kv_heads // 2, bucket + new, head_dim]
    assert case["cache_shards"]["KVCache.k_cache"] == shard
    assert case["cache_shards"]["KVCache.v_cache"] == shard
    assert case["cache_donated"]


def test_a_latent_cache_splits_its_batch_over_data_and_keeps_the_latent_whole(results):
    """DeepSeek-V3's LatentCache on (2, 2, 2): each device holds half the batch and every slot
    of the latent (kv_lora_rank 8) and the rope key (4); the position replicated."""
    case = results["frontier"]["deepseek_v3"]
    B, bucket, new = results["shape"]
    assert case["cache_shards"] == {
        "LatentCache.latent": [B // 2, bucket + new, 8],
        "LatentCache.rope_key": [B // 2, bucket + new, 4],
        "LatentCache.position": [],
    }
    latent_and_key = case["cache_bytes"] - 4  # one int32 position
    assert latent_and_key == B * (bucket + new) * (8 + 4) * 4
    assert case["cache_bytes_per_device"] == [latent_and_key // 2 + 4] * 8
