"""The files of a training run and what their metadata says, in either framework.

A run named `runs/t` has four files: the model checkpoint `runs/t.safetensors` (read by
`parity`), the training state `runs/t.train.safetensors` (weights and Adam moments, to resume),
the loss history `runs/t.history.json` and, when asked for, the plot `runs/t.loss.png`.
A training state's tensors are `params/<name>`, `exp_avg/<name>` and `exp_avg_sq/<name>`, with
the names of the framework that wrote it (metadata "naming": "torch" or "flax").
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .config import LMConfig, TrainConfig
from .files import digest, read_safetensors_header

MODEL_FORMAT = "twin-block/1"  # the checkpoint format of parity.convert.checkpoint
TRAIN_FORMAT = "twin-block-train/1"
TRAIN_GROUPS = ("params", "exp_avg", "exp_avg_sq")
FRAMEWORKS = ("torch", "jax")
FRAMEWORK_ALIASES = {"flax": "jax"}  # another name accepted for a framework
NAMINGS = {"torch": "torch", "jax": "flax"}  # framework -> the tensor names its files hold
SUFFIXES = (".train.safetensors", ".safetensors")


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where the files of one run go."""

    checkpoint: Path
    train_state: Path
    history: Path
    plot: Path

    @classmethod
    def of(cls, path: str | os.PathLike) -> RunPaths:
        """The run named by `path`: its name (`runs/t`), its checkpoint (`runs/t.safetensors`)
        or its training state (`runs/t.train.safetensors`)."""
        path = Path(path)
        name = path.name
        for suffix in SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                name = name.removesuffix(suffix)
                break
        base = path.with_name(name)
        return cls(
            checkpoint=base.with_name(name + ".safetensors"),
            train_state=base.with_name(name + ".train.safetensors"),
            history=base.with_name(name + ".history.json"),
            plot=base.with_name(name + ".loss.png"),
        )

    def outputs(self, plot: bool) -> list[Path]:
        """The files a run writes (the plot only when asked for)."""
        return [self.checkpoint, self.train_state, self.history, *([self.plot] if plot else [])]

    def same_run(self, other: RunPaths) -> bool:
        """True if both name the same files on disk."""
        return self.checkpoint.resolve() == other.checkpoint.resolve()


def framework_name(name: str, what: str = "framework") -> str:
    """'torch' or 'jax' ('flax' is read as 'jax'); ValueError naming `what` for anything else."""
    name = FRAMEWORK_ALIASES.get(name, name) if isinstance(name, str) else name
    if name not in FRAMEWORKS:
        raise ValueError(f"{what} must be one of {FRAMEWORKS} (or 'flax' for 'jax'), got {name!r}")
    return name


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, read from its header alone."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training state file at {path}")
    try:
        return read_safetensors_header(path).metadata
    except ValueError as err:
        raise ValueError(f"{path} is not a readable safetensors file: bad header") from err


def model_metadata(
    naming: str,
    lm_config: LMConfig,
    tensors: Mapping[str, Any],
    extra: Mapping[str, str] | None = None,
) -> dict:
    """Metadata of a model checkpoint that `parity.load` reads; `extra`: entries stored besides
    (what the model carries from a Hugging Face folder)."""
    return {
        "format": MODEL_FORMAT,
        "module": "TransformerLM",
        "naming": naming,
        "config": json.dumps(lm_config.to_dict()),
        "sha256": digest(tensors),
        **(extra or {}),
    }


def train_state_metadata(
    naming: str,
    lm_config: LMConfig,
    config: TrainConfig,
    step: int,
    data_sha256: str,
    tensors: Mapping[str, Any],
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Metadata of a training state: everything needed to resume besides the tensors (`extra`:
    as for `model_metadata`)."""
    return {
        "format": TRAIN_FORMAT,
        "naming": naming,
        "module": "TransformerLM",
        "config": json.dumps(lm_config.to_dict()),
        "train_config": json.dumps(config.to_dict()),
        "step": str(step),
        "data_sha256": data_sha256,
        "sha256": digest(tensors),
        **(extra or {}),
    }


@dataclasses.dataclass(frozen=True)
class SavedTrainState:
    """A checked training state file, its tensors split into TRAIN_GROUPS by name."""

    lm_config: LMConfig
    config: TrainConfig
    step: int
    groups: dict[str, dict[str, Any]]
    metadata: dict[str, str]


def read_train_state(
    path: str | os.PathLike,
    load_tensors: Callable[[Path], Mapping[str, Any]],
    framework: str,
    steps: int | None = None,
) -> SavedTrainState:
    """Read and check a training state for `framework` ("torch" or "jax"), split its tensors.

    `load_tensors` reads the file's tensors (safetensors.torch.load_file or
    safetensors.numpy.load_file). `steps` sets a new length of the run (more than the steps it
    has done): the schedule becomes that of the new total. A missing file is a
    FileNotFoundError; anything else wrong is a ValueError naming it.
    """
    path = Path(path)
    metadata = safetensors_metadata(path)
    try:
        tensors = load_tensors(path)
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if metadata.get("format") != TRAIN_FORMAT:
        raise ValueError(
            f"{path}: expected a training state ({TRAIN_FORMAT!r}), got format "
            f"{metadata.get('format')!r}"
        )
    naming = NAMINGS[framework]
    if metadata.get("naming") != naming:
        raise ValueError(
            f"{path} holds {metadata.get('naming')} names, not {naming}; `python -m parity "
            f"train --framework {framework} --resume` converts it, or parity.convert."
            f"convert_train_state(src, dst, to={framework!r})"
        )
    if digest(tensors) != metadata.get("sha256"):
        raise ValueError(f"{path} is corrupt: its tensors do not match their stored sha256")
    try:
        lm_config = LMConfig.from_dict(json.loads(metadata["config"]))
        config = TrainConfig.from_dict(json.loads(metadata["train_config"]))
        step = int(metadata["step"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: malformed metadata: {type(err).__name__}: {err}") from err
    if steps is not None:
        if steps <= step:
            raise ValueError(
                f"--steps {steps} does not extend {path}: it has done {step} steps already"
            )
        config = dataclasses.replace(config, steps=steps)
    groups: dict[str, dict[str, Any]] = {group: {} for group in TRAIN_GROUPS}
    for key, value in tensors.items():
        group, name = key.split("/", 1) if "/" in key else (key, "")
        if group not in groups:
            raise ValueError(f"{path}: unexpected tensor {key!r}; expected {list(groups)}/...")
        groups[group][name] = value
    return SavedTrainState(lm_config, config, step, groups, dict(metadata))


def check_shapes(
    wanted: Mapping[str, tuple[int, ...]], given: Mapping[str, tuple[int, ...]], name: str
) -> None:
    """Raise ValueError unless `given` has exactly the names and shapes of `wanted`."""
    problems = [f"missing {k}" for k in wanted if k not in given]
    problems += [f"unexpected {k}" for k in given if k not in wanted]
    problems += [
        f"{k}: shape {given[k]}, expected {v}" for k, v in wanted.items() if given.get(k, v) != v
    ]
    if problems:
        raise ValueError(f"{name} does not match the model: {'; '.join(problems)}")
