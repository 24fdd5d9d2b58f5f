"""Hugging Face checkpoint folders of the families of `config.FAMILIES`, read into the twins
and written back."""

from .folder import HFCheckpoint, from_hf, metadata_of, to_hf
from .metadata import HFMetadata

__all__ = ["HFCheckpoint", "HFMetadata", "from_hf", "metadata_of", "to_hf"]
