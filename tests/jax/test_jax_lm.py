"""jax_block TransformerLM: names, a NumPy reference forward, cached decode, jitted generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

from jax_block.cache import KVCache
from jax_block.generate import cached_forward, generate, prompt_bucket
from jax_block.lm import TransformerLM

VOCAB, MAX_LEN, D_MODEL, N_LAYERS, N_HEADS, D_FF, EXPERTS = 64, 128, 32, 2, 4, 64, 4
ATOL = 1e-5
# The shapes of tests/parity/test_parity_lm.py, so that the jitted functions of jax_block compile
# once for both files.
PROMPT_LENGTHS, NEW_TOKENS = [12, 3, 7, 10], 64
SEQ_LENGTHS = [76, 67, 71, 74]  # a left-padded batch as long as a prompt and its new tokens
CONFIGS = {
    "dense": dict(),
    "untied": dict(tie_embeddings=False),
    "moe": dict(use_moe=True),
}


SIZES = dict(
    vocab_size=VOCAB,
    max_seq_len=MAX_LEN,
    d_model=D_MODEL,
    n_layers=N_LAYERS,
    n_heads=N_HEADS,
    d_ff=D_FF,
)


def make_lm(**kw) -> TransformerLM:
    return TransformerLM.create(**SIZES, dropout=0.0, num_experts=EXPERTS, **kw)


def left_padded(lengths: list[int], seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Random prompts of the given lengths, left-padded with token 0: (ids, mask), (B, L)."""
    rng = np.random.default_rng(seed)
    L = max(lengths)
    ids = np.zeros((len(lengths), L), np.int32)
    mask = np.zeros((len(lengths), L), np.int32)
    for row, n in enumerate(lengths):
        ids[row, L - n :] = rng.integers(1, VOCAB, n)
        mask[row, L - n :] = 1
    return ids, mask


class Model:
    """A module, random params and its jitted full forward (logits, aux)."""

    def __init__(self, name: str):
        self.lm = make_lm(**CONFIGS[name])
        fields = dict(d_model=D_MODEL, n_heads=N_HEADS, n_layers=N_LAYERS, num_experts=EXPERTS)
        self.spec = ref.spec(**fields, **CONFIGS[name])
        self.params = ref.random_params(self.lm, jnp.zeros((1, 1), jnp.int32), seed=3)
        self.forward = jax.jit(
            lambda params, ids, mask: self.lm.apply(
                {"params": params}, ids, mask, return_aux_loss=True
            )
        )


MODELS: dict[str, Model] = {}


def get_model(name: str) -> Model:
    """One Model per configuration for the whole module, so that each forward compiles once."""
    if name not in MODELS:
        MODELS[name] = Model(name)
    return MODELS[name]


# --------------------------------------------------------------------------- reference
def reference_logits(m: Model, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float]:
    """The float64 reference LM with the model's params: logits (B, T, V) and the aux loss."""
    return ref.lm(ids, ref.flax_weights(m.params), m.spec, mask)


