"""Real model sizes (issue 23): transformers, torch_block and jax_block on checkpoints of the
shapes people run, where every framework is bound by reading the weights once per token.

Each shape is built once with transformers (random weights, seed 0; the final norm's weight
widened WIDEN times so that the logits spread and greedy decoding is not decided by rounding
ties) and saved with `save_pretrained` into the cache folder (`--cache`, reused between runs,
one folder per shape and dtype). Then, each in a fresh subprocess so that peak memory is its
own: the matrix-vector bandwidth of this machine (torch and JAX, in the row's dtype), then
transformers (`from_pretrained` + `generate`), torch_block (`parity.from_hf` +
`torch_block.generate`) and jax_block (`parity.from_hf(..., "jax")` + `jax_block.generate`).
Each reports its load time, first call (JAX: the compile), tokens/s at batch 1 and 8, peak RSS
growth over the weights' bytes, its greedy tokens (compared with transformers') and its share of
the bandwidth floor.

    python -m benchmarks.real_size [--rows qwen2-0.5b,llama-3.2-1b] [--dtype bfloat16] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .common import (
    RESULTS_DIR,
    Panel,
    Result,
    Target,
    command_name,
    finish,
    measure,
)
from .models import transformers_greedy

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = RESULTS_DIR / "real_size_checkpoints"
WIDEN = 8.0  # the final norm's weight: logits of std ~ WIDEN * 0.02 * sqrt(d_model)
NO_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# transformers config of each shape: the real model's widths, depths, heads and vocabulary
SHAPES: dict[str, dict] = {
    "qwen2-0.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
    ),
    "llama-3.2-1b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        rope_scaling=LLAMA3_ROPE,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
    ),
    # Qwen1.5-MoE-A2.7B's router (60 experts, top 4, a gated shared expert) at half its width
    # and depth: 7.0 GB in float32
    "qwen2-moe": dict(
        model_type="qwen2_moe",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=2816,
        moe_intermediate_size=576,
        shared_expert_intermediate_size=2816,
        num_experts=60,
        num_experts_per_tok=4,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
        max_position_embeddings=8192,
    ),
    # the benchmark's own smoke test (tests/test_real_size.py): seconds, not a target
    "tiny": dict(
        model_type="llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=256,
    ),
}
ROWS = [  # (shape, dtype) run by default
    ("qwen2-0.5b", "float32"),
    ("llama-3.2-1b", "float32"),
    ("llama-3.2-1b", "bfloat16"),
    ("qwen2-moe", "float32"),
]
FRAMEWORKS = ("transformers", "torch", "jax")
PROMPT_LEN, BATCHES = 8, (1, 8)
# targets of issue 23, over transformers in the same run
JAX_OVER_TRANSFORMERS, TORCH_OVER_TRANSFORMERS = 1.05, 1.1
LOAD_TIME_RATIO, LOAD_PEAK_RATIO, JAX_BF16_PEAK_RATIO = 1.5, 1.2, 1.3


# --------------------------------------------------------------------------- the checkpoints
def folder_of(cache: Path, shape: str, dtype: str) -> Path:
    return cache / f"{shape}-{dtype}"


def build(shape: str, dtype: str, folder: Path) -> None:
    """Save the shape's checkpoint, random weights of seed 0 in `dtype`, into `folder` (once:
    a folder holding config.json is reused)."""
    if (folder / "config.json").is_file():
        return
    import torch
    import transformers

    fields = dict(SHAPES[shape])
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields, **NO_TOKENS)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.model.norm.weight.mul_(WIDEN)
    model = model.to(getattr(torch, dtype))
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    partial.rename(folder)


def weight_bytes(folder: Path) -> int:
    """Bytes of the checkpoint's weight files."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def step_bytes(folder: Path) -> int:
    """Bytes a batch-1 decode step reads: every weight once, but the token embedding only when
    it is also the head (tied), and of each MoE layer's experts only the top-k it routes to."""
    from twin_core.files import read_safetensors_header

    config = json.loads((folder / "config.json").read_text())
    top_k, experts = config.get("num_experts_per_tok"), config.get("num_experts")
    total = 0
    for path in folder.glob("*.safetensors"):
        for name, entry in read_safetensors_header(path).tensors.items():
            if name.endswith("embed_tokens.weight") and not config.get("tie_word_embeddings"):
                continue
            share = top_k / experts if ".mlp.experts." in name else 1.0
            total += entry.count * share
    return int(total)


