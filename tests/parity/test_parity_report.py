"""The parity report: every built-in case passes, the comparisons' numbers, routing agreement
with near ties, capacity drops against a hand count, assert_parity on a broken conversion, the
language model's cases failing on perturbed weights, full precision during the cases."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import jax
import numpy as np
import pytest
import reference as ref
import torch

import torch_block
from parity import from_torch
from parity.report import runner as report
from parity.report.cases import lm as lm_cases
from parity.report.compare import (
    IDENTICAL,
    TOLERANCES,
    Agreement,
    Row,
    Tolerance,
    compare,
    routing_agreement,
)
from parity.report.precision import full_precision
from parity.report.registry import (
    BATCH,
    CONFIGS,
    DEFAULT_CONFIGS,
    FAMILIES,
    LM_LAYERS,
    NAMED_FAMILIES,
    PREFILL_LEN,
    SEQ_LEN,
    SLIDING_WINDOW,
    TRAIN_CAPACITY_FACTOR,
    Case,
    Setup,
)
from parity.report.render import WIDTH, environment, render_json, render_table, summary
from parity.report.run import assert_parity
from parity.report.tokens import compare_tokens

CASE_KEYS = [
    (entry.name, config, dtype)
    for entry in report.all_cases()
    for config in entry.configs
    for dtype in entry.dtypes
]


# docs/design.md section 7: gradients and final weights 1e-4 relative, losses 1e-4.
TRAIN_REL_TOLERANCE = Tolerance("rel", 1e-4)
TRAIN_ABS_TOLERANCE = Tolerance("abs", 1e-4)


@pytest.fixture(scope="module")
def case_rows() -> dict[tuple[str, str, str], list[Row]]:
    """Rows of every built-in case, run once (seed 0)."""
    rows = {}
    with report.one_torch_thread():
        for entry in report.all_cases():
            for config in entry.configs:
                for dtype in entry.dtypes:
                    setup = Setup(config, dtype, seed=0)
                    rows[(entry.name, config, dtype)] = report.run_case(entry, setup)
    return rows


# --------------------------------------------------------------------------- built-in cases
@pytest.mark.parametrize("key", CASE_KEYS, ids=["-".join(k) for k in CASE_KEYS])
def test_builtin_case_passes_on_a_correct_conversion(case_rows, key):
    rows = case_rows[key]
    assert rows, key
    assert all(row.passed for row in rows), render_table(rows)
    for row in rows:
        assert (row.config, row.dtype) == key[1:]
        if row.case.startswith("train ") and row.case != "train, dropout 0":
            want = {"rel": TRAIN_REL_TOLERANCE, "abs": TRAIN_ABS_TOLERANCE}[row.tolerance.kind]
        elif row.case == "lm greedy generation":
            want = IDENTICAL
        else:
            want = TOLERANCES[row.dtype]
        assert row.tolerance == want
        if want == IDENTICAL:  # token ids: no numeric error
            assert math.isnan(row.max_abs_error) and math.isnan(row.max_rel_error)
        else:
            assert math.isfinite(row.max_abs_error) and math.isfinite(row.max_rel_error)


def test_the_registry_covers_every_case_of_the_issue():
    names = {entry.name for entry in report.all_cases()}
    assert {
        "forward causal",
        "forward bidirectional",
        "forward masked",
        "cached decode",
        "train, dropout 0",
        "aux loss",
        "z-loss",
        "lm forward",
        "lm cached decode",
        "lm greedy generation",
    } <= names
    dtypes = {dtype for entry in report.all_cases() for dtype in entry.dtypes}
    assert dtypes == {"float32", "bfloat16"}


def test_moe_forward_rows_report_routing_over_every_token(case_rows):
    tokens = BATCH * SEQ_LEN
    for name in ("forward causal", "forward bidirectional", "forward masked"):
        (row,) = case_rows[(name, "moe", "float32")]
        assert row.routing.tokens == tokens and row.routing.disagree == 0
        assert row.routing.agree == tokens  # float32: no choice differs at seed 0
    (row,) = case_rows[("forward causal", "dense", "float32")]
    assert row.routing is None


def test_cached_decode_compares_the_prefill_and_every_step(case_rows):
    prefill, decode = case_rows[("cached decode", "moe", "float32")]
    assert (prefill.case, decode.case) == ("cached prefill", "cached decode")
    steps = decode.details["step_max_abs_error"]
    assert len(steps) == SEQ_LEN - PREFILL_LEN
    assert max(steps) == decode.max_abs_error


def test_train_case_drops_as_many_assignments_as_a_hand_count(case_rows):
    """Count drops with a plain loop: per expert, assignments beyond capacity C are dropped."""
    setup = Setup("moe", "float32", seed=0)
    block, _, _ = setup.build(expert_capacity_factor=TRAIN_CAPACITY_FACTOR)
    captured = []
    block.norm2.register_forward_hook(lambda module, args, out: captured.append(out))
    with torch.no_grad():
        block(setup.input())
    tokens = captured[0].reshape(-1, block.d_model).double()  # (N, d_model)
    gate = block.feed_forward.gate.weight.double()  # (E, d_model)
    E, k, N = gate.shape[0], block.feed_forward.top_k, tokens.shape[0]
    capacity = max(1, math.ceil(TRAIN_CAPACITY_FACTOR * N * k / E))
    s = ref.spec(top_k_experts=k)
    routing = ref.route(tokens.detach().numpy(), ref.torch_weights(block), "feed_forward", s)
    load = [0] * E
    for choice in routing.choices:
        for e, _ in choice:
            load[e] += 1
    dropped = sum(max(0, count - capacity) for count in load)

    (row,) = case_rows[("train, dropout 0", "moe", "float32")]
    assert dropped > 0
    assert row.details["dropped_torch"] == row.details["dropped_jax"] == dropped
    assert row.details["assignments"] == N * k


# --------------------------------------------------------------------------- families
def test_the_family_configurations_are_the_issues():
    """Issue 12's six families and issue 22's Phi-3, in the block and the LM alike."""
    for name in FAMILIES:
        for config in (CONFIGS[name], lm_cases.LM_CONFIGS[name]):
            fields = {**ARCHITECTURE_DEFAULTS, **config}
            rope_family = name != "gpt2"
            assert fields["norm"] == ("rmsnorm" if rope_family else "layernorm")
            assert fields["positions"] == ("rope" if rope_family else "learned")
            assert fields["activation"] == ("silu" if rope_family else "gelu_tanh")
            assert fields["gated_ffn"] == rope_family
            if rope_family:  # GQA 4:1, no FFN or output bias; q/k/v bias for Qwen2 only
                assert fields["n_heads"] == 4 * fields["n_kv_heads"]
                assert not fields["ffn_bias"] and not fields["out_bias"]
                assert fields["qkv_bias"] == name.startswith("qwen2")
            assert fields["sliding_window"] == (SLIDING_WINDOW if name == "mistral" else None)
            assert fields["use_moe"] == (name in ("mixtral", "qwen2_moe"))
            shared = name == "qwen2_moe"
            assert fields["norm_topk_prob"] != shared and fields["shared_expert_gate"] == shared
            assert (fields["shared_expert_d_ff"] is not None) == shared
    assert CONFIGS["mixtral"]["top_k_experts"] == 2
    assert CONFIGS["llama"]["rope_scaling"] is not None  # llama3 frequencies in the report
    # phi3: partial rotary, and longrope's switch passed by the cached steps and generation
    phi3 = CONFIGS["phi3"]
    assert phi3["partial_rotary_factor"] < 1 and phi3["rope_scaling"].rope_type == "longrope"
    original = phi3["rope_scaling"].original_max_position_embeddings
    assert (
        max(lm_cases.PROMPT_LENGTHS)
        < original
        < max(lm_cases.PROMPT_LENGTHS) + lm_cases.DECODE_STEPS
    )
    # the window is shorter than the prefill, the block's sequence and every LM prompt
    assert SLIDING_WINDOW < min(PREFILL_LEN, SEQ_LEN, *lm_cases.PROMPT_LENGTHS)


def test_the_gemma_configurations_use_every_gemma_option():
    """Gemma 2 and 3 in the block and the LM: each option of theirs on, sliding and full
    layers, Gemma 3's local rope base beside its linear-scaled global one."""
    for name in ("gemma2", "gemma3"):
        block, lm = CONFIGS[name], lm_cases.LM_CONFIGS[name]
        assert (block["norm"], block["activation"], block["sandwich_norms"]) == (
            "gemma_rmsnorm",
            "gelu_tanh",
            True,
        )
        assert block["query_pre_attn_scalar"] != block.get("head_dim", 8)
        assert lm["embed_scale"] and set(lm["layer_types"]) == {
            "sliding_attention",
            "full_attention",
        }
        assert lm.items() >= {**block, **LM_LAYERS[name]}.items()
    assert CONFIGS["gemma2"]["attn_logit_softcap"] and LM_LAYERS["gemma2"]["final_logit_softcap"]
    assert CONFIGS["gemma3"]["qk_norm"] == "head" and CONFIGS["gemma3"]["rope_scaling"].factor == 8
    assert LM_LAYERS["gemma3"]["local_rope_theta"] != CONFIGS["gemma3"]["rope_theta"]


