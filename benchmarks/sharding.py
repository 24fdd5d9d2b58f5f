"""Many devices: jax_block on a mesh of 8 CPU devices against one device (DESIGN section 10).

For the small LM, its Llama-like twin and its Mixtral-like twin, on the meshes (data, tensor,
expert) = (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4): the bytes of parameters and of a KV
cache (batch 8) that each device holds against the whole on one device, and whether the
outputs are those of one device (prefill logits, greedy `generate` tokens). A mesh whose
tensor axis does not divide a model's key/value heads is refused (a ValueError, reported in
the notes). Runs in a child process with XLA_FLAGS=--xla_force_host_platform_device_count=8.

    python -m benchmarks.sharding [--quick] [--check]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .common import Panel, Result, Target, main
from .models import SMALL, SMALL_LLAMA, SMALL_MIXTRAL

DEVICES = 8
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
MODELS = {"original": SMALL, "Llama-like": SMALL_LLAMA, "Mixtral-like": SMALL_MIXTRAL}
BATCH, PROMPT_LEN = 8, 16


def child(quick: bool) -> dict:
    """Every (model, mesh) in this process, which must have 8 devices: bytes and outputs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_block import cached_forward, generate, shard_params
    from jax_block.sharding import bytes_per_device, make_mesh

    from .models import jax_lm, tree_bytes

    assert jax.device_count() == DEVICES, jax.devices()
    new_tokens, positions = (8, 256) if quick else (32, 1024)
    rows, refused = [], []
    for model, config in MODELS.items():
        config = {**config, "n_layers": 1} if quick else config
        lm, params = jax_lm(config)
        rng = np.random.default_rng(0)
        ids = rng.integers(0, config["vocab_size"], (BATCH, PROMPT_LEN)).astype(np.int32)
        mask = np.ones((BATCH, PROMPT_LEN), np.int32)
        key_mask = jnp.ones((BATCH, positions), jnp.int32)
        one_cache = lm.create_kv_cache(BATCH, positions)
        cache_total = tree_bytes([(c.k_cache, c.v_cache) for c in one_cache])
        one_logits, _ = cached_forward(lm, params, jnp.asarray(ids), key_mask, one_cache)
        one_tokens = np.asarray(generate(lm, params, ids, mask, max_new_tokens=new_tokens))
        for shape in MESHES:
            mesh = make_mesh(*shape)
            try:
                sharded = shard_params(lm, params, mesh)
            except ValueError as error:
                refused.append(f"{model} on {shape}: {error}")
                continue
            cache = lm.create_kv_cache(BATCH, positions, mesh=mesh)
            cache_bytes = max(bytes_per_device([(c.k_cache, c.v_cache) for c in cache]).values())
            logits, _ = cached_forward(lm, sharded, jnp.asarray(ids), key_mask, cache, mesh=mesh)
            tokens = generate(lm, sharded, ids, mask, max_new_tokens=new_tokens, mesh=mesh)
            rows.append(
                {
                    "model": model,
                    "mesh": str(shape),
                    "param_bytes": tree_bytes(params),
                    "param_bytes_per_device": max(bytes_per_device(sharded).values()),
                    "cache_bytes": cache_total,
                    "cache_bytes_per_device": cache_bytes,
                    "logits_max_abs_diff": float(np.max(np.abs(np.asarray(logits - one_logits)))),
                    "tokens_equal": float(np.mean(np.asarray(tokens) == one_tokens)),
                }
            )
    return {"rows": rows, "refused": refused, "new_tokens": new_tokens, "positions": positions}


def measure_child(quick: bool) -> dict:
    """`child(quick)` in a fresh process with 8 CPU devices."""
    flags = os.environ.get("XLA_FLAGS", "")
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip(),
    )
    command = [sys.executable, "-m", "benchmarks.sharding", "--child"] + (["--quick"] * quick)
    process = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return json.loads(process.stdout.strip().splitlines()[-1])


def run(quick: bool) -> Result:
    raw = measure_child(quick)
    rows = []
    for r in raw["rows"]:
        rows.append(
            {
                "model": r["model"],
                "mesh": r["mesh"],
                "params MB": r["param_bytes"] / 1e6,
                "params MB / device": r["param_bytes_per_device"] / 1e6,
                "params split": r["param_bytes"] / r["param_bytes_per_device"],
                "cache MB": r["cache_bytes"] / 1e6,
                "cache MB / device": r["cache_bytes_per_device"] / 1e6,
                "cache split": r["cache_bytes"] / r["cache_bytes_per_device"],
                "max |logits diff|": r["logits_max_abs_diff"],
                "tokens equal": r["tokens_equal"],
                "raw": r,
            }
        )
    worst = max(r["max |logits diff|"] for r in rows)
    equal = min(r["tokens equal"] for r in rows)
    targets = [
        Target("sharding: max |logits - one device| (float32)", worst, 1e-5, False),
        Target("sharding: greedy tokens equal to one device", equal, 1.0),
    ]
    groups = [f"{r['model']}\n{r['mesh']}" for r in rows]
    panels = [
        Panel(
            "whole / per device",
            "ratio",
            groups,
            {
                "params": [r["params split"] for r in rows],
                "cache": [r["cache split"] for r in rows],
            },
        )
    ]
    notes = [
        f"batch {BATCH}, {PROMPT_LEN}-token prompts, {raw['new_tokens']} greedy new tokens; "
        f"cache of {raw['positions']} positions, float32; per device: the most any of the 8 "
        "devices holds",
        "rules (jax_block.sharding.DEFAULT_RULES): batch over data; heads, kv heads, FFN "
        "hidden units and vocabulary over tensor; experts over expert; the rest replicated",
        *(f"refused: {line}" for line in raw["refused"]),
    ]
    return Result(
        name="sharding",
        title="jax_block on 8 CPU devices: bytes per device and outputs against one device",
        columns=[
            "model",
            "mesh",
            "params MB",
            "params MB / device",
            "params split",
            "cache MB",
            "cache MB / device",
            "cache split",
            "max |logits diff|",
            "tokens equal",
        ],
        rows=rows,
        targets=targets,
        panels=panels,
        notes=notes,
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child("--quick" in sys.argv[2:])))
    else:
        raise SystemExit(main(run, __doc__))
