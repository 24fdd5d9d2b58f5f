"""Weight conversion: exact layout, bit-exact round trips both ways, strict loading, errors."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

import jax_block
import torch_block
from parity import flax_to_torch, from_torch, to_torch, torch_to_flax

D_MODEL, N_HEADS, D_FF, EXPERTS = 16, 2, 32, 4
DENSE = dict(d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF, dropout=0.0)
MOE = dict(DENSE, use_moe=True, num_experts=EXPERTS, top_k_experts=2)
CONFIGS = {"dense": DENSE, "moe": MOE}
DTYPES = {"float32": (torch.float32, jnp.float32), "bfloat16": (torch.bfloat16, jnp.bfloat16)}
CASES = [(c, d) for c in CONFIGS for d in DTYPES]


def random_torch_block(config: dict, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A torch block whose every parameter is distinct random numbers (LayerNorms included)."""
    torch.manual_seed(seed)
    block = torch_block.TransformerBlock(**config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_()
    return block.to(dtype).eval()


def random_flax_params(config: dict, dtype: jnp.dtype, seed: int = 0):
    """A Flax block and params whose every leaf is distinct random numbers."""
    module = jax_block.TransformerBlock.create(**config, dtype=dtype, param_dtype=dtype)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(seed), jnp.zeros((1, 1, D_MODEL)))
    rng = np.random.default_rng(seed)
    return module, jax.tree_util.tree_map(
        lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape).astype(dtype)), shapes["params"]
    )


def flat(params) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}


def numpy_of(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


# --------------------------------------------------------------------------- layout
@pytest.mark.parametrize("config,dtype", CASES)
def test_torch_to_flax_layout_matches_an_independent_listing(config, dtype):
    block = random_torch_block(CONFIGS[config], DTYPES[dtype][0])
    module, params = from_torch(block)
    got = flat(params)
    want = {}
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        layer = getattr(block.attention, name)
        want[f"attention/{name}/kernel"] = numpy_of(layer.weight).T
        want[f"attention/{name}/bias"] = numpy_of(layer.bias)
    for name in ("norm1", "norm2"):
        want[f"{name}/scale"] = numpy_of(getattr(block, name).weight)
        want[f"{name}/bias"] = numpy_of(getattr(block, name).bias)
    ff = block.feed_forward
    if config == "moe":
        want["feed_forward/gate/kernel"] = numpy_of(ff.gate.weight).T
        for fc in ("fc1", "fc2"):
            experts = [getattr(ff.experts[e], fc) for e in range(EXPERTS)]
            want[f"feed_forward/experts/{fc}/kernel"] = np.stack(
                [numpy_of(x.weight).T for x in experts]
            )
            want[f"feed_forward/experts/{fc}/bias"] = np.stack([numpy_of(x.bias) for x in experts])
    else:
        for fc in ("fc1", "fc2"):
            want[f"feed_forward/{fc}/kernel"] = numpy_of(getattr(ff, fc).weight).T
            want[f"feed_forward/{fc}/bias"] = numpy_of(getattr(ff, fc).bias)
    assert sorted(got) == sorted(want)
    for path, array in want.items():
        assert got[path].dtype == np.dtype(DTYPES[dtype][1]), path
        assert np.array_equal(got[path].astype(np.float32), array), path
    assert module.dtype == DTYPES[dtype][1] and module.param_dtype == DTYPES[dtype][1]


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("config,dtype", CASES)
def test_torch_flax_torch_round_trip_is_bit_exact(config, dtype):
    block = random_torch_block(CONFIGS[config], DTYPES[dtype][0])
    original = block.state_dict()
    module, params = from_torch(block)
    back = flax_to_torch(params, module)
    assert sorted(back) == sorted(original)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype, key
        assert torch.equal(back[key], tensor), key
    rebuilt = to_torch(module, params).state_dict()
    for key, tensor in original.items():
        assert rebuilt[key].dtype == tensor.dtype and torch.equal(rebuilt[key], tensor), key


@pytest.mark.parametrize("config,dtype", CASES)
def test_flax_torch_flax_round_trip_is_bit_exact(config, dtype):
    module, params = random_flax_params(CONFIGS[config], DTYPES[dtype][1])
    state_dict = flax_to_torch(params, module)
    back = torch_to_flax(state_dict, module)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    original, got = flat(params), flat(back)
    for path, array in original.items():
        assert got[path].dtype == array.dtype, path
        assert np.array_equal(got[path], array), path


@pytest.mark.parametrize("config,dtype", CASES)
def test_flax_to_torch_loads_strictly_into_a_fresh_block(config, dtype):
    module, params = random_flax_params(CONFIGS[config], DTYPES[dtype][1])
    state_dict = flax_to_torch(params, module)
    fresh = torch_block.TransformerBlock(**CONFIGS[config]).to(DTYPES[dtype][0])
    result = fresh.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    kernel = flat(params)["attention/q_proj/kernel"]  # (in, out)
    assert np.array_equal(numpy_of(fresh.attention.q_proj.weight), kernel.astype(np.float32).T)


# --------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    "config",
    [
        DENSE,
        dict(DENSE, causal=False, dropout=0.2),
        dict(MOE, expert_capacity_factor=None, router_z_loss_coef=0.01),
        dict(MOE, num_experts=3, top_k_experts=1, expert_capacity_factor=0.5, causal=False),
    ],
)
def test_from_torch_to_torch_keeps_the_configuration(config):
    block = torch_block.TransformerBlock(**config)
    module, params = from_torch(block)
    for name, value in block.config.kwargs().items():
        assert getattr(module.config, name) == value, name
    back = to_torch(module, params)
    assert back.config == block.config
    assert not back.training


