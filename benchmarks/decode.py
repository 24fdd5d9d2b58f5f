"""Greedy generation speed of the small LMs (the original architecture and the Llama-like one):
JAX `generate` against torch_block's eager `generate`, with JAX's compile time and compilation
count reported apart. Targets: each framework's token time at most 1.25x its own matrix products
alone (issue 23: at this size both sit near them, so JAX / torch, once >= 3, no longer measures
the program, and is reported only), and the compile time and count (targets 1 and 6; the
Llama-like model has the same targets).

    python -m benchmarks.decode [--quick] [--check]
"""

from __future__ import annotations

import time

import numpy as np

import torch_block

from .common import CompileLog, Panel, Result, Target, block, compare_times, main
from .models import SMALL, SMALL_LLAMA, prompts, twin_lms
from .products import product_seconds

PROMPT_LEN = 16
PRODUCTS_RATIO = 1.25  # a token's time over its framework's matrix products alone, at most
MODELS = {"original": SMALL, "Llama-like": SMALL_LLAMA}
# (model, batch, dtype); the batch 1 float32 ones carry the targets
VARIANTS = [
    ("original", 1, "float32"),
    ("original", 8, "float32"),
    ("original", 1, "bfloat16"),
    ("Llama-like", 1, "float32"),
]


def variant_name(model: str, batch: int, dtype: str) -> str:
    """The row's label: "batch 1, float32" (original model), "Llama-like, batch 1, float32"."""
    return f"{'' if model == 'original' else model + ', '}batch {batch}, {dtype}"


def measure_variant(model: str, batch: int, dtype: str, new_tokens: int, repeats: int) -> dict:
    """Tokens/s of both frameworks, JAX's first-call compile time, and token agreement."""
    import torch

    from jax_block.generate import generate

    config = MODELS[model]
    torch_lm, flax_lm, params = twin_lms(config, dtype)
    ids = prompts(batch, PROMPT_LEN, config["vocab_size"])
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
    row = {
        "variant": variant_name(model, batch, dtype),
        "jax tok/s": jax_rate,
        "torch tok/s": torch_rate,
        "jax/torch": jax_rate / torch_rate,
        "jax compile s": log.seconds("generate_tokens"),
        "jax first call s": first_call,
        "compilations": log.count("generate_tokens"),
        "same tokens": same,
        "times": times,
    }
    if batch == 1 and dtype == "float32":
        # the floor under a step: its matrix products alone, in each framework
        products = product_seconds(torch_lm, steps=new_tokens, repeats=repeats)
        row["jax products ms"] = 1e3 * products["jax"]
        row["torch products ms"] = 1e3 * products["torch"]
        # the most JAX / torch can reach while JAX's step is no faster than its products
        row["jax/torch ceiling"] = 1e3 / torch_rate / row["jax products ms"]
        # a token's time over its own framework's products alone (target 6 of issue 23)
        row["jax x products"] = 1e3 / jax_rate / row["jax products ms"]
        row["torch x products"] = 1e3 / torch_rate / row["torch products ms"]
    return row


def bucket_compilations(config: dict, new_tokens: int) -> dict[int, int]:
    """Compilations of `generate_tokens` for prompts of 16, 11, 5 tokens (bucket 16) and of 17,
    25, 32 tokens (bucket 32), at a max_new_tokens not compiled before."""
    from jax_block.generate import generate, prompt_bucket

    _, flax_lm, params = twin_lms(config)
    counts: dict[int, int] = {}
    for lengths in ((16, 11, 5), (17, 25, 32)):
        with CompileLog() as log:
            for length in lengths:
                ids = prompts(1, length, config["vocab_size"], seed=length)
                block(generate(flax_lm, params, ids, max_new_tokens=new_tokens))
        counts[prompt_bucket(lengths[0])] = log.count("generate_tokens")
    return counts


def run(quick: bool) -> Result:
    new_tokens, repeats = (32, 3) if quick else (256, 7)
    variants = [measure_variant(*variant, new_tokens, repeats) for variant in VARIANTS]
    buckets = {model: bucket_compilations(config, new_tokens=8) for model, config in MODELS.items()}
    targets = []
    for model in MODELS:
        row = next(v for v in variants if v["variant"] == variant_name(model, 1, "float32"))
        prefix = f"decode: {'' if model == 'original' else model + ' '}"
        targets += [
            Target(
                f"{prefix}JAX token time / its matrix products alone, batch 1 float32",
                row["jax x products"],
                PRODUCTS_RATIO,
                higher_is_better=False,
            ),
            Target(
                f"{prefix}torch token time / its matrix products alone, batch 1 float32",
                row["torch x products"],
                PRODUCTS_RATIO,
                higher_is_better=False,
            ),
            Target(
                f"{prefix}JAX generate compile s, batch 1 float32",
                row["jax compile s"],
                10.0,
                higher_is_better=False,
            ),
            Target(
                f"{prefix}compilations per prompt bucket (16, 32)",
                float(max(buckets[model].values())),
                1.0,
                higher_is_better=False,
            ),
        ]
    floors = "; ".join(
        f"{v['variant']}: JAX {v['jax products ms']:.3f} ms, torch {v['torch products ms']:.3f} "
        f"ms per step, while a generated token takes JAX {1e3 / v['jax tok/s']:.3f} ms and torch "
        f"{1e3 / v['torch tok/s']:.3f} ms"
        for v in variants
        if "jax products ms" in v
    )
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
            "token time / its matrix products alone, batch 1 float32",
            "ratio",
            [v["variant"] for v in variants if "jax x products" in v],
            {
                framework: [v[f"{framework} x products"] for v in variants if "jax x products" in v]
                for framework in ("jax", "torch")
            },
            [(PRODUCTS_RATIO, f"target {PRODUCTS_RATIO:g}x")],
        ),
    ]
    return Result(
        name="decode",
        title=f"Greedy decode, small LMs, {PROMPT_LEN}-token prompt, {new_tokens} new tokens",
        columns=[
            "variant",
            "jax tok/s",
            "torch tok/s",
            "jax/torch",
            "jax/torch ceiling",
            "jax x products",
            "torch x products",
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
            "compilations of generate_tokens per prompt bucket: "
            f"{buckets['original']} original, {buckets['Llama-like']} Llama-like "
            "(prompts of 16, 11, 5 tokens, then of 17, 25, 32 tokens)",
            "small LM: vocab 1024, d_model 256, 4 layers, 8 heads, d_ff 1024, exact GELU, "
            "learned positions, tied head; Llama-like: the same with 2 key/value heads (GQA "
            "4:1), rope, RMSNorm, SwiGLU of d_ff 768, no biases, untied head",
            "same tokens = share of greedy tokens equal in both frameworks (same weights)",
            "the matrix products of a batch-1 step alone (every weight matrix the step reads "
            "whole, once, as a (1, in) x (in, out) product, no model around them; median of "
            f"{repeats} runs of {new_tokens} steps, alternating): {floors}; jax/torch ceiling "
            "= torch's time per token / JAX's products: the most JAX / torch can reach while "
            "JAX's step takes at least its products' time",
        ],
    )


if __name__ == "__main__":
    raise SystemExit(main(run, __doc__))
