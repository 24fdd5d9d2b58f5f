"""Weight conversion, checkpoint files and parity checks between torch_block and jax_block."""

from .convert import flax_to_torch, from_torch, to_torch, torch_to_flax
from .mapping import markdown_table

__all__ = ["flax_to_torch", "from_torch", "markdown_table", "to_torch", "torch_to_flax"]