# --------------------------------------------------------------------------- one phase
def status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Peak RSS (VmHWM) := the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def prompt_ids(batch: int, vocab_size: int):
    import numpy as np

    return np.random.default_rng(batch).integers(0, vocab_size, (batch, PROMPT_LEN), np.int64)


def loaders(framework: str, folder: Path, dtype: str):
    """(load, generate(model, ids (B, T) NumPy, n) -> NumPy tokens (B, n)) of one framework."""
    if framework == "transformers":
        import torch
        import transformers

        def load():
            model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, dtype=getattr(torch, dtype)
            )
            return model.eval()

        def generate(model, ids, n):
            return transformers_greedy(model, torch.from_numpy(ids), n).numpy()

        return load, generate
    import parity

    if framework == "torch":
        import torch

        import torch_block

        def generate(model, ids, n):
            with torch.inference_mode():
                return torch_block.generate(model, torch.from_numpy(ids), max_new_tokens=n).numpy()

        return lambda: parity.from_hf(folder), generate
    import jax
    import numpy as np

    from jax_block.generate import generate as jax_generate

    def load():
        lm, params = parity.from_hf(folder, "jax")
        return lm, jax.block_until_ready(params)

    def generate(model, ids, n):
        return np.asarray(jax_generate(model[0], model[1], ids, max_new_tokens=n))

    return load, generate


def run_phase(framework: str, folder: Path, dtype: str, new_tokens: int, repeats: int) -> dict:
    """Load `folder` in `framework` and generate; times in s, memory in bytes, tokens as lists."""
    load, generate = loaders(framework, folder, dtype)
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    before = status_kib("VmRSS")
    reset_peak()
    start = time.perf_counter()
    model = load()
    out = {
        "load_s": time.perf_counter() - start,
        "load_peak": 1024 * (status_kib("VmHWM") - before),
    }
    for batch in BATCHES:
        ids = prompt_ids(batch, vocab_size)
        start = time.perf_counter()
        tokens = generate(model, ids, new_tokens)
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            generate(model, ids, new_tokens)
            times.append(time.perf_counter() - start)
        out[f"b{batch}"] = {"first_s": first, "times": times, "tokens": tokens.tolist()}
    out["peak"] = 1024 * (status_kib("VmHWM") - before)
    return out


def matvec_bandwidth(dtype: str, megabytes: int, repeats: int) -> dict[str, float]:
    """Bytes per second read by a batch-1 matrix-vector product over a `megabytes` matrix in
    `dtype`: torch's F.linear (weight (out, in)) and jitted JAX x @ W in both layouts, x of
    shape (1, in) (in bfloat16 XLA CPU fuses its float32 conversion of the weight only into
    such a one-row product against W (out, in); a model's (B, T, d) products convert the
    whole weight first)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F

    from .common import block, compare_times

    inner = 2048
    outer = megabytes * 2**20 // (inner * (2 if dtype == "bfloat16" else 4))
    weight = torch.randn(outer, inner).to(getattr(torch, dtype))  # (out, in)
    x = torch.randn(1, inner).to(weight.dtype)
    jdtype = getattr(jnp, dtype)
    rows = jnp.asarray(np.random.default_rng(0).standard_normal((outer, inner)), jdtype)
    columns = rows.T.copy()  # (in, out), as jax_block's kernels
    jx = jnp.ones((1, inner), jdtype)
    times_rows = jax.jit(lambda x, w: x @ w.T)
    times_columns = jax.jit(lambda x, w: x @ w)

    def torch_run():
        with torch.inference_mode():
            F.linear(x, weight)

    times = compare_times(
        {
            "torch F.linear": torch_run,
            "jax x @ W.T, W (out, in)": lambda: block(times_rows(jx, rows)),
            "jax x @ W, W (in, out)": lambda: block(times_columns(jx, columns)),
        },
        repeats,
        warmup=1,
    )
    nbytes = weight.numel() * weight.element_size()
    return {name: nbytes / t["min"] for name, t in times.items()}


def child_main(argv: list[str]) -> int:
    """`--phase` of a subprocess: print one line of JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", required=True)
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--shape")
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    bandwidth = (256 if args.new_tokens < 16 else 1024, 5)
    print(json.dumps(one_phase(**vars(args), bandwidth=bandwidth)))
    return 0


