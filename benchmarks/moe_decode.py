"""Decode-step time of the small MoE LM with 8 and with 32 experts (target 4): a step reads only
the weights of the experts its token selects, so 4x the experts should cost little more. The
original model (exact-GELU experts) and the Mixtral-like one (Llama-like attention, SwiGLU
experts, dropless) have the same target.

A step's time is (generate of n tokens - generate of 1 token) / (n - 1), so the prefill drops
out.

    python -m benchmarks.moe_decode [--quick] [--check]
"""

from __future__ import annotations

import torch_block

from .common import Panel, Result, Target, block, compare_times, main
from .models import SMALL, SMALL_LLAMA, SMALL_MIXTRAL, prompts, twin_lms

PROMPT_LEN, TOP_K = 16, 2
EXPERTS = (8, 32)
# family: {model: config}; "dense" is the family's model without MoE, for reference
FAMILIES = {
    "original": {
        "dense": SMALL,
        **{
            f"moe E={e}": {**SMALL, "use_moe": True, "num_experts": e, "top_k_experts": TOP_K}
            for e in EXPERTS
        },
    },
    "Mixtral-like": {
        "dense": SMALL_LLAMA,
        **{f"moe E={e}": {**SMALL_MIXTRAL, "num_experts": e} for e in EXPERTS},
    },
}
MODELS = ("dense", *(f"moe E={e}" for e in EXPERTS))


def run(quick: bool) -> Result:
    import torch

    from jax_block.generate import generate

    new_tokens, repeats = (17, 3) if quick else (129, 5)
    ids = prompts(1, PROMPT_LEN, SMALL["vocab_size"])
    torch_ids = torch.from_numpy(ids)
    runs = {}
    for family, models in FAMILIES.items():
        for name, config in models.items():
            torch_lm, flax_lm, params = twin_lms(config)
            for n in (1, new_tokens):
                runs[f"jax {family} {name} {n}"] = lambda lm=flax_lm, p=params, n=n: block(
                    generate(lm, p, ids, max_new_tokens=n)
                )
                runs[f"torch {family} {name} {n}"] = lambda lm=torch_lm, n=n: torch_block.generate(
                    lm, torch_ids, max_new_tokens=n
                )
    times = compare_times(runs, repeats, warmup=1)

    def step_ms(framework: str, family: str, name: str) -> float:
        long = times[f"{framework} {family} {name} {new_tokens}"]["median"]
        short = times[f"{framework} {family} {name} 1"]["median"]
        return 1e3 * (long - short) / (new_tokens - 1)

    rows, targets = [], []
    for family in FAMILIES:
        label = "" if family == "original" else f"{family} "
        for framework in ("jax", "torch"):
            row = {"family": family, "framework": framework}
            row.update({f"{name} ms/step": step_ms(framework, family, name) for name in MODELS})
            row["E=32 / E=8"] = row["moe E=32 ms/step"] / row["moe E=8 ms/step"]
            rows.append(row)
            targets.append(
                Target(
                    f"moe_decode: {framework} {label}step time E=32 / E=8",
                    row["E=32 / E=8"],
                    1.3,
                    False,
                )
            )
    panels = [
        Panel(
            f"{family} decode step, batch 1 (lower is better)",
            "ms / step",
            list(MODELS),
            {
                r["framework"]: [r[f"{m} ms/step"] for m in MODELS]
                for r in rows
                if r["family"] == family
            },
        )
        for family in FAMILIES
    ]
    return Result(
        name="moe_decode",
        title=f"Decode step of the small LMs, dense and MoE (top-{TOP_K}), batch 1: original "
        "and Mixtral-like",
        columns=["family", "framework", *(f"{m} ms/step" for m in MODELS), "E=32 / E=8"],
        rows=rows,
        targets=targets,
        panels=panels,
        notes=[
            f"step = (generate {new_tokens} tokens - generate 1 token) / {new_tokens - 1}, "
            f"{PROMPT_LEN}-token prompt; medians of {repeats} runs after a warm-up, all "
            "alternating",
            "original: expert weights per layer 2 MiB per expert in float32 (exact GELU, d_ff "
            "1024, biases), so 16 MiB at E=8 and 64 MiB at E=32; a step of one token needs 2 "
            "experts per layer",
            "Mixtral-like: the small Llama-like model (GQA 4:1, rope, RMSNorm, no biases, "
            f"untied head) with SwiGLU experts of d_ff {SMALL_MIXTRAL['d_ff']} (2.25 MiB each "
            "in float32), expert_capacity_factor None; its dense row is the Llama-like model "
            "with one SwiGLU feed-forward",
        ],
    )


if __name__ == "__main__":
    raise SystemExit(main(run, __doc__))
