"""Weight conversion, checkpoint files and parity checks between torch_block and jax_block."""

from .checkpoint import convert_file, load, save
from .convert import flax_to_torch, from_torch, to_torch, torch_to_flax
from .hf import from_hf, to_hf
from .mapping import markdown_table
from .run import assert_parity

__all__ = [
    "assert_parity",
    "convert_file",
    "flax_to_torch",
    "from_hf",
    "from_torch",
    "load",
    "markdown_table",
    "save",
    "to_hf",
    "to_torch",
    "torch_to_flax",
]
