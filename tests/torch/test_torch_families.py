"""torch_block's architecture families against the float64 NumPy reference of
tests/reference/: every family's block and LM, rope positions, full == prefill +
decode, left padding, the GQA cache, and the original block's weight names unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from family_configs import BLOCKS, CAUSAL_BLOCKS, LMS, WINDOW

from torch_block import TransformerBlock, TransformerLM
from twin_core import BlockConfig, LMConfig

ATOL = 1e-5  # docs/design.md section 7: float32, unit-scale outputs
BATCH, SEQ_LEN, PADS = 2, 7, 2  # block inputs; row 1's first PADS keys are masked out
LM_LEN, LM_PADS = 9, 3  # LM batch: row 0 has LM_LEN real tokens, row 1 is left-padded by LM_PADS


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_block(name: str, **overrides) -> TransformerBlock:
    torch.manual_seed(0)
    return ref.randomize_torch(TransformerBlock(**{**BLOCKS[name], **overrides}))


def make_lm(name: str) -> TransformerLM:
    torch.manual_seed(0)
    return ref.randomize_torch(TransformerLM(**LMS[name]))


def block_input(d_model: int, length: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, length, d_model, generator=torch.Generator().manual_seed(seed))


def key_padding(length: int) -> torch.Tensor:
    """(BATCH, 1, 1, length) bool: row 1 may not attend its first PADS keys."""
    mask = torch.ones(BATCH, 1, 1, length, dtype=torch.bool)
    mask[1, ..., :PADS] = False
    return mask


def lm_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) (2, LM_LEN): row 0 all real, row 1 left-padded by LM_PADS with token 0."""
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(1, vocab_size, (2, LM_LEN), generator=generator)
    mask = torch.ones(2, LM_LEN, dtype=torch.long)
    mask[1, :LM_PADS] = 0
    return ids.masked_fill(mask == 0, 0), mask


