"""`python -m parity generate`: generate tokens or text with torch_block or jax_block.

Without a checkpoint the model is a small random TransformerLM (vocabulary of 256, so bytes are
tokens) built in torch from `--seed` and converted for JAX: both frameworks get the same
weights, and greedy generation prints the same tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np
import torch

from jax_block.generate import generate
from torch_block.lm import TransformerLM

from .convert import from_torch

EXIT_OK, EXIT_USAGE = 0, 2
FRAMEWORKS = ("torch", "jax")
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
    parser.add_argument("--framework", choices=FRAMEWORKS, default="torch")
    parser.add_argument("--checkpoint", type=Path, help="a TransformerLM checkpoint file")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text; its UTF-8 bytes are the prompt tokens")
    prompt.add_argument("--ids", type=parse_ids, help="comma-separated token ids, e.g. 1,2,3")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--eos-id", type=int, default=None, help="token that ends generation")
    parser.add_argument("--seed", type=int, default=0, help="random weights and sampling")
    parser.set_defaults(run=run_generate)


def parse_ids(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err
    if not ids:
        raise argparse.ArgumentTypeError("--ids needs at least one token id")
    return ids


def random_lm(seed: int) -> TransformerLM:
    """The small random TransformerLM of RANDOM_CONFIG, in eval mode."""
    torch.manual_seed(seed)
    return TransformerLM(**RANDOM_CONFIG).eval()


def load_lm(checkpoint: Path | None, framework: str, seed: int):
    """A torch TransformerLM, or (Flax TransformerLM, params), from the file or random weights."""
    if checkpoint is None:
        lm = random_lm(seed)
        return lm if framework == "torch" else from_torch(lm)
    from .checkpoint import load

    loaded = load(checkpoint, framework="torch" if framework == "torch" else "flax")
    module = loaded if framework == "torch" else loaded[0]
    if type(module).__name__ != "TransformerLM":
        raise ValueError(
            f"{checkpoint} holds a {type(module).__name__}; generation needs a TransformerLM"
        )
    return loaded


def prompt_ids(args: argparse.Namespace, vocab_size: int) -> list[int]:
    """The prompt's token ids: --ids as given, or the UTF-8 bytes of --prompt."""
    if args.ids is not None:
        return args.ids
    if vocab_size != 256:
        raise ValueError(
            f"--prompt needs a vocabulary of 256 (bytes as tokens); the model has "
            f"vocab_size={vocab_size}: use --ids"
        )
    return list(args.prompt.encode("utf-8"))


def generate_torch(lm, ids: list[int], args: argparse.Namespace) -> tuple[list[int], float]:
    """(new tokens, seconds) with torch_block: a first call warms up, a second one is timed."""

    def run() -> list[int]:
        tokens, num_steps = lm.generate(
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
        tokens, num_steps = generate(
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
        vocab_size = (model if args.framework == "torch" else model[0]).vocab_size
        ids = prompt_ids(args, vocab_size)
        if args.framework == "torch":
            tokens, seconds = generate_torch(model, ids, args)
            timing = ""
        else:
            tokens, seconds, compile_seconds = generate_jax(model, ids, args)
            timing = f" (compile {compile_seconds:.2f} s, not counted)"
    except ValueError as err:
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
