"""Peak memory of JAX generation (target 7): it must keep one copy of the KV cache, for the
small LM and for its Llama-like twin, whose GQA cache (2 key/value heads for 8 query heads) is
n_heads / n_kv_heads = 4 times smaller.

For each model a fresh subprocess (JAX only, no torch) builds the LM, compiles
`generate_tokens` ahead of time without running it, resets the kernel's peak-RSS counter
(/proc/self/clear_refs), then generates: the growth of peak RSS (VmHWM) over the RSS before
generating is compared with the bytes of the model's own cache plus the output tokens.

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
from .models import SMALL, SMALL_LLAMA, cache_bytes

PROMPT_LEN, BATCH = 16, 8
MODELS = {"original": SMALL, "Llama-like": SMALL_LLAMA}


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


def child(model: str, positions: int) -> dict:
    """Generate with `model` until the cache holds `positions` tokens; report memory in bytes."""
    import gc

    import jax
    import jax.numpy as jnp

    from .models import compiled_greedy, jax_lm, tree_bytes

    config = {**MODELS[model], "max_seq_len": positions}
    flax_lm, params = jax_lm(config)
    # the keys and values of the cache generate_tokens creates, as shapes: what the code allocates
    layers = jax.eval_shape(lambda: flax_lm.create_kv_cache(BATCH, positions))
    allocated = tree_bytes([(layer.k_cache, layer.v_cache) for layer in layers])
    new_tokens = positions - PROMPT_LEN
    ids = jnp.asarray(
        jax.random.randint(jax.random.PRNGKey(1), (BATCH, PROMPT_LEN), 0, config["vocab_size"])
    )
    mask = jnp.ones((BATCH, PROMPT_LEN), jnp.int32)
    rng = jax.random.PRNGKey(0)
    compiled = compiled_greedy(flax_lm, params, ids, mask, rng, new_tokens)
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
        "model": model,
        "positions": positions,
        "new_tokens": new_tokens,
        "steps": int(steps),
        "seconds": seconds,
        "rss_before": 1024 * before,
        "peak_rss": 1024 * status_kib("VmHWM"),
        "sampled_peak_rss": 1024 * sampled_peak,
        "cache_bytes": allocated,
        "expected_cache_bytes": cache_bytes(config, BATCH, positions, 4),
        "token_bytes": tokens.size * tokens.dtype.itemsize,
        "xla_temp_bytes": getattr(xla, "temp_size_in_bytes", None),
    }


def measure_child(model: str, positions: int) -> dict:
    """`child(model, positions)` in a fresh process."""
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--child", model, str(positions)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return json.loads(process.stdout.strip().splitlines()[-1])


# DeepSeek-V3's attention sizes (one layer), for the latent cache's bytes per token
DEEPSEEK_V3_MLA = dict(
    d_model=7168,
    n_heads=128,
    d_ff=2048,
    norm="rmsnorm",
    positions="rope",
    qkv_bias=False,
    out_bias=False,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
)


def latent_cache_bytes_per_token(itemsize: int = 2) -> dict:
    """Bytes per token and layer of an MLA layer's cache at DeepSeek-V3's sizes, as
    jax_block allocates it (jax.eval_shape of create_kv_cache: the latent and the rope key),
    against the expanded keys (H (Dn + Dr)) and values (H Dv) that transformers caches."""
    import jax
    import jax.numpy as jnp

    from jax_block import TransformerBlock
    from twin_core import BlockConfig

    config = BlockConfig(**DEEPSEEK_V3_MLA)
    dtype = {2: jnp.bfloat16, 4: jnp.float32}[itemsize]
    block = TransformerBlock.from_config(config)
    cache = jax.eval_shape(lambda: block.create_kv_cache(1, 1024, dtype))
    latent = (cache.latent.size + cache.rope_key.size) // 1024 * itemsize
    H = config.n_heads
    dims = config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
    expanded = H * dims * itemsize
    return {"latent": latent, "expanded": expanded, "ratio": expanded / latent}


def run(quick: bool) -> Result:
    positions = 1024 if quick else 4096
    raw = {model: measure_child(model, positions) for model in MODELS}
    dense_cache = raw["original"]["cache_bytes"]
    rows, targets = [], []
    for model, m in raw.items():
        config = MODELS[model]
        needed = m["cache_bytes"] + m["token_bytes"]
        growth = m["peak_rss"] - m["rss_before"]
        rows.append(
            {
                "model": model,
                "kv heads": config.get("n_kv_heads") or config["n_heads"],
                "positions": m["positions"],
                "cache MB": m["cache_bytes"] / 1e6,
                "original / cache": dense_cache / m["cache_bytes"],
                "tokens MB": m["token_bytes"] / 1e6,
                "peak growth MB": growth / 1e6,
                "growth / needed": growth / needed,
                "sampled growth MB": (m["sampled_peak_rss"] - m["rss_before"]) / 1e6,
                "XLA temp MB": (m["xla_temp_bytes"] or 0) / 1e6,
                "generate s": m["seconds"],
                "raw": m,
            }
        )
        name = "" if model == "original" else f"{model} "
        targets.append(
            Target(f"memory: {name}peak RSS growth / (cache + tokens)", growth / needed, 1.2, False)
        )
    groups = [row["model"] for row in rows]
    panels = [
        Panel(
            f"batch {BATCH}, {positions} positions",
            "MB",
            groups,
            {
                "cache + tokens": [r["cache MB"] + r["tokens MB"] for r in rows],
                "peak RSS growth": [r["peak growth MB"] for r in rows],
                "XLA temp": [r["XLA temp MB"] for r in rows],
            },
        ),
        Panel(
            "peak RSS growth / (cache + tokens)",
            "ratio",
            groups,
            {"growth / needed": [r["growth / needed"] for r in rows]},
            [(1.2, "target 1.2")],
        ),
    ]
    llama = SMALL_LLAMA
    head_ratio = llama["n_heads"] / llama["n_kv_heads"]
    formula = all(m["cache_bytes"] == m["expected_cache_bytes"] for m in raw.values())
    mla = latent_cache_bytes_per_token()
    return Result(
        name="memory",
        title=f"Peak memory of JAX generate, small LMs, batch {BATCH}, {positions} positions",
        columns=[
            "model",
            "kv heads",
            "positions",
            "cache MB",
            "original / cache",
            "tokens MB",
            "peak growth MB",
            "growth / needed",
            "sampled growth MB",
            "XLA temp MB",
            "generate s",
        ],
        rows=rows,
        targets=targets,
        panels=panels,
        notes=[
            f"{PROMPT_LEN}-token prompt and {positions - PROMPT_LEN} new tokens, so the cache "
            f"holds {positions} positions; growth = VmHWM after generating - VmRSS before "
            "(peak reset through /proc/self/clear_refs after AOT compilation); needed = the "
            "model's own cache + the output tokens",
            "cache MB: the keys and values lm.create_kv_cache allocates (jax.eval_shape); "
            f"{'equal to' if formula else 'DIFFERENT from'} 2 * layers * batch * positions * "
            "n_kv_heads * head_dim * 4 bytes; original / cache: the original model's cache over "
            f"this one's (n_heads / n_kv_heads = {head_ratio:g} for the Llama-like model, 8 "
            "query heads sharing 2 key/value heads)",
            "sampled growth: VmRSS polled every millisecond; XLA temp: the compiled "
            "program's own temporary-buffer size (memory_analysis)",
            "Llama-like: the small LM with GQA 4:1, rope, RMSNorm, SwiGLU of d_ff 768, no "
            "biases, untied head",
            f"latent (MLA) cache at DeepSeek-V3's sizes, bfloat16, per token and layer: "
            f"{mla['latent']} bytes (latent 512 + rope key 64) against {mla['expanded']} of "
            f"expanded keys and values (128 heads x (128 + 64 + 128)): {mla['ratio']:.1f}x smaller",
        ],
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]))))
    else:
        raise SystemExit(main(run, __doc__))
