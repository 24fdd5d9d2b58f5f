"""What a model carries besides its weights: the JSON metadata of the Hugging Face folder it was
read from (token ids, generation config, tokenizer files).

The data is opaque here (a JSON-able dict that `parity.hf.metadata` reads and writes); this
layer only keeps it on the model object, where `parity.save`, `parity.load`,
`parity.convert_file` and the training command pick it up and write it into the checkpoint
file's metadata (`metadata_entries`, read back by `from_metadata`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
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


def metadata_entries(data: dict[str, Any] | None) -> dict[str, str]:
    """The checkpoint metadata entries that store `data`, what a model carries ({} for None):
    one JSON string, in every format."""
    return {} if data is None else {ATTRIBUTE: json.dumps(data, ensure_ascii=False)}


def from_metadata(where: Any, metadata: Mapping[str, Any]) -> dict[str, Any] | None:
    """What checkpoint metadata (of the file `where`) stores for a model to carry, or None;
    ValueError when its entry is not a JSON object."""
    text = metadata.get(ATTRIBUTE)
    if text is None:
        return None
    try:
        data = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: metadata {ATTRIBUTE} is not a JSON object")
    return data