def test_from_torch_refuses_an_unknown_module():
    with pytest.raises(TypeError, match="TransformerBlock.*got Linear"):
        from_torch(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------- errors
def flax_module(config: dict) -> jax_block.TransformerBlock:
    return jax_block.TransformerBlock.create(**config)


def conversion_error(state_dict: dict, config: dict) -> str:
    before = {k: v.clone() for k, v in state_dict.items()}
    with pytest.raises(ValueError) as info:
        torch_to_flax(state_dict, flax_module(config))
    assert sorted(state_dict) == sorted(before)  # the input is left as it was
    assert all(torch.equal(state_dict[k], v) for k, v in before.items())
    return str(info.value)


def shapes_in(message: str, key: str) -> tuple[str, str]:
    """(expected, given) shapes the message states for `key`."""
    found = re.search(re.escape(repr(key)) + r": expected shape (\(.*?\)), got (\(.*?\))", message)
    assert found, f"no shapes for {key} in:\n{message}"
    return found.group(1), found.group(2)


def test_missing_unexpected_and_misshapen_keys_are_listed_in_one_error():
    state_dict = random_torch_block(MOE, torch.float32).state_dict()
    del state_dict["attention.q_proj.bias"]
    del state_dict["feed_forward.experts.1.fc2.weight"]
    state_dict["attention.rotary.weight"] = torch.zeros(3)
    state_dict["norm1.weight"] = torch.zeros(D_MODEL + 1)
    state_dict["attention.out_proj.weight"] = torch.zeros(D_MODEL, D_MODEL + 2)
    message = conversion_error(state_dict, MOE)
    assert "missing key 'attention.q_proj.bias'" in message
    assert "missing key 'feed_forward.experts.1.fc2.weight'" in message
    assert "unexpected key 'attention.rotary.weight'" in message
    assert shapes_in(message, "norm1.weight") == ("(16,)", "(17,)")
    assert shapes_in(message, "attention.out_proj.weight") == ("(16, 16)", "(16, 18)")
    assert "5 problem(s)" in message


def test_fewer_experts_than_the_module_lists_every_missing_expert_and_the_gate():
    state_dict = random_torch_block(dict(MOE, num_experts=2), torch.float32).state_dict()
    message = conversion_error(state_dict, MOE)
    for e in (2, 3):
        for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            assert f"missing key 'feed_forward.experts.{e}.{name}'" in message
    assert shapes_in(message, "feed_forward.gate.weight") == ("(4, 16)", "(2, 16)")


def test_more_experts_than_the_module_lists_every_unexpected_expert_and_the_gate():
    state_dict = random_torch_block(dict(MOE, num_experts=6), torch.float32).state_dict()
    message = conversion_error(state_dict, MOE)
    for e in (4, 5):
        for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            assert f"unexpected key 'feed_forward.experts.{e}.{name}'" in message
    assert shapes_in(message, "feed_forward.gate.weight") == ("(4, 16)", "(6, 16)")


def test_a_configuration_the_weights_contradict_lists_every_key_with_both_shapes():
    state_dict = random_torch_block(dict(MOE, d_ff=24), torch.float32).state_dict()
    message = conversion_error(state_dict, MOE)  # the module says d_ff=32
    for e in range(EXPERTS):
        prefix = f"feed_forward.experts.{e}"
        assert shapes_in(message, f"{prefix}.fc1.weight") == ("(32, 16)", "(24, 16)")
        assert shapes_in(message, f"{prefix}.fc1.bias") == ("(32,)", "(24,)")
        assert shapes_in(message, f"{prefix}.fc2.weight") == ("(16, 32)", "(16, 24)")
    assert "attention" not in message and "norm" not in message


def test_dense_weights_for_a_moe_module_list_both_sides():
    state_dict = random_torch_block(DENSE, torch.float32).state_dict()
    message = conversion_error(state_dict, MOE)
    assert "missing key 'feed_forward.gate.weight'" in message
    assert "missing key 'feed_forward.experts.0.fc1.weight'" in message
    assert "unexpected key 'feed_forward.fc1.weight'" in message
    assert "unexpected key 'feed_forward.fc2.bias'" in message


def test_flax_params_with_missing_extra_and_misshapen_paths_are_listed_in_one_error():
    module, params = random_flax_params(MOE, jnp.float32)
    params = jax.tree_util.tree_map(lambda x: x, params)  # a copy to edit
    del params["attention"]["k_proj"]["bias"]
    params["attention"]["extra"] = {"kernel": jnp.zeros((2, 2))}
    params["feed_forward"]["experts"]["fc1"]["kernel"] = jnp.zeros((EXPERTS + 1, D_MODEL, D_FF))
    with pytest.raises(ValueError) as info:
        flax_to_torch(params, module)
    message = str(info.value)
    assert "missing path 'attention/k_proj/bias'" in message
    assert "unexpected path 'attention/extra/kernel'" in message
    assert "'feed_forward/experts/fc1/kernel': expected shape (4, 16, 32), got (5, 16, 32)" in (
        message
    )
