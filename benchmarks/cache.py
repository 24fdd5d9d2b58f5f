"""Speed-up of decoding with the KV cache over recomputing the whole sequence for every new
token (target 5), small LM, batch 1, greedy, in both frameworks.

The recomputing baselines: torch runs the model on the growing sequence each step; JAX runs a
jitted forward on the sequence right-padded to the next multiple of 128 tokens (static shapes:
one compilation per multiple; causal attention makes the padding invisible to the last real
token), so its baseline does at most 127 tokens of extra work per step.

    python -m benchmarks.cache [--quick] [--check]
"""

from __future__ import annotations

import numpy as np

import torch_block

from .common import Panel, Result, Target, block, compare_times, main
from .models import SMALL, prompts, twin_lms

PROMPT_LEN, JAX_PAD = 16, 128


def jax_recompute(flax_lm, params, ids: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy tokens (B, new_tokens), running the model on the whole sequence every step
    (right-padded to a multiple of JAX_PAD; one compilation per padded length)."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def next_token(params, ids, last):
        logits = flax_lm.apply({"params": params}, ids)  # (B, T_padded, V)
        return jnp.argmax(jax.lax.dynamic_index_in_dim(logits, last, 1, False), axis=-1)  # (B,)

    B, L = ids.shape
    total = L + new_tokens
    sequence = np.zeros((B, -(-total // JAX_PAD) * JAX_PAD), np.int32)
    sequence[:, :L] = ids
    for t in range(L, total):
        padded = -(-t // JAX_PAD) * JAX_PAD
        token = next_token(params, jnp.asarray(sequence[:, :padded]), t - 1)
        sequence[:, t] = np.asarray(token)
    return sequence[:, L:total]


def torch_recompute(torch_lm, ids, new_tokens: int):
    """Greedy tokens (B, new_tokens), running the model on the growing sequence every step."""
    import torch

    sequence = ids
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits = torch_lm(sequence)  # (B, T, V)
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return sequence[:, ids.shape[1] :]


def run(quick: bool) -> Result:
    import torch

    from jax_block.generate import generate

    new_tokens, repeats = (64, 2) if quick else (512, 3)
    torch_lm, flax_lm, params = twin_lms(SMALL)
    ids = prompts(1, PROMPT_LEN, SMALL["vocab_size"])
    torch_ids = torch.from_numpy(ids)
    runs = {
        "jax cached": lambda: block(generate(flax_lm, params, ids, max_new_tokens=new_tokens)),
        "jax recompute": lambda: jax_recompute(flax_lm, params, ids, new_tokens),
        "torch cached": lambda: torch_block.generate(
            torch_lm, torch_ids, max_new_tokens=new_tokens
        ),
        "torch recompute": lambda: torch_recompute(torch_lm, torch_ids, new_tokens),
    }
    times = compare_times(runs, repeats, warmup=1)
    same = {
        "jax": float(np.mean(np.asarray(runs["jax cached"]()) == runs["jax recompute"]())),
        "torch": float((runs["torch cached"]() == runs["torch recompute"]()).float().mean().item()),
    }
    rows, targets = [], []
    for framework in ("jax", "torch"):
        cached = times[f"{framework} cached"]["median"]
        recompute = times[f"{framework} recompute"]["median"]
        rows.append(
            {
                "framework": framework,
                "cached s": cached,
                "recompute s": recompute,
                "speed-up": recompute / cached,
                "same tokens": same[framework],
            }
        )
        targets.append(
            Target(
                f"cache: {framework} recompute / cached time, {new_tokens} tokens",
                recompute / cached,
                10.0,
            )
        )
    panels = [
        Panel(
            f"{new_tokens} new tokens (lower is better)",
            "seconds",
            ["cached", "recompute"],
            {r["framework"]: [r["cached s"], r["recompute s"]] for r in rows},
        ),
        Panel(
            "speed-up of the cache",
            "recompute / cached",
            [r["framework"] for r in rows],
            {"speed-up": [r["speed-up"] for r in rows]},
            [(10.0, "target 10x")],
        ),
    ]
    return Result(
        name="cache",
        title=f"KV cache against recomputation, small LM, batch 1, {new_tokens} new tokens",
        columns=["framework", "cached s", "recompute s", "speed-up", "same tokens"],
        rows=rows,
        targets=targets,
        panels=panels,
        notes=[
            f"{PROMPT_LEN}-token prompt, greedy; median of {repeats} runs after a warm-up, all "
            "four alternating; cached = each framework's generate",
            "recompute: torch runs the growing sequence; JAX runs it right-padded to a "
            f"multiple of {JAX_PAD} tokens (one compilation per multiple)",
            "same tokens = share of tokens equal between cached and recomputed decoding",
        ],
    )


if __name__ == "__main__":
    raise SystemExit(main(run, __doc__))