ARCHITECTURE_DEFAULTS = dict(
    use_moe=False,
    n_kv_heads=None,
    qkv_bias=True,
    out_bias=True,
    norm="layernorm",
    activation="gelu",
    gated_ffn=False,
    ffn_bias=True,
    positions="learned",
    sliding_window=None,
    norm_topk_prob=True,
    shared_expert_d_ff=None,
    shared_expert_gate=False,
)


def test_the_named_families_are_qwen3_qwen3_moe_olmoe_gemma_and_gpt_oss_with_their_layers():
    """Run only when named (`check --config qwen3`): q/k norms per head or over the projection,
    per-layer windows (Qwen3) and a dense layer between MoE layers (Qwen3-MoE) in the LM;
    GPT-OSS's sinks, router bias and clamped SwiGLU on sliding and full layers."""
    lm = lm_cases.LM_CONFIGS
    assert NAMED_FAMILIES == (
        "qwen3",
        "qwen3_moe",
        "olmoe",
        "gemma2",
        "gemma3",
        "gpt_oss",
        "deepseek_v3",
    )
    assert not set(NAMED_FAMILIES) & set(DEFAULT_CONFIGS)
    qk_norms = [CONFIGS[n].get("qk_norm") for n in NAMED_FAMILIES]
    assert qk_norms == ["head", "head", "projection", None, "head", None, None]
    gpt_oss = lm["gpt_oss"]
    assert gpt_oss["attention_sinks"] and gpt_oss["router_bias"] and gpt_oss["swiglu_limit"]
    assert gpt_oss["layer_types"] == ("sliding_attention", "full_attention")
    assert lm["qwen3"]["layer_types"] == ("full_attention", "sliding_attention")
    assert lm["qwen3"]["sliding_window"] == SLIDING_WINDOW
    assert (lm["qwen3_moe"]["dense_layers"], lm["qwen3_moe"]["use_moe"]) == ((1,), True)
    assert lm["olmoe"]["norm_topk_prob"] is False
    assert (lm["deepseek_v3"]["dense_layers"], lm["deepseek_v3"]["router"]) == (
        (0,),
        "grouped_sigmoid",
    )


