"""Peak memory of JAX generation (target 7): it must keep one copy of the KV cache.

A fresh subprocess (JAX only, no torch) builds the small LM, compiles `generate_tokens` ahead
of time without running it, resets the kernel's peak-RSS counter (/proc/self/clear_refs), then
generates: the growth of peak RSS (VmHWM) over the RSS before generating is compared with the
bytes of the cache plus the output tokens.

    python -m benchmarks.memory [--quick] [--check]
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from .common import Panel, Result, Target, main
from .models import SMALL, cache_bytes

PROMPT_LEN, BATCH = 16, 8


def status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class RssSampler(threading.Thread):
    """Samples VmRSS every millisecond until stopped; `peak` is the largest seen, in KiB."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = status_kib("VmRSS")
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, status_kib("VmRSS"))
            time.sleep(0.001)

    def stop(self) -> int:
        self.running = False
        self.join()
        return self.peak


def child(positions: int) -> dict:
    """Generate until the cache holds `positions` tokens; report memory in bytes."""
    import gc

    import jax
    import jax.numpy as jnp

    from jax_block.generate import generate_tokens

    from .models import jax_lm

    config = {**SMALL, "max_seq_len": positions}
    flax_lm, params = jax_lm(config)
    new_tokens = positions - PROMPT_LEN
    ids = jnp.asarray(
        jax.random.randint(jax.random.PRNGKey(1), (BATCH, PROMPT_LEN), 0, config["vocab_size"])
    )
    mask = jnp.ones((BATCH, PROMPT_LEN), jnp.int32)
    rng = jax.random.PRNGKey(0)
    compiled = generate_tokens.lower(
        flax_lm,
        params,
        ids,
        mask,
        rng,
        max_new_tokens=new_tokens,
        temperature=0.0,
        top_k=None,
        top_p=None,
        eos_token_id=None,
        pad_token_id=0,
    ).compile()
    xla = compiled.memory_analysis()
    jax.block_until_ready((params, ids, mask, rng))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = status_kib("VmRSS")
    sampler = RssSampler()
    sampler.start()
    start = time.perf_counter()
    tokens, steps = jax.block_until_ready(compiled(params, ids, mask, rng))
    seconds = time.perf_counter() - start
    sampled_peak = sampler.stop()
    return {
        "positions": positions,
        "new_tokens": new_tokens,
        "steps": int(steps),
        "seconds": seconds,
        "rss_before": 1024 * before,
        "peak_rss": 1024 * status_kib("VmHWM"),
        "sampled_peak_rss": 1024 * sampled_peak,
        "cache_bytes": cache_bytes(config, BATCH, positions, 4),
        "token_bytes": tokens.size * tokens.dtype.itemsize,
        "xla_temp_bytes": getattr(xla, "temp_size_in_bytes", None),
    }


def run(quick: bool) -> Result:
    positions = 1024 if quick else 4096
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--child", str(positions)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    m = json.loads(process.stdout.strip().splitlines()[-1])
    needed = m["cache_bytes"] + m["token_bytes"]
    growth = m["peak_rss"] - m["rss_before"]
    row = {
        "positions": m["positions"],
        "cache MB": m["cache_bytes"] / 1e6,
        "tokens MB": m["token_bytes"] / 1e6,
        "peak growth MB": growth / 1e6,
        "growth / needed": growth / needed,
        "sampled growth MB": (m["sampled_peak_rss"] - m["rss_before"]) / 1e6,
        "XLA temp MB": (m["xla_temp_bytes"] or 0) / 1e6,
        "generate s": m["seconds"],
        "raw": m,
    }
    panels = [
        Panel(
            f"batch {BATCH}, {m['positions']} positions",
            "MB",
            ["memory"],
            {
                "cache + tokens": [needed / 1e6],
                "peak RSS growth": [growth / 1e6],
                "XLA temp": [row["XLA temp MB"]],
            },
            [(1.2 * needed / 1e6, "1.2x target")],
        ),
    ]
    return Result(
        name="memory",
        title=f"Peak memory of JAX generate, small LM, batch {BATCH}, {m['positions']} positions",
        columns=[
            "positions",
            "cache MB",
            "tokens MB",
            "peak growth MB",
            "growth / needed",
            "sampled growth MB",
            "XLA temp MB",
            "generate s",
        ],
        rows=[row],
        targets=[Target("memory: peak RSS growth / (cache + tokens)", growth / needed, 1.2, False)],
        panels=panels,
        notes=[
            f"{PROMPT_LEN}-token prompt and {m['new_tokens']} new tokens, so the cache holds "
            f"{m['positions']} positions; growth = VmHWM after generating - VmRSS before "
            "(peak reset through /proc/self/clear_refs after AOT compilation)",
            "sampled growth: VmRSS polled every millisecond; XLA temp: the compiled "
            "program's own temporary-buffer size (memory_analysis)",
        ],
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(int(sys.argv[2]))))
    else:
        raise SystemExit(main(run, __doc__))
