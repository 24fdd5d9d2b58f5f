"""jax_block's architecture families against the float64 NumPy reference of
tests/reference/: every family's block and LM, rope positions, full == prefill +
decode, left padding, the GQA cache, and the original block's parameter paths unchanged.

Parameters are drawn with NumPy on shapes from `jax.eval_shape` (no initialiser compiles) and
every jitted function is built once per configuration (module-scoped fixtures)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from family_configs import BLOCKS, CAUSAL_BLOCKS, LMS
from flax.traverse_util import flatten_dict

import jax_block
from jax_block import TransformerBlock, TransformerLM
from twin_core import BlockConfig, LMConfig

ATOL = 1e-5  # docs/design.md section 7: float32, unit-scale outputs
BATCH, SEQ_LEN, PADS, PREFILL = 2, 9, 2, 4  # row 1's first PADS keys are masked out
LM_LEN, LM_PADS, LM_PREFILL = 9, 3, 5  # row 0 all real, row 1 left-padded by LM_PADS


def max_error(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def block_input(d_model: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((BATCH, SEQ_LEN, d_model), np.float32)


def key_padding() -> np.ndarray:
    """(BATCH, 1, 1, SEQ_LEN) bool: row 1 may not attend its first PADS keys."""
    mask = np.ones((BATCH, 1, 1, SEQ_LEN), bool)
    mask[1, ..., :PADS] = False
    return mask


class BlockTwin:
    """One block configuration: module, random params, jitted full forward (mask, aux)."""

    def __init__(self, name: str):
        self.name = name
        self.spec = ref.spec(**BLOCKS[name])
        self.module = TransformerBlock.create(**BLOCKS[name])
        self.x = block_input(self.module.config.d_model)
        self.params = ref.random_params(self.module, jnp.asarray(self.x))
        self.weights = ref.flax_weights(self.params)
        self.forward = jax.jit(
            lambda p, x, m: self.module.apply({"params": p}, x, m, return_aux_loss=True)
        )


_TWINS: dict[str, BlockTwin] = {}


def block_twin(name: str) -> BlockTwin:
    """The BlockTwin of `name`, built once per test session (its compilations reused)."""
    if name not in _TWINS:
        _TWINS[name] = BlockTwin(name)
    return _TWINS[name]


# --------------------------------------------------------------------------- block
@pytest.mark.parametrize("name", BLOCKS)
def test_block_matches_the_float64_reference(name):
    twin = block_twin(name)
    y, _, aux = twin.forward(twin.params, twin.x, key_padding())
    want, moe = ref.block(twin.x.astype(np.float64), twin.weights, twin.spec, key_padding())
    assert max_error(y, want) <= ATOL
    if twin.spec["use_moe"]:
        assert abs(float(aux) - moe.aux) <= ATOL
    else:
        assert aux is None


def test_rope_rotates_at_the_positions_given():
    """positions (B, T) replace cache position + arange(T): per row, any integers."""
    twin = block_twin("llama3_rope")
    positions = np.stack([np.arange(SEQ_LEN) + 11, np.arange(SEQ_LEN) * 3]).astype(np.int32)
    y = jax.jit(lambda p, x, pos: twin.module.apply({"params": p}, x, positions=pos)[0])(
        twin.params, twin.x, positions
    )
    want, _ = ref.block(twin.x.astype(np.float64), twin.weights, twin.spec, positions=positions)
    assert max_error(y, want) <= ATOL
    default, _ = ref.block(twin.x.astype(np.float64), twin.weights, twin.spec)
    assert max_error(default, want) > 1e-2  # the positions matter


def cached(twin: BlockTwin, bounds: list[tuple[int, int]]) -> jax.Array:
    """The block run through a cache chunk by chunk (decode_step, the key padding mask over
    every slot), outputs concatenated (B, T, d_model)."""
    cache = twin.module.create_kv_cache(BATCH, SEQ_LEN)
    outs = []
    for a, b in bounds:
        y, cache = jax_block.decode_step(
            twin.module, twin.params, jnp.asarray(twin.x[:, a:b]), cache, key_padding()
        )
        outs.append(y)
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("name", CAUSAL_BLOCKS)
def test_full_forward_equals_prefill_then_one_token_steps(name):
    twin = block_twin(name)
    full, _, _ = twin.forward(twin.params, twin.x, key_padding())
    steps = cached(twin, [(0, PREFILL)] + [(t, t + 1) for t in range(PREFILL, SEQ_LEN)])
    assert max_error(steps, full) <= ATOL


def test_sliding_window_holds_across_multi_token_chunks():
    """Chunks of 3 with a window of 3: each chunk's queries see keys of the previous chunk."""
    twin = block_twin("mistral")
    full, _, _ = twin.forward(twin.params, twin.x, key_padding())
    assert max_error(cached(twin, [(0, 3), (3, 6), (6, 9)]), full) <= ATOL


