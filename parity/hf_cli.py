"""`python -m parity` on Hugging Face checkpoint folders: `convert`, `generate --hf`, `check --hf`.

`add_hf_commands` runs after the other commands are registered and extends three of them:
`convert` reads an HF folder as IN (or writes one with `--to hf`), `generate --hf DIR` prompts
the folder's model (text through its tokenizer.json when the `tokenizers` library is installed),
and `check --hf DIR` prints the parity report of the folder's model three ways: torch_block,
jax_block and, when it is installed, transformers (imported here only, never by the rest of the
package: it is the independent reference, optional at run time).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch

import jax_block
import torch_block

from .hf import HFCheckpoint, from_hf, to_hf
from .hf_files import read_json
from .hf_report import hf_report
from .render import render_json, render_report

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_hf_commands(subparsers: argparse._SubParsersAction) -> None:
    """Extend the registered `convert`, `generate` and `check` with Hugging Face folders."""
    commands = subparsers.choices
    _extend_convert(commands["convert"])
    _extend_generate(commands["generate"])
    _extend_check(commands["check"])


def _dispatch(
    parser: argparse.ArgumentParser,
    run_hf: Callable[[argparse.Namespace], int],
    wanted: Callable[[argparse.Namespace], bool],
) -> None:
    """Run `run_hf` instead of the parser's own command when `wanted(args)`."""
    original = parser.get_default("run")
    parser.set_defaults(run=lambda args: run_hf(args) if wanted(args) else original(args))


def _error(command: str, message: str) -> int:
    print(f"python -m parity {command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


# --------------------------------------------------------------------------- convert
def _extend_convert(parser: argparse.ArgumentParser) -> None:
    to = next(action for action in parser._actions if action.dest == "to")
    to.choices = (*to.choices, "hf")
    to.required = False
    to.help = (
        f"{to.help}; hf writes a Hugging Face folder OUT (required unless IN is a Hugging Face "
        "folder, which is converted for torch by default)"
    )
    parser.epilog = (
        f"{parser.epilog or ''}\nHugging Face: python -m parity convert HF_DIR out.safetensors; "
        "python -m parity convert in.safetensors OUT_DIR --to hf"
    )
    _dispatch(parser, run_convert_hf, lambda args: args.to in (None, "hf") or args.input.is_dir())


def run_convert_hf(args: argparse.Namespace) -> int:
    """An HF folder into a checkpoint file, or a TransformerLM checkpoint file into an HF folder."""
    from .checkpoint import load, save

    try:
        if args.input.is_dir():
            if args.to == "hf":
                raise ValueError(f"{args.input} is already a Hugging Face folder")
            framework = args.to or "torch"
            model = from_hf(args.input, framework)
            naming = framework if args.output.suffix.lower() == ".safetensors" else None
            save(args.output, model, naming=naming)
            print(f"wrote {args.output} ({framework}) from the Hugging Face folder {args.input}")
            return EXIT_OK
        if args.to is None:
            raise ValueError("--to is required (torch, jax or hf) unless IN is an HF folder")
        if not args.input.is_file():
            raise ValueError(f"input file not found: {args.input}")
        model = load(args.input, "torch")
        if not isinstance(model, torch_block.TransformerLM):
            raise ValueError(f"{args.input} holds a {type(model).__name__}; --to hf needs a LM")
        folder = to_hf(model, args.output)
    except (OSError, ValueError, TypeError) as err:
        return _error("convert", str(err).replace("\n", " "))
    family = read_json(folder / "config.json", "the model config")["model_type"]
    print(f"wrote the Hugging Face folder {folder} ({family})")
    return EXIT_OK


# --------------------------------------------------------------------------- generate
def _extend_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hf",
        type=Path,
        metavar="DIR",
        help="a Hugging Face checkpoint folder; --prompt goes through its tokenizer.json "
        "(with the tokenizers library), else give --ids",
    )
    _dispatch(parser, run_generate_hf, lambda args: args.hf is not None)