def greedy_reference(m: Model, ids: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Greedy tokens from full causal forwards without a cache, over a fixed-length buffer."""
    B, L = ids.shape
    seq = np.concatenate([ids, np.zeros((B, n), ids.dtype)], 1)
    full_mask = np.concatenate([mask, np.ones((B, n), mask.dtype)], 1)
    for i in range(n):  # logits at L+i-1 do not depend on the later (still empty) slots
        logits, _ = m.forward(m.params, seq, full_mask)
        seq[:, L + i] = np.argmax(np.asarray(logits[:, L + i - 1]), axis=-1)
    return seq[:, L:]


# --------------------------------------------------------------------------- structure
def test_param_paths_and_shapes():
    dummy = jnp.zeros((1, 1), jnp.int32)
    tied = jax.eval_shape(make_lm().init, jax.random.PRNGKey(0), dummy)["params"]
    untied = jax.eval_shape(make_lm(tie_embeddings=False).init, jax.random.PRNGKey(0), dummy)[
        "params"
    ]
    top = ["norm", "position_embedding", "token_embedding"] + [f"blocks_{i}" for i in range(2)]
    assert sorted(tied) == sorted(top)
    assert sorted(untied) == sorted(top + ["lm_head"])
    assert tied["token_embedding"]["embedding"].shape == (VOCAB, D_MODEL)
    assert tied["position_embedding"]["embedding"].shape == (MAX_LEN, D_MODEL)
    assert untied["lm_head"]["kernel"].shape == (D_MODEL, VOCAB)
    assert sorted(tied["blocks_1"]) == ["attention", "feed_forward", "norm1", "norm2"]


def test_cache_is_a_tuple_of_one_kv_cache_per_block():
    cache = make_lm().create_kv_cache(3, 40)
    assert isinstance(cache, tuple) and len(cache) == N_LAYERS
    assert all(isinstance(c, KVCache) for c in cache)
    assert cache[0].k_cache.shape == (3, N_HEADS, 40, D_MODEL // N_HEADS)
    assert len(jax.tree_util.tree_leaves(cache)) == 3 * N_LAYERS


def test_return_values():
    m = get_model("dense")
    ids = jnp.ones((1, 3), jnp.int32)
    plain = jax.eval_shape(lambda p, x: m.lm.apply({"params": p}, x), m.params, ids)
    assert isinstance(plain, jax.ShapeDtypeStruct) and plain.shape == (1, 3, VOCAB)
    logits, aux, cache = jax.eval_shape(
        lambda p, x, c: m.lm.apply({"params": p}, x, return_aux_loss=True, kv_cache=c),
        m.params,
        ids,
        m.lm.create_kv_cache(1, 8),
    )
    assert logits.shape == (1, 3, VOCAB) and aux.shape == ()
    assert isinstance(cache, tuple) and len(cache) == N_LAYERS
    _, dense_aux = m.forward(m.params, *left_padded(SEQ_LENGTHS))
    assert float(dense_aux) == 0.0  # dense blocks have no aux loss


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_reference_on_left_padded_batch(name):
    m = get_model(name)
    ids, mask = left_padded(SEQ_LENGTHS)
    logits, aux = m.forward(m.params, ids, mask)
    want, want_aux = reference_logits(m, ids, mask)
    assert logits.shape == (4, 76, VOCAB) and logits.dtype == jnp.float32
    real = mask.astype(bool)  # pad positions have no defined output
    np.testing.assert_allclose(np.asarray(logits)[real], want[real], atol=ATOL, rtol=0)
    assert aux.shape == () and float(aux) == pytest.approx(want_aux, abs=1e-6)
    if m.lm.config.use_moe:
        assert float(aux) > 0.5 * N_LAYERS  # each layer's loss is near 1 at random routing


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_cached_decode_logits_equal_full_forward_at_every_step(name):
    m = get_model(name)
    ids, mask = left_padded(SEQ_LENGTHS)
    full, _ = m.forward(m.params, ids, mask)  # (B, 76, V)
    cache = m.lm.create_kv_cache(4, 76)
    steps = []
    for t in range(76):  # rows start with pads, whose queries attend nothing
        logits, cache = cached_forward(m.lm, m.params, ids[:, t : t + 1], mask, cache)
        steps.append(logits)
    assert int(cache[0].position) == 76
    cached = np.concatenate(steps, 1)
    real = mask.astype(bool)
    np.testing.assert_allclose(cached[real], np.asarray(full)[real], atol=ATOL, rtol=0)


def test_cached_prefill_then_decode_equals_full_forward():
    m = get_model("dense")
    ids, mask = left_padded(SEQ_LENGTHS)
    full, _ = m.forward(m.params, ids, mask)  # (B, 76, V)
    cache = m.lm.create_kv_cache(4, 76)
    prefill, cache = cached_forward(m.lm, m.params, ids[:, :75], mask, cache)
    last, cache = cached_forward(m.lm, m.params, ids[:, 75:], mask, cache)
    cached = np.concatenate([prefill, last], 1)
    real = mask.astype(bool)
    np.testing.assert_allclose(cached[real], np.asarray(full)[real], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- generation
def test_left_padded_batch_equals_full_forward_loop_and_each_prompt_alone():
    m = get_model("dense")
    ids, mask = left_padded(PROMPT_LENGTHS)
    batch = np.asarray(generate(m.lm, m.params, ids, mask, max_new_tokens=NEW_TOKENS))
    assert batch.shape == (4, NEW_TOKENS) and batch.dtype == np.int32
    np.testing.assert_array_equal(batch, greedy_reference(m, ids, mask, NEW_TOKENS))
    for row, n in enumerate(PROMPT_LENGTHS):
        alone = generate(m.lm, m.params, ids[row : row + 1, -n:], max_new_tokens=NEW_TOKENS)
        np.testing.assert_array_equal(batch[row], np.asarray(alone)[0], err_msg=f"row {row}")


def test_prompt_bucket():
    assert [prompt_bucket(n) for n in (1, 15, 16, 17, 32, 33, 100)] == [16, 16, 16, 32, 32, 64, 128]


def test_prompts_in_one_bucket_compile_once():
    traces = []

    class CountingLM(TransformerLM):
        def __call__(self, *args, **kwargs):
            traces.append(1)
            return super().__call__(*args, **kwargs)

    lm = CountingLM.create(**SIZES, dropout=0.0)
    params = get_model("dense").params
    first = generate(lm, params, left_padded([5, 2])[0], max_new_tokens=4)
    assert len(traces) == 2  # one compilation: the prefill and the loop body trace the model
    second = generate(lm, params, *left_padded([11, 16], seed=2), max_new_tokens=4)
    assert len(traces) == 2  # same batch, bucket 16 and settings: no new trace
    assert first.shape == second.shape == (2, 4)


# --------------------------------------------------------------------------- bad input
def test_forward_rejects_bad_inputs():
    m = get_model("dense")
    variables = {"params": m.params}
    ids = jnp.ones((2, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"\[0, vocab_size=64\), got values in \[1, 64\]"):
        m.lm.apply(variables, jnp.array([[1, 64]]))
    with pytest.raises(ValueError, match="integer"):
        m.lm.apply(variables, ids.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"\(batch >= 1, seq_len >= 1\)"):
        m.lm.apply(variables, jnp.ones((2, 0), jnp.int32))
    with pytest.raises(ValueError, match=r"\(2, 4\), got \(2, 3\)"):
        m.lm.apply(variables, ids, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="seq_len 129 exceeds max_seq_len=128"):
        m.lm.apply(variables, jnp.ones((1, 129), jnp.int32))
    cache = m.lm.create_kv_cache(2, 8)
    with pytest.raises(ValueError, match=r"\(2, 8\), got \(2, 4\)"):
        m.lm.apply(variables, ids, jnp.ones((2, 4)), kv_cache=cache)
    with pytest.raises(ValueError, match="kv_cache must hold 2 caches, got 1"):
        m.lm.apply(variables, ids, kv_cache=cache[:1])


def test_constructor_rejects_bad_config():
    with pytest.raises(ValueError, match="vocab_size must be a positive int, got 0"):
        TransformerLM.create(**{**SIZES, "vocab_size": 0})
    with pytest.raises(ValueError, match="divisible"):
        TransformerLM.create(**{**SIZES, "d_model": 30})
    with pytest.raises(ValueError, match="top_k must be in"):
        TransformerLM.create(**SIZES, use_moe=True, num_experts=2, top_k_experts=3)