def max_error(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --------------------------------------------------------------------------- block
@pytest.mark.parametrize("name", BLOCKS)
def test_block_matches_the_float64_reference(name):
    block = make_block(name)
    x, mask = block_input(block.d_model), key_padding(SEQ_LEN)
    with torch.no_grad():
        y, _, aux = block(x, mask, return_aux_loss=True)
    want, moe = ref.block(
        x.double().numpy(), ref.torch_weights(block), ref.spec(**BLOCKS[name]), mask.numpy()
    )
    assert max_error(y, want) <= ATOL
    if BLOCKS[name].get("use_moe"):
        assert abs(float(aux) - moe.aux) <= ATOL
    else:
        assert aux is None


def test_rope_rotates_at_the_positions_given():
    """positions (B, T) replace cache position + arange(T): per row, any integers."""
    block = make_block("llama3_rope")
    x = block_input(block.d_model)
    positions = torch.stack([torch.arange(SEQ_LEN) + 11, torch.arange(SEQ_LEN) * 3])  # (B, T)
    with torch.no_grad():
        y = block(x, positions=positions)[0]
        default = block(x)[0]
    s, weights = ref.spec(**BLOCKS["llama3_rope"]), ref.torch_weights(block)
    want, _ = ref.block(x.double().numpy(), weights, s, positions=positions.numpy())
    assert max_error(y, want) <= ATOL
    assert max_error(default, want) > 1e-2  # the positions matter


@pytest.mark.parametrize("name", ["original", "llama", "mistral"])
def test_every_key_sees_only_what_the_rules_allow(name):
    """One key's value perturbed: exactly the queries allowed to see it change (causal, and
    with the window p - W < k <= p)."""
    block = make_block(name)
    x = block_input(block.d_model, length=8)
    with torch.no_grad():
        base = block(x)[0]
        for k in range(8):
            moved = x.clone()
            moved[:, k] += 1.0
            changed = (block(moved)[0] - base).abs().amax(dim=(0, 2)) > 0  # (T,) per query
            window = BLOCKS[name].get("sliding_window")
            want = [k == p or (k < p and (window is None or p - window < k)) for p in range(8)]
            assert changed.tolist() == want, (k, window)


# --------------------------------------------------------------------------- cached decode
def chunked(
    block: TransformerBlock, x: torch.Tensor, bounds: list[tuple[int, int]]
) -> torch.Tensor:
    """Outputs of `block` run through a cache chunk by chunk, concatenated (B, T, d_model)."""
    cache = block.create_kv_cache(x.shape[0], x.shape[1])
    with torch.no_grad():
        outs = [block(x[:, a:b], kv_cache=cache, use_cache=True)[0] for a, b in bounds]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", CAUSAL_BLOCKS)
def test_full_forward_equals_prefill_then_one_token_steps(name):
    block = make_block(name)
    x = block_input(block.d_model, length=9)
    with torch.no_grad():
        full = block(x)[0]
    steps = chunked(block, x, [(0, 4)] + [(t, t + 1) for t in range(4, 9)])
    assert max_error(steps, full) <= ATOL


def test_sliding_window_holds_across_multi_token_chunks():
    """Chunks of 3 with a window of 3: each chunk's queries see keys of the previous chunk."""
    block = make_block("mistral")
    x = block_input(block.d_model, length=10)
    with torch.no_grad():
        full = block(x)[0]
    assert max_error(chunked(block, x, [(0, 4), (4, 7), (7, 10)]), full) <= ATOL
    s = ref.spec(**BLOCKS["mistral"])
    assert (
        WINDOW < 10
        and max_error(full, ref.block(x.double().numpy(), ref.torch_weights(block), s)[0]) <= ATOL
    )


def test_gqa_cache_holds_kv_heads_only():
    for name, ratio in (("llama", 4), ("mqa_gated_gelu", 4)):
        config = ref.spec(**BLOCKS[name])
        block = make_block(name)
        cache = block.create_kv_cache(2, 16)
        want = (2, config["n_kv_heads"], 16, config["head_dim"])
        assert tuple(cache.k_cache.shape) == tuple(cache.v_cache.shape) == want
        mha = TransformerBlock(**{**BLOCKS[name], "n_kv_heads": None}).create_kv_cache(2, 16)
        nbytes = cache.k_cache.nbytes + cache.v_cache.nbytes
        assert mha.k_cache.nbytes + mha.v_cache.nbytes == ratio * nbytes
        assert config["n_heads"] // config["n_kv_heads"] == ratio


# --------------------------------------------------------------------------- language model
@pytest.mark.parametrize("name", LMS)
def test_lm_matches_the_float64_reference(name):
    lm = make_lm(name)
    ids, mask = lm_batch(LMS[name]["vocab_size"])
    with torch.no_grad():
        logits = lm(ids, mask)
    want, _ = ref.lm(ids.numpy(), ref.torch_weights(lm), ref.spec(**LMS[name]), mask.numpy())
    real = mask.numpy().astype(bool)  # pad positions have no defined output
    assert max_error(logits.numpy()[real], want[real]) <= ATOL
    assert ("position_embedding.weight" in lm.state_dict()) == (
        LMS[name].get("positions") != "rope"
    )


@pytest.mark.parametrize("name", LMS)
def test_left_padded_row_equals_the_prompt_alone(name):
    lm = make_lm(name)
    ids, mask = lm_batch(LMS[name]["vocab_size"])
    with torch.no_grad():
        batched = lm(ids, mask)[1, LM_PADS:]  # (LM_LEN - LM_PADS, V)
        alone = lm(ids[1:, LM_PADS:])[0]
    assert max_error(batched, alone) <= ATOL


@pytest.mark.parametrize("name", LMS)
def test_lm_cached_prefill_and_steps_equal_the_full_forward(name):
    lm = make_lm(name)
    ids, mask = lm_batch(LMS[name]["vocab_size"])
    with torch.no_grad():
        full = lm(ids, mask)
        cache = lm.create_kv_cache(2, LM_LEN)
        outs = [lm(ids[:, :5], mask[:, :5], kv_cache=cache)[0]]
        outs += [
            lm(ids[:, t : t + 1], mask[:, : t + 1], kv_cache=cache)[0] for t in range(5, LM_LEN)
        ]
    real = mask.numpy().astype(bool)
    assert max_error(torch.cat(outs, dim=1).numpy()[real], full.numpy()[real]) <= ATOL


# --------------------------------------------------------------------------- names
ORIGINAL_BLOCK_KEYS = [
    "attention.q_proj.weight", "attention.q_proj.bias",
    "attention.k_proj.weight", "attention.k_proj.bias",
    "attention.v_proj.weight", "attention.v_proj.bias",
    "attention.out_proj.weight", "attention.out_proj.bias",
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
]  # fmt: skip
ORIGINAL_DENSE_KEYS = [
    "feed_forward.fc1.weight", "feed_forward.fc1.bias",
    "feed_forward.fc2.weight", "feed_forward.fc2.bias",
]  # fmt: skip
ORIGINAL_MOE_KEYS = ["feed_forward.expert_counts", "feed_forward.gate.weight"] + [
    f"feed_forward.experts.{e}.{layer}.{kind}"
    for e in range(4)
    for layer in ("fc1", "fc2")
    for kind in ("weight", "bias")
]


def test_the_original_blocks_state_dict_keys_are_todays():
    dense = TransformerBlock(32, 4, 64, dropout=0.0)
    assert list(dense.state_dict()) == ORIGINAL_BLOCK_KEYS + ORIGINAL_DENSE_KEYS
    moe = TransformerBlock(32, 4, 64, 0.0, True, 4, 2)
    assert list(moe.state_dict()) == ORIGINAL_BLOCK_KEYS + ORIGINAL_MOE_KEYS
    dense_lm = TransformerLM(64, 32, 32, 2, 4, 64, dropout=0.0)
    blocks = [
        f"blocks.{i}.{key}" for i in range(2) for key in ORIGINAL_BLOCK_KEYS + ORIGINAL_DENSE_KEYS
    ]
    assert list(dense_lm.state_dict()) == [
        "token_embedding.weight", "position_embedding.weight", *blocks, "norm.weight", "norm.bias"
    ]  # fmt: skip
    moe_lm = TransformerLM(64, 32, 32, 2, 4, 64, 0.0, True, 4, 2, tie_embeddings=False)
    blocks = [
        f"blocks.{i}.{key}" for i in range(2) for key in ORIGINAL_BLOCK_KEYS + ORIGINAL_MOE_KEYS
    ]
    assert list(moe_lm.state_dict()) == [
        "token_embedding.weight", "position_embedding.weight", *blocks,
        "norm.weight", "norm.bias", "lm_head.weight",
    ]  # fmt: skip


def test_family_weight_names_and_shapes():
    """Llama: no biases, no norm bias, fc3 for the gate's partner; GQA k/v (KV*D, d_model)."""
    shapes = {k: tuple(v.shape) for k, v in make_block("llama").state_dict().items()}
    assert shapes == {
        "attention.q_proj.weight": (64, 32),
        "attention.k_proj.weight": (16, 32),
        "attention.v_proj.weight": (16, 32),
        "attention.out_proj.weight": (32, 64),
        "norm1.weight": (32,),
        "norm2.weight": (32,),
        "feed_forward.fc1.weight": (48, 32),
        "feed_forward.fc2.weight": (32, 48),
        "feed_forward.fc3.weight": (48, 32),
    }
    shapes = {k: tuple(v.shape) for k, v in make_block("qwen2_moe").state_dict().items()}
    assert shapes["attention.q_proj.bias"] == (64,) and "attention.out_proj.bias" not in shapes
    assert shapes["feed_forward.gate.weight"] == (4, 32)
    assert shapes["feed_forward.experts.3.fc3.weight"] == (48, 32)
    assert shapes["feed_forward.shared_expert.fc1.weight"] == (40, 32)
    assert shapes["feed_forward.shared_expert.fc3.weight"] == (40, 32)
    assert shapes["feed_forward.shared_expert.fc2.weight"] == (32, 40)
    assert shapes["feed_forward.shared_expert_gate.weight"] == (1, 32)
    shapes = {k: tuple(v.shape) for k, v in make_block("shared_ungated").state_dict().items()}
    assert "feed_forward.shared_expert.fc1.bias" in shapes
    assert not any("shared_expert_gate" in key for key in shapes)


@pytest.mark.parametrize("name", ["llama3_rope", "qwen2_moe"])
def test_from_config_builds_the_same_block(name):
    config = BlockConfig(**BLOCKS[name])
    block = TransformerBlock.from_config(config)
    assert block.config == config
    twin = make_block(name)
    assert {k: v.shape for k, v in block.state_dict().items()} == {
        k: v.shape for k, v in twin.state_dict().items()
    }
    lm = TransformerLM.from_config(LMConfig(**LMS["llama"]))
    assert lm.config == LMConfig(**LMS["llama"])


def test_a_dtype_cast_keeps_the_rope_frequencies_exact():
    """`.to(bfloat16)` casts the weights, not the rope frequencies (theta^(-2i/D) in float32)."""
    block = TransformerBlock(32, 4, 64, positions="rope", rope_theta=10000.0).to(torch.bfloat16)
    inv_freq = block.attention.inv_freq
    want = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    assert inv_freq.dtype == torch.float32 and block.attention.q_proj.weight.dtype == torch.bfloat16
    np.testing.assert_allclose(inv_freq.numpy(), want, rtol=1e-6)
