"""Weights for the float64 references: random draws, and any twin's weights under torch's
state_dict names (the one naming every reference function reads).

NumPy only, except `randomize_torch` (torch, imported when called) and `random_params` (JAX,
imported when called, to read parameter shapes off a Flax module).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def to_f64(tree: Any) -> Any:
    """A nested dict of arrays as float64 NumPy arrays (same nesting)."""
    if isinstance(tree, Mapping):
        return {name: to_f64(value) for name, value in tree.items()}
    return np.asarray(tree, np.float64)


def random_array(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A unit-scale draw for a weight named by its torch key or Flax path ("/" or "." joined).

    Matrices N(0, 1/fan_in) (fan_in: torch's last axis, a Flax kernel's second to last);
    embeddings N(0, 1/d_model), so tied logits are unit-scale too; norm scales 1 + N(0, 0.1^2);
    biases N(0, 0.1^2).
    """
    z = rng.standard_normal(shape)
    leaf = name.rsplit(".", 1)[-1].rsplit("/", 1)[-1]
    if "embedding" in name:
        return z / math.sqrt(shape[-1])
    if "norm" in name and leaf in ("weight", "scale"):
        return 1.0 + 0.1 * z
    if leaf == "kernel":
        return z / math.sqrt(shape[-2])
    if leaf == "weight":
        return z / math.sqrt(shape[-1])
    return 0.1 * z


def torch_weights(module: Any) -> dict[str, np.ndarray]:
    """A torch module's state_dict as float64 NumPy arrays, by key."""
    return {key: value.detach().double().numpy() for key, value in module.state_dict().items()}


def randomize_torch(module: Any, seed: int = 0) -> Any:
    """Every parameter of a torch module redrawn with random_array, in eval mode."""
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            parameter.copy_(torch.from_numpy(random_array(name, tuple(parameter.shape), rng)))
    return module.eval()


def random_params(module: Any, *args: Any, seed: int = 0, **kwargs: Any) -> dict:
    """float32 parameters for `module.init(key, *args, **kwargs)` drawn with random_array.

    Only the shapes come from Flax (`jax.eval_shape`), so no initialiser compiles.
    """
    import jax

    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args, **kwargs)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = "/".join(part.key for part in path)
        return jax.numpy.asarray(random_array(name, leaf.shape, rng), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def flax_weights(params: Mapping) -> dict[str, np.ndarray]:
    """A Flax parameter tree as float64 arrays under torch's state_dict names.

    kernel (in, out) -> weight (out, in); scale and embedding -> weight; the stacked experts'
    kernels (E, in, out) and biases (E, out) -> one weight and bias per expert;
    blocks_{i} -> blocks.{i}.
    """
    out: dict[str, np.ndarray] = {}

    def visit(tree: Mapping, path: tuple[str, ...]) -> None:
        for name, value in tree.items():
            if isinstance(value, Mapping):
                visit(value, (*path, name))
                continue
            array = np.asarray(value, np.float64)
            parts = [part.replace("blocks_", "blocks.") for part in path]
            leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(name, name)
            if "experts" in parts:  # (E, ...) stacked: feed_forward/experts/fc1/kernel
                at = parts.index("experts")
                for e in range(array.shape[0]):
                    item = array[e].T if name == "kernel" else array[e]
                    key = [*parts[: at + 1], str(e), *parts[at + 1 :], leaf]
                    out[".".join(key)] = item
            else:
                out[".".join([*parts, leaf])] = array.T if name == "kernel" else array

    visit(params, ())
    return out
