"""Autoregressive generation with a KV cache: one jitted function, prefill then a while_loop."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from twin_core import check_prompt, check_sampling, prompt_bucket, recompute_position

from .cache import IN_PLACE_CACHE_OPTIONS
from .lm import TransformerLM
from .sampling import sample_next_token
from .scan import map_caches, with_position
from .sharding import (
    check_batch,
    check_mesh,
    check_model,
    check_rules,
    named_sharding,
    use_mesh,
)


@partial(
    jax.jit,
    static_argnames=("lm", "mesh", "rules"),
    donate_argnames=("kv_cache",),
    compiler_options=IN_PLACE_CACHE_OPTIONS,
)
def cached_forward(
    lm: TransformerLM,
    params: dict,
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    kv_cache: tuple,
    mesh: Mesh | None = None,
    rules: tuple | None = None,
) -> tuple[jax.Array, tuple]:
    """(logits (B, T, V), new cache): `lm` in eval mode on input_ids (B, T) at the caches'
    position, attention_mask (B, S) covering every cache slot.

    The position is traced, so one compilation serves every step of a given shape. The cache is
    donated: its buffers are reused for the returned cache and the argument is deleted.

    With `mesh` (static; `rules` a hashable tuple of pairs, default
    `jax_block.sharding.DEFAULT_RULES`) the call runs sharded: params from
    `jax_block.shard_params`, the cache from `lm.create_kv_cache(..., mesh=mesh)`.
    """
    if mesh is not None:
        mesh = check_mesh(mesh)
        check_model(lm.config, mesh, rules)
        check_batch(input_ids.shape[0], mesh, rules)
    with use_mesh(mesh, rules):
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
    mesh: Mesh | None = None,
    rules: tuple | None = None,
) -> jax.Array | tuple[jax.Array, int]:
    """The new tokens (B, max_new_tokens) int32 that follow left-padded prompts (B, L).

    `params` are the model's parameters (without the {"params": ...} wrapper). Runs in eval
    mode. Prompts are left-padded up to `prompt_bucket(L)`, so `generate_tokens` compiles once
    per (batch, bucket, max_new_tokens, sampling settings). A row that emits `eos_token_id` is
    finished: its later tokens are `pad_token_id`. Generation stops once every row is
    finished; `num_steps` counts the model calls (prefill included), which is the number of
    token positions generated. Sampling (temperature > 0) needs `rng`.

    With `mesh` the whole loop runs sharded over it: `params` placed by
    `jax_block.shard_params` (same `rules`, a tuple of pairs; default
    `jax_block.sharding.DEFAULT_RULES`), the prompts' batch split over `data`, the cache
    created on the mesh. ValueError before compiling when the batch or the model does not
    split evenly.
    """
    if not isinstance(lm, TransformerLM):
        raise TypeError(f"lm must be a jax_block.TransformerLM, got {type(lm).__name__}")
    check_sampling(temperature, top_k, top_p)
    ids, mask = check_prompt(
        input_ids,
        attention_mask,
        vocab_size=lm.config.vocab_size,
        max_seq_len=lm.config.max_seq_len,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    ids, mask = ids.astype(np.int32), mask.astype(np.int32)
    if temperature > 0 and rng is None:
        raise ValueError(f"sampling at temperature {temperature} needs rng (a jax.random key)")
    B, L = ids.shape
    if mesh is not None:
        mesh = check_mesh(mesh)
        rules = check_rules(rules)
        check_model(lm.config, mesh, rules)
        check_batch(B, mesh, rules)
    pad = prompt_bucket(L) - L
    ids = np.pad(ids, ((0, 0), (pad, 0)), constant_values=pad_token_id)  # (B, bucket)
    mask = np.pad(mask, ((0, 0), (pad, 0)))  # (B, bucket)
    prompt = None if mesh is None else named_sharding(mesh, ("batch", "length"), rules)
    tokens, num_steps = generate_tokens(
        lm,
        params,
        jax.device_put(ids, prompt),
        jax.device_put(mask, prompt),
        jax.random.PRNGKey(0) if rng is None else rng,
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=None if top_k is None else int(top_k),
        top_p=None if top_p is None else float(top_p),
        eos_token_id=None if eos_token_id is None else int(eos_token_id),
        pad_token_id=int(pad_token_id),
        mesh=mesh,
        rules=rules,
    )
    return (tokens, int(num_steps)) if return_num_steps else tokens


LONG_PROMPT = 1024  # longer prompts are prefilled in chunks of PREFILL_CHUNK tokens
PREFILL_CHUNK = 512


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
        "mesh",
        "rules",
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
    mesh: Mesh | None = None,
    rules: tuple | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Prefill left-padded, already checked prompts (B, P), then decode in a `lax.while_loop`.

    A prompt longer than LONG_PROMPT is prefilled in chunks of PREFILL_CHUNK tokens, so that
    its activations stay small next to the cache. With longrope, the step where a row reaches
    the original length prefills every slot again (`twin_core.recompute_position`).

    Returns (tokens (B, max_new_tokens) int32, number of model calls () int32). The cache is
    created here and carried through the loop, so XLA updates it in place; no step returns to
    the host. With `mesh` (already checked) everything is traced under `use_mesh(mesh, rules)`.
    """
    with use_mesh(mesh, rules):
        return _generate_tokens(
            lm,
            params,
            input_ids,
            attention_mask,
            rng,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            eos_token_id,
            pad_token_id,
        )


