"""The language model's cases: logits of a full forward, logits of cached decode at every step,
and greedy generation token for token, all on a batch of left-padded prompts of different
lengths.

The three cases share one token batch: PROMPT_LENGTHS prompts left-padded to PROMPT_LEN slots,
each followed by DECODE_STEPS more tokens. The forward sees all of it; the cached case prefills
the prompts and then feeds the rest one token per step; generation starts from the prompts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flax import linen as nn

import jax_block
import torch_block

from ...convert import from_torch
from ...dtypes import JAX_DTYPES, TORCH_DTYPES
from ..compare import Row, to_float64
from ..registry import CONFIGS, FAMILIES, LM_LAYERS, NAMED_FAMILIES, ORIGINAL, Setup, case
from ..run import run_both
from ..tokens import compare_tokens

_LM = dict(vocab_size=256, max_seq_len=128, d_model=64, n_layers=2, n_heads=4, d_ff=128)
UNTIED = ("llama", "mistral", "mixtral", "olmoe")  # families whose LM head is its own weight
LM_CONFIGS: dict[str, dict[str, Any]] = {
    "dense": dict(_LM, dropout=0.0),
    "moe": dict(_LM, dropout=0.0, use_moe=True, num_experts=4, top_k_experts=2),
    **{
        name: dict(
            _LM, **CONFIGS[name], **LM_LAYERS.get(name, {}), tie_embeddings=name not in UNTIED
        )
        for name in FAMILIES + NAMED_FAMILIES
    },
}
LM_CASE_CONFIGS = ORIGINAL + FAMILIES + NAMED_FAMILIES
PROMPT_LENGTHS = (16, 5, 11, 8)  # one row per prompt; the longest sets PROMPT_LEN
PROMPT_LEN = max(PROMPT_LENGTHS)
DECODE_STEPS = 16  # one-token cached steps after the prompts
NEW_TOKENS = 64  # greedy tokens generated after each prompt
PAD_TOKEN = 0


@dataclass(frozen=True)
class LMTwins:
    """A torch TransformerLM (eval mode) and its Flax twin with the converted parameters."""

    torch_lm: torch_block.TransformerLM
    flax_lm: nn.Module
    params: dict


@functools.lru_cache(maxsize=1)  # the report runs a setup's LM cases one after the other
def build_lm(setup: Setup) -> LMTwins:
    """A seeded torch LM of the setup's configuration and dtype, and its converted twin (the
    last one built is reused: the cases only read it)."""
    with torch.random.fork_rng(devices=[]):  # the caller's torch RNG is left as it was
        torch.manual_seed(setup.seed)
        lm = torch_block.TransformerLM(**LM_CONFIGS[setup.config])
    lm = lm.to(TORCH_DTYPES[setup.dtype]).eval()
    flax_lm, params = from_torch(lm)
    return LMTwins(lm, flax_lm, params)


def token_batch(setup: Setup) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (B, PROMPT_LEN + DECODE_STEPS) int64: seeded prompts of
    PROMPT_LENGTHS left-padded with PAD_TOKEN to PROMPT_LEN, then DECODE_STEPS tokens each;
    the mask is 1 on real tokens."""
    B, S = len(PROMPT_LENGTHS), PROMPT_LEN + DECODE_STEPS
    vocab_size = LM_CONFIGS[setup.config]["vocab_size"]
    generator = torch.Generator().manual_seed(setup.seed + 1)
    ids = torch.randint(1, vocab_size, (B, S), generator=generator)  # (B, S)
    pads = torch.tensor([PROMPT_LEN - n for n in PROMPT_LENGTHS])[:, None]  # (B, 1)
    mask = (torch.arange(S)[None, :] >= pads).long()  # (B, S)
    return ids.masked_fill(mask == 0, PAD_TOKEN), mask


def _prompts_note() -> str:
    return f"left-padded prompts of {', '.join(map(str, PROMPT_LENGTHS))} tokens"


