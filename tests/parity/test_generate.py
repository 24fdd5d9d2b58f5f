"""Generation in both frameworks: sampling distributions, EOS, bad input, the command line."""

from __future__ import annotations

import argparse
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_block.sampling as jax_sampling
import torch_block
import torch_block.sampling as torch_sampling
from jax_block.generate import generate as jax_generate
from jax_block.lm import TransformerLM as FlaxLM
from parity.cli.generate import add_generate_command
from parity.convert import from_torch
from torch_block.block import TransformerBlock
from torch_block.lm import TransformerLM

FRAMEWORKS = ["torch", "jax"]
VOCAB, MAX_LEN, D_MODEL, N_LAYERS, N_HEADS, D_FF = 64, 128, 32, 2, 4, 64
PROMPT_LENGTHS, NEW_TOKENS = [12, 3, 7, 10], 64  # the shapes of test_jax_lm / test_parity_lm
NUM_SAMPLES = 20_000
# Fixed logits of 12 tokens with well separated probabilities.
LOGITS = np.array([2.0, 0.3, 1.1, -0.4, 1.6, -1.2, 0.8, 0.0, -2.0, 1.3, -0.7, 0.5], np.float32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- sampling
def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_distribution(logits, temperature, top_k=None, top_p=None) -> np.ndarray:
    """softmax(logits / T) restricted to the top k, then to the nucleus, renormalised."""
    probs = softmax(logits.astype(np.float64) / temperature)
    order = sorted(range(len(logits)), key=lambda i: -logits[i])  # most probable first
    keep = set(order[:top_k] if top_k is not None else order)
    if top_p is not None:
        kept_mass = sum(probs[i] for i in keep)
        nucleus, mass = set(), 0.0
        for i in order:
            if i not in keep:
                continue
            if nucleus and mass >= top_p:
                break
            nucleus.add(i)
            mass += probs[i] / kept_mass
            assert abs(mass - top_p) > 1e-3, "pick a top_p away from a cumulative probability"
        keep = nucleus
    out = np.array([probs[i] if i in keep else 0.0 for i in range(len(logits))])
    return out / out.sum()


def draw(framework: str, logits: np.ndarray, temperature, top_k=None, top_p=None, seed=0):
    """NUM_SAMPLES tokens sampled from one logits vector (as a batch of identical rows)."""
    rows = np.tile(logits, (NUM_SAMPLES, 1))
    if framework == "torch":
        generator = torch.Generator().manual_seed(seed)
        tokens = torch_sampling.sample_next_token(
            torch.tensor(rows), temperature, top_k, top_p, generator
        )
        return tokens.numpy()
    tokens = jax_sampling.sample_next_token(  # eagerly: cheaper than one compile per setting
        jnp.asarray(rows), temperature, top_k, top_p, jax.random.PRNGKey(seed)
    )
    return np.asarray(tokens)


def assert_frequencies(tokens: np.ndarray, probs: np.ndarray) -> None:
    """Every token's count within 5 standard deviations of N * p (and zero where p is 0)."""
    counts = np.bincount(tokens, minlength=probs.size)
    n = tokens.size
    for token, (count, p) in enumerate(zip(counts, probs, strict=True)):
        bound = 5 * math.sqrt(n * p * (1 - p)) + 1
        assert abs(count - n * p) <= bound, f"token {token}: {count} draws, expected {n * p:.0f}"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_greedy_is_argmax_of_each_row(framework):
    logits = np.random.default_rng(0).standard_normal((7, 50)).astype(np.float32)
    if framework == "torch":
        got = torch_sampling.sample_next_token(torch.tensor(logits)).numpy()
    else:
        got = np.asarray(jax_sampling.sample_next_token(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, logits.argmax(axis=1))


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(0.7, None, None), (1.0, 3, None), (1.0, None, 0.6), (1.5, 6, 0.75)],
    ids=["temperature", "top_k", "top_p", "all"],
)
def test_sampling_frequencies_match_filtered_softmax(framework, temperature, top_k, top_p):
    want = reference_distribution(LOGITS, temperature, top_k, top_p)
    tokens = draw(framework, LOGITS, temperature, top_k, top_p)
    allowed = np.flatnonzero(want > 0)
    assert set(np.unique(tokens)) <= set(allowed)  # never outside the top k / the nucleus
    if top_k is not None:
        assert set(np.unique(tokens)) <= set(np.argsort(-LOGITS)[:top_k])
    assert_frequencies(tokens, want)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_tiny_top_p_keeps_the_most_probable_token(framework):
    tokens = draw(framework, LOGITS, 1.0, None, 1e-6)
    assert set(np.unique(tokens)) == {int(np.argmax(LOGITS))}


def test_reference_distribution_is_sensitive_to_every_setting():
    base = reference_distribution(LOGITS, 1.0)
    for other in (
        reference_distribution(LOGITS, 0.7),
        reference_distribution(LOGITS, 1.0, top_k=3),
        reference_distribution(LOGITS, 1.0, top_p=0.6),
    ):
        assert np.abs(other - base).max() > 0.05  # the 5-sigma bound (~0.008) tells them apart


