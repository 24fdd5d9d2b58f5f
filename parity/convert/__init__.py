"""Converting between the twins: the weight-name table, weights both ways, checkpoint files
and training states."""

from .checkpoint import convert_file, load, save
from .mapping import markdown_table
from .train_state import convert_train_state
from .weights import PAIRS, flax_to_torch, from_torch, seeded_lm, to_torch, torch_to_flax

__all__ = [
    "PAIRS",
    "convert_file",
    "convert_train_state",
    "flax_to_torch",
    "from_torch",
    "load",
    "markdown_table",
    "save",
    "seeded_lm",
    "to_torch",
    "torch_to_flax",
]
