"""Weight conversion between torch_block and jax_block, both directions driven by `mapping`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict

import jax_block
import torch_block
from jax_block.scan import per_layer, scanned
from twin_core import BlockConfig, LMConfig
from twin_core.run_files import framework_name

from .mapping import Row, block_table, lm_table


@dataclass(frozen=True)
class Pair:
    """A module that exists in both frameworks, and what conversion needs to know of it."""

    torch_cls: type
    flax_cls: type
    config_cls: type  # the twin_core dataclass both are built from
    table: Callable[[Any], list[Row]]  # config -> rows
    torch_buffers: Callable[[Any], dict[str, tuple[int, ...]]]  # config -> torch-only buffers
    dummy_input: Callable[[Any], jax.Array]  # config -> an input that initialises the module


def _block_buffers(config: BlockConfig) -> dict[str, tuple[int, ...]]:
    return {"feed_forward.expert_counts": (config.num_experts,)} if config.use_moe else {}


PAIRS: dict[str, Pair] = {
    "TransformerBlock": Pair(
        torch_block.TransformerBlock,
        jax_block.TransformerBlock,
        BlockConfig,
        block_table,
        _block_buffers,
        lambda config: jnp.zeros((1, 1, config.d_model)),
    ),
    "TransformerLM": Pair(
        torch_block.TransformerLM,
        jax_block.TransformerLM,
        LMConfig,
        lm_table,
        lambda config: {
            f"blocks.{i}.{key}": shape
            for i, block in enumerate(config.block_configs())
            for key, shape in _block_buffers(block).items()
        },
        lambda config: jnp.zeros((1, 1), jnp.int32),
    ),
}


def _pair_of(module: Any) -> Pair:
    for pair in PAIRS.values():
        if isinstance(module, (pair.torch_cls, pair.flax_cls)):
            return pair
    raise TypeError(
        f"expected one of {sorted(PAIRS)} from torch_block or jax_block, "
        f"got {type(module).__name__}"
    )


def config_of(module: Any) -> BlockConfig | LMConfig:
    """The framework-free configuration of a module of either twin."""
    _pair_of(module)
    return module.config


def _expanded(rows: list[Row], config: Any) -> list[tuple[Row, str, int | None]]:
    """(row, torch key, expert index or None) for every torch tensor the table names."""
    out = []
    for row in rows:
        if "{e}" in row.torch_key:
            out += [(row, row.torch_key.format(e=e), e) for e in range(config.num_experts)]
        else:
            out.append((row, row.torch_key, None))
    return out


@functools.lru_cache(maxsize=64)
def _flax_shapes(flax_module: nn.Module) -> dict[str, tuple[int, ...]]:
    config = config_of(flax_module)
    dummy = _pair_of(flax_module).dummy_input(config)
    variables = jax.eval_shape(lambda: flax_module.init(jax.random.PRNGKey(0), dummy))
    return {"/".join(k): v.shape for k, v in flatten_dict(variables["params"]).items()}


def _torch_shape(flax_shape: tuple[int, ...], row: Row, expert: int | None) -> tuple[int, ...]:
    shape = flax_shape[1:] if expert is not None else flax_shape
    return tuple(reversed(shape)) if row.transpose else tuple(shape)


def _raise_if_any(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(f"{what}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy copy that keeps bfloat16 (through float32, which is exact)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return np.asarray(jnp.asarray(tensor.float().numpy(), jnp.bfloat16))
    return tensor.numpy().copy()


def to_torch_tensor(array: Any) -> torch.Tensor:
    """A torch copy that keeps bfloat16 (through float32, which is exact)."""
    array = np.asarray(array)
    if array.dtype == jnp.bfloat16:
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(array.copy())


def torch_to_flax(state_dict: dict[str, torch.Tensor], flax_module: nn.Module) -> dict:
    """Flax params for `flax_module` from a torch state_dict; ValueError lists every mismatch.
    A TransformerLM with `scan_layers` gets its layers stacked (`jax_block.scan`)."""
    if getattr(flax_module, "scan_layers", False):
        per_layer = flax_module.clone(scan_layers=False, parent=None)
        return scanned(per_layer, torch_to_flax(state_dict, per_layer))[1]
    pair, config = _pair_of(flax_module), config_of(flax_module)
    flax_shapes = _flax_shapes(flax_module)
    entries = _expanded(pair.table(config), config)
    expected = {key for _, key, _ in entries} | set(pair.torch_buffers(config))
    problems = [f"missing key {key!r}" for _, key, _ in entries if key not in state_dict]
    problems += [f"unexpected key {key!r}" for key in state_dict if key not in expected]
    wanted = {key: _torch_shape(flax_shapes[row.flax_path], row, e) for row, key, e in entries}
    wanted.update(pair.torch_buffers(config))
    for key, want in wanted.items():
        if key in state_dict and tuple(state_dict[key].shape) != want:
            problems.append(f"{key!r}: expected shape {want}, got {tuple(state_dict[key].shape)}")
    _raise_if_any(problems, f"state_dict does not match the {type(flax_module).__name__}")

    flat = {}
    for row in pair.table(config):
        if "{e}" in row.torch_key:
            experts = range(config.num_experts)
            array = np.stack([to_numpy(state_dict[row.torch_key.format(e=e)]) for e in experts])
        else:
            array = to_numpy(state_dict[row.torch_key])
        flat[tuple(row.flax_path.split("/"))] = jnp.asarray(
            np.swapaxes(array, -1, -2) if row.transpose else array
        )
    return unflatten_dict(flat)


def flax_to_torch(params: dict, flax_module: nn.Module) -> dict[str, torch.Tensor]:
    """A torch state_dict (loadable with strict=True) from Flax params; ValueError on mismatch.
    A TransformerLM with `scan_layers` takes its params in the scanned layout."""
    flax_module, params = per_layer(flax_module, params)
    pair, config = _pair_of(flax_module), config_of(flax_module)
    flax_shapes = _flax_shapes(flax_module)
    given = {"/".join(k): v for k, v in flatten_dict(params).items()}
    problems = [f"missing path {path!r}" for path in flax_shapes if path not in given]
    problems += [f"unexpected path {path!r}" for path in given if path not in flax_shapes]
    for path, want in flax_shapes.items():
        if path in given and tuple(given[path].shape) != tuple(want):
            problems.append(f"{path!r}: expected shape {tuple(want)}, got {given[path].shape}")
    _raise_if_any(problems, f"params do not match the {type(flax_module).__name__}")

    state_dict = {}
    for row, key, expert in _expanded(pair.table(config), config):
        array = np.asarray(given[row.flax_path])
        array = array[expert] if expert is not None else array
        state_dict[key] = to_torch_tensor(np.swapaxes(array, -1, -2) if row.transpose else array)
    dtype = next(iter(state_dict.values())).dtype
    for key, shape in pair.torch_buffers(config).items():
        state_dict[key] = torch.zeros(shape, dtype=dtype)
    return state_dict


def _torch_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def from_torch(
    torch_module: torch.nn.Module, *, scan_layers: bool = False
) -> tuple[nn.Module, dict]:
    """The matching Flax module and its params, from a torch_block module; a TransformerLM with
    `scan_layers` scans its layers (`jax_block.scan`)."""
    pair = _pair_of(torch_module)
    dtype = jnp.bfloat16 if _torch_dtype(torch_module) == torch.bfloat16 else jnp.float32
    flax_module = pair.flax_cls.from_config(config_of(torch_module), dtype=dtype, param_dtype=dtype)
    params = torch_to_flax(torch_module.state_dict(), flax_module)
    return scanned(flax_module, params) if scan_layers else (flax_module, params)


def to_torch(flax_module: nn.Module, params: dict) -> torch.nn.Module:
    """The matching torch_block module, in eval mode, with the Flax params loaded."""
    pair = _pair_of(flax_module)
    torch_module = pair.torch_cls.from_config(config_of(flax_module))
    if flax_module.param_dtype == jnp.bfloat16:
        torch_module = torch_module.to(torch.bfloat16)
    torch_module.load_state_dict(flax_to_torch(params, flax_module), strict=True)
    return torch_module.eval()


def seeded_lm(config: LMConfig, seed: int, framework: str = "torch") -> Any:
    """A TransformerLM of `config` with torch_block's initial weights drawn from `seed`: the torch
    module in eval mode, or for framework "jax" the same weights as `(flax_module, params)`
    through the weight table (Flax's own initializers draw other numbers)."""
    torch.manual_seed(seed)
    lm = torch_block.TransformerLM.from_config(config).eval()
    return lm if framework_name(framework) == "torch" else from_torch(lm)
