"""`python -m parity train --framework torch|jax`: flags, run paths, checks, the loop's
bookkeeping, the loss plot and resuming another framework's run.

The framework's train module (`torch_block.train` or `jax_block.train`) provides the `Trainer`
hooks; everything else is here, written once. Exit status: 0 done, 1 a file could not be
written, 2 bad input (nothing trained or written), 130 interrupted (the last complete
checkpoint stays).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

import jax_block.train
import torch_block.train
from twin_core import LMConfig, TrainConfig
from twin_core.data import (
    BYTE_VOCAB_SIZE,
    DEFAULT_TEXT,
    check_data,
    check_model_fits,
    load_text,
    text_digest,
)
from twin_core.history import LABELS, load_history, save_history
from twin_core.run_files import NAMINGS, RunPaths, safetensors_metadata

from ..convert import convert_train_state
from .arguments import add_framework_option, error
from .plot import plot_histories


class Trainer(Protocol):
    """What a framework's train module provides to the command (torch_block.train and
    jax_block.train). A module with `set_threads(n)` also takes `--threads`."""

    FRAMEWORK: str  # "torch" or "jax"
    DESCRIPTION: str  # the optimizer, for --help

    def new_state(self, lm_config: LMConfig, config: TrainConfig) -> tuple[Any, Any]:
        """(model, step-0 state), the weights drawn from config.seed."""

    def load_train_state(self, path: Path, steps: int | None = None) -> tuple[Any, Any, dict]:
        """(model, state, metadata) of a training state file of this framework's names."""

    def run_step(self, state: Any, data: np.ndarray, step: int) -> tuple[Any, dict[str, float]]:
        """(state, metrics) after update `step` on batch `step` of `data`."""

    def save_checkpoint(self, paths: RunPaths, lm: Any, state: Any, data_sha256: str) -> None:
        """The training state, then the model checkpoint, each written atomically."""

    def count_params(self, state: Any) -> int:
        """The number of trained parameters."""

    def sample(
        self,
        lm: Any,
        state: Any,
        prompt: bytes,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
    ) -> bytes:
        """`max_new_tokens` bytes after `prompt`, drawn with the run's seed."""


TRAINERS: dict[str, Trainer] = {"torch": torch_block.train, "jax": jax_block.train}
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
INT_FLAGS = ("steps", "batch_size", "seq_len", "warmup_steps", "seed")
MODEL_DEFAULTS: dict[str, Any] = dict(
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
DEFAULT_HELP = {  # defaults that depend on other flags
    "warmup_steps": "min(100, steps // 4)",
    "d_ff": "4 * d_model",
    "max_seq_len": "seq_len",
}


def add_train_command(subparsers: argparse._SubParsersAction) -> None:
    """`train`: train a byte-level TransformerLM; run and model flags not given are None (see
    `new_configs`)."""
    optimizers = "; ".join(f"{name}: {t.DESCRIPTION}" for name, t in TRAINERS.items())
    p = subparsers.add_parser(
        "train",
        help="train a byte-level TransformerLM with torch_block or jax_block",
        description="Train a byte-level TransformerLM (vocabulary 256) on a text file with "
        f"either framework ({optimizers}). A run named R writes R.safetensors (the model, read "
        "by `python -m parity`), R.train.safetensors (the training state, for --resume), "
        "R.history.json (losses) and, with --plot, R.loss.png.",
    )
    add_framework_option(p, "the framework to train with")
    p.add_argument(
        "--data", type=Path, default=DEFAULT_TEXT, help="text file (default: %(default)s)"
    )
    p.add_argument(
        "--out",
        type=Path,
        help="the run R, as R or R.safetensors (default: runs/FRAMEWORK; with --resume: the "
        "resumed run)",
    )
    p.add_argument(
        "--resume",
        type=Path,
        help="a run to continue (R, R.safetensors or R.train.safetensors), from either "
        "framework; its settings are kept, except --steps, which extends it",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace the files of a run already at --out"
    )
    defaults = TrainConfig()
    run = p.add_argument_group("run (default in brackets)")
    for field in RUN_FLAGS:
        kind = int if field in INT_FLAGS else float
        shown = DEFAULT_HELP.get(field, getattr(defaults, field))
        run.add_argument(flag_of(field), type=kind, help=f"[{shown}]")
    model = p.add_argument_group("model (default in brackets)")
    for field, value in MODEL_DEFAULTS.items():
        if isinstance(value, bool):
            model.add_argument(
                flag_of(field), action="store_true", default=None, help="Mixture of Experts"
            )
        else:
            kind = float if field in ("dropout", "capacity_factor") else int
            model.add_argument(
                flag_of(field), type=kind, help=f"[{DEFAULT_HELP.get(field, value)}]"
            )
    out = p.add_argument_group("output")
    out.add_argument("--checkpoint-every", type=int, default=100, help="[%(default)s] steps")
    out.add_argument("--log-every", type=int, default=25, help="[%(default)s] steps")
    out.add_argument("--plot", action="store_true", help="draw the loss curve to R.loss.png")
    out.add_argument(
        "--plot-with",
        type=Path,
        action="append",
        default=[],
        help="another run's R.history.json to draw on the same plot (repeatable)",
    )
    out.add_argument("--sample-tokens", type=int, default=0, help="bytes to generate at the end")
    out.add_argument("--prompt", default="\n", help="prompt of the sample [newline]")
    out.add_argument("--temperature", type=float, default=0.8, help="[%(default)s]")
    out.add_argument("--top-k", type=int, help="sample from the k most likely bytes only")
    p.add_argument(
        "--threads",
        type=int,
        help="torch's intra-op threads (default: the framework's; 1 on a busy CPU)",
    )
    p.set_defaults(run=run_train)


def flag_of(field: str) -> str:
    """The command-line flag of a field: seq_len -> --seq-len."""
    return "--" + field.replace("_", "-")


def given_run_flags(args: argparse.Namespace) -> list[str]:
    """The run and model flags given on the command line."""
    return [flag_of(n) for n in (*RUN_FLAGS, *MODEL_DEFAULTS) if getattr(args, n) is not None]


def new_configs(args: argparse.Namespace) -> tuple[LMConfig, TrainConfig]:
    """The model and run configuration a fresh run's flags ask for."""
    flags = {n: getattr(args, n) for n in (*RUN_FLAGS, *MODEL_DEFAULTS)}
    config = TrainConfig(**{n: flags[n] for n in RUN_FLAGS if flags[n] is not None})
    model = {n: MODEL_DEFAULTS[n] if flags[n] is None else flags[n] for n in MODEL_DEFAULTS}
    lm_config = LMConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        max_seq_len=model["max_seq_len"] or config.seq_len,
        d_model=model["d_model"],
        n_layers=model["n_layers"],
        n_heads=model["n_heads"],
        d_ff=model["d_ff"] or 4 * model["d_model"],
        dropout=model["dropout"],
        use_moe=model["moe"],
        num_experts=model["num_experts"],
        top_k_experts=model["top_k_experts"],
        expert_capacity_factor=model["capacity_factor"],
    )
    check_model_fits(config, lm_config.max_seq_len)
    return lm_config, config


