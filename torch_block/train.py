"""Training a byte-level TransformerLM with torch.optim: the step, checkpoints and the CLI.

`python -m torch_block.train --help` trains on a text file (default: data/tinyshakespeare.txt).
The JAX twin, `jax_block/train.py`, has the same names in the same order; both take the same
batches and learning rates step for step, so the same initial weights give the same trajectory.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from .lm import TransformerLM

FRAMEWORK = "torch"
DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt"
VOCAB_SIZE = 256  # bytes
MODEL_FORMAT = "twin-block/1"  # the checkpoint format of parity.checkpoint
TRAIN_FORMAT = "twin-block-train/1"


# --------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything about a run except the model: batches, optimizer, schedule, seed.

    `seq_len` is the model's input length; each batch row holds seq_len + 1 bytes (the targets
    are the inputs shifted by one). The learning rate rises linearly from 0 over `warmup_steps`
    steps, then follows a cosine down to `lr * min_lr_ratio` at step `steps`.
    """

    steps: int = 400
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    aux_loss_coef: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "warmup_steps", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}"
            )
        floats = ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps", "max_grad_norm")
        for name in (*floats, "aux_loss_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        checks = (
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
            ("eps", self.eps > 0, "> 0"),
            ("max_grad_norm", self.max_grad_norm > 0, "> 0"),
            ("aux_loss_coef", self.aux_loss_coef >= 0, ">= 0"),
        )
        for name, ok, wanted in checks:
            if not ok:
                raise ValueError(f"{name} must be {wanted}, got {getattr(self, name)}")


def check_model_fits(config: TrainConfig, max_seq_len: int) -> None:
    """Raise ValueError unless rows of `config.seq_len` tokens fit a model's context."""
    if config.seq_len > max_seq_len:
        raise ValueError(
            f"seq_len {config.seq_len} exceeds the model's max_seq_len {max_seq_len} (each row "
            f"feeds seq_len tokens and predicts the next seq_len)"
        )


# --------------------------------------------------------------------------- data
def load_text(path: str | os.PathLike) -> np.ndarray:
    """The bytes of a text file as uint8 token ids (N,)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path}")
    return np.frombuffer(path.read_bytes(), dtype=np.uint8)


def check_data(data: np.ndarray, config: TrainConfig, vocab_size: int, name: str) -> None:
    """Raise ValueError if `data` (named `name`) is shorter than one batch (batch_size * seq_len
    + 1 bytes) or holds a token id >= vocab_size."""
    needed = config.batch_size * config.seq_len + 1
    if data.size < needed:
        raise ValueError(
            f"{name} has {data.size} bytes, shorter than one batch: batch_size "
            f"{config.batch_size} x seq_len {config.seq_len} + 1 = {needed} bytes needed"
        )
    if int(data.max()) >= vocab_size:
        raise ValueError(f"{name} holds token id {int(data.max())} >= vocab_size {vocab_size}")


def get_batch(data: np.ndarray, step: int, config: TrainConfig) -> torch.Tensor:
    """Batch `step` of a run: (batch_size, seq_len + 1) int64 windows at random offsets.

    The offsets depend only on (seed, step), so a resumed run, or the twin framework, sees the
    same batches.
    """
    rng = np.random.default_rng([config.seed, step])
    starts = rng.integers(0, data.size - config.seq_len, size=config.batch_size)  # (B,)
    return torch.from_numpy(data[starts[:, None] + np.arange(config.seq_len + 1)].astype(np.int64))


# --------------------------------------------------------------------------- optimizer
def lr_schedule(config: TrainConfig) -> Callable[[int], float]:
    """Learning rate of update `count` (0-based): linear warmup from 0, then cosine decay.

    The formula of `optax.warmup_cosine_decay_schedule(0, lr, warmup_steps, steps,
    lr * min_lr_ratio)`, which the JAX twin uses.
    """

    def schedule(count: int) -> float:
        if count < config.warmup_steps:
            return config.lr * count / config.warmup_steps
        decay_steps = config.steps - config.warmup_steps
        progress = min(count - config.warmup_steps, decay_steps) / decay_steps
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return config.lr * ((1 - config.min_lr_ratio) * cosine + config.min_lr_ratio)

    return schedule


def weight_decay_mask(model: nn.Module) -> dict[str, bool]:
    """True for the weights of Linear layers; biases, LayerNorm and embeddings are not decayed."""
    decayed = {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }
    return {name: name in decayed for name, _ in model.named_parameters()}


def create_optimizer(
    model: nn.Module, config: TrainConfig, step: int = 0
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over two groups (decayed, not decayed) and a LambdaLR of `lr_schedule` at `step`.

    Clipping is `clip_grad_norm_` in `train_step`: torch.optim has no clipping transform.
    """
    mask = weight_decay_mask(model)
    params = dict(model.named_parameters())
    groups = [
        {"params": [p for n, p in params.items() if mask[n]], "weight_decay": config.weight_decay},
        {"params": [p for n, p in params.items() if not mask[n]], "weight_decay": 0.0},
    ]
    for group in groups:
        group["initial_lr"] = config.lr  # LambdaLR multiplies it by the schedule
    optimizer = torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps
    )
    schedule = lr_schedule(config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda count: schedule(count) / config.lr, last_epoch=step - 1
    )
    return optimizer, scheduler


