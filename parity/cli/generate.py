"""`python -m parity generate`: generate tokens or text with torch_block or jax_block.

The model comes from a checkpoint file (`--checkpoint`), a Hugging Face folder (`--hf`) or,
without either, a small random TransformerLM (vocabulary of 256, so bytes are tokens) built in
torch from `--seed` and converted for JAX: both frameworks get the same weights, and greedy
generation prints the same tokens. Text goes through `--tokenizer`, else the tokenizer.json
the model carries (an HF folder's, or the one a checkpoint converted from a folder stores),
with the `tokenizers` library. Every source then goes through the same prompt checks, generation and
output.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch

import jax_block
import torch_block
from twin_core import LMConfig

from ..convert import load, seeded_lm
from ..hf import from_hf, metadata_of
from .arguments import (
    EXIT_OK,
    add_framework_option,
    at_least,
    error,
    probability,
    temperature,
    token_ids,
)
from .text import Tokenizer, carried_tokenizer, folder_tokenizer
from .wording import worded

RANDOM_CONFIG = dict(
    vocab_size=256, max_seq_len=256, d_model=128, n_layers=2, n_heads=4, d_ff=512, dropout=0.0
)


def add_generate_command(subparsers: argparse._SubParsersAction) -> None:
    """`generate`: prompt a TransformerLM from a checkpoint file, an HF folder or random weights."""
    parser = subparsers.add_parser(
        "generate",
        help="generate tokens or text with a TransformerLM",
        description=(
            "Generate with torch_block or jax_block from a checkpoint file, a Hugging Face "
            f"folder, or random weights ({RANDOM_CONFIG}) seeded by --seed. A text prompt goes "
            "through --tokenizer, else the tokenizer.json the model carries (a folder's, or "
            "the one stored in a checkpoint converted from a folder), or else is read as UTF-8 "
            "bytes, one token per byte (vocabulary of 256), and the output is printed as text; "
            "--ids prints the new token ids. Then prints tokens/second of the second of two "
            "identical calls (the first warms up; for JAX it compiles, and the compile time is "
            "reported separately)."
        ),
    )
    add_framework_option(parser, "torch_block or jax_block")
    source = parser.add_argument_group("model (default: random weights)")
    source.add_argument(
        "--checkpoint",
        type=Path,
        help="a TransformerLM checkpoint file (.safetensors, .pt or .msgpack, written by "
        "parity.save, python -m parity convert or training); one converted from a Hugging "
        "Face folder carries its tokenizer and eos_token_id",
    )
    source.add_argument(
        "--hf",
        type=Path,
        metavar="DIR",
        help="a Hugging Face checkpoint folder; --prompt goes through its tokenizer.json "
        "(with the tokenizers library), else give --ids",
    )
    source.add_argument(
        "--tokenizer",
        type=Path,
        metavar="DIR",
        help="a folder with the tokenizer.json for --prompt (or that file), in place of the "
        "one the model carries",
    )
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text: through the model's tokenizer, or its UTF-8 bytes")
    prompt.add_argument("--ids", type=token_ids, help="comma-separated token ids, e.g. 1,2,3")
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
    parser.add_argument(
        "--top-k",
        type=at_least(1),
        help="sample among the k likeliest tokens (needs --temperature > 0)",
    )
    parser.add_argument(
        "--top-p",
        type=probability,
        help="sample among the likeliest tokens of mass p, in (0, 1] (needs --temperature > 0)",
    )
    parser.add_argument(
        "--eos-id",
        type=at_least(0),
        help="token id that ends generation (default: the eos_token_id the model carries)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random weights and sampling (default: %(default)s)"
    )
    parser.set_defaults(run=run_generate)


@dataclasses.dataclass(frozen=True)
class Source:
    """A TransformerLM to prompt: a torch module or `(flax_module, params)`, its tokenizer
    (None: ids only, `no_text` says why) and the token ids that end generation."""

    model: Any
    tokenizer: Tokenizer | None
    no_text: str
    eos_ids: list[int]

    @property
    def config(self) -> LMConfig:
        return lm_config(self.model)


def lm_config(model: Any) -> LMConfig:
    """The configuration of a torch TransformerLM or of `(flax_module, params)`."""
    return (model[0] if isinstance(model, tuple) else model).config


def open_source(args: argparse.Namespace) -> Source:
    """The model of --checkpoint, --hf or random weights, in --framework; ValueError if unusable."""
    if args.hf is not None and args.checkpoint is not None:
        raise ValueError("give --hf or --checkpoint, not both")
    if args.hf is not None:
        model, what = from_hf(args.hf, args.framework), str(args.hf)
    elif args.checkpoint is None:
        model = seeded_lm(LMConfig(**RANDOM_CONFIG), args.seed, args.framework)
        what = "the random model"
    else:
        model, what = _checkpoint_model(args.checkpoint, args.framework), str(args.checkpoint)
    metadata = metadata_of(model)
    if args.tokenizer is not None:
        return Source(model, folder_tokenizer(args.tokenizer), "", metadata.eos_ids())
    try:
        tokenizer = carried_tokenizer(what, metadata, lm_config(model).vocab_size)
    except ValueError as err:  # ids only, then
        no_text = f"{err}: give --tokenizer DIR (a folder with one) or the prompt as --ids"
        return Source(model, None, no_text, metadata.eos_ids())
    return Source(model, tokenizer, "", metadata.eos_ids())


def _checkpoint_model(path: Path, framework: str) -> Any:
    if not path.exists():
        raise ValueError(f"checkpoint file not found: {path}")
    if not path.is_file():
        raise ValueError(f"--checkpoint must be a file, got the folder {path}")
    loaded = load(path, framework=framework)
    module = loaded if framework == "torch" else loaded[0]
    if type(module).__name__ != "TransformerLM":
        raise ValueError(
            f"{path} holds a {type(module).__name__}; generation needs a TransformerLM"
        )
    return loaded


def prompt_ids(args: argparse.Namespace, source: Source) -> list[int]:
    """The prompt's token ids (--ids as given, or --prompt through the tokenizer), checked
    against the model: ValueError naming the flag that does not fit."""
    vocab, length = source.config.vocab_size, source.config.max_seq_len
    if args.ids is None and source.tokenizer is None:
        raise ValueError(source.no_text)
    ids = args.ids if args.ids is not None else source.tokenizer.encode(args.prompt)
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


def generate(model: Any, ids: list[int], args: argparse.Namespace, eos: int | None) -> list[int]:
    """The new tokens of one call of torch_block's or jax_block's `generate`."""
    sampling = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=eos,
        return_num_steps=True,
    )
    if isinstance(model, tuple):
        lm, params = model
        prompt = np.asarray([ids], np.int32)
        rng = jax.random.PRNGKey(args.seed)
        tokens, steps = jax_block.generate(lm, params, prompt, rng=rng, **sampling)
        return np.asarray(tokens)[0, :steps].tolist()  # waits for the result
    generator = torch.Generator().manual_seed(args.seed)
    tokens, steps = torch_block.generate(
        model, torch.tensor([ids]), generator=generator, **sampling
    )
    return tokens[0, :steps].tolist()


def run_generate(args: argparse.Namespace) -> int:
    """Load, generate twice (warm-up, then timed), print the text or ids and the speed."""
    given = (("--top-k", args.top_k), ("--top-p", args.top_p))
    filters = [flag for flag, value in given if value is not None]
    if filters and args.temperature == 0:
        return error(
            "generate",
            f"{' and '.join(filters)} {'apply' if len(filters) > 1 else 'applies'} only when "
            "sampling: give --temperature > 0 (the default 0 is greedy)",
        )
    try:
        source = open_source(args)
        ids = prompt_ids(args, source)
        eos_ids = source.eos_ids if args.eos_id is None else [args.eos_id]
        eos = eos_ids[0] if len(eos_ids) == 1 else None
        start = time.perf_counter()
        generate(source.model, ids, args, eos)
        first = time.perf_counter() - start
        start = time.perf_counter()
        tokens = generate(source.model, ids, args, eos)
        seconds = time.perf_counter() - start
    except (OSError, ValueError) as err:
        return error("generate", worded(err, flags=()))
    stop = next((i for i, token in enumerate(tokens) if token in eos_ids), None)
    tokens = tokens if stop is None else tokens[: stop + 1]
    if args.ids is not None:
        print(",".join(str(token) for token in tokens))
    else:
        print(source.tokenizer.decode(ids + tokens))
    rate = len(tokens) / seconds if seconds > 0 else float("inf")
    timing = ""
    if args.framework == "jax":
        timing = f" (compile {max(first - seconds, 0.0):.2f} s, not counted)"
    print(
        f"{args.framework}: {len(tokens)} new tokens in {seconds:.3f} s: "
        f"{rate:.1f} tokens/s{timing}"
    )
    return EXIT_OK