def test_gqa_cache_holds_kv_heads_only():
    for name, ratio in (("llama", 4), ("mqa_gated_gelu", 4)):
        spec = ref.spec(**BLOCKS[name])
        cache = TransformerBlock.create(**BLOCKS[name]).create_kv_cache(2, 16)
        want = (2, spec["n_kv_heads"], 16, spec["head_dim"])
        assert cache.k_cache.shape == cache.v_cache.shape == want
        mha = TransformerBlock.create(**{**BLOCKS[name], "n_kv_heads": None}).create_kv_cache(2, 16)
        nbytes = cache.k_cache.nbytes + cache.v_cache.nbytes
        assert mha.k_cache.nbytes + mha.v_cache.nbytes == ratio * nbytes
        assert spec["n_heads"] // spec["n_kv_heads"] == ratio


# --------------------------------------------------------------------------- language model
class LMTwin:
    """One LM configuration: module, random params, a left-padded batch, jitted forward."""

    def __init__(self, name: str):
        self.spec = ref.spec(**LMS[name])
        self.module = TransformerLM.create(**LMS[name])
        rng = np.random.default_rng(2)
        self.mask = np.ones((2, LM_LEN), np.int32)
        self.mask[1, :LM_PADS] = 0
        self.ids = (rng.integers(1, LMS[name]["vocab_size"], (2, LM_LEN)) * self.mask).astype(
            np.int32
        )
        self.params = ref.random_params(self.module, jnp.asarray(self.ids))
        self.forward = jax.jit(lambda p, ids, m: self.module.apply({"params": p}, ids, m))


@pytest.fixture(scope="module", params=list(LMS))
def lm(request) -> LMTwin:
    return LMTwin(request.param)


def test_lm_matches_the_float64_reference(lm):
    logits = lm.forward(lm.params, lm.ids, lm.mask)
    want, _ = ref.lm(lm.ids, ref.flax_weights(lm.params), lm.spec, lm.mask)
    real = lm.mask.astype(bool)  # pad positions have no defined output
    assert max_error(np.asarray(logits)[real], want[real]) <= ATOL
    has_positions = "position_embedding" in lm.params
    assert has_positions == (lm.spec["positions"] == "learned")


def test_left_padded_row_equals_the_prompt_alone(lm):
    batched = lm.forward(lm.params, lm.ids, lm.mask)[1, LM_PADS:]  # (LM_LEN - LM_PADS, V)
    alone = lm.forward(lm.params, lm.ids[1:, LM_PADS:], None)[0]
    assert max_error(batched, alone) <= ATOL


def test_lm_cached_prefill_and_steps_equal_the_full_forward(lm):
    full = lm.forward(lm.params, lm.ids, lm.mask)
    cache = lm.module.create_kv_cache(2, LM_LEN)
    outs = []
    for a, b in [(0, LM_PREFILL)] + [(t, t + 1) for t in range(LM_PREFILL, LM_LEN)]:
        logits, cache = jax_block.cached_forward(
            lm.module, lm.params, jnp.asarray(lm.ids[:, a:b]), jnp.asarray(lm.mask), cache
        )
        outs.append(logits)
    real = lm.mask.astype(bool)
    steps = np.asarray(jnp.concatenate(outs, axis=1))
    assert max_error(steps[real], np.asarray(full)[real]) <= ATOL


# --------------------------------------------------------------------------- names
def param_shapes(module, *args) -> dict[str, tuple[int, ...]]:
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)["params"]
    return {"/".join(path): leaf.shape for path, leaf in flatten_dict(shapes).items()}


