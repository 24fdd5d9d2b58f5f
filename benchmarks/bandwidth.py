"""Memory-bandwidth use of decoding the medium dense LM (target 2).

Utilisation = bytes that one decode step must read (every weight once, plus the cached keys and
values written so far) / step time, divided by the copy bandwidth of a large array measured in
the same run. A decode step's time is (generate of n tokens - generate of 1 token) / (n - 1),
so the prefill drops out.

    python -m benchmarks.bandwidth [--quick] [--check]
"""

from __future__ import annotations

import numpy as np

import torch_block

from .common import Panel, Result, Target, block, compare_times, main
from .models import MEDIUM, cache_bytes, prompts, tree_bytes, twin_lms

PROMPT_LEN = 16
VARIANTS = [(1, "float32"), (1, "bfloat16"), (8, "float32")]  # (batch, dtype); the first: target 2


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
    """Bytes per second that torch's own F.linear reads at batch 1 over every weight matrix of
    `torch_lm` (one call each, no model around them): the most its eager decode can reach."""
    import torch
    import torch.nn.functional as F

    weights = [
        p for name, p in torch_lm.named_parameters() if p.dim() == 2 and "position" not in name
    ]
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}

    def one_pass() -> None:
        with torch.inference_mode():
            for w in weights:
                F.linear(inputs[w.shape[1]], w)

    seconds = compare_times({"linear": one_pass}, repeats, warmup=1)["linear"]["median"]
    return sum(w.numel() * w.element_size() for w in weights) / seconds


def measure_variant(batch: int, dtype: str, new_tokens: int, repeats: int) -> dict:
    """Decode-step time and bytes per step of both frameworks."""
    import torch

    from jax_block.generate import generate

    torch_lm, flax_lm, params = twin_lms(MEDIUM, dtype)
    ids = prompts(batch, PROMPT_LEN, MEDIUM["vocab_size"])
    torch_ids = torch.from_numpy(ids)
    runs = {}
    for n in (1, new_tokens):
        runs[f"jax {n}"] = lambda n=n: block(generate(flax_lm, params, ids, max_new_tokens=n))
        runs[f"torch {n}"] = lambda n=n: torch_block.generate(torch_lm, torch_ids, max_new_tokens=n)
    times = compare_times(runs, repeats, warmup=1)
    itemsize = 2 if dtype == "bfloat16" else 4
    position_table = MEDIUM["max_seq_len"] * MEDIUM["d_model"] * itemsize  # one row read per token
    weights = tree_bytes(params) - position_table
    mean_position = PROMPT_LEN + new_tokens / 2  # cached tokens read by the average step
    step_bytes = weights + cache_bytes(MEDIUM, batch, round(mean_position), itemsize)
    row = {"variant": f"batch {batch}, {dtype}", "MB read/step": step_bytes / 1e6}
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
    variants = [measure_variant(b, dtype, new_tokens, repeats) for b, dtype in VARIANTS]
    for row in variants:
        for framework in ("jax", "torch"):
            row[f"{framework} util"] = row[f"{framework} GB/s"] * 1e9 / reference
    main_variant = variants[0]
    targets = [
        Target("bandwidth: JAX utilisation, batch 1 float32", main_variant["jax util"], 0.70),
        Target("bandwidth: torch utilisation, batch 1 float32", main_variant["torch util"], 0.50),
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
    ceiling = main_variant["torch F.linear GB/s"]
    return Result(
        name="bandwidth",
        title="Memory-bandwidth use, medium dense LM decode (d_model 1024, 8 layers)",
        columns=[
            "variant",
            "MB read/step",
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
            "bytes per step = all weights (the tied embedding once, as the LM head) + keys and "
            f"values of the {PROMPT_LEN + new_tokens // 2} tokens cached at the average step",
            f"torch's own F.linear at batch 1 over the same float32 weights, no model around it: "
            f"{ceiling:.1f} GB/s, {ceiling * 1e9 / reference:.2f} of the copy bandwidth; torch's "
            f"decode reaches {main_variant['torch GB/s'] / ceiling:.2f} of it",
        ],
    )


if __name__ == "__main__":
    raise SystemExit(main(run, __doc__))