@pytest.mark.parametrize("name", FAMILIES + NAMED_FAMILIES)
def test_every_family_runs_the_lm_cases_and_bfloat16(case_rows, name):
    rows = [row for key, rows in case_rows.items() if key[1] == name for row in rows]
    names = {(row.case, row.dtype) for row in rows}
    want = {
        ("lm forward", "float32"),
        ("lm cached prefill", "float32"),
        ("lm cached decode", "float32"),
        ("lm greedy generation", "float32"),
        ("forward causal", "bfloat16"),
    }
    if CONFIGS[name].get("use_moe"):
        want |= {("train, dropout 0", "float32"), ("lm aux loss", "float32")}
    assert want <= names
    assert all(row.passed for row in rows), render_table(rows)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_moe_families_drop_assignments_in_training_mode(case_rows, name):
    (row,) = case_rows[("train, dropout 0", name, "float32")]
    assert 0 < row.details["dropped_torch"] == row.details["dropped_jax"]
    assert row.details["dropped_torch"] < row.details["assignments"]


@pytest.mark.parametrize("config", ["dense", "llama"])
def test_bfloat16_cache_rows_hold_at_the_float32_tolerance(case_rows, config):
    """Both frameworks attend to the cache's bfloat16 keys: float32 parity, although a float32
    cache gives outputs far outside it (a framework attending to the unrounded keys fails)."""
    key = ("cached decode, float32 compute, bfloat16 cache", config, "float32")
    prefill, decode = case_rows[key]
    assert (prefill.case, decode.case) == (
        "cached prefill, bfloat16 cache",
        "cached decode, bfloat16 cache",
    )
    for row in (prefill, decode):
        assert row.passed and row.tolerance == TOLERANCES["float32"]
        assert row.details["cache_rounding"] > 100 * row.tolerance.value
    assert len(decode.details["step_max_abs_error"]) == SEQ_LEN - PREFILL_LEN


# --------------------------------------------------------------------------- language model
LM_BATCH = len(lm_cases.PROMPT_LENGTHS)
LM_SLOTS = lm_cases.PROMPT_LEN + lm_cases.DECODE_STEPS


