"""Memory-bandwidth use of decoding the medium dense LM and its Llama-like twin (target 2, the
same for both).

Utilisation = bytes that one decode step must read (every weight it uses whole once, plus the
cached keys and values written so far: n_kv_heads heads, so a GQA cache reads less) / step
time, divided by the copy bandwidth of a large array measured in the same run. A decode step's
time is (generate of n tokens - generate of 1 token) / (n - 1), so the prefill drops out.

    python -m benchmarks.bandwidth [--quick] [--check]
"""

from __future__ import annotations

import numpy as np

import torch_block

from .common import Panel, Result, Target, block, compare_times, main
from .models import MEDIUM, MEDIUM_LLAMA, cache_bytes, prompts, step_weight_bytes, twin_lms

PROMPT_LEN = 16
MODELS = {"dense": MEDIUM, "Llama-like": MEDIUM_LLAMA}
# (model, batch, dtype); the batch 1 float32 ones carry the targets
VARIANTS = [
    ("dense", 1, "float32"),
    ("dense", 1, "bfloat16"),
    ("dense", 8, "float32"),
    ("Llama-like", 1, "float32"),
]


def variant_name(model: str, batch: int, dtype: str) -> str:
    """The row's label: "batch 1, float32" (dense model), "Llama-like, batch 1, float32"."""
    return f"{'' if model == 'dense' else model + ', '}batch {batch}, {dtype}"


def copy_bandwidth(nbytes: int, repeats: int) -> dict[str, float]:
    """Bytes read + written per second when copying a float32 array of `nbytes`, with NumPy,
    torch and a jitted JAX elementwise op (each array is read once and written once)."""
    import jax
    import jax.numpy as jnp
    import torch

    src = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    torch_src, torch_dst = torch.from_numpy(src), torch.from_numpy(dst)
    jax_src = jnp.asarray(src)
    add_one = jax.jit(lambda x: x + 1.0)
    times = compare_times(
        {
            "numpy": lambda: np.copyto(dst, src),
            "torch": lambda: torch_dst.copy_(torch_src),
            "jax": lambda: block(add_one(jax_src)),
        },
        repeats,
        warmup=1,
    )
    return {name: 2 * src.nbytes / t["median"] for name, t in times.items()}


def torch_linear_bandwidth(torch_lm, repeats: int) -> float:
    """Bytes per second that torch's own F.linear reads at batch 1 over every weight matrix that
    a decode step reads whole (one call each, no model around them; the embedding tables only
    indexed are left out): the most its eager decode can reach."""
    import torch
    import torch.nn.functional as F

    indexed = ("position_embedding",) + (
        ("token_embedding",) if torch_lm.lm_head is not None else ()
    )
    weights = [
        p
        for name, p in torch_lm.named_parameters()
        if p.dim() == 2 and not name.startswith(indexed)
    ]
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}

    def one_pass() -> None:
        with torch.inference_mode():
            for w in weights:
                F.linear(inputs[w.shape[1]], w)

    seconds = compare_times({"linear": one_pass}, repeats, warmup=1)["linear"]["median"]
    return sum(w.numel() * w.element_size() for w in weights) / seconds


def measure_variant(model: str, batch: int, dtype: str, new_tokens: int, repeats: int) -> dict:
    """Decode-step time and bytes per step of both frameworks."""
    import torch

    from jax_block.generate import generate

    config = MODELS[model]
    torch_lm, flax_lm, params = twin_lms(config, dtype)
    ids = prompts(batch, PROMPT_LEN, config["vocab_size"])
    torch_ids = torch.from_numpy(ids)
    runs = {}
    for n in (1, new_tokens):
        runs[f"jax {n}"] = lambda n=n: block(generate(flax_lm, params, ids, max_new_tokens=n))
        runs[f"torch {n}"] = lambda n=n: torch_block.generate(torch_lm, torch_ids, max_new_tokens=n)
    times = compare_times(runs, repeats, warmup=1)
    itemsize = 2 if dtype == "bfloat16" else 4
    mean_position = PROMPT_LEN + new_tokens / 2  # cached tokens read by the average step
    kv_bytes = cache_bytes(config, batch, round(mean_position), itemsize)
    step_bytes = step_weight_bytes(params) + kv_bytes
    row = {
        "variant": variant_name(model, batch, dtype),
        "MB read/step": step_bytes / 1e6,
        "KV MB read/step": kv_bytes / 1e6,
    }
    for framework in ("jax", "torch"):
        t_long = times[f"{framework} {new_tokens}"]["median"]
        t_short = times[f"{framework} 1"]["median"]
        step = (t_long - t_short) / (new_tokens - 1)
        row[f"{framework} ms/step"] = 1e3 * step
        row[f"{framework} GB/s"] = step_bytes / step / 1e9
    row["times"] = times
    if batch == 1:
        row["torch F.linear GB/s"] = torch_linear_bandwidth(torch_lm, 2 * repeats + 1) / 1e9
    return row


