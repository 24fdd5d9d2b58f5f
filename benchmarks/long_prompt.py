"""Long prompts in bounded memory: the prefill of an 8192-token prompt with the small LM
(max_seq_len raised), in both frameworks, against the bytes of the cache it fills; and the
prefill of 1024 tokens timed against full attention (one (heads, T, S) score matrix per layer,
the code before blocked attention, which at 8192 tokens is 2 GiB of scores alone).

Each framework runs in a fresh subprocess that imports only it. torch: after a warm-up on a
short prompt, peak RSS (VmHWM, reset through /proc/self/clear_refs) grows while `generate`
prefills the prompt and picks one token: the growth holds the cache it allocates and every
temporary. JAX: `generate_tokens` for that prompt and one new token, compiled ahead of time;
XLA's temp_size_in_bytes holds the cache too (it is created inside), reported also for the
full-attention path (compiled only, never run). Target: peak / cache bytes <= 1.25 in both;
blocked prefill time / full <= 1 at 1024 tokens, the two alternating in one process.

    python -m benchmarks.long_prompt [--quick] [--check]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .common import Panel, Result, Target, compare_times, main
from .models import SMALL, cache_bytes, prompts

SHORT = 1024  # the prompt whose prefill is timed
MEMORY_TARGET = 1.25
TIME_TARGET = 1.0


def config(long: int) -> dict:
    """The small LM with room for a `long`-token prompt and one new token."""
    return {**SMALL, "max_seq_len": long + 8}


def status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def torch_child(long: int, repeats: int) -> dict:
    """torch: peak RSS growth of generate on a `long`-token prompt; prefill times at SHORT."""
    import gc

    import torch

    import torch_block
    from torch_block.attention import MultiHeadAttention, attend
    from torch_block.lm import TransformerLM

    torch.manual_seed(0)
    lm = TransformerLM(**config(long), dropout=0.0).eval()
    ids = torch.from_numpy(prompts(1, long, SMALL["vocab_size"]))
    torch_block.generate(lm, ids[:, :16], max_new_tokens=1)  # warm-up: lazy initialisation
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = status_kib("VmRSS")
    start = time.perf_counter()
    torch_block.generate(lm, ids, max_new_tokens=1)
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
    memory = {
        "long": long,
        "rss_before": 1024 * before,
        "peak_rss": 1024 * peak,
        "long_prefill_s": seconds,
        "cache_bytes": cache_bytes(SMALL, 1, long + 1, 4),
        "threads": torch.get_num_threads(),
    }
    if repeats == 0:
        return memory

    blocked = MultiHeadAttention.attend_blocks
    no_dropout = torch.nn.Dropout(0.0)

    def full_scores(self, q, k, v, start, mask):
        """The attention before blocking: every query against every key, scores written out."""
        T, S = q.shape[2], k.shape[2]
        if mask is not None:
            mask = mask.to(torch.bool)
            mask = mask[(None,) * (4 - mask.dim())]
        allowed = self.allowed(start, start + T, 0, S, mask, 0, T, q.device)
        return attend(q, k, v, allowed, no_dropout)  # a dropout module: the explicit path

    def prefill(attention):
        def run():
            MultiHeadAttention.attend_blocks = attention
            try:
                return torch_block.generate(lm, ids[:, :SHORT], max_new_tokens=1)
            finally:
                MultiHeadAttention.attend_blocks = blocked

        return run

    times = compare_times({"blocked": prefill(blocked), "full": prefill(full_scores)}, repeats)
    return {**memory, "times": times}


def jax_child(long: int, repeats: int) -> dict:
    """JAX: XLA's temporary bytes of generate_tokens on a `long`-token prompt, blocked and full
    attention; the blocked run's time; prefill times at SHORT, blocked and full."""
    import jax
    import jax.numpy as jnp

    import jax_block.attention as attention

    from .common import block
    from .models import compiled_greedy, jax_lm

    flax_lm, params = jax_lm(config(long))
    blocked_min = getattr(attention, "BLOCKED_MIN_SCORES", None)

    def compiled(length: int, full: bool):
        """generate_tokens for a `length`-token prompt and one new token, compiled ahead of
        time; `full`: with blocked attention switched off."""
        if blocked_min is not None:
            attention.BLOCKED_MIN_SCORES = 2**62 if full else blocked_min
        jax.clear_caches()  # trace again under the switch
        ids = jnp.asarray(prompts(1, length, SMALL["vocab_size"]), jnp.int32)
        mask = jnp.ones_like(ids)
        rng = jax.random.PRNGKey(0)
        program = compiled_greedy(flax_lm, params, ids, mask, rng, 1)
        return program, (params, ids, mask, rng)

    long_blocked, long_args = compiled(long, full=False)
    long_full, _ = compiled(long, full=True)
    block(long_blocked(*long_args))  # first run
    start = time.perf_counter()
    block(long_blocked(*long_args))
    seconds = time.perf_counter() - start
    short = {"blocked": compiled(SHORT, full=False), "full": compiled(SHORT, full=True)}
    times = compare_times(
        {name: (lambda p=p, a=a: block(p(*a))) for name, (p, a) in short.items()}, repeats
    )
    return {
        "long": long,
        "temp_bytes": long_blocked.memory_analysis().temp_size_in_bytes,
        "full_temp_bytes": long_full.memory_analysis().temp_size_in_bytes,
        "long_prefill_s": seconds,
        "cache_bytes": cache_bytes(SMALL, 1, long + 1, 4),
        "times": times,
        "switch": blocked_min is not None,
    }


