"""Layers scanned in groups: a repeating pattern of layer kinds compiled once, not once per layer.

`TransformerLM(..., scan_layers=True)` splits its layers into groups (`layer_groups`): a run of
`repeats` copies of a pattern of `period` layers (one kind for Llama; sliding then full
attention for Gemma 2; DeepSeek's dense layers, then its MoE layers) becomes one `nn.scan` over
the repeats, so XLA compiles the pattern once whatever the depth. A layer outside any run stays
the submodule `blocks_{i}`, as without scanning.

Parameter layout of a group covering layers [start, stop): `blocks_{start}_{stop}/block_{j}/...`
holds the parameters of layers start + j, start + period + j, ... stacked on a leading axis of
`repeats` (logical axis name "layers"). Its cache is a tuple of `period` caches stacked the same
way. `stack_params` and `unstack_params` move between that and the per-layer layout
(`blocks_{i}`) that conversion, checkpoint files and Hugging Face folders use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from twin_core import BlockConfig

from .block import TransformerBlock
from .cache import KVCache, LatentCache

LayerCache = KVCache | LatentCache


class LayerGroup(NamedTuple):
    """Layers [start, start + period * repeats): `repeats` copies of a pattern of `period`."""

    start: int
    period: int
    repeats: int

    @property
    def stop(self) -> int:
        return self.start + self.period * self.repeats

    @property
    def scanned(self) -> bool:
        return self.repeats > 1

    @property
    def name(self) -> str:
        """The submodule's name: `blocks_{i}` for one layer, `blocks_{start}_{stop}` scanned."""
        return f"blocks_{self.start}_{self.stop}" if self.scanned else f"blocks_{self.start}"

    def layer(self, repeat: int, j: int) -> int:
        """The index of the j-th layer of the pattern's `repeat`-th copy."""
        return self.start + repeat * self.period + j


def layer_groups(configs: Sequence[BlockConfig], scan: bool) -> tuple[LayerGroup, ...]:
    """The groups of layers with configs `configs` (layer 0 first): one per layer unless `scan`.

    Scanning, each group is taken greedily from the first layer not yet grouped: the pattern
    (of any period) whose consecutive copies cover the most layers, the shortest on a tie; a
    layer that starts no two copies of any pattern is a group of its own.
    """
    n = len(configs)
    groups, i = [], 0
    while i < n:
        best = LayerGroup(i, 1, 1)
        for period in range(1, (n - i) // 2 + 1) if scan else ():
            pattern = configs[i : i + period]
            repeats = 1
            while configs[i + repeats * period : i + (repeats + 1) * period] == pattern:
                repeats += 1
            if repeats > 1 and period * repeats > best.period * best.repeats:
                best = LayerGroup(i, period, repeats)
        groups.append(best)
        i = best.stop
    return tuple(groups)


class BlockPattern(nn.Module):
    """One copy of a group's pattern: its blocks `block_0` ... applied in order (the body of
    the scan). Carries (x (B, T, d_model), aux ()); scans over the caches, one per block."""

    configs: tuple[BlockConfig, ...]
    deterministic: bool
    return_aux_loss: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        carry: tuple[jax.Array, jax.Array],
        caches: tuple[LayerCache, ...] | None,
        key_mask: jax.Array | None,
        cache_position: jax.Array | None,
        positions: jax.Array,
    ) -> tuple[tuple[jax.Array, jax.Array], tuple[LayerCache, ...] | None]:
        x, aux = carry
        new_caches = []
        for j, config in enumerate(self.configs):
            block = TransformerBlock(
                config, dtype=self.dtype, param_dtype=self.param_dtype, name=f"block_{j}"
            )
            cache = None if caches is None else caches[j]
            x, cache, block_aux = block(
                x,
                key_mask,
                cache,
                cache_position,
                self.deterministic,
                self.return_aux_loss,
                positions,
            )
            new_caches.append(cache)
            if block_aux is not None:
                aux = aux + block_aux
        return (x, aux), (None if caches is None else tuple(new_caches))