def one_phase(
    phase: str,
    dtype: str,
    folder: Path | None = None,
    shape: str | None = None,
    new_tokens: int = 32,
    repeats: int = 2,
    *,
    bandwidth: tuple[int, int],
) -> dict:
    """The phase named `phase`: "build" (the checkpoint of `shape` into `folder`; {}),
    "bandwidth" (`matvec_bandwidth` over `bandwidth` = (megabytes, repeats)) or a framework's
    `run_phase`."""
    if phase == "build":
        build(shape, dtype, folder)
        return {}
    if phase == "bandwidth":
        return matvec_bandwidth(dtype, *bandwidth)
    return run_phase(phase, folder, dtype, new_tokens, repeats)


def in_subprocess(**fields) -> dict:
    """A phase in a fresh Python process; its JSON."""
    command = [sys.executable, "-m", "benchmarks.real_size"]
    for key, value in fields.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    print("$ " + " ".join(command[1:]), file=sys.stderr, flush=True)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:])} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def in_process(**fields) -> dict:
    """A phase in this process (the smoke test: memory figures are then not its own)."""
    return one_phase(**fields, bandwidth=(16, 2))


# --------------------------------------------------------------------------- a row
def agreement(ours: list, theirs: list) -> float:
    """Share of greedy tokens equal to transformers', position by position."""
    pairs = [(a, b) for r, s in zip(ours, theirs, strict=True) for a, b in zip(r, s, strict=True)]
    return sum(a == b for a, b in pairs) / len(pairs)


def measure_row(
    shape: str, dtype: str, cache: Path, new_tokens: int, repeats: int, run_phase_in
) -> list[dict]:
    """One table row per framework for the checkpoint of (shape, dtype)."""
    folder = folder_of(cache, shape, dtype)
    run_phase_in(phase="build", shape=shape, dtype=dtype, folder=folder)
    bandwidth = run_phase_in(phase="bandwidth", dtype=dtype, new_tokens=new_tokens)
    best = max(bandwidth.values())
    phases = {
        framework: run_phase_in(
            phase=framework,
            folder=folder,
            dtype=dtype,
            new_tokens=new_tokens,
            repeats=repeats,
        )
        for framework in FRAMEWORKS
    }
    nbytes, read = weight_bytes(folder), step_bytes(folder)
    floor_s = read / best  # seconds per token to read the weights once
    rate = {
        (f, b): new_tokens * b / min(phases[f][f"b{b}"]["times"])
        for f in FRAMEWORKS
        for b in BATCHES
    }
    rows = []
    for framework in FRAMEWORKS:
        phase = phases[framework]
        reference = phases["transformers"]
        rows.append(
            {
                "row": f"{shape}, {dtype}",
                "framework": framework,
                "GB": nbytes / 1e9,
                "load s": phase["load_s"],
                "load x tf": phase["load_s"] / reference["load_s"],
                "load peak / GB": phase["load_peak"] / nbytes,
                "first call s": phase["b1"]["first_s"],
                "tok/s b1": rate[(framework, 1)],
                "b1 x tf": rate[(framework, 1)] / rate[("transformers", 1)],
                "tok/s b8": rate[(framework, 8)],
                "b8 x tf": rate[(framework, 8)] / rate[("transformers", 8)],
                "peak / GB": phase["peak"] / nbytes,
                "same tokens b1": agreement(phase["b1"]["tokens"], reference["b1"]["tokens"]),
                "same tokens b8": agreement(phase["b8"]["tokens"], reference["b8"]["tokens"]),
                "floor share": floor_s * rate[(framework, 1)],
                "bandwidth GB/s": bandwidth,
                "step GB": read / 1e9,
                "times": {f"b{b}": phase[f"b{b}"]["times"] for b in BATCHES},
            }
        )
    return rows


