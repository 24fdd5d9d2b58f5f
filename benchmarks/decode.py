"""Greedy generation speed of the small LM: JAX `generate` against torch_block's eager
`generate`, with JAX's compile time and compilation count reported apart (targets 1 and 6).

    python -m benchmarks.decode [--quick] [--check]
"""

from __future__ import annotations

import time

import numpy as np

import torch_block

from .common import CompileLog, Panel, Result, Target, block, compare_times, main
from .models import SMALL, prompts, twin_lms

PROMPT_LEN = 16
VARIANTS = [(1, "float32"), (8, "float32"), (1, "bfloat16")]  # (batch, dtype); first: target 1


def measure_variant(batch: int, dtype: str, new_tokens: int, repeats: int) -> dict:
    """Tokens/s of both frameworks, JAX's first-call compile time, and token agreement."""
    import torch

    from jax_block.generate import generate

    torch_lm, flax_lm, params = twin_lms(SMALL, dtype)
    ids = prompts(batch, PROMPT_LEN, SMALL["vocab_size"])
    torch_ids = torch.from_numpy(ids)

    def run_jax():
        return block(generate(flax_lm, params, ids, max_new_tokens=new_tokens))

    def run_torch():
        return torch_block.generate(torch_lm, torch_ids, max_new_tokens=new_tokens)

    with CompileLog() as log:
        start = time.perf_counter()
        jax_tokens = run_jax()
        first_call = time.perf_counter() - start
    times = compare_times({"jax": run_jax, "torch": run_torch}, repeats, warmup=1)
    same = float(np.mean(np.asarray(jax_tokens) == run_torch().numpy()))
    jax_rate = batch * new_tokens / times["jax"]["median"]
    torch_rate = batch * new_tokens / times["torch"]["median"]
    return {
        "variant": f"batch {batch}, {dtype}",
        "jax tok/s": jax_rate,
        "torch tok/s": torch_rate,
        "jax/torch": jax_rate / torch_rate,
        "jax compile s": log.seconds("generate_tokens"),
        "jax first call s": first_call,
        "compilations": log.count("generate_tokens"),
        "same tokens": same,
        "times": times,
    }


def bucket_compilations(new_tokens: int) -> dict[int, int]:
    """Compilations of `generate_tokens` for prompts of 16, 11, 5 tokens (bucket 16) and of 17,
    25, 32 tokens (bucket 32), at a max_new_tokens not compiled before."""
    from jax_block.generate import generate, prompt_bucket

    _, flax_lm, params = twin_lms(SMALL)
    counts: dict[int, int] = {}
    for lengths in ((16, 11, 5), (17, 25, 32)):
        with CompileLog() as log:
            for length in lengths:
                ids = prompts(1, length, SMALL["vocab_size"], seed=length)
                block(generate(flax_lm, params, ids, max_new_tokens=new_tokens))
        counts[prompt_bucket(lengths[0])] = log.count("generate_tokens")
    return counts


def run(quick: bool) -> Result:
    new_tokens, repeats = (32, 3) if quick else (256, 7)
    variants = [measure_variant(b, dtype, new_tokens, repeats) for b, dtype in VARIANTS]
    buckets = bucket_compilations(new_tokens=8)
    main_variant = variants[0]
    targets = [
        Target("decode: JAX / torch tokens/s, batch 1 float32", main_variant["jax/torch"], 3.0),
        Target(
            "decode: JAX generate compile s, batch 1 float32",
            main_variant["jax compile s"],
            10.0,
            higher_is_better=False,
        ),
        Target(
            "decode: compilations per prompt bucket (16, 32)",
            float(max(buckets.values())),
            1.0,
            higher_is_better=False,
        ),
    ]
    groups = [v["variant"] for v in variants]
    panels = [
        Panel(
            "tokens/s (higher is better)",
            "tokens / s",
            groups,
            {
                "jax": [v["jax tok/s"] for v in variants],
                "torch": [v["torch tok/s"] for v in variants],
            },
        ),
        Panel(
            "JAX / torch tokens/s",
            "ratio",
            groups,
            {"jax/torch": [v["jax/torch"] for v in variants]},
            [(3.0, "target 3x")],
        ),
    ]
    return Result(
        name="decode",
        title=f"Greedy decode, small LM, {PROMPT_LEN}-token prompt, {new_tokens} new tokens",
        columns=[
            "variant",
            "jax tok/s",
            "torch tok/s",
            "jax/torch",
            "jax compile s",
            "jax first call s",
            "compilations",
            "same tokens",
        ],
        rows=variants,
        targets=targets,
        panels=panels,
        notes=[
            f"median of {repeats} runs after a warm-up, JAX and torch alternating; tokens/s "
            "= batch * new tokens / wall time of the whole generate call (prefill included)",
            "jax compile s = tracing + lowering + XLA compilation of generate_tokens, from "
            "jax.monitoring; jax first call s also includes running it once",
            f"compilations of generate_tokens per prompt bucket: {buckets} "
            "(prompts of 16, 11, 5 tokens, then of 17, 25, 32 tokens)",
            "same tokens = share of greedy tokens equal in both frameworks (same weights)",
        ],
    )


if __name__ == "__main__":
    raise SystemExit(main(run, __doc__))