def test_lm_token_batch_is_left_padded_prompts_of_different_lengths():
    ids, mask = lm_cases.token_batch(Setup("moe", "float32", seed=0))
    assert tuple(ids.shape) == tuple(mask.shape) == (4, LM_SLOTS)
    assert len(set(lm_cases.PROMPT_LENGTHS)) == 4  # every prompt has its own length
    vocab_size = lm_cases.LM_CONFIGS["moe"]["vocab_size"]
    for row, length in enumerate(lm_cases.PROMPT_LENGTHS):
        pads = lm_cases.PROMPT_LEN - length
        assert mask[row].tolist() == [0] * pads + [1] * (LM_SLOTS - pads)
        assert ids[row, :pads].tolist() == [lm_cases.PAD_TOKEN] * pads
        assert 1 <= int(ids[row, pads:].min()) and int(ids[row].max()) < vocab_size


def test_lm_forward_rows_report_routing_over_every_layer_and_token(case_rows):
    tokens = lm_cases.LM_CONFIGS["moe"]["n_layers"] * LM_BATCH * LM_SLOTS
    logits, aux = case_rows[("lm forward", "moe", "float32")]
    assert (logits.case, aux.case) == ("lm forward", "lm aux loss")
    assert logits.routing.tokens == tokens and logits.routing.disagree == 0
    assert logits.routing.agree == tokens  # float32: no choice differs at seed 0
    (dense,) = case_rows[("lm forward", "dense", "float32")]
    assert dense.routing is None


@pytest.mark.parametrize("config", lm_cases.LM_CASE_CONFIGS)
def test_lm_cached_decode_compares_the_prefill_and_every_step(case_rows, config):
    prefill, decode = case_rows[("lm cached decode", config, "float32")]
    assert (prefill.case, decode.case) == ("lm cached prefill", "lm cached decode")
    steps = decode.details["step_max_abs_error"]
    assert len(steps) == lm_cases.DECODE_STEPS
    assert max(steps) == decode.max_abs_error


@pytest.mark.parametrize("config", lm_cases.LM_CASE_CONFIGS)
def test_lm_generation_row_counts_every_new_token(case_rows, config):
    (row,) = case_rows[("lm greedy generation", config, "float32")]
    total = LM_BATCH * lm_cases.NEW_TOKENS
    assert lm_cases.NEW_TOKENS >= 64
    assert row.details == {"tokens_identical": total, "tokens": total}
    assert row.note.startswith(f"{total}/{total} tokens identical")
    assert math.isnan(row.max_abs_error) and row.tolerance == IDENTICAL


@pytest.fixture(scope="module", params=["dense", "moe"])
def lm_setup(request) -> tuple:
    """(setup, twins, ids, mask) of one LM configuration, as the report's cases build them."""
    setup = Setup(request.param, "float32", seed=0)
    return (setup, lm_cases.build_lm(setup), *lm_cases.token_batch(setup))


def with_embedding(twins: lm_cases.LMTwins, change) -> lm_cases.LMTwins:
    """`twins` whose JAX token embedding (V, d_model), tied to the LM head, is change(it)."""
    table = twins.params["token_embedding"]["embedding"]
    return replace(twins, params={**twins.params, "token_embedding": {"embedding": change(table)}})


def test_lm_logit_cases_fail_on_one_weight_off_by_1e_3(lm_setup):
    setup, twins, ids, mask = lm_setup
    broken = with_embedding(twins, lambda table: table.at[7, 3].add(1e-3))
    with report.one_torch_thread(), full_precision():  # as run_case: the compiled code is reused
        rows = lm_cases.forward_rows(setup, broken, ids, mask)
        rows += lm_cases.cached_rows(setup, broken, ids, mask)
    logit_rows = [row for row in rows if row.case != "lm aux loss"]
    assert [row.case for row in logit_rows] == [
        "lm forward",
        "lm cached prefill",
        "lm cached decode",
    ]
    for row in logit_rows:
        assert not row.passed and row.max_abs_error > 1e-5, render_table(rows)


def test_lm_generation_fails_when_a_weight_flips_a_token(lm_setup):
    """Negate, in JAX only, the tied embedding of the token that torch's logits make row 0's
    first greedy choice: that token's logit changes sign, so JAX picks another one there."""
    setup, twins, ids, mask = lm_setup
    prompts, prompt_mask = ids[:, : lm_cases.PROMPT_LEN], mask[:, : lm_cases.PROMPT_LEN]
    with torch.no_grad():
        last = twins.torch_lm(prompts, prompt_mask)[0, -1]  # (V,) logits after row 0's prompt
    top = torch.topk(last, 2).values
    assert top[1] > -top[0]  # the runner-up beats the negated winner
    first = int(last.argmax())
    broken = with_embedding(twins, lambda table: table.at[first].multiply(-1.0))
    with report.one_torch_thread(), full_precision():
        row = lm_cases.generation_row(setup, broken, ids, mask)
    assert not row.passed
    assert row.details["first_difference"] == [0, 0]
    assert row.details["tokens_identical"] < row.details["tokens"] == LM_BATCH * lm_cases.NEW_TOKENS


