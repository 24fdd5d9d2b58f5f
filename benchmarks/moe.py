"""Cost of the Mixture-of-Experts layer in eval mode (target 3): how its time grows with the
number of experts, and what it costs next to the dense feed-forward of the same d_ff.

    python -m benchmarks.moe [--quick] [--check]
"""

from __future__ import annotations

from .common import Panel, Result, Target, block, compare_times, main

D_MODEL, D_FF, TOP_K = 256, 1024, 2
EXPERTS = (8, 32)


def jax_runs(x) -> dict:
    """Jitted eval-mode calls of the MoE layer for each expert count, and of the dense FFN."""
    import jax
    import jax.numpy as jnp

    from jax_block.feed_forward import FeedForward
    from jax_block.moe import MixtureOfExperts

    x = jnp.asarray(x)
    modules = {f"moe E={e}": MixtureOfExperts(D_MODEL, D_FF, e, TOP_K, 0.0) for e in EXPERTS}
    modules["dense"] = FeedForward(D_MODEL, D_FF, 0.0)
    runs = {}
    for name, module in modules.items():
        params = module.init(jax.random.PRNGKey(0), x)
        apply = jax.jit(module.apply)
        runs[f"jax {name}"] = lambda apply=apply, params=params: block(apply(params, x))
    return runs


def torch_runs(x) -> dict:
    """Eval-mode calls, under inference_mode, of the MoE layer per expert count and the FFN."""
    import torch

    from torch_block.feed_forward import FeedForward
    from torch_block.moe import MixtureOfExperts

    torch.manual_seed(0)
    x = torch.from_numpy(x)
    modules = {f"moe E={e}": MixtureOfExperts(D_MODEL, D_FF, e, TOP_K, 0.0) for e in EXPERTS}
    modules["dense"] = FeedForward(D_MODEL, D_FF, 0.0)

    def call(module):
        with torch.inference_mode():
            return module(x)

    for module in modules.values():
        module.eval()
    return {f"torch {name}": lambda m=m: call(m) for name, m in modules.items()}


def run(quick: bool) -> Result:
    import numpy as np

    batch, seq = (2, 512) if quick else (8, 512)
    repeats = 3 if quick else 7
    x = np.random.default_rng(0).standard_normal((batch, seq, D_MODEL), dtype=np.float32)
    times = compare_times({**jax_runs(x), **torch_runs(x)}, repeats, warmup=2)
    ms = {name: 1e3 * t["median"] for name, t in times.items()}
    rows, targets = [], []
    for framework in ("jax", "torch"):
        e8, e32, dense = (ms[f"{framework} {n}"] for n in ("moe E=8", "moe E=32", "dense"))
        rows.append(
            {
                "framework": framework,
                "dense ms": dense,
                "moe E=8 ms": e8,
                "moe E=32 ms": e32,
                "E=32 / E=8": e32 / e8,
                "E=8 / dense": e8 / dense,
            }
        )
        targets += [
            Target(f"moe: {framework} time(E=32) / time(E=8)", e32 / e8, 1.3, False),
            Target(f"moe: {framework} time(MoE E=8, k=2) / time(dense)", e8 / dense, 3.0, False),
        ]
    groups = ["dense", "moe E=8", "moe E=32"]
    panels = [
        Panel(
            f"{batch * seq} tokens, d_model {D_MODEL}, d_ff {D_FF}, k={TOP_K}",
            "ms per call",
            groups,
            {fw: [ms[f"{fw} {g}"] for g in groups] for fw in ("jax", "torch")},
        ),
    ]
    return Result(
        name="moe",
        title=f"MoE layer, eval, {batch * seq} tokens, d_model {D_MODEL}, d_ff {D_FF}, top-{TOP_K}",
        columns=["framework", "dense ms", "moe E=8 ms", "moe E=32 ms", "E=32 / E=8", "E=8 / dense"],
        rows=rows,
        targets=targets,
        panels=panels,
        notes=[
            f"input ({batch}, {seq}, {D_MODEL}); median of {repeats} calls after 2 warm-ups, "
            "all six alternating; JAX: jit(module.apply), torch: eval() under inference_mode",
            "dense = the FeedForward of the same d_ff; a top-2 MoE does twice its FLOPs",
        ],
        quick=quick,
    )


if __name__ == "__main__":
    raise SystemExit(main(run, __doc__))
