"""`python -m parity train --framework torch|jax`: flags, run paths, checks, the loop's
bookkeeping, the loss plot and resuming another framework's run.

A run starts from a model and the tokenizer it reads text with: a byte-level TransformerLM of
the model flags, drawn by torch from --seed (converted for JAX: the same initial weights in both
frameworks), with bytes as tokens; or the model of a Hugging Face folder (--hf) with its
tokenizer.json, whose token ids, generation config and tokenizer files the run's files carry.
Everything after that is one code path. The framework's train module (`torch_block.train` or
`jax_block.train`) provides the `Trainer` hooks; everything else is here, written once. Exit
status: 0 done, 1 a file could not be written, 2 bad input (nothing trained or written), 130
interrupted (the last complete checkpoint stays).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

import jax_block.train
import torch_block.train
from twin_core import LMConfig, TrainConfig
from twin_core.data import BYTE_VOCAB_SIZE, DEFAULT_TEXT, check_data, check_model_fits, text_digest
from twin_core.history import LABELS, load_history, save_history
from twin_core.run_files import NAMINGS, RunPaths, safetensors_metadata

from ..convert import convert_train_state, seeded_lm
from ..convert.carried import carried, carry, from_metadata, metadata_entries
from ..hf import from_hf, metadata_of
from ..hf.metadata import TOKENIZER
from .arguments import add_framework_option, error
from .plot import plot_histories
from .text import Tokenizer, carried_tokenizer, text_ids


class Trainer(Protocol):
    """What a framework's train module provides to the command (torch_block.train and
    jax_block.train). A module with `set_threads(n)` also takes `--threads`."""

    FRAMEWORK: str  # "torch" or "jax"
    DESCRIPTION: str  # the optimizer, for --help

    def start(self, model: Any, config: TrainConfig) -> tuple[Any, Any]:
        """(model, step-0 state) of training `model` (a torch module or `(flax_module,
        params)`)."""

    def load_train_state(self, path: Path, steps: int | None = None) -> tuple[Any, Any, dict]:
        """(model, state, metadata) of a training state file of this framework's names."""

    def run_step(self, state: Any, data: np.ndarray, step: int) -> tuple[Any, dict[str, float]]:
        """(state, metrics) after update `step` on batch `step` of `data`."""

    def save_checkpoint(
        self, paths: RunPaths, lm: Any, state: Any, data_sha256: str, extra: dict[str, str]
    ) -> None:
        """The training state, then the model checkpoint, each written atomically with the
        metadata entries `extra`."""

    def count_params(self, state: Any) -> int:
        """The number of trained parameters."""

    def sample(
        self,
        lm: Any,
        state: Any,
        prompt: list[int],
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
    ) -> list[int]:
        """`max_new_tokens` token ids after the ids `prompt`, drawn with the run's seed."""


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
    """`train`: train a byte-level TransformerLM, or fine-tune a Hugging Face folder's model; run
    and model flags not given are None (see `train_config` and `byte_lm_config`)."""
    optimizers = "; ".join(f"{name}: {t.DESCRIPTION}" for name, t in TRAINERS.items())
    p = subparsers.add_parser(
        "train",
        help="train a byte-level TransformerLM, or fine-tune a Hugging Face model, with "
        "torch_block or jax_block",
        description="Train a byte-level TransformerLM (vocabulary 256) on a text file with "
        f"either framework ({optimizers}); the same --seed starts both from the same weights. "
        "--hf DIR fine-tunes the model of a Hugging Face folder instead, on the text through "
        "its tokenizer.json. A run named R writes R.safetensors (the model, read by `python "
        "-m parity`; an --hf run's carries the folder's tokenizer and token ids, for generate "
        "and convert --to hf), R.train.safetensors (the training state, for --resume), "
        "R.history.json (losses) and, with --plot, R.loss.png.",
    )
    add_framework_option(p, "the framework to train with")
    p.add_argument(
        "--data", type=Path, default=DEFAULT_TEXT, help="text file (default: %(default)s)"
    )
    p.add_argument(
        "--hf",
        type=Path,
        metavar="DIR",
        help="fine-tune the model of this Hugging Face folder (its weights, in float32, and "
        "config; the model flags do not apply), reading --data through its tokenizer.json",
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
    out.add_argument("--sample-tokens", type=int, default=0, help="tokens to generate at the end")
    out.add_argument("--prompt", default="\n", help="prompt of the sample [newline]")
    out.add_argument("--temperature", type=float, default=0.8, help="[%(default)s]")
    out.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    p.add_argument(
        "--threads",
        type=int,
        help="torch's intra-op threads (default: the framework's; 1 on a busy CPU)",
    )
    p.set_defaults(run=run_train)


def flag_of(field: str) -> str:
    """The command-line flag of a field: seq_len -> --seq-len."""
    return "--" + field.replace("_", "-")


def given_flags(args: argparse.Namespace, names: Iterable[str]) -> list[str]:
    """The flags of these fields given on the command line."""
    return [flag_of(n) for n in names if getattr(args, n) is not None]


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The run configuration a fresh run's flags ask for."""
    return TrainConfig(**{n: getattr(args, n) for n in RUN_FLAGS if getattr(args, n) is not None})


def byte_lm_config(args: argparse.Namespace, config: TrainConfig) -> LMConfig:
    """The byte-level model the model flags ask for."""
    model = {
        n: MODEL_DEFAULTS[n] if getattr(args, n) is None else getattr(args, n)
        for n in MODEL_DEFAULTS
    }
    return LMConfig(
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


def initial_model(args: argparse.Namespace, framework: str, config: TrainConfig) -> Any:
    """The model a fresh run starts from, in `framework`: the --hf folder's in float32, or else
    the byte-level model of the flags with torch_block's weights drawn from the seed."""
    if args.hf is None:
        return seeded_lm(byte_lm_config(args, config), config.seed, framework)
    model_flags = given_flags(args, MODEL_DEFAULTS)
    if model_flags:
        raise ValueError(
            f"--hf {args.hf} gives the model (its config.json); drop {' '.join(model_flags)}"
        )
    if not args.hf.is_dir():
        raise ValueError(f"--hf {args.hf}: not a directory (a Hugging Face checkpoint folder)")
    if not (args.hf / TOKENIZER).is_file():
        raise ValueError(
            f"--hf {args.hf} has no {TOKENIZER}: fine-tuning reads --data through the "
            "folder's tokenizer"
        )
    return from_hf(args.hf, framework, dtype="float32")


@dataclasses.dataclass
class Run:
    """A checked run, ready to train: nothing has been trained or written yet."""

    lm: Any
    state: Any
    tokenizer: Tokenizer  # the model's: bytes as tokens, or what a Hugging Face folder gave
    data: np.ndarray  # the text's token ids
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
    """Check every flag, build or resume the model, then read the text through its tokenizer;
    raises on bad input."""
    check_flags(trainer, args)
    if not args.data.is_file():
        raise FileNotFoundError(f"no text file at {args.data}")
    if args.resume is not None:
        extra = given_flags(args, (*RUN_FLAGS, *MODEL_DEFAULTS, "hf"))
        extra = [flag for flag in extra if flag != "--steps"]
        if extra:
            raise ValueError(
                f"--resume continues the saved run with its own settings (only --steps may "
                f"extend it); drop {' '.join(extra)}"
            )
        resumed = RunPaths.of(args.resume)
        lm, state, metadata = resume(trainer, args.resume, args.steps)
        carry(lm, from_metadata(resumed.train_state, metadata))
        paths = resumed if args.out is None else RunPaths.of(args.out)
        history = load_history(resumed.history)[1] if resumed.history.is_file() else []
        history = history[: int(state.step)]
        if not paths.same_run(resumed):
            check_free(paths, args.plot, args.overwrite)
        what, trained_on = str(resumed.train_state), metadata.get("data_sha256")
    else:
        config = train_config(args)
        paths = RunPaths.of(Path("runs") / trainer.FRAMEWORK if args.out is None else args.out)
        check_free(paths, args.plot, args.overwrite)
        lm, state = trainer.start(initial_model(args, trainer.FRAMEWORK, config), config)
        history = []
        what, trained_on = ("the model" if args.hf is None else f"--hf {args.hf}"), ""
    lm_config, config = lm.config, state.config
    check_model_fits(config, lm_config.max_seq_len)
    tokenizer = carried_tokenizer(what, metadata_of(lm), lm_config.vocab_size)
    if tokenizer.vocab_size > lm_config.vocab_size:
        raise ValueError(
            f"{what}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size {lm_config.vocab_size}"
        )
    data = text_ids(args.data, tokenizer)
    data_sha256 = text_digest(data)
    if trained_on not in ("", data_sha256):
        raise ValueError(f"{what} was trained on another text than {args.data}")
    check_data(data, config, lm_config.vocab_size, str(args.data))
    prompt_len = len(tokenizer.encode(args.prompt))
    if args.sample_tokens and prompt_len == 0:
        raise ValueError(f"--prompt {args.prompt!r} is no token of the model's tokenizer")
    if args.sample_tokens and prompt_len + args.sample_tokens > lm_config.max_seq_len:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + --sample-tokens {args.sample_tokens} exceeds the "
            f"model's max_seq_len {lm_config.max_seq_len}"
        )
    return Run(lm, state, tokenizer, data, data_sha256, history, paths)


def save_checkpoint(trainer: Trainer, run: Run) -> None:
    """Training state, model, then history: each file atomic and complete on its own."""
    extra = metadata_entries(carried(run.lm))
    trainer.save_checkpoint(run.paths, run.lm, run.state, run.data_sha256, extra)
    lm_config = run.lm.config.to_dict()
    config = run.state.config.to_dict()
    save_history(run.paths.history, trainer.FRAMEWORK, lm_config, config, run.history)


def train(trainer: Trainer, run: Run, args: argparse.Namespace) -> None:
    """Train to the run's last step: a progress line, a log line and a checkpoint every N steps."""
    config = run.state.config
    start = int(run.state.step)
    tokens_per_step = config.batch_size * config.seq_len
    num_params = trainer.count_params(run.state)
    print(f"{LABELS[trainer.FRAMEWORK]}: {num_params:,} params, {run.data.size:,} tokens of text")
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
        prompt = run.tokenizer.encode(args.prompt)
        tokens = trainer.sample(
            run.lm, run.state, prompt, args.sample_tokens, args.temperature, args.top_k
        )
        print(f"--- {args.sample_tokens} tokens after {args.prompt!r} ---")
        print(run.tokenizer.decode(prompt + tokens))
    return 0