def scanned_pattern(repeats: int) -> type[nn.Module]:
    """BlockPattern scanned `repeats` times: parameters, caches and dropout keys per copy."""
    return nn.scan(
        BlockPattern,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
        length=repeats,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def stack_caches(caches: Sequence[LayerCache], groups: Sequence[LayerGroup]) -> tuple:
    """Per-layer caches (layer 0 first) in the scanned layout: for each group, its one cache,
    or a tuple of `period` caches stacked over the repeats."""
    out = []
    for group in groups:
        if not group.scanned:
            out.append(caches[group.start])
            continue
        out.append(
            tuple(
                jax.tree.map(
                    lambda *leaves: jnp.stack(leaves),
                    *[caches[group.layer(r, j)] for r in range(group.repeats)],
                )
                for j in range(group.period)
            )
        )
    return tuple(out)


def first_cache(kv_cache: Sequence) -> LayerCache:
    """Layer 0's cache (its position, slots and batch are every layer's) from an LM's cache."""
    entry = kv_cache[0]
    if isinstance(entry, tuple):  # a scanned group: take copy 0 of its first block
        return jax.tree.map(lambda leaf: leaf[0], entry[0])
    return entry


def map_caches(fn: Any, kv_cache: Sequence) -> tuple:
    """An LM's cache with `fn` applied to each of its caches, stacked or not."""
    return tuple(
        tuple(fn(c) for c in entry) if isinstance(entry, tuple) else fn(entry) for entry in kv_cache
    )


def with_position(kv_cache: Sequence, position: Any) -> tuple:
    """An LM's cache with every layer's position set to `position` (an int, known while
    tracing, or a () int32 array)."""

    def one(cache: LayerCache) -> LayerCache:
        shape = np.shape(cache.position)
        if isinstance(position, jax.Array):
            return cache.replace(position=jnp.broadcast_to(position, shape).astype(jnp.int32))
        return cache.replace(position=np.full(shape, position, np.int32))

    return map_caches(one, kv_cache)


def scanned_path(path: str, groups: Sequence[LayerGroup]) -> tuple[str, int | None, int]:
    """Where the per-layer parameter `path` ("blocks_{i}/..." joined by "/") lies in the scanned
    layout of `groups`: (path there, index on the stacking axis or None, the axis' length)."""
    head, _, rest = path.partition("/")
    if not head.startswith("blocks_"):
        return path, None, 1
    layer = int(head.removeprefix("blocks_"))
    group = next(g for g in groups if g.start <= layer < g.stop)
    if not group.scanned:
        return path, None, 1
    repeat, j = divmod(layer - group.start, group.period)
    return f"{group.name}/block_{j}/{rest}", repeat, group.repeats


def stack_params(params: dict, groups: Sequence[LayerGroup]) -> dict:
    """Params in the per-layer layout (`blocks_{i}`) put in the scanned layout of `groups`.

    Each stacked leaf is one new array; the per-layer arrays are left as they are.
    """
    out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    for group in groups:
        if not group.scanned:
            out[group.name] = params[f"blocks_{group.start}"]
            continue
        out[group.name] = {
            f"block_{j}": jax.tree.map(
                lambda *leaves: _stack(leaves),
                *[params[f"blocks_{group.layer(r, j)}"] for r in range(group.repeats)],
            )
            for j in range(group.period)
        }
    return out


def unstack_params(params: dict, groups: Sequence[LayerGroup]) -> dict:
    """Params in the scanned layout of `groups` put back in the per-layer layout (`blocks_{i}`)."""
    out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    for group in groups:
        if not group.scanned:
            out[group.name] = params[group.name]
            continue
        for j in range(group.period):
            stacked = params[group.name][f"block_{j}"]
            for r in range(group.repeats):
                out[f"blocks_{group.layer(r, j)}"] = jax.tree.map(
                    lambda leaf, r=r: leaf[r], stacked
                )
    return dict(sorted(out.items(), key=lambda item: _layer_order(item[0])))


def per_layer(lm: nn.Module, params: dict) -> tuple[nn.Module, dict]:
    """`lm` without scanning and `params` in its per-layer layout: as they are when `lm` does
    not scan, else unstacked; ValueError when `params` are not in `lm`'s layout."""
    if not getattr(lm, "scan_layers", False):
        return lm, params
    groups = lm.layer_groups
    want = sorted((g.name for g in groups), key=_layer_order)
    got = sorted((k for k in params if k.startswith("blocks_")), key=_layer_order)
    if want != got:
        raise ValueError(
            f"params are not in the scanned layout of the model (scan_layers=True): expected "
            f"the blocks {want}, got {got}"
        )
    return lm.clone(scan_layers=False, parent=None), unstack_params(params, groups)


def scanned(lm: nn.Module, params: dict) -> tuple[nn.Module, dict]:
    """`lm` with `scan_layers=True` and `params` (per-layer layout) stacked into its layout."""
    if not hasattr(lm, "scan_layers"):
        raise TypeError(f"only a TransformerLM scans its layers, got a {type(lm).__name__}")
    lm = lm.clone(scan_layers=True, parent=None)
    return lm, stack_params(params, lm.layer_groups)


def _stack(leaves: Sequence[Any]) -> Any:
    """NumPy leaves stay NumPy (a file's arrays); JAX leaves stack as JAX arrays."""
    if all(isinstance(leaf, np.ndarray) for leaf in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _layer_order(name: str) -> tuple[int, int | str]:
    """Blocks in layer order after the other top-level params."""
    if name.startswith("blocks_"):
        return (1, int(name.split("_")[1]))
    return (0, name)
