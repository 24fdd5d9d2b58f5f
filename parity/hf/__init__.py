"""Hugging Face checkpoint folders of the six families, read into the twins and written back."""

from .folder import HFCheckpoint, from_hf, to_hf

__all__ = ["HFCheckpoint", "from_hf", "to_hf"]
