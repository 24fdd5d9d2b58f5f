"""Training a byte-level TransformerLM with optax: the jitted step, checkpoints and the CLI.

`python -m jax_block.train --help` trains on a text file (default: data/tinyshakespeare.txt).
The torch twin, `torch_block/train.py`, has the same names in the same order; both take the same
batches and learning rates step for step, so the same initial weights give the same trajectory.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors
import safetensors.numpy
from flax.training import train_state
from flax.traverse_util import flatten_dict, unflatten_dict

from .generate import generate
from .lm import TransformerLM

FRAMEWORK = "flax"
DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt"
VOCAB_SIZE = 256  # bytes
MODEL_FORMAT = "twin-block/1"  # the checkpoint format of parity.checkpoint
TRAIN_FORMAT = "twin-block-train/1"
# TransformerLM's constructor arguments shared with torch_block (a checkpoint's "config")
MODEL_FIELDS = (
    "vocab_size",
    "max_seq_len",
    "d_model",
    "n_layers",
    "n_heads",
    "d_ff",
    "dropout",
    "use_moe",
    "num_experts",
    "top_k_experts",
    "expert_capacity_factor",
    "tie_embeddings",
    "router_z_loss_coef",
)


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


def get_batch(data: np.ndarray, step: int, config: TrainConfig) -> jax.Array:
    """Batch `step` of a run: (batch_size, seq_len + 1) int32 windows at random offsets.

    The offsets depend only on (seed, step), so a resumed run, or the twin framework, sees the
    same batches.
    """
    rng = np.random.default_rng([config.seed, step])
    starts = rng.integers(0, data.size - config.seq_len, size=config.batch_size)  # (B,)
    return jnp.asarray(data[starts[:, None] + np.arange(config.seq_len + 1)], jnp.int32)


# --------------------------------------------------------------------------- optimizer
def lr_schedule(config: TrainConfig) -> optax.Schedule:
    """Learning rate of update `count` (0-based): linear warmup from 0, then cosine decay."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=config.warmup_steps,
        decay_steps=config.steps,
        end_value=config.lr * config.min_lr_ratio,
    )


def weight_decay_mask(params: dict) -> dict:
    """True for the kernels of Dense layers; biases, LayerNorm and embeddings are not decayed."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


@functools.cache
def create_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with `lr_schedule` and decoupled weight decay.

    Cached per configuration: the same optimizer object keeps the jitted step from recompiling.
    """
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(
            lr_schedule(config),
            b1=config.beta1,
            b2=config.beta2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=weight_decay_mask,
        ),
    )


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, optimizer state) with the run's configuration."""

    config: TrainConfig = flax.struct.field(pytree_node=False, default=TrainConfig())


@functools.cache
def apply_fn_of(lm: TransformerLM) -> Callable:
    """`lm.apply`, one bound method per distinct model configuration.

    A bound method compares equal only to itself; sharing one per configuration lets every
    state of equal models reuse the jitted step's compilation.
    """
    return lm.apply


