"""Autoregressive generation with a KV cache: prefill the prompts, then one token per step."""

from __future__ import annotations

from numbers import Integral
from typing import TYPE_CHECKING

import torch

from .sampling import check_sampling, sample_next_token

if TYPE_CHECKING:
    from .lm import TransformerLM


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """True for the integer dtypes (bool is not one)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_token_id(name: str, value: int | None, vocab_size: int, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= value < vocab_size:
        allowed = "None or an int" if optional else "an int"
        raise ValueError(f"{name} must be {allowed} in [0, vocab_size={vocab_size}), got {value!r}")


def check_prompt(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    vocab_size: int,
    max_seq_len: int,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
) -> torch.Tensor:
    """Raise ValueError unless the prompts fit the model; returns the mask (B, L) as int64.

    Prompts are left-padded: each mask row is 0s then 1s, with at least one 1.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens}")
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be (batch, prompt_len), got shape {tuple(input_ids.shape)}"
        )
    B, L = input_ids.shape
    if B == 0 or L == 0:
        raise ValueError(f"empty prompt: input_ids has shape {(B, L)}")
    if not is_integer_dtype(input_ids.dtype):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"token ids must be in [0, vocab_size={vocab_size}), got values in [{low}, {high}]"
        )
    if L + max_new_tokens > max_seq_len:
        raise ValueError(
            f"prompt length {L} + max_new_tokens {max_new_tokens} = {L + max_new_tokens} "
            f"exceeds max_seq_len={max_seq_len}"
        )
    _check_token_id("pad_token_id", pad_token_id, vocab_size, optional=False)
    _check_token_id("eos_token_id", eos_token_id, vocab_size, optional=True)
    if attention_mask is None:
        return torch.ones(B, L, dtype=torch.long, device=input_ids.device)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, L):
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else None
        raise ValueError(f"attention_mask must have the shape of input_ids {(B, L)}, got {shape}")
    if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 and 1 (or False and True)")
    mask = attention_mask.long()  # (B, L)
    right_padded = (mask[:, 1:] < mask[:, :-1]).any(dim=1)  # a 0 after a 1
    if bool(right_padded.any()):
        rows = torch.nonzero(right_padded).flatten().tolist()
        raise ValueError(
            f"attention_mask rows {rows} have padding on the right (a 0 after a 1); "
            "prompts must be left-padded"
        )
    empty = mask.sum(dim=1) == 0
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten().tolist()
        raise ValueError(f"empty prompt: attention_mask rows {rows} have no real token")
    return mask.to(input_ids.device)


def generate(
    lm: TransformerLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
    return_num_steps: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, int]:
    """The new tokens (B, max_new_tokens) int64 that follow left-padded prompts (B, L).

    Runs in eval mode under inference_mode (the module's mode is restored afterwards). A row
    that emits `eos_token_id` is finished: its later tokens are `pad_token_id`. Generation stops
    once every row is finished; `num_steps` counts the model calls (prefill included), which is
    the number of token positions generated.
    """
    check_sampling(temperature, top_k, top_p)
    mask = check_prompt(
        input_ids,
        attention_mask,
        vocab_size=lm.vocab_size,
        max_seq_len=lm.max_seq_len,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    param = next(lm.parameters())
    was_training = lm.training
    lm.eval()
    try:
        with torch.inference_mode():
            tokens, num_steps = _decode(
                lm,
                input_ids.to(param.device),
                mask.to(param.device),
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                eos_token_id,
                pad_token_id,
                generator,
            )
    finally:
        lm.train(was_training)
    return (tokens, num_steps) if return_num_steps else tokens


def _decode(
    lm: TransformerLM,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id: int | None,
    pad_token_id: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, int]:
    """Prefill, then decode one token per call until max_new_tokens or every row is finished."""
    B, L = input_ids.shape
    device = input_ids.device
    param = next(lm.parameters())
    key_mask = torch.cat([mask, mask.new_ones(B, max_new_tokens)], dim=1)  # (B, L + n)
    cache = lm.create_kv_cache(B, L + max_new_tokens, param.dtype, device)
    logits, _ = lm(input_ids, key_mask[:, :L], kv_cache=cache)  # (B, L, V)
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    num_steps = 1
    padless = bool(mask.all())  # then decode steps need no mask: every cached key is real
    for i in range(max_new_tokens):
        next_token = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)
        next_token = torch.where(finished, pad_token_id, next_token)  # (B,)
        tokens[:, i] = next_token
        if eos_token_id is not None:
            finished |= next_token == eos_token_id
        if i + 1 == max_new_tokens or bool(finished.all()):
            break
        step_mask = None if padless else key_mask[:, : L + i + 1]
        logits, _ = lm(next_token[:, None], step_mask, kv_cache=cache)  # (B, 1, V)
        num_steps += 1
    return tokens, num_steps
