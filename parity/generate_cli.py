"""`python -m parity generate`: generate tokens or text with torch_block or jax_block.

Without a checkpoint the model is a small random TransformerLM (vocabulary of 256, so bytes are
tokens) built in torch from `--seed` and converted for JAX: both frameworks get the same
weights, and greedy generation prints the same tokens.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import torch

from jax_block.generate import generate as jax_generate
from torch_block.generate import generate as torch_generate
from torch_block.lm import TransformerLM
from twin_core import LMConfig

from .checkpoint import ALIASES, FRAMEWORKS, command_line_errors, load
from .convert import from_torch

EXIT_OK, EXIT_USAGE = 0, 2
RANDOM_CONFIG = dict(
    vocab_size=256, max_seq_len=256, d_model=128, n_layers=2, n_heads=4, d_ff=512, dropout=0.0
)


def add_generate_command(subparsers: argparse._SubParsersAction) -> None:
    """`generate`: prompt a TransformerLM from a checkpoint file (or random weights)."""
    parser = subparsers.add_parser(
        "generate",
        help="generate tokens or text with a TransformerLM",
        description=(
            "Generate with torch_block or jax_block from a checkpoint file, or from random "
            f"weights ({RANDOM_CONFIG}) seeded by --seed. A text prompt is read as UTF-8 bytes, "
            "one token per byte (vocabulary of 256), and the output is printed as text; "
            "--ids prints the new token ids. Then prints tokens/second of the second of two "
            "identical calls (the first warms up; for JAX it compiles, and the compile time "
            "is reported separately)."
        ),
    )
    parser.add_argument(
        "--framework",
        type=framework_name,
        choices=FRAMEWORKS,
        default="torch",
        help="torch_block or jax_block ('flax' is read as jax) (default: %(default)s)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="a TransformerLM checkpoint file (.safetensors, .pt or .msgpack, written by "
        "parity.save, python -m parity convert or training) (default: random weights)",
    )
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text; its UTF-8 bytes are the prompt tokens")
    prompt.add_argument("--ids", type=parse_ids, help="comma-separated token ids, e.g. 1,2,3")
    parser.add_argument(
        "--max-new-tokens",
        type=at_least(1),
        default=64,
        help="tokens to generate (default: %(default)s)",
    )
    parser.add_argument(
        "--temperature",
        type=temperature,
        default=0.0,
        help="0 is greedy; otherwise sample from softmax(logits / T) (default: %(default)s)",
    )
    parser.add_argument("--top-k", type=at_least(1), help="sample among the k likeliest tokens")
    parser.add_argument(
        "--top-p", type=probability, help="sample among the likeliest tokens of mass p, in (0, 1]"
    )
    parser.add_argument("--eos-id", type=at_least(0), help="token id that ends generation")
    parser.add_argument(
        "--seed", type=int, default=0, help="random weights and sampling (default: %(default)s)"
    )
    parser.set_defaults(run=run_generate)


def framework_name(text: str) -> str:
    """The framework's one name: 'flax' is read as 'jax'."""
    return ALIASES.get(text, text)