@dataclasses.dataclass
class TrainState:
    """The model, its optimizer and schedule, the number of updates done, the configuration."""

    model: TransformerLM
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    config: TrainConfig
    step: int = 0


def create_train_state(model: TransformerLM, config: TrainConfig) -> TrainState:
    """Step 0 of training `model` (in place): fresh Adam moments."""
    check_model_fits(config, model.max_seq_len)
    optimizer, scheduler = create_optimizer(model, config)
    return TrainState(model, optimizer, scheduler, config)


# --------------------------------------------------------------------------- the step
def next_token_loss(
    model: TransformerLM, batch: torch.Tensor, aux_loss_coef: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy + aux_loss_coef * MoE aux loss on batch (B, T+1)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T), (B, T)
    logits, aux = model(inputs, return_aux_loss=True)  # (B, T, V), ()
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss = ce + aux_loss_coef * aux
    return loss, {"loss": loss.detach(), "ce": ce.detach(), "aux": aux.detach()}


def loss_and_grads(
    state: TrainState, batch: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(metrics, gradients of the loss) at the current params, in training mode.

    The gradients are the parameters' `.grad` tensors. A parameter the loss did not reach (an
    expert that received no token) gets a zero gradient rather than None, so that AdamW still
    advances its moments and decays it, as optax does.
    """
    state.model.train()
    state.optimizer.zero_grad(set_to_none=True)
    loss, metrics = next_token_loss(state.model, batch, state.config.aux_loss_coef)
    loss.backward()
    grads = {}
    for name, param in state.model.named_parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads[name] = param.grad
    return metrics, grads


def train_step(state: TrainState, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """One optimizer update on batch (B, T+1), in place; returns the metrics.

    metrics: loss, ce, aux (of the params before the update), grad_norm (before clipping), lr
    (the learning rate this update used). One difference from optax remains: clip_grad_norm_
    scales by max_norm / (norm + 1e-6) where optax scales by max_norm / norm, a relative
    difference of 1e-6 / norm in a clipped gradient.
    """
    metrics, _ = loss_and_grads(state, batch)
    params = state.model.parameters()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, state.config.max_grad_norm)
    lr = torch.tensor(state.optimizer.param_groups[0]["lr"])
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    return {**metrics, "grad_norm": grad_norm, "lr": lr}


# --------------------------------------------------------------------------- checkpoints
def model_config(model: TransformerLM) -> dict[str, Any]:
    """The constructor arguments shared with jax_block's TransformerLM."""
    return dict(model.config)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` through a temporary file and a rename: `path` is old or new, never partial."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over names, shapes and bytes, as parity.checkpoint computes it."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        raw = np.ascontiguousarray(arrays[name]).reshape(-1).view(np.uint8)
        h.update(f"{name} {tuple(arrays[name].shape)} {raw.size}\n".encode())
        h.update(raw)
    return h.hexdigest()


def _numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().contiguous().numpy() for k, v in tensors.items()}


def save_model(path: str | os.PathLike, model: TransformerLM) -> None:
    """A safetensors checkpoint that `parity.checkpoint.load` reads (torch state_dict keys)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": MODEL_FORMAT,
        "module": "TransformerLM",
        "config": json.dumps(model_config(model)),
        "sha256": digest(_numpy(tensors)),
    }
    atomic_write(path, safetensors.torch.save(tensors, metadata))


def save_train_state(path: str | os.PathLike, state: TrainState, data_sha256: str = "") -> None:
    """Everything needed to resume: params, Adam moments, step, model and run configuration.

    Tensors are `params/<key>` (the state_dict), `exp_avg/<name>` and `exp_avg_sq/<name>` with
    torch names; `parity.train_cases.convert_train_state` rewrites the file for jax_block.
    """
    params = dict(state.model.named_parameters())
    moments = {name: state.optimizer.state.get(p, {}) for name, p in params.items()}
    groups = {
        "params": state.model.state_dict(),
        **{
            group: {n: m.get(group, torch.zeros_like(params[n])) for n, m in moments.items()}
            for group in ("exp_avg", "exp_avg_sq")
        },
    }
    tensors = {
        f"{group}/{k}": v.detach().cpu().contiguous()
        for group, tree in groups.items()
        for k, v in tree.items()
    }
    metadata = {
        "format": TRAIN_FORMAT,
        "naming": FRAMEWORK,
        "module": "TransformerLM",
        "config": json.dumps(model_config(state.model)),
        "train_config": json.dumps(dataclasses.asdict(state.config)),
        "step": str(state.step),
        "data_sha256": data_sha256,
        "sha256": digest(_numpy(tensors)),
    }
    atomic_write(path, safetensors.torch.save(tensors, metadata))


def load_train_state(path: str | os.PathLike) -> tuple[TransformerLM, TrainState, dict]:
    """(model, state at the saved step, metadata) from a `save_train_state` file, torch names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training state file at {path}")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if metadata.get("format") != TRAIN_FORMAT:
        raise ValueError(
            f"{path}: expected a training state ({TRAIN_FORMAT!r}), got format "
            f"{metadata.get('format')!r}"
        )
    if metadata.get("naming") != FRAMEWORK:
        raise ValueError(
            f"{path} holds {metadata.get('naming')} names; convert it for torch with "
            f"parity.train_cases.convert_train_state(src, dst, to='torch')"
        )
    if digest(_numpy(tensors)) != metadata.get("sha256"):
        raise ValueError(f"{path} is corrupt: its tensors do not match their stored sha256")
    try:
        model = TransformerLM(**json.loads(metadata["config"]))
        config = TrainConfig(**json.loads(metadata["train_config"]))
        step = int(metadata["step"])
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: malformed metadata: {type(err).__name__}: {err}") from err
    groups: dict[str, dict] = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for key, value in tensors.items():
        group, name = key.split("/", 1) if "/" in key else (key, "")
        if group not in groups:
            raise ValueError(f"{path}: unexpected tensor {key!r}; expected {sorted(groups)}/...")
        groups[group][name] = value
    try:
        model.load_state_dict(groups["params"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not match the model: {err}") from err
    params = dict(model.named_parameters())
    for group in ("exp_avg", "exp_avg_sq"):
        check_params(model, groups[group], f"{path} (Adam moments)")
    check_model_fits(config, model.max_seq_len)
    optimizer, scheduler = create_optimizer(model, config, step)
    if step > 0:
        for name, param in params.items():
            optimizer.state[param] = {
                "step": torch.tensor(float(step)),
                "exp_avg": groups["exp_avg"][name].clone(),
                "exp_avg_sq": groups["exp_avg_sq"][name].clone(),
            }
    return model, TrainState(model, optimizer, scheduler, config, step), metadata


def check_params(model: TransformerLM, tensors: dict, name: str) -> None:
    """Raise ValueError unless `tensors` has exactly the names and shapes of `model`'s params."""
    wanted = {k: tuple(v.shape) for k, v in model.named_parameters()}
    given = {k: tuple(v.shape) for k, v in tensors.items()}
    problems = [f"missing {k}" for k in wanted if k not in given]
    problems += [f"unexpected {k}" for k in given if k not in wanted]
    problems += [
        f"{k}: shape {given[k]}, expected {v}" for k, v in wanted.items() if given.get(k, v) != v
    ]
    if problems:
        raise ValueError(f"{name} does not match the model: {'; '.join(problems)}")


# --------------------------------------------------------------------------- history and plot
def save_history(
    path: str | os.PathLike, history: list[dict], lm: TransformerLM, config: TrainConfig
) -> None:
    """The loss history (one record per step) as JSON, written atomically."""
    record = {
        "framework": FRAMEWORK,
        "config": model_config(lm),
        "train_config": dataclasses.asdict(config),
        "history": history,
    }
    atomic_write(path, json.dumps(record, indent=1).encode())


def plot_histories(path: str | os.PathLike, runs: list[tuple[str, list[dict]]]) -> None:
    """A PNG of the loss curves of (label, history) runs (matplotlib, imported here)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.subplots()
    for label, history in runs:
        ax.plot([r["step"] for r in history], [r["loss"] for r in history], label=label, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats per byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


# --------------------------------------------------------------------------- CLI
RUN_FLAGS = (  # TrainConfig fields set from flags of the same names
    "steps",
    "batch_size",
    "seq_len",
    "lr",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "beta1",
    "beta2",
    "max_grad_norm",
    "aux_loss_coef",
    "seed",
)
MODEL_DEFAULTS = dict(
    d_model=128,
    n_layers=4,
    n_heads=4,
    d_ff=None,  # 4 * d_model
    max_seq_len=None,  # seq_len
    dropout=0.0,
    moe=False,
    num_experts=4,
    top_k_experts=2,
    capacity_factor=1.25,
)
LABELS = {"flax": "JAX / optax", "torch": "PyTorch / torch.optim"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed flags; run and model flags not given are None (see `fill_defaults`)."""
    p = argparse.ArgumentParser(
        prog=f"python -m {__name__}" if __name__ != "__main__" else "python -m torch_block.train",
        description="Train a byte-level TransformerLM (vocabulary 256) on a text file with "
        "torch.optim.AdamW, warmup + cosine schedule (LambdaLR) and clip_grad_norm_.",
    )
    p.add_argument(
        "--data", type=Path, default=DEFAULT_TEXT, help="text file (default: %(default)s)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(f"runs/{FRAMEWORK}.safetensors"),
        help="model checkpoint (safetensors, read by `parity`); the training state and loss "
        "history go next to it as <out>.train.safetensors and <out>.history.json "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--resume",
        type=Path,
        help="training state to continue from; the run and model settings come from it",
    )
    defaults = TrainConfig()
    run = p.add_argument_group("run (default in brackets)")
    for name in RUN_FLAGS:
        value = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        run.add_argument(flag, type=type(value), help=f"[{value}]")
    model = p.add_argument_group("model (default in brackets)")
    for name, value in MODEL_DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            model.add_argument(flag, action="store_true", default=None, help="Mixture of Experts")
        else:
            kind = float if name in ("dropout", "capacity_factor") else int
            model.add_argument(flag, type=kind, help=f"[{value}]")
    out = p.add_argument_group("output")
    out.add_argument("--checkpoint-every", type=int, default=100, help="[%(default)s] steps")
    out.add_argument("--log-every", type=int, default=25, help="[%(default)s] steps")
    out.add_argument("--plot", type=Path, help="write a PNG of the loss curve here")
    out.add_argument(
        "--plot-with",
        type=Path,
        action="append",
        default=[],
        help="another run's <out>.history.json to draw on the same plot (repeatable)",
    )
    out.add_argument("--sample-tokens", type=int, default=0, help="bytes to generate at the end")
    out.add_argument("--prompt", default="\n", help="prompt of the sample [newline]")
    out.add_argument("--temperature", type=float, default=0.8, help="[%(default)s]")
    out.add_argument("--top-k", type=int, help="sample from the k most likely bytes only")
    p.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: torch's; 1 on a busy CPU)"
    )
    return p.parse_args(argv)


def given_run_flags(args: argparse.Namespace) -> list[str]:
    """The run and model flags given on the command line."""
    names = (*RUN_FLAGS, *MODEL_DEFAULTS)
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n) is not None]


@dataclasses.dataclass
class Run:
    """A checked run, ready to train: nothing has been trained or written yet."""

    lm: TransformerLM
    state: TrainState
    data: np.ndarray
    data_sha256: str
    history: list[dict]
    out: Path


def train_state_path(out: Path) -> Path:
    """Where the training state of checkpoint `out` goes."""
    return out.with_suffix(".train.safetensors")


def history_path(out: Path) -> Path:
    """Where the loss history of checkpoint `out` goes."""
    return out.with_suffix(".history.json")


def checkpoint_of(train_state_file: Path) -> Path:
    """The checkpoint whose training state is `train_state_file` (inverse of train_state_path)."""
    name = train_state_file.name.removesuffix(".train.safetensors")
    return train_state_file.with_name(name + ".safetensors")


def model_and_config(args: argparse.Namespace) -> tuple[TransformerLM, TrainConfig]:
    """The model (initialised from the seed) and run configuration the flags ask for."""
    defaults = {**dataclasses.asdict(TrainConfig()), **MODEL_DEFAULTS}
    flags = {
        n: defaults[n] if getattr(args, n) is None else getattr(args, n)
        for n in (*RUN_FLAGS, *MODEL_DEFAULTS)
    }
    config = TrainConfig(**{n: flags[n] for n in RUN_FLAGS})
    torch.manual_seed(config.seed)  # the initial weights
    lm = TransformerLM(
        vocab_size=VOCAB_SIZE,
        max_seq_len=flags["max_seq_len"] or config.seq_len,
        d_model=flags["d_model"],
        n_layers=flags["n_layers"],
        n_heads=flags["n_heads"],
        d_ff=flags["d_ff"] or 4 * flags["d_model"],
        dropout=flags["dropout"],
        use_moe=flags["moe"],
        num_experts=flags["num_experts"],
        top_k_experts=flags["top_k_experts"],
        expert_capacity_factor=flags["capacity_factor"],
    )
    check_model_fits(config, lm.max_seq_len)
    return lm, config


def prepare(args: argparse.Namespace) -> Run:
    """Check every flag and the text, then build or resume the model; raises on bad input."""
    for name in ("checkpoint_every", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.sample_tokens < 0:
        raise ValueError(f"--sample-tokens must be >= 0, got {args.sample_tokens}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib (pip install matplotlib, or the dev extra)")
    for path in args.plot_with:
        if not path.is_file():
            raise FileNotFoundError(f"no history file at {path}")
    data = load_text(args.data)
    data_sha256 = hashlib.sha256(data.tobytes()).hexdigest()
    if args.resume is not None:
        if given_run_flags(args):
            raise ValueError(
                f"--resume continues the saved run with its own settings; drop "
                f"{' '.join(given_run_flags(args))}"
            )
        lm, state, metadata = load_train_state(args.resume)
        config = state.config
        if metadata.get("data_sha256") not in ("", data_sha256):
            raise ValueError(f"{args.resume} was trained on another text than {args.data}")
    else:
        lm, config = model_and_config(args)
    check_data(data, config, lm.vocab_size, str(args.data))
    prompt_len = len(args.prompt.encode())
    if args.sample_tokens and prompt_len + args.sample_tokens > lm.max_seq_len:
        raise ValueError(
            f"prompt ({prompt_len} bytes) + --sample-tokens {args.sample_tokens} exceeds the "
            f"model's max_seq_len {lm.max_seq_len}"
        )
    history: list[dict] = []
    if args.resume is not None:
        saved = history_path(checkpoint_of(args.resume))
        if saved.is_file():
            history = json.loads(saved.read_text())["history"][: state.step]
    else:
        state = create_train_state(lm, config)
    return Run(lm, state, data, data_sha256, history, args.out)


def dropout_seed(seed: int, step: int) -> int:
    """The torch seed of step `step`'s dropout masks: a resumed run draws the same masks."""
    return int(np.random.SeedSequence([seed, step, 1]).generate_state(1)[0])


def save_checkpoint(run: Run) -> None:
    """Training state, model, then history: each file atomic and complete on its own."""
    save_train_state(train_state_path(run.out), run.state, run.data_sha256)
    save_model(run.out, run.lm)
    save_history(history_path(run.out), run.history, run.lm, run.state.config)


def train(run: Run, args: argparse.Namespace) -> None:
    """Train to the run's last step: a progress line, a log line and a checkpoint every N steps."""
    config = run.state.config
    start = run.state.step
    tokens_per_step = config.batch_size * config.seq_len
    num_params = sum(p.numel() for p in run.lm.parameters())
    print(f"{LABELS[FRAMEWORK]}: {num_params:,} params, {run.data.size:,} bytes of text")
    if start >= config.steps:
        print(f"nothing to train: the run is at its last step, {config.steps}")
        return
    show_bar = sys.stderr.isatty()
    began = time.perf_counter()
    logged = (start, began)  # (step, time) of the last log line
    first_done = began  # end of the first step (which compiles, in JAX)
    for step in range(start, config.steps):
        torch.manual_seed(dropout_seed(config.seed, step))
        metrics = train_step(run.state, get_batch(run.data, step, config))
        now = time.perf_counter()
        first_done = now if step == start else first_done
        record = {"step": step + 1, **{k: float(v) for k, v in metrics.items()}}
        run.history.append({**record, "elapsed_s": now - began})
        if show_bar:
            rate = tokens_per_step * (step + 1 - start) / (now - began)
            line = f"step {step + 1}/{config.steps} loss {record['loss']:.4f} {rate:,.0f} tok/s"
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
        if (step + 1) % args.log_every == 0 or step + 1 == config.steps:
            rate = tokens_per_step * (step + 1 - logged[0]) / (now - logged[1])
            logged = (step + 1, now)
            if show_bar:
                print("\r\033[K", end="", file=sys.stderr, flush=True)
            print(
                f"step {step + 1:>5} loss {record['loss']:.4f} ce {record['ce']:.4f} "
                f"aux {record['aux']:.4f} lr {record['lr']:.2e} "
                f"grad norm {record['grad_norm']:.3f} {rate:,.0f} tok/s",
                flush=True,
            )
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == config.steps:
            save_checkpoint(run)
    end = time.perf_counter()
    steady = tokens_per_step * (config.steps - start - 1) / max(end - first_done, 1e-9)
    print(
        f"done: {end - began:.1f} s ({first_done - began:.1f} s first step, then "
        f"{steady:,.0f} tok/s); checkpoint {run.out}",
        flush=True,
    )


def sample(run: Run, args: argparse.Namespace) -> str:
    """`--sample-tokens` bytes generated after `--prompt` by the trained model."""
    prompt = torch.tensor(list(args.prompt.encode()))[None, :]  # (1, L)
    tokens = run.lm.generate(
        prompt,
        max_new_tokens=args.sample_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        generator=torch.Generator().manual_seed(run.state.config.seed),
    )  # (1, sample_tokens)
    return bytes(tokens[0].tolist()).decode("utf-8", errors="replace")


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 done, 2 bad input (nothing trained or written), 130 interrupted."""
    args = parse_args(argv)
    try:
        run = prepare(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        train(run, args)
    except KeyboardInterrupt:
        print(f"\ninterrupted; last complete checkpoint: {run.out}", file=sys.stderr)
        return 130
    if args.plot is not None:
        runs = [(LABELS[FRAMEWORK], run.history)]
        for path in args.plot_with:
            other = json.loads(path.read_text())
            runs.append((LABELS.get(other["framework"], other["framework"]), other["history"]))
        plot_histories(args.plot, runs)
        print(f"plot: {args.plot}")
    if args.sample_tokens:
        print(f"--- {args.sample_tokens} bytes after {args.prompt!r} ---")
        print(args.prompt + sample(run, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