def targets_of(rows: list[dict]) -> list[Target]:
    """Issue 23's targets 2-4 for every measured row."""
    targets = []
    for row in rows:
        name, framework = row["row"], row["framework"]
        if framework == "transformers":
            continue
        label = "JAX" if framework == "jax" else "torch"
        goal = JAX_OVER_TRANSFORMERS if framework == "jax" else TORCH_OVER_TRANSFORMERS
        targets += [
            Target(
                f"real_size: {name}: {label} / transformers tokens/s, batch 1", row["b1 x tf"], goal
            ),
            Target(
                f"real_size: {name}: {label} from_hf / from_pretrained time",
                row["load x tf"],
                LOAD_TIME_RATIO,
                higher_is_better=False,
            ),
            Target(
                f"real_size: {name}: {label} from_hf peak RSS / checkpoint bytes",
                row["load peak / GB"],
                LOAD_PEAK_RATIO,
                higher_is_better=False,
            ),
        ]
        if framework == "jax" and name.endswith("bfloat16"):
            targets.append(
                Target(
                    f"real_size: {name}: JAX peak RSS / weight bytes",
                    row["peak / GB"],
                    JAX_BF16_PEAK_RATIO,
                    higher_is_better=False,
                )
            )
    return targets


COLUMNS = [
    "row",
    "framework",
    "GB",
    "load s",
    "load x tf",
    "load peak / GB",
    "first call s",
    "tok/s b1",
    "b1 x tf",
    "tok/s b8",
    "b8 x tf",
    "peak / GB",
    "same tokens b1",
    "same tokens b8",
    "floor share",
]


