"""What makes a Hugging Face model usable besides its weights: its bos/eos/pad token ids,
generation_config.json and tokenizer files, and the family it was read as, carried from a folder
through checkpoint files and back into a folder.

`HFMetadata.from_folder` reads them; `to_dict`/`from_dict` are the JSON a model carries
(`parity.convert.carried`) and checkpoint files store; `folder_files` says what `to_hf` writes
into a folder besides config.json and the weights, refusing (`FolderConflict`) to replace a
file there with a different one.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, FolderConflict
from .files import CONFIG, read_json

TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
GENERATION_CONFIG = "generation_config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_FILES = (  # carried when present; no other name is ever written
    TOKENIZER,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
MAX_TOKENIZER_BYTES = 48 << 20  # all together: a safetensors header holds 100 MB
UNCOMPARED = ("transformers_version",)  # says who wrote a generation config, not what it does


@dataclass(frozen=True)
class HFMetadata:
    """`token_ids` (those of bos/eos/pad that are set: an int or a list), `generation_config`
    (generation_config.json's object, None when absent), the tokenizer `files` (name -> bytes)
    and `model_type` (config.json's, None when absent: `to_hf` writes that family back when
    the config fits it, Phi-3 rather than the Llama layout it shares)."""

    token_ids: dict[str, Any] = field(default_factory=dict)
    generation_config: dict[str, Any] | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    model_type: str | None = None

    @classmethod
    def from_folder(cls, directory: str | Path, *, lenient: bool = False) -> HFMetadata:
        """What `directory` holds; ValueError for an unreadable file (`lenient`: such a file
        counts as absent, for a folder about to be written over)."""
        directory = Path(directory)
        token_ids: dict[str, Any] = {}
        generation = model_type = None
        try:
            if (directory / CONFIG).is_file():
                config = read_json(directory / CONFIG, "the model config")
                if isinstance(config, dict):
                    token_ids = {k: config[k] for k in TOKEN_KEYS if config.get(k) is not None}
                    model_type = config.get("model_type")
            if (directory / GENERATION_CONFIG).is_file():
                generation = read_json(directory / GENERATION_CONFIG, "the generation config")
        except ValueError:
            if not lenient:
                raise
        if lenient and not isinstance(generation, dict):
            generation = None
        present = _present(directory)
        if sum((directory / n).stat().st_size for n in present) > MAX_TOKENIZER_BYTES:
            raise CheckpointError(
                f"{directory}: the tokenizer files pass {MAX_TOKENIZER_BYTES >> 20} MiB together"
            )
        files = {n: (directory / n).read_bytes() for n in present}
        return cls.from_dict(
            {
                "token_ids": token_ids,
                "generation_config": generation,
                "files": _encode(files),
                "model_type": model_type if isinstance(model_type, str) else None,
            },
            str(directory),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form a checkpoint stores: files as UTF-8 text, or base64 if binary."""
        return {
            "token_ids": dict(self.token_ids),
            "generation_config": self.generation_config,
            "files": _encode(self.files),
            **({} if self.model_type is None else {"model_type": self.model_type}),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "hf_metadata") -> HFMetadata:
        """The inverse of `to_dict`, checked: a CheckpointError names what is malformed
        (`where`: what held it)."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{where}: expected a JSON object of Hugging Face metadata")
        ids = data.get("token_ids") or {}
        if not isinstance(ids, Mapping) or not set(ids) <= set(TOKEN_KEYS):
            raise CheckpointError(f"{where}: token_ids must map {TOKEN_KEYS} to ids")
        for key, value in ids.items():
            if value is not None and not _is_ids(value):
                raise CheckpointError(f"{where}: {key} must be a token id or a list of them")
        generation = data.get("generation_config")
        if generation is not None and not isinstance(generation, dict):
            raise CheckpointError(f"{where}: {GENERATION_CONFIG} must hold a JSON object")
        files = _decode(data.get("files") or {}, where)
        if sum(len(b) for b in files.values()) > MAX_TOKENIZER_BYTES:
            raise CheckpointError(
                f"{where}: the tokenizer files pass {MAX_TOKENIZER_BYTES >> 20} MiB together"
            )
        ids = {k: v for k, v in ids.items() if v is not None}
        model_type = data.get("model_type")
        if model_type is not None and not isinstance(model_type, str):
            raise CheckpointError(f"{where}: model_type must be a string, got {model_type!r}")
        return cls(ids, generation, files, model_type)

    @property
    def tokenizer_json(self) -> str | None:
        """tokenizer.json's text, when carried."""
        data = self.files.get(TOKENIZER)
        return None if data is None else data.decode("utf-8")

    def eos_ids(self) -> list[int]:
        """The ids that end generation: the generation config's, else the model config's."""
        eos = (self.generation_config or {}).get("eos_token_id")
        if eos is None:
            eos = self.token_ids.get("eos_token_id")
        if eos is None:
            return []
        return [eos] if isinstance(eos, int) else [int(e) for e in eos]

    def with_token_ids(self, token_ids: Mapping[str, Any] | None) -> HFMetadata:
        """These token ids (those not None) in place of the carried ones, in the generation
        config too; a ValueError for keys other than bos/eos/pad_token_id."""
        given = {k: v for k, v in (token_ids or {}).items() if v is not None}
        unknown = sorted(set(token_ids or {}) - set(TOKEN_KEYS))
        if unknown:
            raise ValueError(f"token_ids: unknown keys {unknown}")
        if not given:
            return self
        generation = None if self.generation_config is None else self.generation_config | given
        return replace(self, token_ids=self.token_ids | given, generation_config=generation)

    def or_else(self, other: HFMetadata) -> HFMetadata:
        """This, with what it lacks taken from `other`: each token id, the generation config,
        the tokenizer (all of its files, never a mix of two tokenizers) and the model type."""
        generation = self.generation_config
        return HFMetadata(
            other.token_ids | self.token_ids,
            other.generation_config if generation is None else generation,
            self.files or other.files,
            self.model_type or other.model_type,
        )

    def generation_file(self) -> dict[str, Any]:
        """generation_config.json as it is written: the carried one, with the token ids it
        lacks."""
        return {**self.token_ids, **(self.generation_config or {})}


def folder_files(meta: HFMetadata, directory: Path) -> dict[str, bytes]:
    """The files besides config.json and the weights that exporting `meta` into `directory`
    writes (name -> bytes): generation_config.json merged into the folder's (keys only it has
    are kept; token ids are the model's) and the tokenizer files, leaving out those already
    there unchanged. A FolderConflict, before anything is written, when the folder holds a
    tokenizer file with other content, or a generation setting with another value."""
    existing = HFMetadata.from_folder(directory, lenient=True) if directory.is_dir() else None
    ours = meta.generation_file()
    theirs = existing.generation_config if existing is not None else None
    names, details = [], []
    out: dict[str, bytes] = {}
    if theirs is None:
        out[GENERATION_CONFIG] = _json(ours)
    else:
        differ = sorted(
            k
            for k in set(ours) & set(theirs)
            if k not in (*TOKEN_KEYS, *UNCOMPARED) and ours[k] != theirs[k]
        )
        if differ:
            names.append(GENERATION_CONFIG)
            values = ", ".join(f"{k}: {theirs[k]!r} here, {ours[k]!r} in the model" for k in differ)
            details.append(f"{GENERATION_CONFIG} ({values})")
        merged = {**theirs, **ours}
        if merged != theirs:
            out[GENERATION_CONFIG] = _json(merged)
    for name, data in meta.files.items():
        there = directory / name
        if not there.is_file():
            out[name] = data
        elif there.read_bytes() != data:
            names.append(name)
            details.append(f"{name} (other content)")
    if names:
        raise FolderConflict(directory, names, details)
    return out


def _present(directory: Path) -> list[str]:
    return [n for n in TOKENIZER_FILES if (directory / n).is_file()]


def _is_ids(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(_is_ids(v) and not isinstance(v, list) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _encode(files: Mapping[str, bytes]) -> dict[str, dict[str, str]]:
    out = {}
    for name, data in files.items():
        try:
            out[name] = {"text": data.decode("utf-8")}
        except UnicodeDecodeError:
            out[name] = {"base64": base64.b64encode(data).decode("ascii")}
    return out


def _decode(files: Any, where: str) -> dict[str, bytes]:
    if not isinstance(files, Mapping):
        raise CheckpointError(f"{where}: files must map tokenizer file names to their content")
    out = {}
    for name, entry in files.items():
        if name not in TOKENIZER_FILES:
            raise CheckpointError(
                f"{where}: {name!r} is not a tokenizer file name ({', '.join(TOKENIZER_FILES)})"
            )
        if isinstance(entry, Mapping) and isinstance(entry.get("text"), str):
            out[name] = entry["text"].encode("utf-8")
        elif isinstance(entry, Mapping) and isinstance(entry.get("base64"), str):
            out[name] = base64.b64decode(entry["base64"])
        else:
            raise CheckpointError(f"{where}: {name}: expected {{'text': ...}} or {{'base64': ...}}")
    return out


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
