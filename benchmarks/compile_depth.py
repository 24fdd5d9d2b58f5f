"""JAX compile time against depth (issue 23, target 5): the first call of `jax_block.generate`
for models of the same width and 4, 8, 16 or 32 layers, with the layers scanned
(`scan_layers=True`, the target) and applied one by one, each depth in a fresh process with no
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
from .models import MEDIUM_LLAMA, SMALL_LLAMA

DEPTHS, QUICK_DEPTHS = (4, 8, 16, 32), (4, 8)
PROMPT_LEN, NEW_TOKENS = 8, 8
DEPTH_RATIO = 1.5  # deepest first call / shallowest first call
DECODE_TOKENS = 64  # new tokens of the decode-rate comparison at MEDIUM_LLAMA


def first_calls(n_layers: int, scan_layers: bool) -> dict:
    """Seconds of the first and second `generate` calls of a SMALL_LLAMA-wide model of
    `n_layers` layers (this process must not have compiled it before)."""
    import jax

    from jax_block.generate import generate

    from .models import jax_lm, prompts

    lm, params = jax_lm({**SMALL_LLAMA, "n_layers": n_layers}, scan_layers=scan_layers)
    params = jax.block_until_ready(params)
    ids = prompts(1, PROMPT_LEN, SMALL_LLAMA["vocab_size"])
    times = []
    for _ in range(2):
        start = time.perf_counter()
        jax.block_until_ready(generate(lm, params, ids, max_new_tokens=NEW_TOKENS))
        times.append(time.perf_counter() - start)
    return {"first_s": times[0], "second_s": times[1]}


def decode_rate(scan_layers: bool) -> dict:
    """Tokens/s of `generate` (batch 1, DECODE_TOKENS new tokens, compiled; best of 3) of a
    MEDIUM_LLAMA model, its layers scanned or one by one."""
    import jax

    from jax_block.generate import generate

    from .models import jax_lm, prompts

    lm, params = jax_lm(MEDIUM_LLAMA, scan_layers=scan_layers)
    ids = prompts(1, PROMPT_LEN, MEDIUM_LLAMA["vocab_size"])
    jax.block_until_ready(generate(lm, params, ids, max_new_tokens=DECODE_TOKENS))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(generate(lm, params, ids, max_new_tokens=DECODE_TOKENS))
        best = min(best, time.perf_counter() - start)
    return {"tokens_per_s": DECODE_TOKENS / best}


def in_subprocess(call: str) -> dict:
    """`call` (e.g. "first_calls(4, True)") of this module in a fresh Python process without a
    compilation cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    code = f"import json; from {__spec__.name} import *; print(json.dumps({call}))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{call} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def run(quick: bool) -> Result:
    depths = QUICK_DEPTHS if quick else DEPTHS
    rows = []
    for n_layers in depths:
        row = {"layers": n_layers}
        for scan, label in ((True, "scanned"), (False, "one by one")):
            times = in_subprocess(f"first_calls({n_layers}, {scan})")
            row[f"{label}: first s"] = times["first_s"]
            row[f"{label}: second s"] = times["second_s"]
        rows.append(row)
    shallow, deep = rows[0], rows[-1]
    for row in rows:
        for label in ("scanned", "one by one"):
            key = f"{label}: first s"
            row[f"{label}: first x shallowest"] = row[key] / shallow[key]
    ratio = deep["scanned: first x shallowest"]
    rates = {scan: in_subprocess(f"decode_rate({scan})")["tokens_per_s"] for scan in (True, False)}
    return Result(
        name="compile_depth",
        title="JAX: first call of generate against depth (compile time)",
        columns=list(rows[0]),
        rows=rows,
        targets=[
            Target(
                f"compile_depth: first call, {deep['layers']} / {shallow['layers']} layers "
                "(scan_layers)",
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
                {
                    label: [row[f"{label}: first s"] for row in rows]
                    for label in ("scanned", "one by one")
                },
            )
        ],
        notes=[
            f"SMALL_LLAMA's width ({SMALL_LLAMA['d_model']}) at each depth, float32, batch 1, "
            f"{PROMPT_LEN}-token prompt, {NEW_TOKENS} new tokens; each depth and layout in a "
            "fresh process without the persistent compilation cache; second s: the same call "
            "again, compiled",
            "scanned: TransformerLM(scan_layers=True), one nn.scan over the identical layers "
            "(XLA compiles one block); one by one: the default, blocks_0 ... blocks_N-1 each "
            "its own submodule, compiled N times",
            f"the price of scanning, at decode: MEDIUM_LLAMA (d_model {MEDIUM_LLAMA['d_model']}, "
            f"{MEDIUM_LLAMA['n_layers']} layers), batch 1, {DECODE_TOKENS} new tokens: "
            f"{rates[True]:.1f} tokens/s scanned, {rates[False]:.1f} one by one "
            f"({rates[False] / rates[True]:.2f}x): in each step XLA CPU copies every layer's "
            "weights out of the stacked arrays (a dynamic-slice fusion) before its matrix "
            "products, so the weights are read twice and written once; one by one stays the "
            "default for generation",
        ],
    )


if __name__ == "__main__":
    raise SystemExit(main(run, __doc__))