def run_rows(
    rows: list[tuple[str, str]], cache: Path, new_tokens: int, repeats: int, isolated: bool = True
) -> Result:
    """Every (shape, dtype) of `rows`, measured and judged."""
    run_phase_in = in_subprocess if isolated else in_process
    table = []
    for shape, dtype in rows:
        table += measure_row(shape, dtype, cache, new_tokens, repeats, run_phase_in)
    groups = sorted({r["row"] for r in table}, key=[r["row"] for r in table].index)
    by = {(r["row"], r["framework"]): r for r in table}
    panels = [
        Panel(
            "tokens/s over transformers', batch 1",
            "ratio",
            groups,
            {f: [by[(g, f)]["b1 x tf"] for g in groups] for f in ("torch", "jax")},
            [(JAX_OVER_TRANSFORMERS, "JAX target"), (TORCH_OVER_TRANSFORMERS, "torch target")],
        ),
        Panel(
            "share of the bandwidth floor, batch 1",
            "floor share",
            groups,
            {f: [by[(g, f)]["floor share"] for g in groups] for f in FRAMEWORKS},
        ),
        Panel(
            "load time over transformers'",
            "ratio",
            groups,
            {f: [by[(g, f)]["load x tf"] for g in groups] for f in ("torch", "jax")},
            [(LOAD_TIME_RATIO, "target")],
        ),
    ]
    bandwidths = "; ".join(
        f"{r['row']}: "
        + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in r["bandwidth GB/s"].items())
        + f"; a step reads {r['step GB']:.2f} GB"
        for r in table
        if r["framework"] == "transformers"
    )
    return Result(
        name="real_size",
        title="Real model sizes: transformers, torch_block, jax_block from the same HF checkpoint",
        columns=COLUMNS,
        rows=table,
        targets=targets_of(table),
        panels=panels,
        notes=[
            f"greedy, {PROMPT_LEN}-token random prompt, {new_tokens} new tokens; tokens/s = "
            f"batch * new tokens / the fastest of {repeats} generate calls after the first "
            "(prefill included); 'first call s' is the first batch-1 call (JAX: its compile)",
            "each framework in its own process: load s = from_pretrained (transformers) or "
            "parity.from_hf (ours, until the params are ready); 'load peak / GB' and "
            "'peak / GB' = growth of peak RSS (VmHWM) over the RSS after imports, during the "
            "load and over the whole run, over the checkpoint's bytes",
            "same tokens = share of greedy tokens equal to transformers' (batch 1 and 8)",
            "floor share = (bytes a batch-1 step reads / the best matrix-vector bandwidth "
            "measured in the same run) * tokens/s: 1 would be reading every weight once per "
            f"token at that bandwidth. Bandwidths: {bandwidths}",
            f"random weights of seed 0 saved by transformers; the final norm's weight x{WIDEN:g} "
            "so that greedy tokens are not decided by rounding ties; qwen2-moe is "
            "Qwen1.5-MoE-A2.7B's router (60 experts, top 4, gated shared expert) at width 1024 "
            "and 12 layers",
            "timings on this shared machine are noisy: compare ratios within one run, repeat",
            "measured causes of the known misses (docs/design.md 'Real model sizes'): JAX "
            "bfloat16 tokens/s and peak: XLA CPU has no bfloat16 matrix product and converts "
            "each bfloat16 weight into a fresh float32 buffer at every call, in either kernel "
            "layout (the bandwidths above: only a 2-D one-row x @ W.T fuses the conversion; a "
            "model's (B, T, d) activations do not); JAX load time: its arrays are fresh memory, "
            "first touched while each kernel is read or transposed into it, where transformers "
            "and torch_block map the file; torch bfloat16 tokens/s: PyTorch's bfloat16 "
            "matrix-vector products (MKL's and oneDNN's alike) read no faster than "
            "transformers' own",
        ],
    )


def parse_rows(names: str | None, dtype: str | None) -> list[tuple[str, str]]:
    """(shape, dtype) pairs of `--rows a,b` and `--dtype`; ValueError naming unknown shapes."""
    if names is None:
        rows = ROWS
    else:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in SHAPES]
        if unknown or not wanted:
            raise ValueError(f"--rows: expected names among {sorted(SHAPES)}, got {names!r}")
        rows = [r for r in ROWS if r[0] in wanted] or [(n, "float32") for n in wanted]
        rows += [(n, "float32") for n in wanted if n not in {r[0] for r in rows}]
    if dtype is not None:
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype: expected float32 or bfloat16, got {dtype!r}")
        rows = list(dict.fromkeys((shape, dtype) for shape, _ in rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a.startswith("--phase") for a in argv):
        return child_main(argv)
    parser = argparse.ArgumentParser(
        prog=command_name(__name__), description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rows", help=f"comma-separated shapes among {', '.join(SHAPES)}")
    parser.add_argument("--dtype", help="float32 or bfloat16 for every row (default: per row)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=CACHE_DIR, help="checkpoint folder")
    parser.add_argument("--quick", action="store_true", help="8 new tokens, one repeat")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="JSON and PNG folder")
    args = parser.parse_args(argv)
    rows = parse_rows(args.rows, args.dtype)
    new_tokens, repeats = (8, 1) if args.quick else (args.new_tokens, args.repeats)
    args.cache.mkdir(parents=True, exist_ok=True)
    result = measure(lambda quick: run_rows(rows, args.cache, new_tokens, repeats), args.quick)
    status = finish(result, args.out, args.check)
    if args.check:
        for target in result.targets:
            verdict = "met" if target.met else "MISSED"
            print(f"{verdict}: {target.name}: {target.value:.3g}, goal {target.goal}")
    return status


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
