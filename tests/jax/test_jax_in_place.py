"""The jitted decoding functions update the KV cache in place: no cache-sized copy, one cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_block import TransformerBlock, decode_step
from jax_block.cache import KVCache
from jax_block.generate import cached_forward, generate_tokens
from jax_block.lm import TransformerLM

B, H, D_HEAD, N_LAYERS, PROMPT, NEW = 4, 4, 8, 2, 16, 240
S = PROMPT + NEW
SHAPE = f"f32[{B},{H},{S},{D_HEAD}]"


def cache_copies(hlo: str, shape: str, in_entry: bool) -> int:
    """Copy instructions producing an array of `shape` (e.g. "f32[4,4,256,8]") in the compiled
    HLO text, counted inside the entry computation or inside all the others (loop bodies)."""
    count, entry = 0, False
    for line in hlo.splitlines():
        if line and not line.startswith(" "):
            entry = line.startswith("ENTRY")
        head, _, rest = line.partition(" copy(")
        if rest and f"= {shape}" in head and entry == in_entry:
            count += 1
    return count


def test_the_copy_count_sees_a_copied_cache():
    """Control: a write that must keep the old cache too copies both buffers, and is counted."""
    cache, k = KVCache.create(B, S, H, D_HEAD), jnp.ones((B, H, 1, D_HEAD))
    keeps_old = jax.jit(lambda c, k: (c.write(k, k, c.position), c))
    assert cache_copies(keeps_old.lower(cache, k).compile().as_text(), SHAPE, in_entry=True) >= 2
    in_place = jax.jit(lambda c, k: c.write(k, k, c.position), donate_argnums=0)
    assert cache_copies(in_place.lower(cache, k).compile().as_text(), SHAPE, in_entry=True) == 0


@pytest.fixture(scope="module")
def lm_and_params():
    lm = TransformerLM.create(
        vocab_size=64,
        max_seq_len=S,
        d_model=H * D_HEAD,
        n_layers=N_LAYERS,
        n_heads=H,
        d_ff=64,
        dropout=0.0,
    )
    params = lm.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return lm, params


def test_decode_step_copies_no_cache_buffer():
    block = TransformerBlock.create(d_model=H * D_HEAD, n_heads=H, d_ff=64, dropout=0.0)
    x = jnp.ones((B, 1, H * D_HEAD), jnp.float32)
    params = block.init(jax.random.PRNGKey(0), x)["params"]
    cache = block.create_kv_cache(B, S)
    lowered = decode_step.lower(block, params, x, cache)
    assert cache_copies(lowered.compile().as_text(), SHAPE, in_entry=True) == 0


def test_cached_forward_copies_no_cache_buffer(lm_and_params):
    lm, params = lm_and_params
    cache = lm.create_kv_cache(B, S)
    ids, mask = jnp.ones((B, 1), jnp.int32), jnp.ones((B, S), jnp.int32)
    lowered = cached_forward.lower(lm, params, ids, mask, cache)
    assert cache_copies(lowered.compile().as_text(), SHAPE, in_entry=True) == 0


def test_generate_keeps_one_cache_and_copies_none_per_step(lm_and_params):
    lm, params = lm_and_params
    ids, mask = jnp.ones((B, PROMPT), jnp.int32), jnp.ones((B, PROMPT), jnp.int32)
    compiled = generate_tokens.lower(
        lm,
        params,
        ids,
        mask,
        jax.random.PRNGKey(0),
        max_new_tokens=NEW,
        temperature=0.0,
        top_k=None,
        top_p=None,
        eos_token_id=None,
        pad_token_id=0,
    ).compile()
    assert cache_copies(compiled.as_text(), SHAPE, in_entry=False) == 0  # none in the loop
    cache_bytes = 2 * N_LAYERS * B * H * S * D_HEAD * 4
    prefill_scores = B * H * PROMPT * S * 4  # what attending to every slot in the prefill costs
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert cache_bytes <= temp < cache_bytes + prefill_scores / 2, (temp, cache_bytes)
    tokens, steps = compiled(params, ids, mask, jax.random.PRNGKey(0))
    assert tokens.shape == (B, NEW) and int(steps) == NEW
    assert np.all((np.asarray(tokens) >= 0) & (np.asarray(tokens) < 64))