@dataclasses.dataclass
class Run:
    """A checked run, ready to train: nothing has been trained or written yet."""

    lm: Any
    state: Any
    data: np.ndarray
    data_sha256: str
    history: list[dict]
    paths: RunPaths


def check_flags(trainer: Trainer, args: argparse.Namespace) -> None:
    """Raise ValueError for output flags that cannot work."""
    for name in ("checkpoint_every", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"{flag_of(name)} must be >= 1, got {getattr(args, name)}")
    if args.sample_tokens < 0:
        raise ValueError(f"--sample-tokens must be >= 0, got {args.sample_tokens}")
    if args.threads is not None and not hasattr(trainer, "set_threads"):
        raise ValueError(f"--threads sets torch's threads; --framework {args.framework} has none")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib (pip install matplotlib, or the dev extra)")
    for path in args.plot_with:
        load_history(path)


def check_free(paths: RunPaths, plot: bool, overwrite: bool) -> None:
    """Raise ValueError if the run would replace files that exist, unless `overwrite`."""
    taken = [str(p) for p in paths.outputs(plot) if p.exists()]
    if taken and not overwrite:
        raise ValueError(
            f"{', '.join(taken)} already exist; --overwrite replaces them, --resume "
            f"{paths.train_state} continues that run, --out names another"
        )


def resume(trainer: Trainer, path: Path, steps: int | None) -> tuple[Any, Any, dict]:
    """(model, state, metadata) of the training state of run `path`, from either framework.

    Another framework's state is converted through `parity.convert.convert_train_state` into a
    temporary file, then read.
    """
    source = RunPaths.of(path).train_state
    naming = safetensors_metadata(source).get("naming")
    if naming == NAMINGS[trainer.FRAMEWORK] or naming not in NAMINGS.values():
        return trainer.load_train_state(source, steps)
    with tempfile.TemporaryDirectory() as folder:
        converted = Path(folder) / source.name
        convert_train_state(source, converted, to=trainer.FRAMEWORK)
        return trainer.load_train_state(converted, steps)