def test_assert_parity_compares_lm_logits_and_aux(lm_setup):
    setup, twins, ids, mask = lm_setup
    rows = assert_parity(
        twins.torch_lm, twins.flax_lm, twins.params, ids, attention_mask=mask, return_aux_loss=True
    )
    assert [row.case for row in rows] == ["logits", "aux loss"]
    assert all(row.max_abs_error <= 1e-5 for row in rows)


# --------------------------------------------------------------------------- comparisons
def test_compare_reports_max_abs_and_relative_error():
    expected = np.linspace(-2.0, 4.0, 24).reshape(2, 3, 4)
    actual = expected.copy()
    actual[1, 2, 3] += 3e-6
    actual[0, 0, 0] -= 1e-6
    row = compare("c", "dense", "float32", expected, actual)
    assert row.max_abs_error == pytest.approx(3e-6, rel=1e-6)
    assert row.max_rel_error == pytest.approx(3e-6 / 4.0, rel=1e-6)
    assert row.passed
    actual[0, 1, 2] += 2e-5
    assert not compare("c", "dense", "float32", expected, actual).passed


def test_compare_fails_nan_and_mismatched_shapes():
    expected = np.ones((2, 3))
    actual = expected.copy()
    actual[0, 0] = np.nan
    assert not compare("c", "dense", "float32", expected, actual).passed
    assert not compare("c", "dense", "float32", expected, expected.copy()[:, :2]).passed
    both_nan = compare("c", "dense", "float32", actual, actual.copy())
    assert not both_nan.passed  # NaN is never parity, even in both frameworks


def test_bfloat16_tolerance_is_relative_to_the_output_scale():
    expected = np.full((4, 4), 10.0)
    actual = expected + 0.15  # 1.5e-2 relative: inside 2e-2 although 0.15 absolute
    row = compare("c", "moe", "bfloat16", expected, actual)
    assert row.max_rel_error == pytest.approx(0.015) and row.passed
    assert not compare("c", "moe", "bfloat16", expected, expected + 0.25).passed


def test_compare_leaves_out_only_the_excluded_tokens():
    expected = np.zeros((1, 3, 2))
    actual = expected.copy()
    actual[0, 1] = 5.0  # token 1 routed apart by a near tie
    actual[0, 2] = 1e-6
    row = compare("c", "moe", "float32", expected, actual, excluded=np.array([False, True, False]))
    assert row.max_abs_error == pytest.approx(1e-6) and row.passed
    assert row.details["excluded_tokens"] == 1


def test_compare_tokens_counts_identical_tokens_and_finds_the_first_difference():
    expected = np.random.default_rng(0).integers(0, 256, (4, 64))  # int64, as torch returns
    actual = expected.astype(np.int32)  # as JAX returns
    row = compare_tokens("g", "dense", "float32", torch.from_numpy(expected), actual)
    assert row.passed and math.isnan(row.max_abs_error)
    assert row.details == {"tokens_identical": 256, "tokens": 256}
    actual[3, 2] = (actual[3, 2] + 1) % 256
    actual[1, 10] = (actual[1, 10] + 7) % 256
    row = compare_tokens("g", "dense", "float32", torch.from_numpy(expected), actual)
    assert not row.passed
    assert row.details == {"tokens_identical": 254, "tokens": 256, "first_difference": [1, 10]}
    assert row.note.startswith("254/256 tokens identical, first difference row 1 token 10")
    assert math.isnan(row.max_abs_error) and row.to_dict()["max_abs_error"] is None
    assert str(row.tolerance) == "identical"
    assert not compare_tokens("g", "dense", "float32", expected, expected[:, :63]).passed


def step_logits_with_gap(tokens: np.ndarray, gap: float) -> np.ndarray:
    """(B, N, V) logits of scale 10 whose argmax is `tokens` at every step, the runner-up
    (token + 1) `gap` below it."""
    B, N = tokens.shape
    logits = np.full((B, N, 8), -10.0)
    rows, steps = np.meshgrid(np.arange(B), np.arange(N), indexing="ij")
    logits[rows, steps, tokens] = 10.0
    logits[rows, steps, tokens + 1] = 10.0 - gap
    return logits


