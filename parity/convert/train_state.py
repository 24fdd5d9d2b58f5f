"""Training-state files converted between the frameworks, so a run continues in the other one.

A training state (`*.train.safetensors`, written by `torch_block.train` or `jax_block.train`)
holds `params/<name>`, `exp_avg/<name>` and `exp_avg_sq/<name>` with one framework's names;
`python -m parity train --resume` converts another framework's state through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy
import torch
from flax.traverse_util import flatten_dict, unflatten_dict

import jax_block
from twin_core import LMConfig, atomic_write, digest
from twin_core.run_files import NAMINGS, TRAIN_FORMAT, framework_name

from .mapping import FROZEN_BUFFERS, TORCH_ONLY_BUFFERS
from .weights import flax_to_torch, torch_to_flax


def convert_train_state(src: str | os.PathLike, dst: str | os.PathLike, to: str) -> None:
    """Rewrite a training state file (`*.train.safetensors`) for framework `to` ("torch" or
    "jax"; "flax" is the same): weights and both Adam moments go through the mapping table.

    The MoE expert counters (a torch statistics buffer) do not survive a trip through Flax:
    they come back as zeros. Buffers that are frozen Flax parameters (FROZEN_BUFFERS) have no
    moments in torch and zero moments in JAX.
    """
    naming = NAMINGS[framework_name(to, "to")]
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"no training state file at {src}")
    with safetensors.safe_open(src, framework="np") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if metadata.get("format") != TRAIN_FORMAT:
        raise ValueError(
            f"{src}: expected a training state ({TRAIN_FORMAT!r}), got format "
            f"{metadata.get('format')!r}"
        )
    if metadata.get("naming") == naming:
        raise ValueError(f"{src} already holds {naming} names")
    if digest(tensors) != metadata.get("sha256"):
        raise ValueError(f"{src} is corrupt: its tensors do not match their stored sha256")
    config = LMConfig.from_dict(json.loads(metadata["config"]))
    flax_lm = jax_block.TransformerLM.from_config(config)
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        group, name = key.split("/", 1)
        groups.setdefault(group, {})[name] = value
    converted = {}
    for group, arrays in groups.items():
        if naming == "flax":
            if group != "params":  # a frozen buffer's moments: zeros
                arrays = {**_frozen_moments(groups["params"]), **arrays}
            tree = torch_to_flax({k: torch.from_numpy(v) for k, v in arrays.items()}, flax_lm)
            flat = {k: np.asarray(v) for k, v in flatten_dict(tree, sep="/").items()}
        else:
            state_dict = flax_to_torch(unflatten_dict(arrays, sep="/"), flax_lm)
            flat = {k: v.numpy() for k, v in state_dict.items()}
            if group != "params":  # moments exist for parameters only, not buffers
                flat = {k: v for k, v in flat.items() if not _is_torch_buffer(k)}
        converted.update({f"{group}/{k}": v for k, v in flat.items()})
    metadata.update(naming=naming, sha256=digest(converted))
    atomic_write(dst, safetensors.numpy.save(converted, metadata))


def _is_torch_buffer(torch_key: str) -> bool:
    return any(torch_key.endswith(buffer) for buffer in TORCH_ONLY_BUFFERS | FROZEN_BUFFERS)


def _frozen_moments(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zero moments of the frozen buffers among torch `params`."""
    return {
        key: np.zeros_like(value)
        for key, value in params.items()
        if any(key.endswith(buffer) for buffer in FROZEN_BUFFERS)
    }