def _generate_tokens(
    lm,
    params,
    input_ids,
    attention_mask,
    rng,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    eos_token_id,
    pad_token_id,
) -> tuple[jax.Array, jax.Array]:
    B, P = input_ids.shape
    variables = {"params": params}
    key_mask = jnp.concatenate(
        [attention_mask, jnp.ones((B, max_new_tokens), attention_mask.dtype)], axis=1
    )  # (B, P + n): prompt slots, then one slot per new token
    cache = lm.create_kv_cache(B, P + max_new_tokens, lm.dtype)
    # Position 0 known while tracing: the first chunk reads no cache slot (none is written yet).
    cache = map_caches(lambda layer: layer.constrained(), with_position(cache, 0))
    chunk = P if P <= LONG_PROMPT else PREFILL_CHUNK  # P is a power of two: chunks divide it
    logits, cache = lm.apply(variables, input_ids[:, :chunk], key_mask, kv_cache=cache)
    last_logits = logits[:, -1]  # (B, V)

    def prefill_chunk(i, carry):
        _, cache = carry
        ids = jax.lax.dynamic_slice_in_dim(input_ids, i * chunk, chunk, axis=1)  # (B, chunk)
        logits, cache = lm.apply(variables, ids, key_mask, kv_cache=cache)
        return logits[:, -1], cache

    if P > chunk:
        last_logits, cache = jax.lax.fori_loop(1, P // chunk, prefill_chunk, (last_logits, cache))
    rng, step_rng = jax.random.split(rng)
    first = sample_next_token(last_logits, temperature, top_k, top_p, step_rng)  # (B,)
    tokens = jnp.full((B, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(first)
    finished = jnp.zeros((B,), bool) if eos_token_id is None else first == eos_token_id

    def not_done(carry) -> jax.Array:
        num_steps, _, _, finished, _, _ = carry
        return (num_steps < max_new_tokens) & ~jnp.all(finished)

    switch = recompute_position(lm.config.rope_scaling)
    real = attention_mask.sum(axis=-1)  # (B,) each row's prompt tokens

    def step(num_steps, tokens, last_token, cache):
        return lm.apply(variables, last_token[:, None], key_mask, kv_cache=cache)

    def recompute(num_steps, tokens, last_token, cache):
        """Every slot again, up to the last token's: a row passes longrope's original length."""
        slot = P + num_steps - 1  # the last token's slot; the later slots are masked
        ids = jnp.concatenate([input_ids, tokens], axis=1)  # (B, P + n)
        mask = key_mask * (jnp.arange(key_mask.shape[1]) <= slot).astype(key_mask.dtype)
        logits, cache = lm.apply(variables, ids, mask, kv_cache=with_position(cache, 0))
        logits = jax.lax.dynamic_slice_in_dim(logits, slot, 1, axis=1)  # (B, 1, V)
        return logits, with_position(cache, jnp.asarray(slot + 1, jnp.int32))

    def decode_one(carry):
        num_steps, tokens, last_token, finished, cache, rng = carry
        operands = (num_steps, tokens, last_token, cache)
        if switch is None:
            logits, cache = step(*operands)
        else:
            passes = jnp.any(real + num_steps - 1 == switch)
            logits, cache = jax.lax.cond(passes, recompute, step, *operands)
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