def test_bfloat16_tokens_may_part_at_a_near_tie_and_no_further():
    expected = np.array([[1, 2, 3, 4], [5, 1, 2, 3]])
    actual = expected.copy()
    actual[0, 2:] = [4, 6]  # row 0 parts at token 2 (3 -> 4, the runner-up) and continues apart
    logits = step_logits_with_gap(expected, gap=0.1)  # bound: 5e-2 * scale 10 = 0.5
    row = compare_tokens(
        "g", "llama", "bfloat16", expected, actual, tie=5e-2, step_logits=(logits, logits + 0.01)
    )
    assert row.passed and str(row.tolerance) == "tie 5e-02"
    assert row.note.startswith(
        "6/8 tokens identical; row 0 parts at token 2, a near tie: margin 0.1 <= 0.5"
    )
    (parting,) = row.details["partings"]
    assert parting["row"] == 0 and parting["index"] == 2 and parting["near_tie"]
    assert parting["margin"] == pytest.approx(0.1) and parting["bound"] == pytest.approx(
        0.5, rel=1e-2
    )
    assert json.loads(json.dumps(row.to_dict()))["max_abs_error"] is None

    # the same parting where the two tokens' logits are far apart: a real difference
    far = step_logits_with_gap(expected, gap=3.0)
    row = compare_tokens(
        "g", "llama", "bfloat16", expected, actual, tie=5e-2, step_logits=(far, far)
    )
    assert not row.passed
    assert "row 0 parts at token 2, not a near tie: margin 3 > 0.5" in row.note
    # float32 (no tie) keeps asking for identical tokens; without logits nothing is excused
    assert not compare_tokens("g", "llama", "float32", expected, actual).passed
    row = compare_tokens("g", "llama", "bfloat16", expected, actual, tie=5e-2)
    assert not row.passed and "no logits to judge a near tie" in row.note


# --------------------------------------------------------------------------- routing
def test_routing_agreement_counts_near_ties_separately_from_disagreements():
    tie = 0.25 - 3e-6  # within 1e-5 of 0.25
    probs_a = np.array(
        [
            [0.4, 0.3, 0.2, 0.1],  # same choices (0, 1)
            [0.4, 0.3, 0.2, 0.1],  # second choice differs with a gap of 0.1: a disagreement
            [0.4, 0.25, tie, 0.1],  # 2nd and 3rd a near tie, choices differ: excused
            [0.4, 0.25, tie, 0.1],  # near tie, same choices
            [0.1, 0.2, 0.3, 0.4],  # same choices (3, 2)
        ]
    )
    probs_b = probs_a.copy()
    probs_b[1] = [0.4, 0.2, 0.3, 0.1]
    probs_b[2] = [0.4, tie, 0.25, 0.1]
    agreement, routed_apart = routing_agreement(probs_a, probs_b, top_k=2)
    assert agreement == Agreement(tokens=5, agree=3, near_ties=2, disagree=1)
    assert routed_apart.tolist() == [False, False, True, False, False]
    assert str(agreement) == "3/5 (2 near ties)"


def test_an_exact_tie_goes_to_the_lower_expert_in_the_comparison():
    probs = np.array([[0.2, 0.3, 0.3, 0.2]])
    agreement, _ = routing_agreement(probs, probs[:, [0, 2, 1, 3]], top_k=1)
    assert agreement == Agreement(tokens=1, agree=1, near_ties=1, disagree=0)


def near_tie_block() -> torch_block.TransformerBlock:
    """A MoE block whose router sees norm2(h) = z * e0 + e1, with logits (2z, 0, 0, -10).

    Experts 1 and 2 always tie exactly. With top_k=1 a token with z < 0 has them as its two
    best (a near tie between 1st and 2nd); a token with z > 0 picks expert 0 clearly.
    """
    torch.manual_seed(0)
    block = torch_block.TransformerBlock(
        16, 2, 32, dropout=0.0, use_moe=True, num_experts=4, top_k_experts=1
    ).eval()
    with torch.no_grad():
        block.norm2.weight.zero_()
        block.norm2.weight[0] = 1.0
        block.norm2.bias.zero_()
        block.norm2.bias[1] = 1.0
        gate = block.feed_forward.gate.weight  # (E, d_model)
        gate.zero_()
        gate[0, 0] = 2.0
        gate[3, 1] = -10.0
    return block


def test_assert_parity_counts_near_ties_of_a_hand_built_gate():
    block = near_tie_block()
    flax_module, params = from_torch(block)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    captured = []
    block.norm2.register_forward_hook(lambda module, args, out: captured.append(out))
    rows = assert_parity(block, flax_module, params, x)
    z = captured[0].reshape(-1, 16)[:, 0]  # (N,) the router's only varying input
    assert z.abs().min() > 1e-3  # no accidental tie between expert 0 and the others
    expected_ties = int((z < 0).sum())
    assert 0 < expected_ties < len(z)
    output = rows[0]
    assert output.case == "output"
    assert output.routing == Agreement(len(z), len(z), expected_ties, 0)
    assert output.passed