def run(quick: bool) -> Result:
    new_tokens, repeats, copy_mb = (9, 2, 256) if quick else (25, 3, 1024)
    copy = copy_bandwidth(copy_mb * 2**20, repeats=5)
    reference = max(copy.values())
    variants = [measure_variant(*variant, new_tokens, repeats) for variant in VARIANTS]
    for row in variants:
        for framework in ("jax", "torch"):
            row[f"{framework} util"] = row[f"{framework} GB/s"] * 1e9 / reference
    main = {
        m: next(v for v in variants if v["variant"] == variant_name(m, 1, "float32"))
        for m in MODELS
    }
    targets = []
    for model, row in main.items():
        prefix = f"bandwidth: {'' if model == 'dense' else model + ' '}"
        targets += [
            Target(f"{prefix}JAX utilisation, batch 1 float32", row["jax util"], 0.70),
            Target(f"{prefix}torch utilisation, batch 1 float32", row["torch util"], 0.50),
        ]
    groups = [v["variant"] for v in variants]
    panels = [
        Panel(
            "share of copy bandwidth",
            "utilisation",
            groups,
            {
                "jax": [v["jax util"] for v in variants],
                "torch": [v["torch util"] for v in variants],
            },
            [(0.7, "JAX target"), (0.5, "torch target")],
        ),
        Panel(
            "decode step (lower is better)",
            "ms / step",
            groups,
            {
                "jax": [v["jax ms/step"] for v in variants],
                "torch": [v["torch ms/step"] for v in variants],
            },
        ),
    ]
    copies = ", ".join(f"{name} {bw / 1e9:.1f} GB/s" for name, bw in copy.items())
    ceilings = "; ".join(
        f"{model} {row['torch F.linear GB/s']:.1f} GB/s, "
        f"{row['torch F.linear GB/s'] * 1e9 / reference:.2f} of the copy bandwidth, of which "
        f"torch's decode reaches {row['torch GB/s'] / row['torch F.linear GB/s']:.2f}"
        for model, row in main.items()
    )
    return Result(
        name="bandwidth",
        title="Memory-bandwidth use, medium LM decode, dense and Llama-like (d_model 1024)",
        columns=[
            "variant",
            "MB read/step",
            "KV MB read/step",
            "jax ms/step",
            "torch ms/step",
            "jax GB/s",
            "torch GB/s",
            "jax util",
            "torch util",
        ],
        rows=variants,
        targets=targets,
        panels=panels,
        notes=[
            f"copy bandwidth of a {copy_mb} MiB float32 array, (read + written) / time, median "
            f"of 5: {copies}; the reference is the fastest, {reference / 1e9:.1f} GB/s",
            f"step time = (generate {new_tokens} tokens - generate 1 token) / {new_tokens - 1}, "
            f"medians of {repeats} runs after a warm-up, all runs alternating",
            "bytes per step = all weights but the tables only indexed (learned positions; the "
            "token embedding when the head is untied; a tied embedding counts once, as the "
            f"head) + keys and values of the {PROMPT_LEN + new_tokens // 2} tokens cached at "
            "the average step, n_kv_heads * head_dim per token and layer",
            "medium LM: vocab 8192, d_model 1024, 8 layers, 16 heads, d_ff 4096, exact GELU, "
            "tied head; Llama-like: 4 key/value heads (GQA 4:1), rope, RMSNorm, SwiGLU of d_ff "
            "2816, no biases, untied head",
            "torch's own F.linear at batch 1 over the same float32 weights, no model around "
            f"it: {ceilings}",
        ],
    )


if __name__ == "__main__":
    raise SystemExit(main(run, __doc__))