def prepare(trainer: Trainer, args: argparse.Namespace) -> Run:
    """Check every flag and the text, then build or resume the model; raises on bad input."""
    check_flags(trainer, args)
    data = load_text(args.data)
    data_sha256 = text_digest(data)
    if args.resume is not None:
        extra = [flag for flag in given_run_flags(args) if flag != "--steps"]
        if extra:
            raise ValueError(
                f"--resume continues the saved run with its own settings (only --steps may "
                f"extend it); drop {' '.join(extra)}"
            )
        resumed = RunPaths.of(args.resume)
        lm, state, metadata = resume(trainer, args.resume, args.steps)
        if metadata.get("data_sha256") not in ("", data_sha256):
            raise ValueError(f"{resumed.train_state} was trained on another text than {args.data}")
        paths = resumed if args.out is None else RunPaths.of(args.out)
        history = load_history(resumed.history)[1] if resumed.history.is_file() else []
        history = history[: int(state.step)]
        if not paths.same_run(resumed):
            check_free(paths, args.plot, args.overwrite)
    else:
        lm_config, config = new_configs(args)
        paths = RunPaths.of(Path("runs") / trainer.FRAMEWORK if args.out is None else args.out)
        check_free(paths, args.plot, args.overwrite)
        lm, state = trainer.new_state(lm_config, config)
        history = []
    lm_config, config = lm.config, state.config
    check_model_fits(config, lm_config.max_seq_len)
    check_data(data, config, lm_config.vocab_size, str(args.data))
    prompt_len = len(args.prompt.encode())
    if args.sample_tokens and prompt_len + args.sample_tokens > lm_config.max_seq_len:
        raise ValueError(
            f"prompt ({prompt_len} bytes) + --sample-tokens {args.sample_tokens} exceeds the "
            f"model's max_seq_len {lm_config.max_seq_len}"
        )
    return Run(lm, state, data, data_sha256, history, paths)


def save_checkpoint(trainer: Trainer, run: Run) -> None:
    """Training state, model, then history: each file atomic and complete on its own."""
    trainer.save_checkpoint(run.paths, run.lm, run.state, run.data_sha256)
    lm_config = run.lm.config.to_dict()
    config = run.state.config.to_dict()
    save_history(run.paths.history, trainer.FRAMEWORK, lm_config, config, run.history)


def train(trainer: Trainer, run: Run, args: argparse.Namespace) -> None:
    """Train to the run's last step: a progress line, a log line and a checkpoint every N steps."""
    config = run.state.config
    start = int(run.state.step)
    tokens_per_step = config.batch_size * config.seq_len
    num_params = trainer.count_params(run.state)
    print(f"{LABELS[trainer.FRAMEWORK]}: {num_params:,} params, {run.data.size:,} bytes of text")
    if start >= config.steps:
        print(f"nothing to train: the run is at its last step, {config.steps} (--steps extends it)")
        return
    show_bar = sys.stderr.isatty()
    began = time.perf_counter()
    logged = (start, began)  # (step, time) of the last log line
    first_done = began  # end of the first step (which compiles, in JAX)
    for step in range(start, config.steps):
        run.state, metrics = trainer.run_step(run.state, run.data, step)
        now = time.perf_counter()
        first_done = now if step == start else first_done
        record = {"step": step + 1, **metrics}
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
            save_checkpoint(trainer, run)
    end = time.perf_counter()
    steady = tokens_per_step * (config.steps - start - 1) / max(end - first_done, 1e-9)
    print(
        f"done: {end - began:.1f} s ({first_done - began:.1f} s first step, then "
        f"{steady:,.0f} tok/s); checkpoint {run.paths.checkpoint}",
        flush=True,
    )


def plot(trainer: Trainer, run: Run, args: argparse.Namespace) -> None:
    """The run's loss curve, with those of `--plot-with`, to the run's plot file."""
    runs = [(LABELS[trainer.FRAMEWORK], run.history)]
    for path in args.plot_with:
        framework, history = load_history(path)
        label = LABELS[framework]
        if any(label == other for other, _ in runs):
            label = f"{label} ({path.name})"
        runs.append((label, history))
    plot_histories(run.paths.plot, runs)
    print(f"plot: {run.paths.plot}")


def run_train(args: argparse.Namespace) -> int:
    """Train with --framework's trainer; returns the exit status."""
    trainer = TRAINERS[args.framework]
    try:
        run = prepare(trainer, args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        return error("train", str(err))
    if args.threads is not None:
        trainer.set_threads(args.threads)  # type: ignore[attr-defined]
    try:
        run.paths.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        train(trainer, run, args)
        if args.plot:
            plot(trainer, run, args)
    except KeyboardInterrupt:
        print(f"\ninterrupted; last complete checkpoint: {run.paths.checkpoint}", file=sys.stderr)
        return 130
    except OSError as err:
        error("train", str(err))
        return 1
    if args.sample_tokens:
        text = trainer.sample(
            run.lm,
            run.state,
            args.prompt.encode(),
            args.sample_tokens,
            args.temperature,
            args.top_k,
        )
        print(f"--- {args.sample_tokens} bytes after {args.prompt!r} ---")
        print(args.prompt + text.decode("utf-8", errors="replace"))
    return 0
