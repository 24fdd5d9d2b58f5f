"""Logical axis names, the rules that map them onto a device mesh, and placement on the mesh.

Every parameter, the KV cache and the main activations name their axes with the logical names
of `LOGICAL_AXES`; `DEFAULT_RULES` maps those onto the mesh axes `data`, `tensor` and `expert`
(Flax's `nn.logical_axis_rules` format: the first rule whose mesh axis is free wins). A mesh may
have any of the axes, of any size: a rule naming an axis the mesh lacks replicates that
dimension. The partitioner (XLA's SPMD) inserts the collectives; the model code is the same
for one device and for many.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "tensor", "expert")
LOGICAL_AXES = (
    "batch",
    "length",
    "embed",
    "heads",
    "kv_heads",
    "head_dim",
    "mlp",
    "vocab",
    "expert",
    "layers",
)
Rules = tuple[tuple[str, Any], ...]
# batch over data (data parallel); heads, kv heads, the FFN hidden size and the vocabulary over
# tensor (Megatron: column-parallel q/k/v and fc1/fc3, row-parallel out_proj and fc2); the
# stacked experts over expert; the rest (the scanned layers' stacking axis too) replicated.
DEFAULT_RULES: Rules = (
    ("batch", "data"),
    ("length", None),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("layers", None),
)
CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")  # KVCache keys and values (B, KV, S, D)
LATENT_CACHE_AXES = ("batch", None, None)  # LatentCache latent, rope key (B, S, R|Dr): batch only
ACTIVATION_AXES = ("batch", "length", "embed")  # the residual stream (B, T, d_model)

# The mesh and rules of the jitted call being traced (set by `use_mesh`), or None.
_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "jax_block_mesh", default=None
)


class AxisNamedModule(nn.Module):
    """A Linen module whose parameters carry logical axis names, and whose init is plain.

    Parameters are created through `nn.with_logical_partitioning`, so `init` builds
    `nn.LogicallyPartitioned` boxes; `init` and `init_with_output` unbox them, so users (and
    files, parity) get plain arrays. `param_axes` reads the names back.
    """

    @nn.nowrap
    def init_with_output(self, *args, **kwargs) -> tuple[Any, Any]:
        """Flax's init_with_output, with the variables unboxed to plain arrays."""
        out, variables = super().init_with_output(*args, **kwargs)
        return out, nn.meta.unbox(variables)


def make_mesh(data: int = 1, tensor: int = 1, expert: int = 1, devices=None) -> Mesh:
    """A (data, tensor, expert) mesh over `devices` (default: every device of every process)."""
    return jax.make_mesh(
        (data, tensor, expert), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices
    )


