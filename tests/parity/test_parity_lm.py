"""TransformerLM parity: torch_block and jax_block on the same weights, and weight conversion."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
import torch
from family_configs import LMS as FAMILY_LMS
from family_configs import WINDOW
from flax.traverse_util import flatten_dict

import torch_block
from jax_block.generate import cached_forward
from jax_block.generate import generate as jax_generate
from parity.convert import flax_to_torch, from_torch, load, save, to_torch, torch_to_flax
from torch_block.lm import TransformerLM

VOCAB, MAX_LEN, D_MODEL, N_LAYERS, N_HEADS, D_FF, EXPERTS = 64, 128, 32, 2, 4, 64, 4
ATOL = 1e-5
# The shapes of tests/jax/test_jax_lm.py, so that the jitted functions of jax_block compile once.
PROMPT_LENGTHS, NEW_TOKENS = [12, 3, 7, 10], 64
SEQ_LENGTHS = [76, 67, 71, 74]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_torch_lm(use_moe=False, tie_embeddings=True, seed=0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(
        VOCAB, MAX_LEN, D_MODEL, N_LAYERS, N_HEADS, D_FF, dropout=0.0, use_moe=use_moe,
        num_experts=EXPERTS, tie_embeddings=tie_embeddings,
    ).eval()  # fmt: skip


def left_padded(lengths: list[int], seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Random prompts of the given lengths, left-padded with token 0: (ids, mask), (B, L)."""
    rng = np.random.default_rng(seed)
    L = max(lengths)
    ids = np.zeros((len(lengths), L), np.int64)
    mask = np.zeros((len(lengths), L), np.int64)
    for row, n in enumerate(lengths):
        ids[row, L - n :] = rng.integers(1, VOCAB, n)
        mask[row, L - n :] = 1
    return ids, mask


class Twins:
    """One torch LM, its Flax twin with the converted params, and the Flax jitted forward."""

    def __init__(self, use_moe: bool):
        self.torch_lm = make_torch_lm(use_moe)
        self.flax_lm, self.params = from_torch(self.torch_lm)
        self.forward = jax.jit(
            lambda p, ids, mask: self.flax_lm.apply({"params": p}, ids, mask, return_aux_loss=True)
        )


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def twins(request) -> Twins:
    return Twins(request.param)


def test_full_forward_logits_and_aux(twins):
    ids, mask = left_padded(SEQ_LENGTHS)
    with torch.no_grad():
        want, want_aux = twins.torch_lm(torch.tensor(ids), torch.tensor(mask), True)
    got, aux = twins.forward(twins.params, ids.astype(np.int32), mask.astype(np.int32))
    real = mask.astype(bool)  # pad positions have no defined output
    np.testing.assert_allclose(np.asarray(got)[real], want.numpy()[real], atol=ATOL, rtol=0)
    assert float(aux) == pytest.approx(float(want_aux), abs=1e-6)


def test_cached_decode_logits_at_every_step(twins):
    ids, mask = left_padded(SEQ_LENGTHS)
    torch_cache = twins.torch_lm.create_kv_cache(4, 76)
    jax_cache = twins.flax_lm.create_kv_cache(4, 76)
    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
    ids_j, mask_j = ids.astype(np.int32), mask.astype(np.int32)
    worst = 0.0
    for t in range(76):
        with torch.no_grad():
            want, _ = twins.torch_lm(ids_t[:, t : t + 1], mask_t[:, : t + 1], kv_cache=torch_cache)
        got, jax_cache = cached_forward(
            twins.flax_lm, twins.params, ids_j[:, t : t + 1], mask_j, jax_cache
        )
        real = mask[:, t].astype(bool)
        worst = max(worst, float(np.abs(np.asarray(got)[real, 0] - want.numpy()[real, 0]).max()))
    assert worst <= ATOL


def test_greedy_generation_is_token_identical(twins):
    ids, mask = left_padded(PROMPT_LENGTHS)
    want = torch_block.generate(
        twins.torch_lm, torch.tensor(ids), torch.tensor(mask), max_new_tokens=NEW_TOKENS
    )
    got = jax_generate(twins.flax_lm, twins.params, ids, mask, max_new_tokens=NEW_TOKENS)
    assert want.shape == (4, NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(got), want.numpy())


