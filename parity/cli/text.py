"""Text to token ids and back for `generate` and `train`: a model's Hugging Face tokenizer
(tokenizer.json through the `tokenizers` library) or UTF-8 bytes as tokens."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

import numpy as np

from twin_core.data import BYTE_VOCAB_SIZE, load_text

from ..hf.metadata import TOKENIZER, HFMetadata


class Tokenizer(Protocol):
    """Text to token ids and back."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (a vocabulary of 256)."""

    vocab_size = BYTE_VOCAB_SIZE

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

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def carried_tokenizer(what: str, metadata: HFMetadata, vocab: int) -> Tokenizer:
    """The tokenizer.json a model (named `what` in errors) carries, else bytes as tokens for a
    vocabulary of 256; a ValueError saying why neither can read text."""
    text = metadata.tokenizer_json
    if text is None:
        if vocab == BYTE_VOCAB_SIZE:
            return ByteTokenizer()
        raise ValueError(
            f"{what} has no {TOKENIZER} and vocab_size={vocab} (bytes as tokens need "
            f"{BYTE_VOCAB_SIZE})"
        )
    if not have_tokenizers():
        raise ValueError(
            f"{what} carries a {TOKENIZER}, read by the tokenizers library, which is not "
            "installed (pip install tokenizers)"
        )
    return JSONTokenizer(text, f"{what}: {TOKENIZER}")


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


def text_ids(path: Path, tokenizer: Tokenizer) -> np.ndarray:
    """The token ids of the text file `path` (N,): its bytes (uint8) for `ByteTokenizer`, else
    the tokenizer's ids of its UTF-8 text (int32). FileNotFoundError when there is no file,
    ValueError when it is not UTF-8."""
    data = load_text(path)
    if isinstance(tokenizer, ByteTokenizer):
        return data
    try:
        text = data.tobytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    return np.asarray(tokenizer.encode(text), np.int32)
