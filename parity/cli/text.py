"""Text to token ids and back for `generate`: a model's Hugging Face tokenizer (tokenizer.json
through the `tokenizers` library) or UTF-8 bytes as tokens."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

from ..hf.metadata import TOKENIZER


class Tokenizer(Protocol):
    """Text to token ids and back."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (a vocabulary of 256)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class JSONTokenizer:
    """A tokenizer.json's text (`where` names it in errors), through the tokenizers library."""

    def __init__(self, text: str, where: str):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tokenizer = HFTokenizer.from_str(text)
        except Exception as err:  # the library raises its own exception type
            raise ValueError(f"{where}: the tokenizers library cannot read it: {err}") from err

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def have_tokenizers() -> bool:
    """Whether the `tokenizers` library is installed."""
    return importlib.util.find_spec("tokenizers") is not None


def folder_tokenizer(path: Path) -> JSONTokenizer:
    """The tokenizer of `path`: a folder holding tokenizer.json, or that file; ValueError when
    there is none or the tokenizers library is missing."""
    file = path / TOKENIZER if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"--tokenizer: no {TOKENIZER} at {path}")
    if not have_tokenizers():
        raise ValueError("--tokenizer needs the tokenizers library (pip install tokenizers)")
    return JSONTokenizer(file.read_text(encoding="utf-8"), str(file))
