"""Sharded checkpoints with orbax-checkpoint: each process writes its own shards, and a restore
places every array on any mesh (another shape, another number of devices).

Params (the plain tree of `lm.init(...)["params"]`, sharded by `jax_block.shard_params`) and
training states (`jax_block.train.create_train_state(..., mesh=mesh)`) are saved as they are;
restoring reads only the pieces each device needs. The single-file safetensors checkpoints of
`jax_block.train` and `parity` stay the format that the torch twin reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from twin_core import TrainConfig

from .lm import TransformerLM
from .sharding import check_mesh, param_shardings, replicated


def save(path: str | os.PathLike, tree: Any) -> None:
    """Write a pytree of arrays (params, or a TrainState) to the directory `path`.

    The directory must not exist. Orbax writes into a temporary directory and renames it when
    every shard is written, so `path` is complete or absent. Returns once the write is done.
    """
    path = Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"a checkpoint directory already exists at {path}")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()


def restore(path: str | os.PathLike, like: Any) -> Any:
    """The tree saved at `path`, shaped and placed like `like`.

    `like` is a tree of the same structure whose leaves are arrays or `jax.ShapeDtypeStruct`s
    with a `sharding`: their shardings say where each restored array goes (any mesh).
    """
    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    return ocp.StandardCheckpointer().restore(path, abstract(like))


def abstract(tree: Any, mesh: Mesh | None = None) -> Any:
    """Each array of `tree` as a ShapeDtypeStruct with its sharding (nothing allocated).

    With `mesh`, a leaf not placed on it (a step counter on one device) is replicated on it.
    """

    def one(a) -> jax.ShapeDtypeStruct:
        sharding = a.sharding
        if mesh is not None and getattr(sharding, "mesh", None) != mesh:
            sharding = replicated(mesh)
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def abstract_params(lm: TransformerLM, mesh: Mesh, rules=None) -> dict:
    """`lm`'s parameters as ShapeDtypeStructs placed on `mesh` by `rules`."""
    shapes = jax.eval_shape(lm.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    return jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        shapes["params"],
        param_shardings(lm, mesh, rules),
    )


def restore_params(path: str | os.PathLike, lm: TransformerLM, mesh: Mesh, rules=None) -> dict:
    """Params saved by `save` (from any mesh), placed on `mesh` as `shard_params` places them."""
    return restore(path, abstract_params(lm, mesh, rules))


def restore_train_state(
    path: str | os.PathLike, lm: TransformerLM, config: TrainConfig, mesh: Mesh, rules=None
):
    """A TrainState saved by `save` (from any mesh), continued on `mesh` with `config`.

    The target is what `create_train_state(lm, params, config, mesh=mesh)` builds; it is made
    from zeros created already sharded, and only its shapes and places are kept.
    """
    from .train import create_train_state  # train imports generation; keep this module light

    mesh = check_mesh(mesh)
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype, device=s.sharding), abstract_params(lm, mesh, rules)
    )
    target = abstract(create_train_state(lm, zeros, config, mesh=mesh, rules=rules), mesh)
    del zeros
    return restore(path, target)
