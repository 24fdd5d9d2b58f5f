"""Framework-free checks of what generation and the language models are given: sampling
settings, token ids, prompts, the lengths and masks of a call."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np

MIN_PROMPT_BUCKET = 16


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError unless temperature >= 0, top_k is None or >= 1, top_p None or in (0, 1]."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, Real)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1
    ):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, Real) or not 0 < top_p <= 1
    ):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def check_token_id(name: str, value: int | None, vocab_size: int, optional: bool) -> None:
    """Raise ValueError unless `value` is a token id (or None, when optional)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= value < vocab_size:
        allowed = "None or an int" if optional else "an int"
        raise ValueError(f"{name} must be {allowed} in [0, vocab_size={vocab_size}), got {value!r}")


def check_prompt(
    input_ids: Any,
    attention_mask: Any | None,
    *,
    vocab_size: int,
    max_seq_len: int,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Raise ValueError unless the prompts fit the model; returns (ids, mask) (B, L) as NumPy.

    `input_ids` and `attention_mask` are anything NumPy can read (NumPy, JAX or CPU torch
    arrays). Prompts are left-padded: each mask row is 0s then 1s, with at least one 1.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens}")
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, prompt_len), got shape {tuple(ids.shape)}")
    B, L = ids.shape
    if B == 0 or L == 0:
        raise ValueError(f"empty prompt: input_ids has shape {(B, L)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    check_token_range(int(ids.min()), int(ids.max()), vocab_size)
    if L + max_new_tokens > max_seq_len:
        raise ValueError(
            f"prompt length {L} + max_new_tokens {max_new_tokens} = {L + max_new_tokens} "
            f"exceeds max_seq_len={max_seq_len}"
        )
    check_token_id("pad_token_id", pad_token_id, vocab_size, optional=False)
    check_token_id("eos_token_id", eos_token_id, vocab_size, optional=True)
    if attention_mask is None:
        return ids, np.ones((B, L), np.int64)
    if not hasattr(attention_mask, "shape") or tuple(attention_mask.shape) != (B, L):
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else None
        raise ValueError(f"attention_mask must have the shape of input_ids {(B, L)}, got {shape}")
    given = np.asarray(attention_mask)
    if np.any((given != 0) & (given != 1)):
        raise ValueError("attention_mask must hold only 0 and 1 (or False and True)")
    mask = given.astype(np.int64)  # (B, L)
    right_padded = (mask[:, 1:] < mask[:, :-1]).any(axis=1)  # a 0 after a 1
    if right_padded.any():
        rows = np.flatnonzero(right_padded).tolist()
        raise ValueError(
            f"attention_mask rows {rows} have padding on the right (a 0 after a 1); "
            "prompts must be left-padded"
        )
    empty = mask.sum(axis=1) == 0
    if empty.any():
        rows = np.flatnonzero(empty).tolist()
        raise ValueError(f"empty prompt: attention_mask rows {rows} have no real token")
    return ids, mask


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float | None) -> int:
    """Assignments each expert may take: max(1, ceil(c * N * k / E)), or N when dropless."""
    if factor is None:
        return num_tokens
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


def prompt_bucket(length: int) -> int:
    """The length prompts are left-padded to: the next power of two >= length, at least 16."""
    return max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())


def check_token_range(low: int, high: int, vocab_size: int) -> None:
    """Raise ValueError unless token ids from `low` to `high` lie in [0, vocab_size)."""
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"token ids must be in [0, vocab_size={vocab_size}), got values in [{low}, {high}]"
        )


def check_lm_call(seq_len: int, max_seq_len: int, caches: int | None, n_layers: int) -> None:
    """Raise ValueError unless a language model of `n_layers` layers can take `seq_len` tokens:
    at most max_seq_len without a cache, one cache per layer (`caches` of them) with one."""
    if caches is None and seq_len > max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds max_seq_len={max_seq_len}")
    if caches is not None and caches != n_layers:
        raise ValueError(f"kv_cache must hold {n_layers} caches, got {caches}")


def check_key_mask(attention_mask: Any | None, shape: tuple[int, int]) -> None:
    """Raise ValueError unless `attention_mask` (when given) has `shape` (batch, key slots)."""
    if attention_mask is not None and tuple(attention_mask.shape) != shape:
        raise ValueError(
            f"attention_mask must be (batch, key slots) = {shape}, "
            f"got {tuple(attention_mask.shape)}"
        )


def check_mask(mask: Any, shape: tuple[int, int, int, int]) -> None:
    """Raise ValueError unless `mask` (an array of any framework) broadcasts to `shape` =
    (B, H, T, S)."""
    if len(mask.shape) > 4:
        raise ValueError(f"mask must have at most 4 dimensions, got shape {tuple(mask.shape)}")
    try:
        broadcast = np.broadcast_shapes(tuple(mask.shape), shape)
    except ValueError:
        broadcast = None
    if broadcast != shape:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to (batch, heads, query_len, "
            f"key_len) = {shape}"
        )
