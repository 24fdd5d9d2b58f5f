"""`python -m parity convert IN OUT`: a checkpoint file for the other framework, a Hugging Face
folder into a checkpoint file, or a TransformerLM checkpoint file into a Hugging Face folder."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch_block
from twin_core.run_files import FRAMEWORKS, framework_name

from ..convert import PAIRS, convert_file, load, save
from ..convert.checkpoint import SUFFIXES
from ..hf import from_hf, to_hf
from ..hf.files import CONFIG, read_json
from ..hf.metadata import TOKENIZER
from .arguments import EXIT_OK, error, json_object
from .wording import worded

FLAGS = ("config", "module", "to")  # the flags of this command that library errors may name


def add_convert_command(subparsers: argparse._SubParsersAction) -> None:
    """`convert IN OUT --to {torch,jax,hf}`."""
    parser = subparsers.add_parser(
        "convert",
        help="convert a checkpoint file between torch and JAX, or from or to a Hugging Face folder",
        description=(
            "Convert a checkpoint file (safetensors with the twin-block configuration, torch "
            ".pt state_dict, or Flax msgpack) for the framework named by --to, through "
            "parity.convert_file. The suffix gives each file's format "
            f"({', '.join(SUFFIXES)}): --to torch writes .safetensors or .pt, --to jax "
            "writes .msgpack or .safetensors (Flax parameter paths). The input is never "
            "modified; the output is written atomically. A file that carries weights alone "
            "(a plain torch state_dict) needs --config. IN may be a Hugging Face folder (read "
            "for torch unless --to says otherwise); its token ids, generation config and "
            "tokenizer files travel in the output's metadata. --to hf writes the Hugging Face "
            "folder OUT from a TransformerLM checkpoint file, with what it carries (or what "
            "--hf-source gives); files already in OUT that differ from those are refused."
        ),
        epilog="examples: python -m parity convert block.safetensors block.msgpack --to jax\n"
        "Hugging Face: python -m parity convert HF_DIR out.safetensors; "
        "python -m parity convert in.safetensors OUT_DIR --to hf [--hf-source HF_DIR]",
    )
    parser.add_argument("input", type=Path, metavar="IN", help="checkpoint file or HF folder")
    parser.add_argument("output", type=Path, metavar="OUT", help="checkpoint file or HF folder")
    parser.add_argument(
        "--to",
        choices=(*FRAMEWORKS, "flax", "hf"),
        help="framework of the output file ('flax' is read as jax); hf writes a Hugging Face "
        "folder OUT (required unless IN is a Hugging Face folder, which is converted for torch "
        "by default)",
    )
    parser.add_argument(
        "--config",
        type=json_object,
        help="the module's configuration (BlockConfig or LMConfig fields) as JSON, for files "
        'without one, e.g. \'{"d_model": 64, "n_heads": 4, "d_ff": 128}\'; vocab_size makes '
        "it a TransformerLM",
    )
    parser.add_argument(
        "--module",
        choices=sorted(PAIRS),
        help="module class, for files without one (default: told by the --config fields)",
    )
    parser.add_argument(
        "--hf-source",
        type=Path,
        metavar="DIR",
        help="with --to hf: a Hugging Face folder whose token ids, generation_config.json and "
        "tokenizer files are written where the checkpoint carries none",
    )
    parser.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    """Convert args.input to args.output; exit 2 with a one-line message on a bad file."""
    to = args.to if args.to in (None, "hf") else framework_name(args.to)
    try:
        if not args.input.exists():
            raise ValueError(f"no such file or folder: {args.input}")
        if args.input.is_dir():
            if to == "hf":
                raise ValueError(f"{args.input} is already a Hugging Face folder")
            if args.hf_source is not None:
                raise ValueError("--hf-source goes with --to hf")
            return _from_hf_folder(args.input, args.output, to or "torch")
        if to is None:
            raise ValueError("--to is required (torch, jax or hf) unless IN is an HF folder")
        if not args.input.is_file():
            raise ValueError(f"input file not found: {args.input}")
        if to == "hf":
            return _to_hf_folder(args)
        if args.hf_source is not None:
            raise ValueError("--hf-source goes with --to hf")
        if args.output.is_dir():
            raise ValueError(f"OUT must be a checkpoint file, got the folder {args.output}")
        if args.input.resolve() == args.output.resolve():
            raise ValueError(f"input and output are the same file: {args.input}")
    except (OSError, ValueError, TypeError) as err:
        return error("convert", worded(err, FLAGS))
    try:
        convert_file(args.input, args.output, to, config=args.config, module=args.module)
    except (OSError, ValueError, TypeError) as err:
        return error("convert", f"cannot convert {args.input}: {worded(err, FLAGS)}")
    print(f"wrote {args.output} ({to})")
    return EXIT_OK


def _from_hf_folder(folder: Path, output: Path, framework: str) -> int:
    model = from_hf(folder, framework)
    naming = framework if output.suffix.lower() == ".safetensors" else None
    save(output, model, naming=naming)
    print(f"wrote {output} ({framework}) from the Hugging Face folder {folder}")
    return EXIT_OK


def _to_hf_folder(args: argparse.Namespace) -> int:
    model = load(args.input, "torch", config=args.config, module=args.module)
    if not isinstance(model, torch_block.TransformerLM):
        raise ValueError(f"{args.input} holds a {type(model).__name__}; --to hf needs a LM")
    folder = to_hf(model, args.output, source=args.hf_source)
    family = read_json(folder / CONFIG, "the model config")["model_type"]
    print(f"wrote the Hugging Face folder {folder} ({family})")
    if not (folder / TOKENIZER).is_file():
        print(
            f"note: {folder} has no {TOKENIZER}: {args.input} carries none; --hf-source DIR "
            "takes the tokenizer files of a Hugging Face folder"
        )
    return EXIT_OK