def run_generate_hf(args: argparse.Namespace) -> int:
    """Generate from an HF folder with torch_block or jax_block; print text or ids."""
    framework = "torch" if args.framework == "torch" else "jax"
    try:
        if getattr(args, "checkpoint", None) is not None:
            raise ValueError("give --hf or --checkpoint, not both")
        tokenizer = _tokenizer(args.hf)
        if args.prompt is not None and tokenizer is None:
            raise ValueError(
                f"{args.hf} has no tokenizer.json (or the tokenizers library is not installed): "
                "give the prompt as --ids"
            )
        ids = args.ids if args.ids is not None else tokenizer.encode(args.prompt).ids
        eos = _eos_ids(args.hf) if args.eos_id is None else [args.eos_id]
        model = from_hf(args.hf, framework)
        start = time.perf_counter()
        tokens = _generate(model, ids, args, eos[0] if len(eos) == 1 else None)
        seconds = time.perf_counter() - start
    except (OSError, ValueError) as err:
        return _error("generate", str(err).replace("\n", " "))
    stop = next((i for i, token in enumerate(tokens) if token in eos), None)
    tokens = tokens if stop is None else tokens[: stop + 1]
    if args.prompt is not None:
        print(tokenizer.decode(ids + tokens))
    else:
        print(",".join(map(str, tokens)))
    compiled = " (compile included)" if framework == "jax" else ""
    print(f"{framework}: {len(tokens)} new tokens in {seconds:.3f} s{compiled}")
    return EXIT_OK


def _tokenizer(folder: Path):
    """The folder's tokenizers.Tokenizer, or None without tokenizer.json or the library."""
    path = folder / "tokenizer.json"
    if not path.is_file() or importlib.util.find_spec("tokenizers") is None:
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the library raises its own exception type
        raise ValueError(f"{path}: the tokenizers library cannot read it: {err}") from err


def _eos_ids(folder: Path) -> list[int]:
    """eos_token_id of generation_config.json, else of config.json, as a list (maybe empty)."""
    for name in ("generation_config.json", "config.json"):
        if (folder / name).is_file():
            eos = read_json(folder / name, "token ids").get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else [int(e) for e in eos]
    return []


def _generate(model: Any, ids: list[int], args: argparse.Namespace, eos: int | None) -> list[int]:
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
        tokens, steps = jax_block.generate(
            lm, params, np.asarray([ids], np.int32), rng=jax.random.PRNGKey(args.seed), **sampling
        )
        return np.asarray(tokens)[0, :steps].tolist()
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.tensor([ids])
    tokens, steps = torch_block.generate(model, prompt, generator=generator, **sampling)
    return tokens[0, :steps].tolist()


# --------------------------------------------------------------------------- check
def _extend_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hf",
        type=Path,
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="check a Hugging Face checkpoint folder three ways instead of the built-in cases: "
        "torch_block, jax_block and transformers (when installed): logits, cached decode, "
        "greedy tokens, on left-padded prompts seeded by --seed; --dtype all keeps the "
        "checkpoint's dtype",
    )
    _dispatch(parser, run_check_hf, lambda args: getattr(args, "hf", None) is not None)


def run_check_hf(args: argparse.Namespace) -> int:
    """The three-way report of an HF folder; 0 when every row passes, 1 otherwise, 2 on errors."""
    if args.config != "all":
        return _error("check", "--config picks built-in configurations; --hf checks a folder")
    start = time.perf_counter()
    try:
        checkpoint = HFCheckpoint(args.hf, None if args.dtype == "all" else args.dtype)
        rows, env = hf_report(checkpoint, args.seed)
    except (OSError, ValueError) as err:
        return _error("check", str(err).replace("\n", " "))
    if args.json:
        print(render_json(rows, env, args.seed))
    else:
        print(render_report(rows, env, args.seed))
        print(f"(transformers: {env['transformers']}; {time.perf_counter() - start:.1f} s)")
    return EXIT_OK if all(row.passed for row in rows) else EXIT_FAILED
