"""Training text: bytes as token ids, the checks a run makes on token ids, and the batch windows.

A batch depends only on (seed, step), so a resumed run, or the twin framework, sees the same
batches; each framework turns the NumPy windows into its own tensor.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .config import TrainConfig

DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt"
BYTE_VOCAB_SIZE = 256  # the training CLI's models read bytes


def load_text(path: str | os.PathLike) -> np.ndarray:
    """The bytes of a text file as uint8 token ids (N,)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path}")
    return np.frombuffer(path.read_bytes(), dtype=np.uint8)


def text_digest(data: np.ndarray) -> str:
    """sha256 of the text's bytes: a training state records the text it was trained on."""
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


def check_model_fits(config: TrainConfig, max_seq_len: int) -> None:
    """Raise ValueError unless rows of `config.seq_len` tokens fit a model's context."""
    if config.seq_len > max_seq_len:
        raise ValueError(
            f"seq_len {config.seq_len} exceeds the model's max_seq_len {max_seq_len} (each row "
            f"feeds seq_len tokens and predicts the next seq_len)"
        )


def check_data(data: np.ndarray, config: TrainConfig, vocab_size: int, name: str) -> None:
    """Raise ValueError if the token ids `data` (of the text `name`) are fewer than one batch
    (batch_size * seq_len + 1) or hold one >= vocab_size."""
    needed = config.batch_size * config.seq_len + 1
    if data.size < needed:
        raise ValueError(
            f"{name} has {data.size} tokens, shorter than one batch: batch_size "
            f"{config.batch_size} x seq_len {config.seq_len} + 1 = {needed} tokens needed"
        )
    if int(data.max()) >= vocab_size:
        raise ValueError(f"{name} holds token id {int(data.max())} >= vocab_size {vocab_size}")


def batch_offsets(size: int, step: int, config: TrainConfig) -> np.ndarray:
    """Where the rows of batch `step` start in a text of `size` tokens (batch_size,) int64."""
    rng = np.random.default_rng([config.seed, step])
    return rng.integers(0, size - config.seq_len, size=config.batch_size)


def batch_windows(data: np.ndarray, step: int, config: TrainConfig) -> np.ndarray:
    """Batch `step` of a run: (batch_size, seq_len + 1) windows of `data`, its dtype."""
    starts = batch_offsets(data.size, step, config)  # (B,)
    return data[starts[:, None] + np.arange(config.seq_len + 1)]  # (B, T+1)