def forward_rows(setup: Setup, twins: LMTwins, ids: torch.Tensor, mask: torch.Tensor) -> list[Row]:
    """Logits of one full forward over every slot (pads included), with routing agreement
    over every MoE layer; MoE also compares the summed aux loss."""
    run = run_both(
        twins.torch_lm, twins.flax_lm, twins.params, ids, attention_mask=mask, return_aux_loss=True
    )
    note = f"{tuple(ids.shape)}: {_prompts_note()}, then {DECODE_STEPS} more each"
    rows = [setup.compare_output("lm forward", run, note=note)]
    if twins.torch_lm.config.use_moe:
        torch_aux, jax_aux = run.torch_out[1], run.jax_out[1]
        note = f"value {float(torch_aux):.4f}"
        rows.append(setup.compare("lm aux loss", torch_aux, jax_aux, note=note))
    return rows


def cached_rows(setup: Setup, twins: LMTwins, ids: torch.Tensor, mask: torch.Tensor) -> list[Row]:
    """Logits of the prompts' prefill, then of each one-token cached step (JAX through
    `jax_block.cached_forward`, whose mask covers every cache slot)."""
    B, S = ids.shape
    dtype = TORCH_DTYPES[setup.dtype]
    torch_cache = twins.torch_lm.create_kv_cache(B, S, dtype)
    jax_cache = twins.flax_lm.create_kv_cache(B, S, JAX_DTYPES[setup.dtype])
    jax_ids, jax_mask = ids.numpy().astype(np.int32), mask.numpy().astype(np.int32)  # (B, S)
    chunks = [(0, PROMPT_LEN)] + [(t, t + 1) for t in range(PROMPT_LEN, S)]
    torch_logits, jax_logits = [], []
    for start, end in chunks:
        with torch.no_grad():
            logits, _ = twins.torch_lm(ids[:, start:end], mask[:, :end], kv_cache=torch_cache)
        torch_logits.append(to_float64(logits))  # (B, end - start, V)
        logits, jax_cache = jax_block.cached_forward(
            twins.flax_lm, twins.params, jax_ids[:, start:end], jax_mask, jax_cache
        )
        jax_logits.append(to_float64(logits))
    step_errors = [
        float(np.max(np.abs(t - j))) for t, j in zip(torch_logits[1:], jax_logits[1:], strict=True)
    ]
    worst = int(np.argmax(step_errors))
    return [
        setup.compare("lm cached prefill", torch_logits[0], jax_logits[0], note=_prompts_note()),
        setup.compare(
            "lm cached decode",
            np.concatenate(torch_logits[1:], axis=1),
            np.concatenate(jax_logits[1:], axis=1),
            note=f"{len(step_errors)} steps of 1 token; worst step {worst + 1}",
            details={"step_max_abs_error": step_errors},
        ),
    ]


def generation_row(setup: Setup, twins: LMTwins, ids: torch.Tensor, mask: torch.Tensor) -> Row:
    """NEW_TOKENS greedy tokens after each left-padded prompt: `lm.generate` (torch) against
    `jax_block.generate`; passes only when every token is identical."""
    prompts, prompt_mask = ids[:, :PROMPT_LEN], mask[:, :PROMPT_LEN]  # (B, PROMPT_LEN)
    expected = torch_block.generate(twins.torch_lm, prompts, prompt_mask, max_new_tokens=NEW_TOKENS)
    actual = jax_block.generate(
        twins.flax_lm,
        twins.params,
        prompts.numpy().astype(np.int32),
        prompt_mask.numpy().astype(np.int32),
        max_new_tokens=NEW_TOKENS,
    )
    note = f"{NEW_TOKENS} new after {_prompts_note()}"
    return compare_tokens("lm greedy generation", setup.config, setup.dtype, expected, actual, note)


@case("lm forward", configs=LM_CASE_CONFIGS, rows=("lm forward", "lm aux loss"))
def lm_forward(setup: Setup) -> list[Row]:
    """TransformerLM logits of a full forward with a left-padded attention_mask."""
    return forward_rows(setup, build_lm(setup), *token_batch(setup))


@case("lm cached decode", configs=LM_CASE_CONFIGS, rows=("lm cached prefill", "lm cached decode"))
def lm_cached_decode(setup: Setup) -> list[Row]:
    """TransformerLM logits of the prompts' prefill, then of every one-token cached step."""
    return cached_rows(setup, build_lm(setup), *token_batch(setup))


@case("lm greedy generation", configs=LM_CASE_CONFIGS)
def lm_greedy_generation(setup: Setup) -> list[Row]:
    """Greedy generation after left-padded prompts, torch against JAX: identical tokens."""
    return [generation_row(setup, build_lm(setup), *token_batch(setup))]