def parse_ids(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    if min(ids) < 0:
        raise argparse.ArgumentTypeError(f"token ids are >= 0, got {min(ids)}")
    return ids


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def temperature(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    value = _number(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def random_lm(seed: int) -> TransformerLM:
    """The small random TransformerLM of RANDOM_CONFIG, in eval mode."""
    torch.manual_seed(seed)
    return TransformerLM(**RANDOM_CONFIG).eval()


def load_lm(checkpoint: Path | None, framework: str, seed: int):
    """A torch TransformerLM, or (Flax TransformerLM, params), from the file or random weights."""
    if checkpoint is None:
        lm = random_lm(seed)
        return lm if framework == "torch" else from_torch(lm)
    if not checkpoint.exists():
        raise ValueError(f"checkpoint file not found: {checkpoint}")
    if not checkpoint.is_file():
        raise ValueError(f"--checkpoint must be a file, got the folder {checkpoint}")
    with command_line_errors(flags=()):
        loaded = load(checkpoint, framework=framework)
    module = loaded if framework == "torch" else loaded[0]
    if type(module).__name__ != "TransformerLM":
        raise ValueError(
            f"{checkpoint} holds a {type(module).__name__}; generation needs a TransformerLM"
        )
    return loaded


def prompt_ids(args: argparse.Namespace, config: LMConfig) -> list[int]:
    """The prompt's token ids (--ids as given, or the UTF-8 bytes of --prompt), checked against
    the model: ValueError naming the flag that does not fit."""
    vocab, length = config.vocab_size, config.max_seq_len
    if args.ids is None and vocab != 256:
        raise ValueError(
            f"--prompt needs a vocabulary of 256 (bytes as tokens); the model has "
            f"vocab_size={vocab}: use --ids"
        )
    ids = args.ids if args.ids is not None else list(args.prompt.encode("utf-8"))
    if not ids:
        raise ValueError("--prompt is empty: give at least one character")
    if max(ids) >= vocab:
        raise ValueError(
            f"--ids: token ids must be < the model's vocab_size={vocab}, got {max(ids)}"
        )
    if args.eos_id is not None and args.eos_id >= vocab:
        raise ValueError(f"--eos-id must be < the model's vocab_size={vocab}, got {args.eos_id}")
    if len(ids) + args.max_new_tokens > length:
        raise ValueError(
            f"a prompt of {len(ids)} tokens and --max-new-tokens {args.max_new_tokens} need "
            f"{len(ids) + args.max_new_tokens} positions; the model has max_seq_len={length}"
        )
    return ids


def generate_torch(lm, ids: list[int], args: argparse.Namespace) -> tuple[list[int], float]:
    """(new tokens, seconds) with torch_block: a first call warms up, a second one is timed."""

    def run() -> list[int]:
        tokens, num_steps = torch_generate(
            lm,
            torch.tensor([ids]),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token_id=args.eos_id,
            generator=torch.Generator().manual_seed(args.seed),
            return_num_steps=True,
        )
        return tokens[0, :num_steps].tolist()

    run()
    start = time.perf_counter()
    tokens = run()
    return tokens, time.perf_counter() - start


def generate_jax(model, ids: list[int], args: argparse.Namespace) -> tuple[list[int], float, float]:
    """(new tokens, seconds, compile seconds) with jax_block: a first call compiles, a second
    one with the same shapes is timed; compile time is the first call's extra time."""
    lm, params = model

    def run() -> list[int]:
        tokens, num_steps = jax_generate(
            lm,
            params,
            np.asarray([ids], np.int32),
            max_new_tokens=args.max_new_tokens,
            rng=jax.random.PRNGKey(args.seed),
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token_id=args.eos_id,
            return_num_steps=True,
        )
        return np.asarray(tokens)[0, :num_steps].tolist()  # waits for the result

    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    start = time.perf_counter()
    tokens = run()
    seconds = time.perf_counter() - start
    return tokens, seconds, max(first - seconds, 0.0)


def run_generate(args: argparse.Namespace) -> int:
    """Load, generate, print the tokens or text and the speed; returns the exit code."""
    try:
        model = load_lm(args.checkpoint, args.framework, args.seed)
        ids = prompt_ids(args, (model if args.framework == "torch" else model[0]).config)
        if args.framework == "torch":
            tokens, seconds = generate_torch(model, ids, args)
            timing = ""
        else:
            tokens, seconds, compile_seconds = generate_jax(model, ids, args)
            timing = f" (compile {compile_seconds:.2f} s, not counted)"
    except (OSError, ValueError) as err:
        print(f"python -m parity generate: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.ids is not None:
        print(",".join(str(token) for token in tokens))
    else:
        print(bytes(ids + tokens).decode("utf-8", errors="replace"))
    rate = len(tokens) / seconds if seconds > 0 else float("inf")
    print(
        f"{args.framework}: {len(tokens)} new tokens in {seconds:.3f} s: "
        f"{rate:.1f} tokens/s{timing}"
    )
    return EXIT_OK
