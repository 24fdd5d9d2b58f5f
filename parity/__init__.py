"""Weight conversion, checkpoint files and parity checks between torch_block and jax_block.

Subpackages, each importing only those before it: `convert` (weight names, weights both ways,
checkpoint files, training states), `hf` (Hugging Face folders), `report` (the parity cases and
their table) and `cli` (`python -m parity`).
"""

from .convert import (
    convert_file,
    flax_to_torch,
    from_torch,
    load,
    markdown_table,
    save,
    to_torch,
    torch_to_flax,
)
from .hf import from_hf, to_hf
from .report import assert_parity

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