# --------------------------------------------------------------------------- models
def make_torch_lm(seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(
        VOCAB, MAX_LEN, D_MODEL, N_LAYERS, N_HEADS, D_FF, dropout=0.0, num_experts=4
    ).eval()


@pytest.fixture(scope="module")
def models():
    """The same weights in both frameworks: (torch lm, (flax lm, params))."""
    lm = make_torch_lm()
    return lm, from_torch(lm)


def left_padded(lengths: list[int], seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    L = max(lengths)
    ids = np.zeros((len(lengths), L), np.int64)
    mask = np.zeros((len(lengths), L), np.int64)
    for row, n in enumerate(lengths):
        ids[row, L - n :] = rng.integers(1, VOCAB, n)
        mask[row, L - n :] = 1
    return ids, mask


def run_generate(framework, models, ids, mask, **kw) -> tuple[np.ndarray, int, int | None]:
    """(tokens, reported number of steps, counted forward calls or None) in one framework."""
    if framework == "torch":
        module = importlib.import_module("torch_block.generate")  # counts its token steps
        step, calls = module.token_step, []
        module.token_step = lambda *args: calls.append(1) or step(*args)
        try:
            tokens, steps = torch_block.generate(
                models[0], torch.tensor(ids), torch.tensor(mask), return_num_steps=True, **kw
            )
        finally:
            module.token_step = step
        return tokens.numpy(), steps, 1 + len(calls)  # the prefill, then one call per step
    flax_lm, params = models[1]
    tokens, steps = jax_generate(flax_lm, params, ids, mask, return_num_steps=True, **kw)
    return np.asarray(tokens), steps, None


def with_eos(tokens: np.ndarray, eos: int, pad: int) -> tuple[np.ndarray, int]:
    """What EOS does to greedy rows, by a plain loop: (rows padded after their first eos,
    number of model calls until every row has finished or NEW_TOKENS)."""
    out = tokens.copy()
    ends = []
    for row in out:
        hits = np.flatnonzero(row == eos)
        end = int(hits[0]) + 1 if hits.size else len(row)
        row[end:] = pad
        ends.append(end)
    return out, max(ends)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_eos_pads_finished_rows_and_ends_when_every_row_has(framework, models):
    ids, mask = left_padded(PROMPT_LENGTHS)
    base, steps, calls = run_generate(framework, models, ids, mask, max_new_tokens=NEW_TOKENS)
    assert steps == NEW_TOKENS and calls in (None, NEW_TOKENS)
    # eos: a token that first appears in some row r at a step j in [1, NEW_TOKENS - 1)
    firsts = [
        (j, r) for r in range(len(base)) for j in range(1, NEW_TOKENS - 1)
        if base[r, j] not in base[r, :j]
    ]  # fmt: skip
    assert firsts, "greedy rows should not be constant"
    j, r = max(firsts)
    eos = int(base[r, j])
    kw = dict(max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=5)

    got, steps, calls = run_generate(framework, models, ids, mask, **kw)
    want, want_steps = with_eos(base, eos, pad=5)
    np.testing.assert_array_equal(got, want)
    assert steps == want_steps and calls in (None, want_steps)

    same_ids, same_mask = np.repeat(ids[r : r + 1], 4, 0), np.repeat(mask[r : r + 1], 4, 0)
    got, steps, calls = run_generate(framework, models, same_ids, same_mask, **kw)
    want, want_steps = with_eos(np.repeat(base[r : r + 1], 4, 0), eos, pad=5)
    np.testing.assert_array_equal(got, want)
    assert want_steps == j + 1 < NEW_TOKENS  # every row finished early
    assert steps == want_steps and calls in (None, want_steps)


# --------------------------------------------------------------------------- bad input
BAD_INPUTS = {
    "too long": (
        dict(ids=np.ones((1, 100)), max_new_tokens=29),
        r"prompt length 100 \+ max_new_tokens 29 = 129 exceeds max_seq_len=128",
    ),
    "id >= vocab": (dict(ids=[[1, 64]]), r"\[0, vocab_size=64\), got values in \[1, 64\]"),
    "negative id": (dict(ids=[[-1, 3]]), r"got values in \[-1, 3\]"),
    "float ids": (
        dict(ids=np.ones((1, 2), np.float32)),
        r"integer token ids, got dtype (torch\.)?float32",
    ),
    "1-d ids": (dict(ids=[1, 2, 3]), r"\(batch, prompt_len\), got shape \(3,\)"),
    "empty prompt": (dict(ids=np.ones((1, 0))), r"empty prompt: input_ids has shape \(1, 0\)"),
    "mask shape": (
        dict(ids=np.ones((2, 4)), mask=np.ones((2, 3))),
        r"shape of input_ids \(2, 4\), got \(2, 3\)",
    ),
    "right padding": (
        dict(ids=np.ones((2, 4)), mask=[[1, 1, 1, 1], [0, 1, 1, 0]]),
        r"rows \[1\] have padding on the right",
    ),
    "mask values": (dict(ids=np.ones((1, 2)), mask=[[1, 2]]), "only 0 and 1"),
    "all-pad row": (
        dict(ids=np.ones((2, 2)), mask=[[1, 1], [0, 0]]),
        r"empty prompt: attention_mask rows \[1\] have no real token",
    ),
    "temperature": (dict(temperature=-0.5), "temperature must be a finite number >= 0, got -0.5"),
    "top_p 0": (dict(top_p=0.0), r"top_p must be None or a number in \(0, 1\], got 0.0"),
    "top_p > 1": (dict(top_p=1.5), r"top_p must be None or a number in \(0, 1\], got 1.5"),
    "top_k 0": (dict(top_k=0), "top_k must be None or an int >= 1, got 0"),
    "max_new_tokens 0": (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1, got 0"),
    "pad id": (dict(pad_token_id=64), r"pad_token_id must be an int in \[0, vocab_size=64\)"),
    "eos id": (dict(eos_token_id=-1), r"eos_token_id must be None or an int in \[0, vocab_s"),
}


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_before_any_computation(framework, case, models):
    given, message = dict(BAD_INPUTS[case][0]), BAD_INPUTS[case][1]
    ids = np.asarray(given.pop("ids", np.ones((1, 3))))
    ids = ids.astype(np.int64) if ids.dtype == np.float64 else ids
    mask = given.pop("mask", None)
    kw = dict(max_new_tokens=4) | given
    if framework == "torch":
        lm = models[0]
        calls = []
        hook = lm.register_forward_hook(lambda *_: calls.append(1))
        try:
            with pytest.raises(ValueError, match=message):
                torch_block.generate(
                    lm, torch.tensor(ids), None if mask is None else torch.tensor(mask), **kw
                )
        finally:
            hook.remove()
        assert calls == [] and not lm.training
    else:
        traces = []

        class CountingLM(FlaxLM):
            def __call__(self, *args, **kwargs):
                traces.append(1)
                return super().__call__(*args, **kwargs)

        flax_lm, params = models[1]
        lm = CountingLM.from_config(flax_lm.config)
        with pytest.raises(ValueError, match=message):
            jax_generate(lm, params, ids, None if mask is None else np.asarray(mask), **kw)
        assert traces == []


def test_jax_sampling_without_rng_is_an_error(models):
    flax_lm, params = models[1]
    with pytest.raises(ValueError, match="temperature 0.8 needs rng"):
        jax_generate(flax_lm, params, np.ones((1, 3), np.int32), max_new_tokens=4, temperature=0.8)


# --------------------------------------------------------------------------- command line
def cli(*argv: str):
    parser = argparse.ArgumentParser()
    add_generate_command(parser.add_subparsers())
    args = parser.parse_args(["generate", *argv])
    return args.run(args)


def test_cli_checkpoint_ids_both_frameworks(models, tmp_path, capsys):
    from parity.convert import save

    lm = models[0]
    path = tmp_path / "lm.safetensors"
    save(path, lm)
    ids = [int(t) for t in left_padded([7])[0][0]]
    want = torch_block.generate(lm, torch.tensor([ids]), max_new_tokens=NEW_TOKENS)[0].tolist()
    for framework in FRAMEWORKS:
        argv = ["--framework", framework, "--checkpoint", str(path), "--max-new-tokens", "64"]
        assert cli(*argv, "--ids", ",".join(map(str, ids))) == 0
        tokens_line, speed_line = capsys.readouterr().out.strip().splitlines()
        assert [int(t) for t in tokens_line.split(",")] == want
        assert speed_line.startswith(f"{framework}: 64 new tokens in ")
        assert "tokens/s" in speed_line and ("compile" in speed_line) == (framework == "jax")


def test_cli_text_prompt_with_random_weights_is_the_same_in_both_frameworks(capsys):
    texts = []
    for framework in FRAMEWORKS:
        argv = ["--framework", framework, "--prompt", "Hello", "--max-new-tokens", "12"]
        assert cli(*argv, "--seed", "3") == 0
        text, speed = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
        assert text.startswith("Hello") and "12 new tokens" in speed
        texts.append(text)
    assert texts[0] == texts[1]


def test_cli_errors(models, tmp_path, capsys):
    from parity.convert import save

    path = tmp_path / "lm.safetensors"
    save(path, models[0])
    assert cli("--checkpoint", str(path), "--prompt", "hi") == 2
    err = capsys.readouterr().err
    assert "has no tokenizer.json and vocab_size=64 (bytes as tokens need 256)" in err
    assert "give --tokenizer DIR" in err and "or the prompt as --ids" in err
    with pytest.raises(SystemExit) as info:
        cli("--ids", "1,2", "--top-p", "2")
    assert info.value.code == 2
    assert "argument --top-p: expected a number in (0, 1], got 2" in capsys.readouterr().err
    block_path = tmp_path / "block.safetensors"
    save(block_path, TransformerBlock(D_MODEL, N_HEADS, D_FF))
    assert cli("--checkpoint", str(block_path), "--ids", "1,2") == 2
    assert "holds a TransformerBlock; generation needs a TransformerLM" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli("--ids", "1,x")
