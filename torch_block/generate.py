"""Autoregressive generation with a KV cache: prefill the prompts, then one token per step."""

from __future__ import annotations

import torch

from twin_core import check_prompt, check_sampling, recompute_position

from .cache import KVCache
from .lm import TransformerLM
from .sampling import sample_next_token
from .token_step import compiled_token_step, step_inputs, token_step

LONG_PROMPT = 1024  # longer prompts are prefilled in chunks of PREFILL_CHUNK tokens
PREFILL_CHUNK = 512
COMPILED_CACHE_MULTIPLE = 128  # compile=True: cache lengths rounded up, one compilation each


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
    compile: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, int]:
    """The new tokens (B, max_new_tokens) int64 that follow left-padded prompts (B, L).

    Runs in eval mode under inference_mode (the module's mode is restored afterwards). A row
    that emits `eos_token_id` is finished: its later tokens are `pad_token_id`. Generation stops
    once every row is finished; `num_steps` counts the model calls (prefill included), which is
    the number of token positions generated.

    A prompt longer than LONG_PROMPT is prefilled PREFILL_CHUNK tokens at a time, so that its
    activations stay small next to the cache; each new token is then one `token_step`. With
    longrope, the step where a row reaches the original length prefills every slot again
    (`twin_core.recompute_position`).

    With `compile=True` that step runs under torch.compile with static shapes. It compiles on
    the first call for a model layout, dtype, batch size and cache length (L + max_new_tokens
    rounded up to a multiple of COMPILED_CACHE_MULTIPLE), then serves every position of that
    call and of every later call of the same shape. The tokens are the eager ones (up to float
    rounding at a near tie of two logits).
    """
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {type(compile).__name__}")
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
                compile,
            )
    finally:
        lm.train(was_training)
    return (tokens, num_steps) if return_num_steps else tokens


def prefill(
    lm: TransformerLM, input_ids: torch.Tensor, mask: torch.Tensor | None, cache: list[KVCache]
) -> torch.Tensor:
    """Write the prompts (B, L) into the empty caches, in chunks of PREFILL_CHUNK tokens when
    L > LONG_PROMPT; the logits (B, V) of their last slot. `mask` (B, L) marks real tokens
    (None: all are)."""
    L = input_ids.shape[1]
    chunk = L if L <= LONG_PROMPT else PREFILL_CHUNK
    for start in range(0, L, chunk):
        end = min(L, start + chunk)
        key_mask = None if mask is None else mask[:, :end]
        x, _ = lm.hidden_states(input_ids[:, start:end], key_mask, cache)  # (B, T, d_model)
    return lm.logits(x[:, -1])  # (B, V)


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
    compile: bool,
) -> tuple[torch.Tensor, int]:
    """Prefill, then decode one token per step until max_new_tokens or every row is finished."""
    B, L = input_ids.shape
    device = input_ids.device
    S = L + max_new_tokens
    if compile:
        S = -(-S // COMPILED_CACHE_MULTIPLE) * COMPILED_CACHE_MULTIPLE
    cache = lm.create_kv_cache(B, S, next(lm.parameters()).dtype, device)
    mask = mask.bool()
    padless = bool(mask.all())
    logits = prefill(lm, input_ids, None if padless else mask, cache)  # (B, V)
    key_valid = torch.cat([mask, mask.new_ones(B, S - L)], dim=1)  # (B, S)
    inputs = step_inputs(lm, cache, key_valid)
    step = compiled_token_step() if compile else token_step
    switch = recompute_position(lm.config.rope_scaling)
    pos = torch.tensor(L, device=device)  # the slot of the token fed to the next step
    finished = None if eos_token_id is None else torch.zeros(B, dtype=torch.bool, device=device)
    chosen = []
    for i in range(max_new_tokens):
        next_token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
        if finished is not None:
            next_token = torch.where(finished, pad_token_id, next_token)
            finished |= next_token == eos_token_id
        chosen.append(next_token)
        if i + 1 == max_new_tokens or (finished is not None and bool(finished.all())):
            break
        if switch is not None and bool((L + i - inputs.pads == switch).any()):
            # a row passes longrope's original length: every slot again, with the long factors
            for layer_cache in cache:
                layer_cache.reset()
            ids = torch.cat([input_ids, torch.stack(chosen, dim=1)], dim=1)  # (B, L + i + 1)
            logits = prefill(lm, ids, key_valid[:, : L + i + 1], cache)
        else:
            logits = step(inputs, next_token, pos, None if compile else L + i)  # (B, V)
        pos += 1
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    tokens[:, : len(chosen)] = torch.stack(chosen, dim=1)
    return tokens, len(chosen)
