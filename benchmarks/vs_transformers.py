"""Greedy decode against transformers' own GPT2LMHeadModel.generate, same weights and arithmetic:
torch_block eager, torch_block with `compile=True`, jax_block and transformers, side by side.

The small LM (vocab 1024, d_model 256, 4 layers, d_ff 1024, exact GELU) is written as a GPT-2
checkpoint (`parity.hf.to_hf`, activation_function "gelu") and loaded by transformers, so all
four compute the same function; the table says how many greedy tokens each shares with eager
torch_block. Targets: torch eager >= 2x transformers, compiled >= 1.3x eager, JAX >= 10x
transformers. torch.compile's first-call time and the number of graphs it compiled (once for
every position and every later call of the same shape) are reported apart.

    python -m benchmarks.vs_transformers [--quick] [--check]
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from .common import Panel, Result, Target, block, compare_times, main
from .models import SMALL, prompts, twin_lms

PROMPT_LEN = 16


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def matmul_floor(torch_lm, steps: int):
    """A run of `steps` tokens' matrix products alone: every Linear of the LM and its head at
    batch 1, as a decode step runs them (F.linear over the same weights, nothing else)."""
    import torch
    import torch.nn.functional as F

    linears = [m for m in torch_lm.modules() if isinstance(m, torch.nn.Linear)]
    head = torch_lm.token_embedding.weight
    x = {m.in_features: torch.randn(1, m.in_features) for m in linears}

    def run():
        with torch.inference_mode():
            for _ in range(steps):
                for m in linears:
                    F.linear(x[m.in_features], m.weight, m.bias)
                F.linear(x[head.shape[1]], head)

    return run


def jax_matmul_floor(params: dict, steps: int):
    """The same for JAX: `steps` tokens' matrix products alone (every kernel of the LM and the
    head at batch 1) in one jitted loop, each product fed by the last so none is hoisted."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    flat = flatten_dict(params)
    kernels = [w for path, w in flat.items() if path[-1] == "kernel" and w.ndim == 2]
    head = flat[("token_embedding", "embedding")].T  # (d_model, vocab): the tied head
    weights = tuple(kernels) + (head,)
    sizes = sorted({w.shape[0] for w in weights} | {w.shape[1] for w in weights})

    @jax.jit
    def run_steps(weights):
        def step(_, carry):
            carry = dict(carry)
            for w in weights:
                y = carry[w.shape[0]] @ w  # (1, out)
                carry[w.shape[1]] = carry[w.shape[1]] + 1e-30 * y
            return carry

        start = {n: jnp.ones((1, n), weights[0].dtype) for n in sizes}
        return jax.lax.fori_loop(0, steps, step, start)

    def run():
        return block(run_steps(weights))

    return run


def transformers_gpt2(torch_lm, folder: str):
    """transformers' GPT2LMHeadModel holding torch_lm's weights (written to `folder`)."""
    import transformers

    from parity.hf import to_hf

    to_hf(torch_lm, folder)
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    if model.config.activation_function != "gelu":
        raise RuntimeError(f"expected exact GELU, got {model.config.activation_function}")
    return model


def with_threads(threads: int, run):
    """`run` at `threads` torch intra-op threads (the count restored after)."""
    import torch

    def threaded():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run()
        finally:
            torch.set_num_threads(before)

    return threaded