# --------------------------------------------------------------------------- conversion
def assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "use_moe,tie", [(False, True), (False, False), (True, True)], ids=["dense", "untied", "moe"]
)
def test_conversion_round_trips_bit_exact(use_moe, tie):
    lm = make_torch_lm(use_moe, tie)
    flax_lm, params = from_torch(lm)
    flat = {"/".join(k): v for k, v in flatten_dict(params).items()}
    assert ("lm_head/kernel" in flat) == (not tie)
    np.testing.assert_array_equal(
        flat["token_embedding/embedding"], lm.token_embedding.weight.detach().numpy()
    )
    np.testing.assert_array_equal(
        flat["blocks_1/attention/q_proj/kernel"],
        lm.blocks[1].attention.q_proj.weight.detach().numpy().T,
    )
    back = to_torch(flax_lm, params)
    assert isinstance(back, TransformerLM) and back.config == lm.config
    assert_state_dicts_equal(back.state_dict(), lm.state_dict())
    again = torch_to_flax(flax_to_torch(params, flax_lm), flax_lm)
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(params)
    for x, y in zip(
        jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(params), strict=True
    ):
        assert x.dtype == y.dtype and bool(jnp.array_equal(x, y))


def test_checkpoint_file_round_trips_the_lm(tmp_path):
    lm = make_torch_lm(use_moe=True, tie_embeddings=False)
    path = tmp_path / "lm.safetensors"
    save(path, lm)
    loaded = load(path, framework="torch")
    assert isinstance(loaded, TransformerLM) and loaded.config == lm.config
    assert_state_dicts_equal(loaded.state_dict(), lm.state_dict())
    flax_lm, params = load(path, framework="flax")
    want_lm, want_params = from_torch(lm)
    assert flax_lm == want_lm
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(want_params)
    leaves = zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want_params), strict=True
    )
    for x, y in leaves:
        assert x.dtype == y.dtype and bool(jnp.array_equal(x, y))


@pytest.mark.parametrize("name", FAMILY_LMS)
def test_every_family_converts_both_ways_bit_exact(name):
    """GQA, rope (no position embedding), RMSNorm (no bias), fc3, shared expert and its gate:
    torch -> Flax -> torch gives the same state_dict, and the twins hold one config."""
    torch.manual_seed(0)
    lm = TransformerLM(**FAMILY_LMS[name]).eval()
    flax_lm, params = from_torch(lm)
    assert flax_lm.config == lm.config
    back = to_torch(flax_lm, params)
    assert back.config == lm.config
    assert_state_dicts_equal(back.state_dict(), lm.state_dict())


@pytest.mark.parametrize("name", ["llama", "qwen2_moe", "mixed_layers"])
def test_checkpoint_file_round_trips_a_family_lm(tmp_path, name):
    """The config in the file carries every family field (rope_scaling and the per-layer
    fields included)."""
    torch.manual_seed(0)
    lm = TransformerLM(**FAMILY_LMS[name]).eval()
    path = tmp_path / f"{name}.safetensors"
    save(path, lm)
    loaded = load(path, framework="torch")
    assert loaded.config == lm.config
    assert_state_dicts_equal(loaded.state_dict(), lm.state_dict())
    flax_lm, _ = load(path, framework="flax")
    assert flax_lm.config == lm.config


def test_mixed_layers_generate_the_reference_tokens_in_both_past_the_window():
    """Sliding and full layers, MoE and dense layers in one LM: torch's token step and JAX's
    while loop each greedy-decode the float64 reference's tokens, well past the window, and
    the full forwards agree."""
    torch.manual_seed(0)
    lm = ref.randomize_torch(TransformerLM(**FAMILY_LMS["mixed_layers"]))
    flax_lm, params = from_torch(lm)
    ids, mask = left_padded([6, 3])
    new = 10  # 16 positions against a window of WINDOW
    want = ref.greedy(ids, ref.torch_weights(lm), ref.spec(**FAMILY_LMS["mixed_layers"]), mask, new)
    got_torch = torch_block.generate(lm, torch.tensor(ids), torch.tensor(mask), max_new_tokens=new)
    got_jax = jax_generate(flax_lm, params, ids, mask, max_new_tokens=new)
    assert WINDOW < 6 + new
    np.testing.assert_array_equal(got_torch.numpy(), want)
    np.testing.assert_array_equal(np.asarray(got_jax), want)
    with torch.no_grad():
        torch_logits = lm(torch.tensor(ids), torch.tensor(mask)).numpy()
    jax_logits = np.asarray(flax_lm.apply({"params": params}, ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(jax_logits[real], torch_logits[real], atol=ATOL, rtol=0)