# glibc returns freed blocks of >= 128 KiB to the system at once, instead of raising that
# threshold as blocks are freed and keeping later ones in its heap: peak RSS then follows the
# bytes held at once, not the allocator's reuse of them
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def measure_child(framework: str, long: int, repeats: int, env: dict | None = None) -> dict:
    """The child of `framework` in a fresh process, with `env` added to its environment."""
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.long_prompt",
            "--child",
            framework,
            str(long),
            str(repeats),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, **(env or {})},
    )
    return json.loads(process.stdout.strip().splitlines()[-1])


def run(quick: bool) -> Result:
    long, repeats = (2048, 3) if quick else (8192, 5)
    raw = {
        "torch": measure_child("torch", long, repeats, FIXED_MMAP_THRESHOLD),
        "jax": measure_child("jax", long, repeats),
    }
    default_malloc = measure_child("torch", long, 0)
    rows, targets = [], []
    for framework, m in raw.items():
        if framework == "torch":
            peak = m["peak_rss"] - m["rss_before"]
            full_peak = None
            other_peak = default_malloc["peak_rss"] - default_malloc["rss_before"]
        else:
            peak, full_peak, other_peak = m["temp_bytes"], m["full_temp_bytes"], None
        blocked_s, full_s = m["times"]["blocked"]["median"], m["times"]["full"]["median"]
        rows.append(
            {
                "framework": framework,
                "prompt": long,
                "cache MB": m["cache_bytes"] / 1e6,
                "peak MB": peak / 1e6,
                "peak / cache": peak / m["cache_bytes"],
                "default malloc peak MB": "" if other_peak is None else other_peak / 1e6,
                "full-attention peak MB": "" if full_peak is None else full_peak / 1e6,
                f"prefill {long} s": m["long_prefill_s"],
                f"prefill {SHORT} ms": 1e3 * blocked_s,
                f"full {SHORT} ms": 1e3 * full_s,
                "blocked / full": blocked_s / full_s,
                "raw": m,
            }
        )
        targets += [
            Target(
                f"long_prompt: {framework} peak / cache bytes, {long}-token prefill",
                peak / m["cache_bytes"],
                MEMORY_TARGET,
                higher_is_better=False,
            ),
            Target(
                f"long_prompt: {framework} prefill time {SHORT} tokens, blocked / full",
                blocked_s / full_s,
                TIME_TARGET,
                higher_is_better=False,
            ),
        ]
    groups = [row["framework"] for row in rows]
    panels = [
        Panel(
            f"{long}-token prefill: memory (MB)",
            "MB",
            groups,
            {
                "cache": [row["cache MB"] for row in rows],
                "peak (cache included)": [row["peak MB"] for row in rows],
            },
        ),
        Panel(
            f"{SHORT}-token prefill time, blocked / full attention",
            "ratio",
            groups,
            {"blocked / full": [row["blocked / full"] for row in rows]},
            [(TIME_TARGET, "target 1")],
        ),
    ]
    return Result(
        name="long_prompt",
        title=f"Long prompts: {long}-token prefill memory, {SHORT}-token prefill time, small LM",
        columns=[
            "framework",
            "prompt",
            "cache MB",
            "peak MB",
            "peak / cache",
            "default malloc peak MB",
            "full-attention peak MB",
            f"prefill {long} s",
            f"prefill {SHORT} ms",
            f"full {SHORT} ms",
            "blocked / full",
        ],
        rows=rows,
        targets=targets,
        panels=panels,
        notes=[
            f"batch 1, float32; the cache holds the prompt and one new token ({long + 1} slots, "
            "2 * layers * slots * d_model * 4 bytes); prefill = generate with max_new_tokens=1",
            "torch peak: growth of VmHWM over VmRSS before generate, in a fresh torch-only "
            f"process ({raw['torch']['threads']} threads) whose glibc returns every freed block "
            "of >= 128 KiB at once (MALLOC_MMAP_THRESHOLD_), so that RSS follows the bytes held; "
            "default malloc peak: the same in a process with glibc's default, which keeps freed "
            "temporaries in its heap; JAX peak: XLA temp_size_in_bytes of generate_tokens "
            "compiled ahead of time (the cache is one of its temporaries)",
            "full: every query against every key with the (B, H, T, S) scores written out (torch: "
            "the explicit softmax path, as before blocking; JAX: BLOCKED_MIN_SCORES switched "
            "off); full-attention peak is XLA's figure for that program, compiled, never run",
            f"prefill times: median of {repeats} runs after a warm-up, blocked and full "
            "alternating in one process",
        ],
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child = {"torch": torch_child, "jax": jax_child}[sys.argv[2]]
        print(json.dumps(child(int(sys.argv[3]), int(sys.argv[4]))))
    else:
        raise SystemExit(main(run, __doc__))