def check_mesh(mesh: Mesh) -> Mesh:
    """`mesh` as a mesh of Auto (partitioner-propagated) axes; TypeError if it is not a Mesh.

    An Explicit-axes mesh (`jax.make_mesh`'s default) is rebuilt with Auto axes over the same
    devices: jax_block states shardings as constraints and lets the partitioner propagate them.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if all(kind == AxisType.Auto for kind in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def check_rules(rules: Sequence | None) -> Rules | None:
    """`rules` as a tuple of (logical name, mesh axes) pairs (hashable: a static jit argument)."""
    if rules is None:
        return None
    out = []
    for rule in rules:
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"a rule must be a pair (logical axis name, mesh axes), got {rule!r}")
        name, axes = rule
        out.append((name, tuple(axes) if isinstance(axes, list) else axes))
    return tuple(out)


def mesh_rules(mesh: Mesh, rules: Sequence | None = None) -> Rules:
    """`rules` (default DEFAULT_RULES) without the mesh axes that `mesh` lacks or has of size 1
    (splitting over one device is replicating: the spelling jit gives its outputs)."""
    out = []
    for name, axes in DEFAULT_RULES if rules is None else check_rules(rules):
        present = tuple(a for a in _as_tuple(axes) if mesh.shape.get(a, 1) > 1)
        out.append((name, present[0] if len(present) == 1 else present or None))
    return tuple(out)


def mesh_axes_of(name: str, mesh: Mesh, rules: Sequence | None = None) -> tuple[str, ...]:
    """The mesh axes that logical axis `name` is split over (empty: replicated)."""
    return _as_tuple(nn.logical_to_mesh_axes((name,), mesh_rules(mesh, rules))[0])


def split_count(name: str, mesh: Mesh, rules: Sequence | None = None) -> int:
    """Into how many pieces `mesh` splits logical axis `name`."""
    return math.prod(mesh.shape[a] for a in mesh_axes_of(name, mesh, rules))


def check_divisible(what: str, size: int, name: str, mesh: Mesh, rules=None) -> None:
    """ValueError unless `size` (of `what`, logical axis `name`) splits evenly over the mesh."""
    count = split_count(name, mesh, rules)
    if size % count:
        axes = mesh_axes_of(name, mesh, rules)
        sizes = " x ".join(f"{a!r} ({mesh.shape[a]})" for a in axes)
        raise ValueError(
            f"{what} ({size}) is not divisible by {count}, the size of mesh "
            f"{'axis' if len(axes) == 1 else 'axes'} {sizes} that the rule for {name!r} "
            "splits it over"
        )


def check_model(config, mesh: Mesh, rules=None) -> None:
    """ValueError unless a BlockConfig/LMConfig's heads, kv heads, FFN sizes (dense layers'
    too), experts and vocabulary split evenly over the axes the rules give them."""
    check_divisible("n_heads", config.n_heads, "heads", mesh, rules)
    check_divisible("n_kv_heads", config.resolved_n_kv_heads, "kv_heads", mesh, rules)
    check_divisible("d_ff", config.d_ff, "mlp", mesh, rules)
    check_divisible("d_model", config.d_model, "embed", mesh, rules)
    if config.use_moe:
        check_divisible("num_experts", config.num_experts, "expert", mesh, rules)
        if config.shared_expert_d_ff is not None:
            check_divisible("shared_expert_d_ff", config.shared_expert_d_ff, "mlp", mesh, rules)
    if getattr(config, "dense_layers", ()):  # an LMConfig's dense layers of an MoE model
        dense_d_ff = config.d_ff if config.dense_d_ff is None else config.dense_d_ff
        check_divisible("dense_d_ff", dense_d_ff, "mlp", mesh, rules)
    if hasattr(config, "vocab_size"):
        check_divisible("vocab_size", config.vocab_size, "vocab", mesh, rules)
        if config.positions == "learned":
            check_divisible("max_seq_len", config.max_seq_len, "length", mesh, rules)


def check_batch(batch_size: int, mesh: Mesh, rules=None) -> None:
    """ValueError unless `batch_size` splits evenly over the axes of the rule for `batch`."""
    check_divisible("batch size", batch_size, "batch", mesh, rules)


# --------------------------------------------------------------------------- inside jit
@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Sequence | None = None) -> Iterator[None]:
    """While tracing inside it, `constrain` places arrays on `mesh` by `rules`; mesh None: no-op.

    Used inside the jitted functions (jax.set_mesh may not be entered under jit).
    """
    if mesh is None:
        yield
        return
    token = _ACTIVE.set((mesh, mesh_rules(mesh, rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: tuple) -> jax.Array:
    """`nn.with_logical_constraint(x, names)` on the mesh of `use_mesh`.

    Outside `use_mesh` Flax's own context applies (`nn.logical_axis_rules` and `jax.set_mesh`),
    and without one this is the identity.
    """
    active = _ACTIVE.get()
    if active is None:
        return nn.with_logical_constraint(x, names)
    mesh, rules = active
    return nn.with_logical_constraint(x, names, rules=rules, mesh=mesh)


def active_split_count(name: str) -> int:
    """Into how many pieces the mesh of `use_mesh` splits logical axis `name` (1 outside)."""
    active = _ACTIVE.get()
    return 1 if active is None else split_count(name, *active)


# --------------------------------------------------------------------------- placement
@functools.lru_cache(maxsize=64)
def param_axes(module: nn.Module) -> Any:
    """The logical axis names of `module`'s parameters: a tree of PartitionSpec of names.

    Read from the module's initializers (`jax.eval_shape`: nothing is computed). `module` is a
    TransformerLM (example input: token ids) or a block (example input: activations).
    """
    if hasattr(module.config, "vocab_size"):
        example = jnp.zeros((1, 1), jnp.int32)
    else:
        example = jnp.zeros((1, 1, module.config.d_model), jnp.float32)
    boxed = jax.eval_shape(
        lambda: nn.Module.init_with_output(module, jax.random.PRNGKey(0), example)[1]
    )
    return nn.get_partition_spec(boxed["params"])


def param_shardings(module: nn.Module, mesh: Mesh, rules: Sequence | None = None) -> Any:
    """NamedSharding of every parameter of `module` on `mesh`, by `rules`."""
    mesh = check_mesh(mesh)
    return jax.tree.map(
        lambda names: named_sharding(mesh, tuple(names), rules),
        param_axes(module),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_params(module: nn.Module, params: Any, mesh: Mesh, rules: Sequence | None = None):
    """`params` (the plain tree `module.init(...)["params"]` returns) placed on `mesh`.

    Heads and kv heads, the FFN hidden size and the vocabulary split over `tensor`, experts
    over `expert`, the rest replicated (DEFAULT_RULES). ValueError, before any transfer, when a
    split size does not divide its mesh axis or when the tree is not the module's.
    """
    mesh = check_mesh(mesh)
    check_model(module.config, mesh, rules)
    shardings = param_shardings(module, mesh, rules)
    want, got = jax.tree.structure(shardings), jax.tree.structure(params)
    if want != got:
        raise ValueError(f"params do not match the module's parameters: expected {want}, got {got}")
    return jax.device_put(params, shardings)


def named_sharding(mesh: Mesh, names: tuple, rules: Sequence | None = None) -> NamedSharding:
    """The NamedSharding of an array whose axes have logical `names`."""
    mesh = check_mesh(mesh)
    axes = list(nn.logical_to_mesh_axes(names, mesh_rules(mesh, rules)))
    while axes and axes[-1] is None:  # the spelling jit gives its outputs: one compilation
        axes.pop()
    return NamedSharding(mesh, PartitionSpec(*axes))


def kv_cache_sharding(
    config, max_batch_size: int, max_seq_len: int, mesh: Mesh | None, rules=None
) -> NamedSharding | None:
    """Where a cache of a BlockConfig/LMConfig's model lives on `mesh` (None: no mesh).

    ValueError when its batch, kv heads or slots do not split evenly over their mesh axes.
    """
    if mesh is None:
        return None
    mesh = check_mesh(mesh)
    check_batch(max_batch_size, mesh, rules)
    check_divisible("n_kv_heads", config.resolved_n_kv_heads, "kv_heads", mesh, rules)
    check_divisible("max_seq_len of the cache", max_seq_len, "length", mesh, rules)
    return named_sharding(mesh, CACHE_AXES, rules)


def latent_cache_sharding(
    max_batch_size: int, mesh: Mesh | None, rules=None
) -> NamedSharding | None:
    """Where a latent (MLA) cache lives on `mesh`: its batch split as the data, the latent and
    the rope key whole on each device (None: no mesh). ValueError when the batch does not split
    evenly."""
    if mesh is None:
        return None
    mesh = check_mesh(mesh)
    check_batch(max_batch_size, mesh, rules)
    return named_sharding(mesh, LATENT_CACHE_AXES, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    """A copy of the whole array on every device of `mesh`."""
    return NamedSharding(check_mesh(mesh), PartitionSpec())


def place_on_mesh(tree: Any, mesh: Mesh) -> Any:
    """`tree` with every array that is not on `mesh` (a step counter) replicated on it."""
    mesh = check_mesh(mesh)

    def place(leaf):
        if getattr(leaf.sharding, "mesh", None) == mesh:
            return leaf
        return jax.device_put(leaf, replicated(mesh))

    return jax.tree.map(place, tree)


def bytes_per_device(tree: Any) -> dict[int, int]:
    """Bytes each device holds of the arrays of `tree`, by device id."""
    held: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            nbytes = int(np.prod(shard.data.shape)) * shard.data.dtype.itemsize
            held[shard.device.id] = held.get(shard.device.id, 0) + nbytes
    return held


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def named_init(init, *names: str | None):
    """`init` making a parameter whose axes have the logical `names` (Flax's boxes)."""
    return nn.with_logical_partitioning(init, names)


def dense_axes(in_name: str | None, out_name: str | None) -> dict[str, Any]:
    """nn.Dense's default kernel and bias initializers, with logical axis names.

    The kernel (in, out) is named (in_name, out_name), the bias (out,) (out_name,).
    """
    return dict(
        kernel_init=named_init(nn.linear.default_kernel_init, in_name, out_name),
        bias_init=named_init(nn.initializers.zeros_init(), out_name),
    )