ORIGINAL_ATTENTION = {
    f"attention/{proj}/{kind}": (32, 32) if kind == "kernel" else (32,)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
    for kind in ("kernel", "bias")
}
ORIGINAL_NORMS = {
    f"{norm}/{kind}": (32,) for norm in ("norm1", "norm2") for kind in ("scale", "bias")
}
ORIGINAL_DENSE = {
    "feed_forward/fc1/kernel": (32, 64),
    "feed_forward/fc1/bias": (64,),
    "feed_forward/fc2/kernel": (64, 32),
    "feed_forward/fc2/bias": (32,),
}
ORIGINAL_MOE = {
    "feed_forward/gate/kernel": (32, 4),
    "feed_forward/experts/fc1/kernel": (4, 32, 64),
    "feed_forward/experts/fc1/bias": (4, 64),
    "feed_forward/experts/fc2/kernel": (4, 64, 32),
    "feed_forward/experts/fc2/bias": (4, 32),
}


def test_the_original_blocks_parameter_paths_are_todays():
    x, ids = jnp.zeros((1, 3, 32)), jnp.zeros((1, 3), jnp.int32)
    block = {**ORIGINAL_ATTENTION, **ORIGINAL_NORMS}
    dense = TransformerBlock.create(d_model=32, n_heads=4, d_ff=64, dropout=0.0)
    assert param_shapes(dense, x) == {**block, **ORIGINAL_DENSE}
    moe = TransformerBlock.from_config(BlockConfig(32, 4, 64, 0.0, True, 4, 2))
    assert param_shapes(moe, x) == {**block, **ORIGINAL_MOE}
    lm = TransformerLM.from_config(
        LMConfig(64, 32, 32, 2, 4, 64, 0.0, True, 4, 2, tie_embeddings=False)
    )
    assert param_shapes(lm, ids) == {
        **{f"blocks_{i}/{k}": v for i in range(2) for k, v in {**block, **ORIGINAL_MOE}.items()},
        "token_embedding/embedding": (64, 32),
        "position_embedding/embedding": (32, 32),
        "norm/scale": (32,),
        "norm/bias": (32,),
        "lm_head/kernel": (32, 64),
    }


def test_family_parameter_paths_and_shapes():
    """Llama: no biases, no norm bias, fc3 beside fc1; GQA k/v kernels (d_model, KV*D)."""
    x = jnp.zeros((1, 3, 32))
    assert param_shapes(TransformerBlock.create(**BLOCKS["llama"]), x) == {
        "attention/q_proj/kernel": (32, 64),
        "attention/k_proj/kernel": (32, 16),
        "attention/v_proj/kernel": (32, 16),
        "attention/out_proj/kernel": (64, 32),
        "norm1/scale": (32,),
        "norm2/scale": (32,),
        "feed_forward/fc1/kernel": (32, 48),
        "feed_forward/fc2/kernel": (48, 32),
        "feed_forward/fc3/kernel": (32, 48),
    }
    shapes = param_shapes(TransformerBlock.create(**BLOCKS["qwen2_moe"]), x)
    assert shapes["attention/q_proj/bias"] == (64,) and "attention/out_proj/bias" not in shapes
    assert shapes["feed_forward/experts/fc3/kernel"] == (4, 32, 48)
    assert shapes["feed_forward/shared_expert/fc1/kernel"] == (32, 40)
    assert shapes["feed_forward/shared_expert/fc3/kernel"] == (32, 40)
    assert shapes["feed_forward/shared_expert/fc2/kernel"] == (40, 32)
    assert shapes["feed_forward/shared_expert_gate/kernel"] == (32, 1)


def test_config_and_from_config_round_trip():
    config = BlockConfig(**BLOCKS["qwen2_moe"])
    block = TransformerBlock.from_config(config)
    assert block.config == config and block == TransformerBlock.create(**BLOCKS["qwen2_moe"])
    lm_config = LMConfig(**LMS["llama"])
    lm = TransformerLM.from_config(lm_config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert lm.config == lm_config and lm.dtype == jnp.bfloat16
