"""Decode-step time of the small MoE LM with 8 and with 32 experts (target 4): a step reads only
the weights of the experts its token selects, so 4x the experts should cost little more.

A step's time is (generate of n tokens - generate of 1 token) / (n - 1), so the prefill drops
out.

    python -m benchmarks.moe_decode [--quick] [--check]
"""

from __future__ import annotations

import torch_block

from .common import Panel, Result, Target, block, compare_times, main
from .models import SMALL, prompts, twin_lms

PROMPT_LEN, TOP_K = 16, 2
MODELS = {"dense": {}, **{f"moe E={e}": {"use_moe": True, "num_experts": e} for e in (8, 32)}}


def run(quick: bool) -> Result:
    import torch

    from jax_block.generate import generate

    new_tokens, repeats = (17, 3) if quick else (129, 5)
    ids = prompts(1, PROMPT_LEN, SMALL["vocab_size"])
    torch_ids = torch.from_numpy(ids)
    runs = {}
    for name, extra in MODELS.items():
        torch_lm, flax_lm, params = twin_lms(SMALL, top_k_experts=TOP_K, **extra)
        for n in (1, new_tokens):
            runs[f"jax {name} {n}"] = lambda lm=flax_lm, p=params, n=n: block(
                generate(lm, p, ids, max_new_tokens=n)
            )
            runs[f"torch {name} {n}"] = lambda lm=torch_lm, n=n: torch_block.generate(
                lm, torch_ids, max_new_tokens=n
            )
    times = compare_times(runs, repeats, warmup=1)

    def step_ms(framework: str, name: str) -> float:
        long = times[f"{framework} {name} {new_tokens}"]["median"]
        short = times[f"{framework} {name} 1"]["median"]
        return 1e3 * (long - short) / (new_tokens - 1)

    rows, targets = [], []
    for framework in ("jax", "torch"):
        row = {"framework": framework}
        row.update({f"{name} ms/step": step_ms(framework, name) for name in MODELS})
        row["E=32 / E=8"] = row["moe E=32 ms/step"] / row["moe E=8 ms/step"]
        rows.append(row)
        targets.append(
            Target(f"moe_decode: {framework} step time E=32 / E=8", row["E=32 / E=8"], 1.3, False)
        )
    groups = list(MODELS)
    panels = [
        Panel(
            "decode step, batch 1 (lower is better)",
            "ms / step",
            groups,
            {r["framework"]: [r[f"{g} ms/step"] for g in groups] for r in rows},
        ),
    ]
    return Result(
        name="moe_decode",
        title=f"Decode step of the small LM, dense and MoE (top-{TOP_K}), batch 1",
        columns=["framework", *(f"{g} ms/step" for g in groups), "E=32 / E=8"],
        rows=rows,
        targets=targets,
        panels=panels,
        notes=[
            f"step = (generate {new_tokens} tokens - generate 1 token) / {new_tokens - 1}, "
            f"{PROMPT_LEN}-token prompt; medians of {repeats} runs after a warm-up, all "
            "alternating",
            "expert weights per layer: 2 MiB per expert in float32, so 16 MiB at E=8 and "
            "64 MiB at E=32; a step of one token needs 2 experts per layer",
        ],
    )


if __name__ == "__main__":
    raise SystemExit(main(run, __doc__))