# --------------------------------------------------------------------------- assert_parity
@pytest.mark.parametrize("use_moe", [False, True])
def test_assert_parity_passes_then_raises_with_the_table_on_a_broken_conversion(use_moe):
    torch.manual_seed(0)
    block = torch_block.TransformerBlock(
        16, 2, 32, dropout=0.0, use_moe=use_moe, num_experts=4, top_k_experts=2
    ).eval()
    flax_module, params = from_torch(block)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    rows = assert_parity(block, flax_module, params, x, return_aux_loss=True)
    assert [row.case for row in rows] == (["output", "aux loss"] if use_moe else ["output"])

    kernel = params["attention"]["q_proj"]["kernel"]
    broken = {**params, "attention": {**params["attention"]}}
    broken["attention"]["q_proj"] = {**params["attention"]["q_proj"]}
    broken["attention"]["q_proj"]["kernel"] = kernel.at[3, 5].add(1e-3)
    with pytest.raises(AssertionError) as info:
        assert_parity(block, flax_module, broken, x, return_aux_loss=True)
    message = str(info.value)
    assert "abs err" in message and "tolerance" in message
    output_line = next(line for line in message.splitlines() if line.startswith("output"))
    assert "FAIL" in output_line
    assert "abs 1e-05" in output_line


def test_assert_parity_takes_numpy_inputs_and_a_mask():
    torch.manual_seed(0)
    block = torch_block.TransformerBlock(16, 2, 32, dropout=0.0).eval()
    flax_module, params = from_torch(block)
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    mask = np.tril(np.ones((5, 5), bool))[None, None] & np.array([True, False])[:, None, None, None]
    (row,) = assert_parity(block, flax_module, params, x, mask=mask)
    assert row.passed and row.max_abs_error <= 1e-5


# --------------------------------------------------------------------------- rendering
def test_table_columns_line_up_and_summary_counts(case_rows):
    rows = [row for key in CASE_KEYS for row in case_rows[key]]
    table = render_table(rows).splitlines()
    row_lines = [line for line in table if not line.startswith("    ")]  # notes go beneath
    assert len(row_lines) == len(rows) + 2
    result_at = table[0].index("result")
    assert all(
        line[result_at : result_at + 4] in ("PASS", "FAIL", "----") for line in row_lines[1:]
    )
    assert max(map(len, row_lines)) <= 120  # the routing column's near-tie counts widen it
    assert max(len(line) for line in table if line not in row_lines) <= WIDTH
    notes = " ".join(line.strip() for line in table if line.startswith("    "))
    assert all(row.note in notes for row in rows)  # wrapped, not cut
    wide = render_table(rows, width=1000).splitlines()
    assert len(wide) == len(rows) + 2 and wide[0].endswith("note")  # room: notes inline
    assert summary(rows) == f"{len(rows)}/{len(rows)} PASS"
    failing = [rows[0], Row("x", "dense", "float32", 1.0, 1.0, rows[0].tolerance, False)]
    assert summary(failing) == "1/2 PASS; FAIL: x (dense, float32)"


def test_json_carries_every_row_with_its_fields(case_rows):
    rows = case_rows[("train, dropout 0", "moe", "float32")]
    document = json.loads(render_json(rows, environment(), seed=0))
    assert document["total"] == document["passed"] == 1 and document["all_passed"]
    (row,) = document["rows"]
    assert row["case"] == "train, dropout 0" and row["result"] == "PASS"
    assert row["tolerance"] == {"kind": "abs", "value": 1e-5}
    assert set(row["routing"]) == {"tokens", "agree", "near_ties", "disagree"}
    assert row["details"]["dropped_torch"] == row["details"]["dropped_jax"]
    assert {"torch", "jax", "flax", "jax_device"} <= set(document["environment"])


def test_a_case_that_raises_gives_a_failing_row():
    def broken(setup):
        raise RuntimeError("boom")

    entry = Case("broken", broken, ("dense",), ("float32",))
    (row,) = report.run_case(entry, Setup("dense", "float32", 0))
    assert not row.passed and "RuntimeError: boom" in row.note