@functools.partial(jax.jit, static_argnums=0)
def init_params(lm: TransformerLM, rng: jax.Array) -> dict:
    """`lm`'s initial parameters, compiled once per configuration (not op by op)."""
    return lm.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def create_train_state(lm: TransformerLM, params: dict, config: TrainConfig) -> TrainState:
    """Step 0 of training `lm` from `params`: fresh Adam moments."""
    check_model_fits(config, lm.max_seq_len)
    state = TrainState.create(
        apply_fn=apply_fn_of(lm), params=params, tx=create_optimizer(config), config=config
    )
    return state.replace(step=jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------- the step
def next_token_loss(
    params: dict,
    apply_fn: Callable,
    batch: jax.Array,
    dropout_rng: jax.Array,
    aux_loss_coef: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy + aux_loss_coef * MoE aux loss on batch (B, T+1)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T), (B, T)
    logits, aux = apply_fn(
        {"params": params},
        inputs,
        deterministic=False,
        return_aux_loss=True,
        rngs={"dropout": dropout_rng},
    )  # (B, T, V), ()
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    ce = ce.mean()
    loss = ce + aux_loss_coef * aux
    return loss, {"loss": loss, "ce": ce, "aux": aux}


@jax.jit
def loss_and_grads(
    state: TrainState, batch: jax.Array, rng: jax.Array
) -> tuple[dict[str, jax.Array], dict]:
    """(metrics, gradients of the loss) at the current params, in training mode.

    Dropout uses `rng` folded with the step, so a constant `rng` gives each step its own masks.
    """
    dropout_rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(next_token_loss, has_aux=True)
    (_, metrics), grads = grad_fn(
        state.params, state.apply_fn, batch, dropout_rng, state.config.aux_loss_coef
    )
    return metrics, grads


@functools.partial(jax.jit, donate_argnums=0)
def train_step(
    state: TrainState, batch: jax.Array, rng: jax.Array
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on batch (B, T+1): (new state, metrics). `state` is donated.

    metrics: loss, ce, aux (of the params before the update), grad_norm (before clipping), lr
    (the learning rate this update used).
    """
    metrics, grads = loss_and_grads(state, batch, rng)
    grad_norm = optax.tree.norm(grads)
    lr = lr_schedule(state.config)(state.step)
    state = state.apply_gradients(grads=grads)
    return state, {**metrics, "grad_norm": grad_norm, "lr": lr}


# --------------------------------------------------------------------------- checkpoints
def model_config(lm: TransformerLM) -> dict[str, Any]:
    """The constructor arguments shared with torch_block's TransformerLM."""
    return {name: getattr(lm, name) for name in MODEL_FIELDS}


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


def _flat(tree: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flatten_dict(tree, sep="/").items()}


def save_model(path: str | os.PathLike, lm: TransformerLM, params: dict) -> None:
    """A safetensors checkpoint that `parity.checkpoint.load` reads (Flax names, "naming": "flax").

    `python -m parity convert` rewrites it with torch names.
    """
    tensors = _flat(params)
    metadata = {
        "format": MODEL_FORMAT,
        "module": "TransformerLM",
        "config": json.dumps(model_config(lm)),
        "sha256": digest(tensors),
        "naming": FRAMEWORK,
    }
    atomic_write(path, safetensors.numpy.save(tensors, metadata))


def save_train_state(
    path: str | os.PathLike, lm: TransformerLM, state: TrainState, data_sha256: str = ""
) -> None:
    """Everything needed to resume: params, Adam moments, step, model and run configuration.

    Tensors are `params/<name>`, `exp_avg/<name>` and `exp_avg_sq/<name>` with Flax names;
    `parity.train_cases.convert_train_state` rewrites the file for torch_block.
    """
    groups = {
        "params": state.params,
        "exp_avg": optax.tree_utils.tree_get(state.opt_state, "mu"),
        "exp_avg_sq": optax.tree_utils.tree_get(state.opt_state, "nu"),
    }
    tensors = {f"{group}/{k}": v for group, tree in groups.items() for k, v in _flat(tree).items()}
    metadata = {
        "format": TRAIN_FORMAT,
        "naming": FRAMEWORK,
        "module": "TransformerLM",
        "config": json.dumps(model_config(lm)),
        "train_config": json.dumps(dataclasses.asdict(state.config)),
        "step": str(int(state.step)),
        "data_sha256": data_sha256,
        "sha256": digest(tensors),
    }
    atomic_write(path, safetensors.numpy.save(tensors, metadata))


def load_train_state(path: str | os.PathLike) -> tuple[TransformerLM, TrainState, dict]:
    """(lm, state at the saved step, metadata) from a `save_train_state` file with Flax names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training state file at {path}")
    try:
        with safetensors.safe_open(path, framework="np") as f:
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
            f"{path} holds {metadata.get('naming')} names; convert it for JAX with "
            f"parity.train_cases.convert_train_state(src, dst, to='flax')"
        )
    if digest(tensors) != metadata.get("sha256"):
        raise ValueError(f"{path} is corrupt: its tensors do not match their stored sha256")
    try:
        lm = TransformerLM(**json.loads(metadata["config"]))
        config = TrainConfig(**json.loads(metadata["train_config"]))
        step = jnp.asarray(int(metadata["step"]), jnp.int32)
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: malformed metadata: {type(err).__name__}: {err}") from err
    groups: dict[str, dict] = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for key, value in tensors.items():
        group, name = key.split("/", 1) if "/" in key else (key, "")
        if group not in groups:
            raise ValueError(f"{path}: unexpected tensor {key!r}; expected {sorted(groups)}/...")
        groups[group][name] = jnp.asarray(value)
    params, mu, nu = (unflatten_dict(groups[g], sep="/") for g in groups)
    check_params(lm, params, str(path))
    for tree in (mu, nu):
        check_params(lm, tree, f"{path} (Adam moments)")
    state = create_train_state(lm, params, config)
    opt_state = optax.tree_utils.tree_set(state.opt_state, mu=mu, nu=nu, count=step)
    state = state.replace(step=step, opt_state=opt_state)
    return lm, jax.tree.map(jnp.copy, state), metadata  # one buffer per leaf: donatable


def check_params(lm: TransformerLM, params: dict, name: str) -> None:
    """Raise ValueError unless `params` has exactly the paths and shapes of `lm`'s parameters."""
    dummy = jnp.zeros((1, 1), jnp.int32)
    wanted = jax.eval_shape(lambda: lm.init(jax.random.PRNGKey(0), dummy))["params"]
    wanted = {k: tuple(v.shape) for k, v in flatten_dict(wanted, sep="/").items()}
    given = {k: tuple(v.shape) for k, v in flatten_dict(params, sep="/").items()}
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
        prog=f"python -m {__name__}" if __name__ != "__main__" else "python -m jax_block.train",
        description="Train a byte-level TransformerLM (vocabulary 256) on a text file with "
        "optax AdamW, warmup + cosine schedule and global-norm clipping.",
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
    rng: jax.Array


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
    """The model (not initialised) and run configuration the flags ask for."""
    defaults = {**dataclasses.asdict(TrainConfig()), **MODEL_DEFAULTS}
    flags = {
        n: defaults[n] if getattr(args, n) is None else getattr(args, n)
        for n in (*RUN_FLAGS, *MODEL_DEFAULTS)
    }
    config = TrainConfig(**{n: flags[n] for n in RUN_FLAGS})
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
            history = json.loads(saved.read_text())["history"][: int(state.step)]
    else:
        state = create_train_state(lm, init_params(lm, jax.random.PRNGKey(config.seed)), config)
    rng = jax.random.PRNGKey(config.seed + 1)  # dropout, folded with the step
    return Run(lm, state, data, data_sha256, history, args.out, rng)


def save_checkpoint(run: Run) -> None:
    """Training state, model, then history: each file atomic and complete on its own."""
    save_train_state(train_state_path(run.out), run.lm, run.state, run.data_sha256)
    save_model(run.out, run.lm, run.state.params)
    save_history(history_path(run.out), run.history, run.lm, run.state.config)


def train(run: Run, args: argparse.Namespace) -> None:
    """Train to the run's last step: a progress line, a log line and a checkpoint every N steps."""
    config = run.state.config
    start = int(run.state.step)
    tokens_per_step = config.batch_size * config.seq_len
    num_params = sum(x.size for x in jax.tree.leaves(run.state.params))
    print(f"{LABELS[FRAMEWORK]}: {num_params:,} params, {run.data.size:,} bytes of text")
    if start >= config.steps:
        print(f"nothing to train: the run is at its last step, {config.steps}")
        return
    show_bar = sys.stderr.isatty()
    began = time.perf_counter()
    logged = (start, began)  # (step, time) of the last log line
    first_done = began  # end of the first step (which compiles, in JAX)
    for step in range(start, config.steps):
        run.state, metrics = train_step(run.state, get_batch(run.data, step, config), run.rng)
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
    prompt = np.frombuffer(args.prompt.encode(), np.uint8).astype(np.int32)[None, :]  # (1, L)
    tokens = generate(
        run.lm,
        run.state.params,
        prompt,
        max_new_tokens=args.sample_tokens,
        rng=jax.random.PRNGKey(run.state.config.seed),
        temperature=args.temperature,
        top_k=args.top_k,
    )  # (1, sample_tokens)
    return bytes(np.asarray(tokens[0]).astype(np.uint8)).decode("utf-8", errors="replace")


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 done, 2 bad input (nothing trained or written), 130 interrupted."""
    args = parse_args(argv)
    try:
        run = prepare(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
