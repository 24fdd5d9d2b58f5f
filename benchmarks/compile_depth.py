"""JAX compile time against depth (issue 23, target 5): the first call of `jax_block.generate`
for models of the same width and 4, 8, 16 or 32 layers, each depth in a fresh process with no
persistent compilation cache, so that every first call compiles.

    python -m benchmarks.compile_depth [--quick] [--check]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from .common import Panel, Result, Target, main
from .models import SMALL_LLAMA

DEPTHS, QUICK_DEPTHS = (4, 8, 16, 32), (4, 8)
PROMPT_LEN, NEW_TOKENS = 8, 8
DEPTH_RATIO = 1.5  # deepest first call / shallowest first call


def first_calls(n_layers: int) -> dict:
    """Seconds of the first and second `generate` calls of a SMALL_LLAMA-wide model of
    `n_layers` layers (this process must not have compiled it before)."""
    import jax

    from jax_block.generate import generate

    from .models import jax_lm, prompts

    lm, params = jax_lm({**SMALL_LLAMA, "n_layers": n_layers})
    params = jax.block_until_ready(params)
    ids = prompts(1, PROMPT_LEN, SMALL_LLAMA["vocab_size"])
    times = []
    for _ in range(2):
        start = time.perf_counter()
        jax.block_until_ready(generate(lm, params, ids, max_new_tokens=NEW_TOKENS))
        times.append(time.perf_counter() - start)
    return {"first_s": times[0], "second_s": times[1]}


def in_subprocess(n_layers: int) -> dict:
    """`first_calls(n_layers)` in a fresh Python process without a compilation cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    code = f"import json; from {__spec__.name} import first_calls; "
    code += f"print(json.dumps(first_calls({n_layers})))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{n_layers} layers failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def run(quick: bool) -> Result:
    depths = QUICK_DEPTHS if quick else DEPTHS
    rows = []
    for n_layers in depths:
        times = in_subprocess(n_layers)
        compile_s = times["first_s"] - times["second_s"]
        rows.append({"layers": n_layers, **times, "compile s": compile_s})
    shallow, deep = rows[0], rows[-1]
    ratio = deep["first_s"] / shallow["first_s"]
    for row in rows:
        row["first x shallowest"] = row["first_s"] / shallow["first_s"]
    return Result(
        name="compile_depth",
        title="JAX: first call of generate against depth (compile time)",
        columns=["layers", "first_s", "second_s", "compile s", "first x shallowest"],
        rows=rows,
        targets=[
            Target(
                f"compile_depth: first call, {deep['layers']} / {shallow['layers']} layers",
                ratio,
                DEPTH_RATIO,
                higher_is_better=False,
            )
        ],
        panels=[
            Panel(
                "first call of generate (lower is better)",
                "seconds",
                [str(row["layers"]) for row in rows],
                {"first call": [row["first_s"] for row in rows]},
            )
        ],
        notes=[
            f"SMALL_LLAMA's width ({SMALL_LLAMA['d_model']}) at each depth, float32, batch 1, "
            f"{PROMPT_LEN}-token prompt, {NEW_TOKENS} new tokens; each depth in a fresh process "
            "without the persistent compilation cache; compile s = first - second call",
            "cause of a miss: jax_block.TransformerLM applies its layers one after another "
            "(blocks_0 ... blocks_N-1, each its own Flax submodule), so the prefill and the "
            "decode loop hold N copies of the block and XLA compiles each; a scan over "
            "identical layers (or over the repeating pattern of layer kinds) would compile one, "
            "at the price of a stacked parameter layout (one array per weight with a leading "
            "layer axis) that conversion, sharding and checkpoints would read; not built yet",
        ],
    )


if __name__ == "__main__":
    raise SystemExit(main(run, __doc__))
