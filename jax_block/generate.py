"""Autoregressive generation with a KV cache: one jitted function, prefill then a while_loop."""

from __future__ import annotations

from functools import partial
from numbers import Integral

import jax
import jax.numpy as jnp
import numpy as np

from .cache import IN_PLACE_CACHE_OPTIONS, KVCache
from .lm import TransformerLM
from .sampling import check_sampling, sample_next_token

MIN_PROMPT_BUCKET = 16


def prompt_bucket(length: int) -> int:
    """The length prompts are left-padded to: the next power of two >= length, at least 16."""
    return max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())


def _check_token_id(name: str, value: int | None, vocab_size: int, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= value < vocab_size:
        allowed = "None or an int" if optional else "an int"
        raise ValueError(f"{name} must be {allowed} in [0, vocab_size={vocab_size}), got {value!r}")


def check_prompt(
    input_ids: jax.Array | np.ndarray,
    attention_mask: jax.Array | np.ndarray | None,
    *,
    vocab_size: int,
    max_seq_len: int,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Raise ValueError unless the prompts fit the model; returns (ids, mask) (B, L) as int32.

    Prompts are left-padded: each mask row is 0s then 1s, with at least one 1.
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
    low, high = int(ids.min()), int(ids.max())
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
        return ids.astype(np.int32), np.ones((B, L), np.int32)
    if not hasattr(attention_mask, "shape") or tuple(attention_mask.shape) != (B, L):
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else None
        raise ValueError(f"attention_mask must have the shape of input_ids {(B, L)}, got {shape}")
    given = np.asarray(attention_mask)
    if np.any((given != 0) & (given != 1)):
        raise ValueError("attention_mask must hold only 0 and 1 (or False and True)")
    mask = given.astype(np.int32)  # (B, L)
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
    return ids.astype(np.int32), mask


@partial(
    jax.jit,
    static_argnames=("lm",),
    donate_argnames=("kv_cache",),
    compiler_options=IN_PLACE_CACHE_OPTIONS,
)
def cached_forward(
    lm: TransformerLM,
    params: dict,
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    kv_cache: tuple[KVCache, ...],
) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """(logits (B, T, V), new cache): `lm` in eval mode on input_ids (B, T) at the caches'
    position, attention_mask (B, S) covering every cache slot.

    The position is traced, so one compilation serves every step of a given shape. The cache is
    donated: its buffers are reused for the returned cache and the argument is deleted.
    """
    return lm.apply({"params": params}, input_ids, attention_mask, kv_cache=kv_cache)


def generate(
    lm: TransformerLM,
    params: dict,
    input_ids: jax.Array | np.ndarray,
    attention_mask: jax.Array | np.ndarray | None = None,
    *,
    max_new_tokens: int,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    return_num_steps: bool = False,
) -> jax.Array | tuple[jax.Array, int]:
    """The new tokens (B, max_new_tokens) int32 that follow left-padded prompts (B, L).

    `params` are the model's parameters (without the {"params": ...} wrapper). Runs in eval
    mode. Prompts are left-padded up to `prompt_bucket(L)`, so `generate_tokens` compiles once
    per (batch, bucket, max_new_tokens, sampling settings). A row that emits `eos_token_id` is
    finished: its later tokens are `pad_token_id`. Generation stops once every row is
    finished; `num_steps` counts the model calls (prefill included), which is the number of
    token positions generated. Sampling (temperature > 0) needs `rng`.
    """
    if not isinstance(lm, TransformerLM):
        raise TypeError(f"lm must be a jax_block.TransformerLM, got {type(lm).__name__}")
    check_sampling(temperature, top_k, top_p)
    ids, mask = check_prompt(
        input_ids,
        attention_mask,
        vocab_size=lm.vocab_size,
        max_seq_len=lm.max_seq_len,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    if temperature > 0 and rng is None:
        raise ValueError(f"sampling at temperature {temperature} needs rng (a jax.random key)")
    B, L = ids.shape
    pad = prompt_bucket(L) - L
    ids = np.pad(ids, ((0, 0), (pad, 0)), constant_values=pad_token_id)  # (B, bucket)
    mask = np.pad(mask, ((0, 0), (pad, 0)))  # (B, bucket)
    tokens, num_steps = generate_tokens(
        lm,
        params,
        jnp.asarray(ids),
        jnp.asarray(mask),
        jax.random.PRNGKey(0) if rng is None else rng,
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=None if top_k is None else int(top_k),
        top_p=None if top_p is None else float(top_p),
        eos_token_id=None if eos_token_id is None else int(eos_token_id),
        pad_token_id=int(pad_token_id),
    )
    return (tokens, int(num_steps)) if return_num_steps else tokens


@partial(
    jax.jit,
    static_argnames=(
        "lm",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "eos_token_id",
        "pad_token_id",
    ),
    compiler_options=IN_PLACE_CACHE_OPTIONS,
)
def generate_tokens(
    lm: TransformerLM,
    params: dict,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id: int | None,
    pad_token_id: int,
) -> tuple[jax.Array, jax.Array]:
    """Prefill left-padded, already checked prompts (B, P), then decode in a `lax.while_loop`.

    Returns (tokens (B, max_new_tokens) int32, number of model calls () int32). The cache is
    created here and carried through the loop, so XLA updates it in place; no step returns to
    the host.
    """
    B, P = input_ids.shape
    variables = {"params": params}
    key_mask = jnp.concatenate(
        [attention_mask, jnp.ones((B, max_new_tokens), attention_mask.dtype)], axis=1
    )  # (B, P + n): prompt slots, then one slot per new token
    cache = lm.create_kv_cache(B, P + max_new_tokens, lm.dtype)
    # Position 0 known while tracing: the prefill reads no cache slot (none is written yet).
    cache = tuple(layer.replace(position=np.zeros((), np.int32)) for layer in cache)
    logits, cache = lm.apply(variables, input_ids, key_mask, kv_cache=cache)  # (B, P, V)
    rng, step_rng = jax.random.split(rng)
    first = sample_next_token(logits[:, -1], temperature, top_k, top_p, step_rng)  # (B,)
    tokens = jnp.full((B, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(first)
    finished = jnp.zeros((B,), bool) if eos_token_id is None else first == eos_token_id

    def not_done(carry) -> jax.Array:
        num_steps, _, _, finished, _, _ = carry
        return (num_steps < max_new_tokens) & ~jnp.all(finished)

    def decode_one(carry):
        num_steps, tokens, last_token, finished, cache, rng = carry
        logits, cache = lm.apply(variables, last_token[:, None], key_mask, kv_cache=cache)
        rng, step_rng = jax.random.split(rng)
        next_token = sample_next_token(logits[:, -1], temperature, top_k, top_p, step_rng)
        next_token = jnp.where(finished, pad_token_id, next_token)  # (B,)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, next_token[:, None], num_steps, 1)
        if eos_token_id is not None:
            finished = finished | (next_token == eos_token_id)
        return num_steps + 1, tokens, next_token, finished, cache, rng

    carry = (jnp.ones((), jnp.int32), tokens, first, finished, cache, rng)
    num_steps, tokens, *_ = jax.lax.while_loop(not_done, decode_one, carry)
    return tokens, num_steps
