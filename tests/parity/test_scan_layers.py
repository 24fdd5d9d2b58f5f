"""Scanned layers (`TransformerLM(scan_layers=True)`, jax_block/scan.py) against torch_block.

The torch twin (itself held to the NumPy reference) is the reference: a scanned JAX model on
converted weights gives its logits, MoE aux loss, cached decode and greedy tokens; weights go
both ways bit for bit; files hold one entry per layer; the compiled program does not grow
with depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from family_configs import LMS, MLA_SIZES
from flax.traverse_util import flatten_dict

import torch_block
from jax_block.generate import cached_forward
from jax_block.generate import generate as jax_generate
from jax_block.lm import TransformerLM as FlaxLM
from jax_block.scan import layer_groups
from parity import from_hf
from parity.convert import flax_to_torch, from_torch, load, save, to_torch
from twin_core import LLAMA_OPTIONS, LMConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 2e-5
FOUR = dict(n_layers=4, max_seq_len=24)
CONFIGS = {
    # one kind of layer: one group of 4
    "llama": dict(LMS["llama"], **FOUR),
    # sliding then full attention, twice: a pattern of 2 scanned twice; own rope per kind
    "gemma3": dict(LMS["gemma3"], **FOUR, layer_types=("sliding_attention", "full_attention") * 2),
    # DeepSeek-V3: MLA (a latent cache), grouped sigmoid routing, a dense first layer: one
    # layer, then a group of 3 MoE layers
    "deepseek": dict(
        vocab_size=64,
        d_model=32,
        n_heads=4,
        d_ff=48,
        dropout=0.0,
        **LLAMA_OPTIONS,
        **MLA_SIZES,
        **FOUR,
        use_moe=True,
        num_experts=4,
        top_k_experts=2,
        router="grouped_sigmoid",
        n_group=2,
        dense_layers=(0,),
        dense_d_ff=40,
    ),
}
# (start, period, repeats) of each group, written out by hand
GROUPS = {"llama": [(0, 1, 4)], "gemma3": [(0, 2, 2)], "deepseek": [(0, 1, 1), (1, 1, 3)]}


@pytest.mark.parametrize(
    "kinds, want",
    [
        ("aaaa", [(0, 1, 4)]),
        ("abab" * 3, [(0, 2, 6)]),
        ("sssssf" * 4 + "ss", [(0, 6, 4), (24, 1, 2)]),  # Gemma 3's 5:1, with 2 layers left
        ("dddmmmmm", [(0, 1, 3), (3, 1, 5)]),  # DeepSeek: dense layers, then MoE layers
        ("aabaab", [(0, 3, 2)]),  # the pattern covering most wins over the run "aa"
        ("abcab", [(0, 1, 1), (1, 1, 1), (2, 1, 1), (3, 1, 1), (4, 1, 1)]),  # nothing repeats
        ("a", [(0, 1, 1)]),
    ],
)
def test_layer_groups_take_the_repeating_pattern_covering_most(kinds, want):
    assert [tuple(g) for g in layer_groups(list(kinds), scan=True)] == want
    assert [tuple(g) for g in layer_groups(list(kinds), scan=False)] == [
        (i, 1, 1) for i in range(len(kinds))
    ]


class Scanned:
    """A torch LM of one config and its scanned Flax twin from the converted weights."""

    def __init__(self, name: str):
        torch.manual_seed(0)
        self.torch_lm = torch_block.TransformerLM.from_config(LMConfig(**CONFIGS[name])).eval()
        self.flax_lm, self.params = from_torch(self.torch_lm, scan_layers=True)
        self.forward = jax.jit(
            lambda p, ids: self.flax_lm.apply({"params": p}, ids, return_aux_loss=True)
        )


@pytest.fixture(scope="module", params=list(CONFIGS))
def twins(request) -> tuple[str, Scanned]:
    return request.param, Scanned(request.param)


def ids_of(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 64, (batch, length))


def test_params_are_stacked_per_group_and_go_back_to_torch_bit_for_bit(twins):
    """Each group is one entry whose arrays lead with its repeats (layer start + r * period + j
    in block_j's row r); converting back gives the torch state_dict exactly."""
    name, t = twins
    assert [tuple(g) for g in t.flax_lm.layer_groups] == GROUPS[name]
    blocks = sorted(k for k in t.params if k.startswith("blocks_"))
    want = sorted(f"blocks_{s}_{s + p * r}" if r > 1 else f"blocks_{s}" for s, p, r in GROUPS[name])
    assert blocks == want
    state = t.torch_lm.state_dict()
    for start, period, repeats in GROUPS[name]:
        if repeats == 1:
            continue
        group = t.params[f"blocks_{start}_{start + period * repeats}"]
        for j in range(period):
            for path, stacked in flatten_dict(group[f"block_{j}"], sep=".").items():
                assert stacked.shape[0] == repeats, path
        # one weight read by hand: attention's output projection (Flax (in, out) = torch's T)
        kernel = np.asarray(group["block_0"]["attention"]["out_proj"]["kernel"])
        for r in range(repeats):
            torch_weight = state[f"blocks.{start + r * period}.attention.out_proj.weight"]
            np.testing.assert_array_equal(kernel[r], torch_weight.numpy().T)
    back = flax_to_torch(t.params, t.flax_lm)
    assert set(back) == set(state)
    for key, tensor in state.items():
        if key.endswith("expert_counts"):  # a torch-only buffer, written as zeros
            continue
        assert torch.equal(back[key], tensor), key


def test_scanned_logits_and_aux_equal_torch(twins):
    name, t = twins
    ids = ids_of(2, 9)
    logits, aux = t.forward(t.params, jnp.asarray(ids))
    with torch.no_grad():
        want, want_aux = t.torch_lm(torch.from_numpy(ids), return_aux_loss=True)
    np.testing.assert_allclose(np.asarray(logits), want.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(float(aux), float(want_aux), atol=ATOL, rtol=0)


def test_scanned_cache_decodes_token_by_token_as_torch_recomputes(twins):
    """A stacked cache: prefill 5 tokens, then 4 one-token steps through cached_forward, each
    step's logits equal to torch's full forward over the whole prefix; the cache is updated in
    place."""
    name, t = twins
    ids = ids_of(2, 9, seed=1)
    cache = t.flax_lm.create_kv_cache(2, 24)
    logits, cache = cached_forward(t.flax_lm, t.params, jnp.asarray(ids[:, :5]), None, cache)
    steps = [np.asarray(logits)[:, -1]]
    stacked = jax.tree.leaves(cache[-1])[0]  # the last group's stacked keys (or latent)
    pointer = stacked.unsafe_buffer_pointer()
    for i in range(5, 9):
        logits, cache = cached_forward(
            t.flax_lm, t.params, jnp.asarray(ids[:, i : i + 1]), None, cache
        )
        steps.append(np.asarray(logits)[:, -1])
    # donated and updated in place: the stacked buffer is the one the steps keep writing
    assert stacked.is_deleted() and jax.tree.leaves(cache[-1])[0].unsafe_buffer_pointer() == pointer
    with torch.no_grad():
        full = t.torch_lm(torch.from_numpy(ids)).numpy()
    for k, got in enumerate(steps):
        np.testing.assert_allclose(got, full[:, 4 + k], atol=ATOL, rtol=0, err_msg=f"step {k}")


def test_scanned_greedy_equals_torch_greedy(twins):
    name, t = twins
    ids, mask = ids_of(2, 6, seed=2), np.ones((2, 6), np.int64)
    mask[1, :2] = 0  # row 1 left-padded
    got = jax_generate(t.flax_lm, t.params, ids, mask, max_new_tokens=8)
    want = torch_block.generate(
        t.torch_lm, torch.from_numpy(ids), torch.from_numpy(mask), max_new_tokens=8
    )
    assert np.asarray(got).tolist() == want.tolist()


def test_gradients_through_the_scan_equal_torch_gradients(twins):
    """d loss / d params of the scanned model (next-token cross-entropy), converted to torch's
    names, equal torch's autograd gradients of the same loss."""
    name, t = twins
    ids = ids_of(2, 8, seed=3)

    def loss(params):
        logits = t.flax_lm.apply({"params": params}, jnp.asarray(ids[:, :-1]))
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, jnp.asarray(ids[:, 1:, None]), axis=-1).mean()

    got = flax_to_torch(jax.grad(loss)(t.params), t.flax_lm)
    t.torch_lm.zero_grad()
    logits = t.torch_lm(torch.from_numpy(ids[:, :-1]))
    logp = torch.log_softmax(logits, dim=-1)
    (-logp.gather(-1, torch.from_numpy(ids[:, 1:, None])).mean()).backward()
    for key, param in t.torch_lm.named_parameters():
        want = np.zeros(param.shape) if param.grad is None else param.grad.numpy()
        np.testing.assert_allclose(got[key].numpy(), want, atol=1e-6, rtol=0, err_msg=key)


def test_files_hold_one_entry_per_layer_and_load_scanned_again(twins, tmp_path):
    name, t = twins
    path = tmp_path / "m.safetensors"
    save(path, (t.flax_lm, t.params))
    torch_lm = load(path, "torch")
    for key, tensor in t.torch_lm.state_dict().items():
        assert torch.equal(torch_lm.state_dict()[key], tensor), key
    lm, params = load(path, "jax", scan_layers=True)
    assert lm.scan_layers
    assert jax.tree.structure(params) == jax.tree.structure(t.params)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(t.params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    per_layer = load(path, "jax")[1]
    assert not any(k.count("_") == 2 for k in per_layer if k.startswith("blocks_"))


def test_params_of_the_other_layout_are_refused_by_name(tmp_path):
    t = Scanned("llama")
    per_layer_params = from_torch(t.torch_lm)[1]
    with pytest.raises(ValueError, match=r"scanned layout.*blocks_0_4.*blocks_0"):
        to_torch(t.flax_lm, per_layer_params)
    with pytest.raises(ValueError, match="scan_layers=True is for framework='jax'"):
        from_hf(tmp_path, "torch", scan_layers=True)


def _program_size(n_layers: int, scan_layers: bool) -> int:
    config = LMConfig(**dict(CONFIGS["llama"], n_layers=n_layers))
    lm = FlaxLM(config, scan_layers=scan_layers)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = jax.eval_shape(lambda: lm.init(jax.random.PRNGKey(0), ids))["params"]
    return len(jax.jit(lambda p, i: lm.apply({"params": p}, i)).lower(params, ids).as_text())


def test_the_program_xla_compiles_does_not_grow_with_depth_when_scanned():
    """The StableHLO handed to XLA: 16 scanned layers no larger than 2 (one block in a loop);
    16 layers one by one hold 16 blocks (the check can fail)."""
    assert _program_size(16, True) < 1.1 * _program_size(2, True)
    assert _program_size(16, False) > 4 * _program_size(2, False)