def test_run_cases_spreads_configurations_over_workers_and_keeps_the_order(monkeypatch, tmp_path):
    (tmp_path / "pid_parity_cases.py").write_text(
        "import os\n"
        "from parity.report.registry import CONFIGS, case\n"
        "from parity.dtypes import DTYPES\nfrom parity.report.compare import Row\n"
        "@case('pid', configs=tuple(CONFIGS), dtypes=DTYPES)\n"
        "def pid(setup):\n"
        "    return [Row('pid', setup.config, setup.dtype, 0.0, 0.0, setup.tolerance, True,\n"
        "                note=str(os.getpid()))]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers get this sys.path too
    monkeypatch.setattr(report, "CASE_MODULES", ("pid_parity_cases",))
    rows = report.run_cases(workers=2)
    in_order = [(c, dtype) for c in DEFAULT_CONFIGS for dtype in ("float32", "bfloat16")]
    assert [(row.config, row.dtype) for row in rows] == in_order
    pids = {row.note for row in rows}
    assert len(pids) == 2 and str(os.getpid()) not in pids
    here = report.run_cases(config="llama", workers=2)  # one configuration: no worker
    assert [row.note for row in here] == [str(os.getpid())] * 2
    assert {row.config for row in report.run_cases(config="gemma3")} == {"gemma3"}


def test_run_cases_refuses_an_unknown_config_or_dtype():
    known = (
        "dense, moe, gpt2, llama, mistral, qwen2, mixtral, qwen2_moe, qwen3, qwen3_moe, olmoe, "
        "phi3, gemma2, gemma3, gpt_oss, deepseek_v3"
    )
    with pytest.raises(ValueError, match=f"config must be one of {known} or all, got 'big'"):
        report.run_cases(config="big")
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16 or all"):
        report.run_cases(dtype="float16")


# --------------------------------------------------------------------------- running cases
def torch_matmul_state() -> tuple[str, ...]:
    """torch's float32 matmul settings: global precision, allow_tf32 (each "unreadable" where
    torch refuses to read it), CUDA's and oneDNN's per-backend precision."""
    matmul = torch.backends.cuda.matmul
    state = []
    for read in (torch.get_float32_matmul_precision, lambda: matmul.allow_tf32):
        try:
            state.append(str(read()))
        except RuntimeError:
            state.append("unreadable")
    return (*state, matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)


FULL_PRECISION = ("highest", "False", "ieee", "ieee")


@pytest.fixture
def restore_torch_matmul_settings():
    """Puts torch's matmul settings back as they were before the test."""
    precision = torch.get_float32_matmul_precision()
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    per_backend = [backend.fp32_precision for backend in backends]
    yield
    torch.set_float32_matmul_precision(precision)
    for backend, value in zip(backends, per_backend, strict=True):
        backend.fp32_precision = value


def tf32_and_bfloat16_per_backend() -> None:
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"


REDUCED_PRECISION = {
    "global high": lambda: torch.set_float32_matmul_precision("high"),
    "global medium": lambda: torch.set_float32_matmul_precision("medium"),
    "allow_tf32": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "per backend": tf32_and_bfloat16_per_backend,
}


@pytest.mark.parametrize("reduce", REDUCED_PRECISION.values(), ids=REDUCED_PRECISION.keys())
def test_full_precision_sets_and_restores_both_frameworks(restore_torch_matmul_settings, reduce):
    reduce()
    before, jax_before = torch_matmul_state(), jax.config.jax_default_matmul_precision
    assert before[2:] != ("ieee", "ieee")  # reduced precision somewhere
    with full_precision():
        assert torch_matmul_state() == FULL_PRECISION
        assert jax.config.jax_default_matmul_precision == "highest"
    assert torch_matmul_state() == before
    assert jax.config.jax_default_matmul_precision == jax_before
    with pytest.raises(RuntimeError, match="a failing case"), full_precision():
        raise RuntimeError("a failing case")
    assert torch_matmul_state() == before


def test_every_case_runs_at_full_precision(restore_torch_matmul_settings):
    seen = []

    def probe(setup):
        seen.append((jax.config.jax_default_matmul_precision, *torch_matmul_state()))
        return [Row("probe", setup.config, setup.dtype, 0.0, 0.0, setup.tolerance, True)]

    torch.set_float32_matmul_precision("medium")
    report.run_case(Case("probe", probe, ("dense",), ("float32",)), Setup("dense", "float32", 0))
    assert seen == [("highest", *FULL_PRECISION)]


def test_a_case_module_is_one_more_entry_of_case_modules(monkeypatch, tmp_path):
    before = [entry.name for entry in report.all_cases()]
    assert before[0] == "forward causal" and "lm greedy generation" in before
    (tmp_path / "extra_parity_cases.py").write_text(
        "from parity.report.registry import case\n"
        "@case('extra', configs=('dense',))\n"
        "def extra(setup):\n"
        "    return []\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(report, "CASE_MODULES", (*report.CASE_MODULES, "extra_parity_cases"))
    assert [entry.name for entry in report.all_cases()] == [*before, "extra"]
    monkeypatch.undo()
    assert [entry.name for entry in report.all_cases()] == before
