"""Cost of the Mixture-of-Experts layer in eval mode (target 3): how its time grows with the
number of experts, and what it costs next to the dense feed-forward of the same d_ff; for the
original layer (exact-GELU experts with biases) and for the Mixtral-like one (SwiGLU experts
without biases, dropless), with the same targets.

    python -m benchmarks.moe [--quick] [--check]
"""

from __future__ import annotations

from .common import Panel, Result, Target, block, compare_times, main
from .models import SMALL_MIXTRAL

D_MODEL, TOP_K = 256, 2
EXPERTS = (8, 32)
SWIGLU = dict(activation="silu", gated=True, bias=False)
# family: (d_ff, the feed-forward's kind, MoE-only options)
FAMILIES = {
    "original": (1024, {}, {}),
    "Mixtral-like": (
        SMALL_MIXTRAL["d_ff"],
        SWIGLU,
        {"expert_capacity_factor": SMALL_MIXTRAL["expert_capacity_factor"]},
    ),
}


def layers(moe_class, feed_forward_class) -> dict:
    """Each family's MoE layer for every expert count and its dense FFN, keyed "family name",
    built with one framework's classes (in this order: torch draws the weights in it)."""
    modules = {}
    for family, (d_ff, kind, moe_options) in FAMILIES.items():
        for e in EXPERTS:
            modules[f"{family} moe E={e}"] = moe_class(
                D_MODEL, d_ff, e, TOP_K, 0.0, **kind, **moe_options
            )
        modules[f"{family} dense"] = feed_forward_class(D_MODEL, d_ff, 0.0, **kind)
    return modules


def jax_runs(x) -> dict:
    """Jitted eval-mode calls of the MoE layer for each family and expert count, and of the
    dense FFN of the same kind."""
    import jax
    import jax.numpy as jnp

    from jax_block.feed_forward import FeedForward
    from jax_block.moe import MixtureOfExperts

    x = jnp.asarray(x)
    runs = {}
    for name, module in layers(MixtureOfExperts, FeedForward).items():
        params = module.init(jax.random.PRNGKey(0), x)
        apply = jax.jit(module.apply)
        runs[f"jax {name}"] = lambda apply=apply, params=params: block(apply(params, x))
    return runs


def torch_runs(x) -> dict:
    """Eval-mode calls, under inference_mode, of the MoE layer per family and expert count, and
    of the dense FFN of the same kind."""
    import torch

    from torch_block.feed_forward import FeedForward
    from torch_block.moe import MixtureOfExperts

    torch.manual_seed(0)
    x = torch.from_numpy(x)

    def call(module):
        with torch.inference_mode():
            return module(x)

    runs = {}
    for name, module in layers(MixtureOfExperts, FeedForward).items():
        module.eval()
        runs[f"torch {name}"] = lambda m=module: call(m)
    return runs


def grouped_blocks(assignments: int) -> str:
    """How jax_block's grouped path splits `assignments` rows for each expert count."""
    from jax_block.moe import group_block_size

    parts = []
    for e in EXPERTS:
        rows = group_block_size(assignments, e)
        most = (assignments + e * (rows - 1)) // rows  # each expert padded to whole blocks
        parts.append(f"E={e} in blocks of {rows} rows, at most {most} blocks")
    return "; ".join(parts)


def run(quick: bool) -> Result:
    import numpy as np

    batch, seq = (2, 512) if quick else (8, 512)
    repeats = 3 if quick else 7
    x = np.random.default_rng(0).standard_normal((batch, seq, D_MODEL), dtype=np.float32)
    times = compare_times({**jax_runs(x), **torch_runs(x)}, repeats, warmup=2)
    ms = {name: 1e3 * t["median"] for name, t in times.items()}
    rows, targets = [], []
    for family, (d_ff, _, _) in FAMILIES.items():
        label = "" if family == "original" else f"{family} "
        for framework in ("jax", "torch"):
            e8, e32, dense = (
                ms[f"{framework} {family} {n}"] for n in ("moe E=8", "moe E=32", "dense")
            )
            rows.append(
                {
                    "family": family,
                    "framework": framework,
                    "d_ff": d_ff,
                    "dense ms": dense,
                    "moe E=8 ms": e8,
                    "moe E=32 ms": e32,
                    "E=32 / E=8": e32 / e8,
                    "E=8 / dense": e8 / dense,
                }
            )
            targets += [
                Target(f"moe: {framework} {label}time(E=32) / time(E=8)", e32 / e8, 1.3, False),
                Target(
                    f"moe: {framework} {label}time(MoE E=8, k=2) / time(dense)",
                    e8 / dense,
                    3.0,
                    False,
                ),
            ]
    assignments = TOP_K * batch * seq
    groups = ["dense", "moe E=8", "moe E=32"]
    panels = [
        Panel(
            f"{family}: {batch * seq} tokens, d_model {D_MODEL}, d_ff {d_ff}, k={TOP_K}",
            "ms per call",
            groups,
            {fw: [ms[f"{fw} {family} {g}"] for g in groups] for fw in ("jax", "torch")},
        )
        for family, (d_ff, _, _) in FAMILIES.items()
    ]
    return Result(
        name="moe",
        title=f"MoE layer, eval, {batch * seq} tokens, d_model {D_MODEL}, top-{TOP_K}: original "
        "and Mixtral-like",
        columns=[
            "family",
            "framework",
            "d_ff",
            "dense ms",
            "moe E=8 ms",
            "moe E=32 ms",
            "E=32 / E=8",
            "E=8 / dense",
        ],
        rows=rows,
        targets=targets,
        panels=panels,
        notes=[
            f"input ({batch}, {seq}, {D_MODEL}); median of {repeats} calls after 2 warm-ups, "
            "all twelve alternating; JAX: jit(module.apply), torch: eval() under inference_mode",
            "dense = the FeedForward of the same d_ff and kind; a top-2 MoE does twice its FLOPs",
            "original: exact-GELU experts with biases, d_ff 1024; Mixtral-like: SwiGLU experts "
            f"(silu(fc1 x) * fc3 x, then fc2), no biases, d_ff {SMALL_MIXTRAL['d_ff']} (the "
            "small Llama-like model's), expert_capacity_factor None",
            f"JAX's grouped (dropless) path runs the {assignments} assignments through one "
            f"expert per block, in a lax.map over blocks: {grouped_blocks(assignments)}",
            "torch loops over the experts in Python: E=32 pays 4x the per-expert gathers, "
            "products and scatters of E=8, each on a quarter of the rows",
        ],
        quick=quick,
    )


if __name__ == "__main__":
    raise SystemExit(main(run, __doc__))
