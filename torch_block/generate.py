"""Autoregressive generation with a KV cache: prefill the prompts, then one token per step."""

from __future__ import annotations

import torch

from twin_core import check_prompt, check_sampling

from .lm import TransformerLM
from .sampling import sample_next_token


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
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if isinstance(attention_mask, torch.Tensor):
        attention_mask = attention_mask.cpu()
    _, mask = check_prompt(
        input_ids.cpu(),
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
                torch.from_numpy(mask).to(param.device),
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