def run(quick: bool) -> Result:
    import torch

    import torch_block
    from jax_block.generate import generate as jax_generate

    new_tokens, repeats = (32, 3) if quick else (256, 7)
    torch_lm, flax_lm, params = twin_lms(SMALL)
    ids = prompts(1, PROMPT_LEN, SMALL["vocab_size"])
    torch_ids = torch.from_numpy(ids)
    with tempfile.TemporaryDirectory() as folder:
        hf_lm = transformers_gpt2(torch_lm, folder)

    def run_eager():
        return torch_block.generate(torch_lm, torch_ids, max_new_tokens=new_tokens)

    def run_compiled():
        return torch_block.generate(torch_lm, torch_ids, max_new_tokens=new_tokens, compile=True)

    def run_jax():
        return block(jax_generate(flax_lm, params, ids, max_new_tokens=new_tokens))

    def run_transformers():
        with torch.inference_mode():
            out = hf_lm.generate(
                torch_ids,
                attention_mask=torch.ones_like(torch_ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return out[:, PROMPT_LEN:]

    default_threads = torch.get_num_threads()
    thread_counts = sorted({1, default_threads})
    graphs_before = compiled_graphs()
    start = time.perf_counter()
    compiled_tokens = with_threads(1, run_compiled)()
    first_compiled_call = time.perf_counter() - start
    first_call_graphs = compiled_graphs() - graphs_before
    start = time.perf_counter()
    run_jax()
    first_jax_call = time.perf_counter() - start
    torch_runs = {
        "transformers": run_transformers,
        "torch eager": run_eager,
        "torch compiled": run_compiled,
        "matmuls alone": matmul_floor(torch_lm, new_tokens - 1),
    }
    runs = {"jax": run_jax, "jax matmuls alone": jax_matmul_floor(params, new_tokens - 1)}
    for threads in thread_counts:
        runs.update({(name, threads): with_threads(threads, r) for name, r in torch_runs.items()})
    times = compare_times(runs, repeats, warmup=1)
    graphs = compiled_graphs() - graphs_before
    eager_tokens = run_eager().numpy()
    outputs = {
        "transformers": run_transformers().numpy(),
        "torch eager": eager_tokens,
        "torch compiled": compiled_tokens.numpy(),
        "jax": np.asarray(run_jax()),
    }
    rate = {key: new_tokens / t["median"] for key, t in times.items()}
    floor = {t: times[("matmuls alone", t)]["median"] / (new_tokens - 1) for t in thread_counts}
    jax_floor = times["jax matmuls alone"]["median"] / (new_tokens - 1)
    jax_goal = 1 / (10 * rate[("transformers", 1)])  # seconds per token at 10x transformers
    rows = []
    for threads in thread_counts:
        for name in ("transformers", "torch eager", "torch compiled", "jax"):
            key = "jax" if name == "jax" else (name, threads)
            rows.append(
                {
                    "generate": name,
                    "torch threads": threads,
                    "tok/s": rate[key],
                    "ms/token": 1e3 / rate[key],
                    "x transformers": rate[key] / rate[("transformers", threads)],
                    "x torch eager": rate[key] / rate[("torch eager", threads)],
                    "same tokens": float(np.mean(outputs[name] == eager_tokens)),
                    "times": times[key],
                }
            )
    one = {row["generate"]: row for row in rows if row["torch threads"] == 1}
    compile_seconds = first_compiled_call - times[("torch compiled", 1)]["median"]
    targets = [
        Target(
            "vs_transformers: torch eager / transformers tokens/s",
            one["torch eager"]["x transformers"],
            2.0,
        ),
        Target(
            "vs_transformers: torch compiled / torch eager tokens/s",
            one["torch compiled"]["x torch eager"],
            1.3,
        ),
        Target("vs_transformers: JAX / transformers tokens/s", one["jax"]["x transformers"], 10.0),
        Target(
            "vs_transformers: torch graphs compiled per thread count over every run",
            graphs / len(thread_counts),
            1.0,
            higher_is_better=False,
        ),
    ]
    groups = [f"{row['generate']}, {row['torch threads']}t" for row in rows]
    panels = [
        Panel(
            "tokens/s (higher is better)",
            "tokens / s",
            groups,
            {"tok/s": [r["tok/s"] for r in rows]},
        ),
        Panel(
            "speed-up over transformers (same torch threads)",
            "ratio",
            groups,
            {"x transformers": [row["x transformers"] for row in rows]},
            [(2.0, "torch eager target 2x"), (10.0, "JAX target 10x")],
        ),
    ]
    floors = "; ".join(
        f"{t} thread{'s' if t > 1 else ''}: {1e3 * floor[t]:.2f} ms per token, a token taking "
        f"{1 / rate[('torch eager', t)] / floor[t]:.2f}x that eagerly and "
        f"{1 / rate[('torch compiled', t)] / floor[t]:.2f}x compiled"
        for t in thread_counts
    )
    return Result(
        name="vs_transformers",
        title=(
            f"Greedy decode against transformers' GPT-2 generate, small LM, batch 1, "
            f"{PROMPT_LEN}-token prompt, {new_tokens} new tokens"
        ),
        columns=[
            "generate",
            "torch threads",
            "tok/s",
            "ms/token",
            "x transformers",
            "x torch eager",
            "same tokens",
        ],
        rows=rows,
        targets=targets,
        panels=panels,
        notes=[
            f"median of {repeats} runs after a warm-up, every run alternating; tokens/s = new "
            "tokens / wall time of the whole generate call (prefill included), float32",
            f"targets at 1 torch thread; torch's default here is {default_threads}, whose rows "
            "are beside: at batch 1 a second intra-op thread gains little, and on a machine "
            "shared with other work every operator waits for whichever thread was descheduled "
            "(JAX keeps its own thread pool in both)",
            "transformers: GPT2LMHeadModel.from_pretrained of torch_block's weights written by "
            "parity.hf.to_hf (activation_function 'gelu', its default attention), "
            "generate(do_sample=False) under inference_mode",
            f"torch compiled: first call {first_compiled_call:.1f} s, so compile time "
            f"{compile_seconds:.1f} s; graphs compiled: {first_call_graphs} by the first "
            f"call, {graphs} over every run at {len(thread_counts)} thread count(s) (one per "
            "thread count: torch.compile specialises on it; one serves every position and "
            "every later call)",
            f"JAX first call {first_jax_call:.1f} s (compiles generate_tokens)",
            "matmul floor: the model's matrix products alone (every Linear and the head, "
            f"F.linear at batch 1, timed in the same rotation), {floors} (prefill included): "
            "compiling can shorten only what lies above the floor",
            f"JAX matmul floor: the same products in one jitted loop, {1e3 * jax_floor:.2f} ms "
            f"per token, a JAX token taking {1 / rate['jax'] / jax_floor:.2f}x that; 10x "
            f"transformers needs {1e3 * jax_goal:.2f} ms per token, "
            f"{jax_goal / jax_floor:.2f}x the products alone on this CPU "
            "(at batch 1 they read every weight once per token: memory-bound)",
            "same tokens = share of greedy tokens equal to torch_block eager's",
        ],
    )


if __name__ == "__main__":
    raise SystemExit(main(run, __doc__))
