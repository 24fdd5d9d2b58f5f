"""What a model carries besides its weights: the JSON metadata of the Hugging Face folder it was
read from (token ids, generation config, tokenizer files).

The data is opaque here (a JSON-able dict that `parity.hf.metadata` reads and writes); this
layer only keeps it on the model object, where `parity.save`, `parity.load` and
`parity.convert_file` pick it up and write it into the checkpoint file's metadata.
"""

from __future__ import annotations

from typing import Any

ATTRIBUTE = "hf_metadata"  # the model's attribute, and the checkpoint files' metadata key


def carried(model: Any) -> dict[str, Any] | None:
    """The metadata a torch module, a Flax module or a `(flax_module, params)` pair carries."""
    if isinstance(model, tuple) and len(model) == 2:
        model = model[0]
    data = getattr(model, ATTRIBUTE, None)
    return data if isinstance(data, dict) else None


def carry(model: Any, data: dict[str, Any] | None) -> None:
    """Attach `data` to a torch module, a Flax module or a `(flax_module, params)` pair (Flax
    modules are frozen dataclasses: set past their guard; nothing else reads the attribute)."""
    if isinstance(model, tuple) and len(model) == 2:
        model = model[0]
    if data is not None:
        object.__setattr__(model, ATTRIBUTE, data)
