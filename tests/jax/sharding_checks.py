"""Sharded jax_block against the same model on one device, on 8 host CPU devices.

Run as a script (tests/jax/test_sharding.py runs it in subprocesses, so the rest of the suite
keeps one device): `python tests/jax/sharding_checks.py OUT.json [CHECK ...]`. It sets
XLA_FLAGS=--xla_force_host_platform_device_count=8 before importing jax, runs the checks
(default: all of CHECKS) and writes the measured numbers as JSON; the pytest side asserts on
them. Nothing here decides pass or fail.
"""

from __future__ import annotations

import os
import sys

DEVICES = 8
# Eight CPU devices; LLVM's cheap settings, which cut compile time by a third: the partitioned
# HLO (its collectives) is the same, and one device and the mesh are compiled alike.
FLAGS = (
    f"--xla_force_host_platform_device_count={DEVICES} --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAGS).strip()

import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402

from jax_block import (  # noqa: E402
    TransformerBlock,
    TransformerLM,
    cached_forward,
    decode_step,
    generate,
    shard_params,
)
from jax_block.generate import generate_tokens  # noqa: E402
from jax_block.sharded_checkpoint import restore_params, restore_train_state, save  # noqa: E402
from jax_block.sharding import make_mesh, named_sharding  # noqa: E402
from jax_block.train import create_train_state, train_step  # noqa: E402
from twin_core import LLAMA_OPTIONS, TrainConfig  # noqa: E402

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]  # (data, tensor, expert)
COMMON = dict(vocab_size=64, max_seq_len=32, d_model=32, n_layers=1, dropout=0.0)
MODELS = {
    "dense": dict(COMMON, n_heads=8, d_ff=64, n_layers=2),  # two layers: collectives per layer
    "moe": dict(
        COMMON,
        n_heads=8,
        d_ff=16,
        use_moe=True,
        num_experts=8,
        top_k_experts=2,
        shared_expert_d_ff=24,
        shared_expert_gate=True,
        tie_embeddings=False,
    ),
    "llama": dict(  # GQA 2:1, rope, RMSNorm, gated SiLU, no biases, untied head
        COMMON,
        **LLAMA_OPTIONS,
        n_heads=16,
        n_kv_heads=8,
        head_dim=4,
        d_ff=48,
        tie_embeddings=False,
    ),
}
B, BUCKET, NEW = 8, 16, 4
S = BUCKET + NEW
LENGTHS = [16, 11, 7, 16, 3, 12, 9, 14]  # real tokens of each prompt (left-padded)
# Adam's first update is lr * g / (|g| + eps): with eps 1e-8 a gradient at rounding level
# (~1e-8) moves its weight by up to lr, whatever its sign; eps 1e-3 keeps the comparison of
# updated weights well-conditioned (an error e in g moves a weight by at most lr * e / eps).
TRAIN = TrainConfig(steps=10, batch_size=B, seq_len=12, lr=1e-2, eps=1e-3, warmup_steps=0)
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")


def prompts(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts (B, BUCKET) and their mask."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab_size, size=(B, BUCKET)).astype(np.int32)
    mask = (np.arange(BUCKET)[None, :] >= BUCKET - np.array(LENGTHS)[:, None]).astype(np.int32)
    return ids * mask, mask


def decode(lm, params, ids, mask, mesh=None) -> dict:
    """The prompts fed one token at a time, then NEW - 1 greedy tokens, through one
    ahead-of-time compilation of `cached_forward` for one token: every step's logits, the
    greedy tokens, the compiled HLO text and what became of the donated cache."""
    place = (
        (lambda a: jnp.asarray(a))
        if mesh is None
        else (lambda a: jax.device_put(a, named_sharding(mesh, ("batch", "length"))))
    )
    key_mask = place(np.concatenate([mask, np.ones((B, NEW), np.int32)], axis=1))  # (B, S)
    cache = lm.create_kv_cache(B, S, mesh=mesh)
    step = cached_forward.lower(lm, params, place(ids[:, :1]), key_mask, cache, mesh=mesh)
    step = step.compile()
    first = jax.tree.leaves(cache[0])[0]  # keys (KVCache) or the latent (LatentCache)
    pointers = [s.data.unsafe_buffer_pointer() for s in first.addressable_shards]
    logits, step_logits, tokens = None, [], []
    for t in range(BUCKET + NEW - 1):
        token = place(ids[:, t : t + 1]) if t < BUCKET else place(tokens[-1])
        logits, cache = step(params, token, key_mask, cache)
        step_logits.append(np.asarray(logits)[:, 0])  # (B, V)
        if t >= BUCKET - 1:
            tokens.append(np.argmax(step_logits[-1], axis=-1).astype(np.int32)[:, None])
    after = [
        s.data.unsafe_buffer_pointer() for s in jax.tree.leaves(cache[0])[0].addressable_shards
    ]
    return dict(
        logits=np.stack(step_logits, axis=1),  # (B, S - 1, V)
        tokens=np.concatenate(tokens, axis=1),  # (B, NEW)
        hlo=step.as_text(),
        cache=cache,
        donated=bool(first.is_deleted()),
        in_place=pointers == after,
    )


def collectives(hlo: str) -> dict:
    """Counts of each collective in compiled HLO text, and the result shapes of all-gathers."""
    counts = {name: len(re.findall(rf"\s{name}(?:-start)?\(", hlo)) for name in COLLECTIVES}
    gathered = re.findall(r"= \(?(\w+\[[\d,]*\])[^=\n]*?\sall-gather(?:-start)?\(", hlo)
    return dict(counts=counts, all_gather_shapes=sorted(set(gathered)))


def first_shards(tree) -> dict[str, list]:
    """{path: shape of the shard on the first device} for every leaf (shards are even)."""
    flat = flatten_dict(tree, sep="/")
    return {k: list(v.addressable_shards[0].data.shape) for k, v in flat.items()}


def bytes_on(tree, device_id: int) -> int:
    """Bytes of `tree`'s arrays held by one device."""
    return sum(
        s.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for s in leaf.addressable_shards
        if s.device.id == device_id
    )


def max_diff(a, b) -> float:
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in leaves)


def copy(tree):
    """A fresh copy on the default device (train_step donates its state)."""
    return jax.tree.map(lambda a: jnp.asarray(np.array(a)), tree)


def init(config: dict, seed: int = 3) -> tuple[TransformerLM, dict]:
    """The model and random NumPy parameters on its shapes (nothing compiles): kernels
    N(0, 1/fan_in), embeddings N(0, 1/4), norm scales 1 + N(0, 1/100), biases N(0, 1/100)."""
    lm = TransformerLM.create(**config)
    shapes = jax.eval_shape(lm.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        z, name = rng.standard_normal(leaf.shape).astype(np.float32), path[-1].key
        if name == "kernel":
            return z / np.float32(np.sqrt(leaf.shape[-2]))
        if name == "embedding":
            return z / 2
        return 1 + z / 10 if name == "scale" else z / 10

    return lm, jax.tree_util.tree_map_with_path(draw, shapes["params"])


def train_batch(vocab_size: int) -> jax.Array:
    rng = np.random.default_rng(1)
    return jnp.asarray(rng.integers(0, vocab_size, size=(B, TRAIN.seq_len + 1)), jnp.int32)


ONE_DEVICE: dict[str, dict] = {}  # decode() of each model on one device


def check_model(name: str, config: dict, out: dict) -> None:
    """Every mesh of MESHES against one device, for one model; generate on (2, 2, 2)."""
    lm, params = init(config)
    ids, mask = prompts(lm.config.vocab_size)
    batch, rng = train_batch(lm.config.vocab_size), jax.random.PRNGKey(5)
    one = ONE_DEVICE[name] = decode(lm, copy(params), ids, mask)
    one_state, one_metrics = train_step(create_train_state(lm, copy(params), TRAIN), batch, rng)
    out["config"] = {k: v for k, v in config.items() if isinstance(v, (int, float, str))}
    out["full_shapes"] = {k: list(v.shape) for k, v in flatten_dict(params, sep="/").items()}
    out["param_bytes"] = sum(a.nbytes for a in jax.tree.leaves(params))
    out["cache_bytes"] = bytes_on(one["cache"], 0)
    for shape in MESHES:
        start = time.perf_counter()
        mesh = make_mesh(*shape)
        case = out.setdefault("meshes", {}).setdefault(str(shape), {})
        sharded = shard_params(lm, params, mesh)  # from NumPy: sliced on the host
        run = decode(lm, sharded, ids, mask, mesh)
        case["logits_max_abs_diff"] = float(np.max(np.abs(one["logits"] - run["logits"])))
        case["greedy_equal"] = bool(np.array_equal(one["tokens"], run["tokens"]))
        case["param_shards"] = first_shards(sharded)
        case["param_bytes_per_device"] = [bytes_on(sharded, d) for d in range(DEVICES)]
        k_cache = run["cache"][0].k_cache
        case["cache_shard"] = list(k_cache.addressable_shards[0].data.shape)
        case["cache_bytes_per_device"] = [bytes_on(run["cache"], d) for d in range(DEVICES)]
        case["cache_donated"], case["cache_in_place"] = run["donated"], run["in_place"]
        case["decode_collectives"] = collectives(run["hlo"])
        state = create_train_state(lm, params, TRAIN, mesh=mesh)
        before = jax.tree.map(lambda a: a.sharding, state)
        state, metrics = train_step(state, batch, rng)
        case["train_loss_diff"] = abs(float(metrics["loss"]) - float(one_metrics["loss"]))
        case["train_params_max_abs_diff"] = max_diff(one_state.params, state.params)
        case["train_opt_state_max_abs_diff"] = max_diff(one_state.opt_state, state.opt_state)
        case["train_param_shards"] = first_shards(state.params)
        case["train_mu_shards"] = first_shards(state.opt_state[1][0].mu)
        case["train_shardings_kept"] = before == jax.tree.map(lambda a: a.sharding, state)
        case["seconds"] = round(time.perf_counter() - start, 2)
        if shape == (2, 2, 2):
            check_generate(lm, sharded, ids, mask, mesh, one["tokens"], case)


def check_generate(lm, sharded, ids, mask, mesh, expected: np.ndarray, case: dict) -> None:
    """generate on the mesh against the greedy tokens of one device; a second prompt length in
    the same bucket compiles nothing new."""
    before = generate_tokens._cache_size()
    tokens = generate(lm, sharded, ids, mask, max_new_tokens=NEW, mesh=mesh)
    shorter = generate(lm, sharded, ids[:, 2:], mask[:, 2:], max_new_tokens=NEW, mesh=mesh)
    case["generate_equal"] = bool(np.array_equal(expected, np.asarray(tokens)))
    case["generate_compilations"] = generate_tokens._cache_size() - before
    case["generate_shorter_shape"] = list(np.asarray(shorter).shape)


def check_missing_axis(out: dict) -> None:
    """A (data, expert) mesh without `tensor`: the rules naming it replicate (the dense model)."""
    lm, params = init(MODELS["dense"])
    ids, mask = prompts(lm.config.vocab_size)
    mesh = jax.make_mesh((4, 2), ("data", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = shard_params(lm, params, mesh)
    run = decode(lm, sharded, ids, mask, mesh)
    one = ONE_DEVICE["dense"]
    out["logits_max_abs_diff"] = float(np.max(np.abs(one["logits"] - run["logits"])))
    out["greedy_equal"] = bool(np.array_equal(one["tokens"], run["tokens"]))
    out["param_shards"] = first_shards(sharded)
    out["cache_shard"] = list(run["cache"][0].k_cache.addressable_shards[0].data.shape)


def check_decode_step(out: dict) -> None:
    """decode_step of one block (the llama model's) on (2, 2, 2) against one device: a
    prefill of 5 tokens, then single tokens, every step compiled once per shape."""
    config = {k: v for k, v in MODELS["llama"].items() if k not in ("vocab_size", "max_seq_len")}
    config.pop("n_layers"), config.pop("tie_embeddings")
    block = TransformerBlock.create(**config)
    shapes = jax.eval_shape(block.init, jax.random.PRNGKey(0), jnp.zeros((1, 1, 32)))["params"]
    rng = np.random.default_rng(4)
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) / 4).astype(np.float32), shapes)
    x = rng.standard_normal((B, 8, config["d_model"])).astype(np.float32)
    mesh = make_mesh(2, 2, 2)
    outputs = []
    for on_mesh in (None, mesh):
        p = copy(params) if on_mesh is None else shard_params(block, params, on_mesh)
        cache = block.create_kv_cache(B, 8, mesh=on_mesh)
        before = decode_step._cache_size()
        y, cache = decode_step(block, p, x[:, :5], cache, mesh=on_mesh)
        ys = [np.asarray(y)]
        for t in range(5, 8):
            y, cache = decode_step(block, p, x[:, t : t + 1], cache, mesh=on_mesh)
            ys.append(np.asarray(y))
        outputs.append(np.concatenate(ys, axis=1))
        out["compilations"] = decode_step._cache_size() - before
        out["cache_shard"] = list(cache.k_cache.addressable_shards[0].data.shape)
    out["max_abs_diff"] = float(np.max(np.abs(outputs[0] - outputs[1])))


COMPILATIONS = [0]  # XLA compilations so far (counted by a jax.monitoring listener)


def count_compilations(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILATIONS[0] += 1


def error(call) -> tuple[str, int]:
    """(the ValueError's message, XLA compilations the call ran)."""
    before = COMPILATIONS[0]
    try:
        call()
    except ValueError as e:
        return str(e), COMPILATIONS[0] - before
    return "no ValueError", COMPILATIONS[0] - before


def check_bad_inputs(out: dict) -> None:
    """ValueErrors before anything compiles: what each says, and how many compilations ran."""
    lm, params = init(MODELS["dense"])
    few_heads, few_params = init(dict(MODELS["dense"], n_heads=4))
    few_kv, few_kv_params = init(dict(MODELS["llama"], n_kv_heads=2))
    data8, tensor8 = make_mesh(8, 1, 1), make_mesh(1, 8, 1)
    ids6, mask6 = (a[:6] for a in prompts(lm.config.vocab_size))
    sharded = shard_params(lm, params, data8)
    cache6, ids6_on_device = lm.create_kv_cache(6, S), jnp.asarray(ids6)
    six = TrainConfig(steps=10, batch_size=6, seq_len=12, warmup_steps=0)
    out["errors"] = {
        "heads": error(lambda: shard_params(few_heads, few_params, tensor8)),
        "kv_heads": error(lambda: shard_params(few_kv, few_kv_params, tensor8)),
        "kv_heads_cache": error(lambda: few_kv.create_kv_cache(8, S, mesh=tensor8)),
        "generate_batch": error(
            lambda: generate(lm, sharded, ids6, mask6, max_new_tokens=NEW, mesh=data8)
        ),
        "cache_batch": error(lambda: lm.create_kv_cache(6, S, mesh=data8)),
        "cached_forward_batch": error(
            lambda: cached_forward(lm, sharded, ids6_on_device, None, cache6, mesh=data8)
        ),
        "train_batch": error(lambda: create_train_state(lm, params, six, mesh=data8)),
    }


def check_checkpoint(out: dict) -> None:
    """Params and a train state saved from (2, 2, 2) after one step, restored on (1, 4, 2):
    the next step there against the next step on (2, 2, 2)."""
    lm, params = init(MODELS["dense"])
    batch, rng = train_batch(lm.config.vocab_size), jax.random.PRNGKey(5)
    old, new = make_mesh(2, 2, 2), make_mesh(1, 4, 2)
    before = train_step._cache_size()
    state, _ = train_step(create_train_state(lm, params, TRAIN, mesh=old), batch, rng)
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp) / "params", state.params)
        save(Path(tmp) / "state", state)
        moved_params = restore_params(Path(tmp) / "params", lm, new)
        moved = restore_train_state(Path(tmp) / "state", lm, TRAIN, new)
    out["params_restored_max_abs_diff"] = max_diff(state.params, moved_params)
    out["restored_param_shards"] = first_shards(moved_params)
    out["restored_state_param_shards"] = first_shards(moved.params)
    out["restored_step"] = int(moved.step)
    state, metrics = train_step(state, batch, rng)
    out["compilations_for_two_steps"] = train_step._cache_size() - before
    moved, moved_metrics = train_step(moved, batch, rng)
    out["loss"], out["loss_after_restore"] = float(metrics["loss"]), float(moved_metrics["loss"])
    out["params_max_abs_diff"] = max_diff(state.params, moved.params)


# GPT-OSS (sinks, router bias, biased experts with the clamped SwiGLU, a sliding layer) and
# DeepSeek-V3 (latent attention and its cache, grouped sigmoid routing with a nonzero correction
# bias, a shared expert), each on the one mesh FRONTIER_MESH
FRONTIER = {
    "gpt_oss": dict(
        COMMON,
        n_heads=4,
        n_kv_heads=2,
        d_ff=16,
        norm="rmsnorm",
        positions="rope",
        gated_ffn=True,
        activation="silu",
        use_moe=True,
        num_experts=4,
        attention_sinks=True,
        router_bias=True,
        swiglu_limit=0.5,
        sliding_window=6,
        layer_types=("sliding_attention",),
        tie_embeddings=False,
    ),
    "deepseek_v3": dict(
        COMMON,
        n_heads=4,
        d_ff=16,
        **LLAMA_OPTIONS,
        use_moe=True,
        num_experts=4,
        shared_expert_d_ff=16,
        router="grouped_sigmoid",
        n_group=2,
        q_lora_rank=8,
        kv_lora_rank=8,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        v_head_dim=4,
        tie_embeddings=False,
    ),
}
# Llama with its 3 layers scanned: stacked parameters and a stacked cache on the mesh
FRONTIER["llama_scanned"] = dict(MODELS["llama"], n_layers=3, scan_layers=True)
FRONTIER_MESH = (2, 2, 2)


def check_frontier(out: dict) -> None:
    """Each FRONTIER model on FRONTIER_MESH against one device: the prompts' cached decode and
    greedy tokens, the parameters' and the cache's pieces on the first device."""
    mesh = make_mesh(*FRONTIER_MESH)
    for name, config in FRONTIER.items():
        case = out.setdefault(name, {})
        lm, params = init(config)
        ids, mask = prompts(lm.config.vocab_size)
        one = decode(lm, copy(params), ids, mask)
        sharded = shard_params(lm, params, mesh)
        run = decode(lm, sharded, ids, mask, mesh)
        case["logits_max_abs_diff"] = float(np.max(np.abs(one["logits"] - run["logits"])))
        case["greedy_equal"] = bool(np.array_equal(one["tokens"], run["tokens"]))
        case["full_shapes"] = {k: list(v.shape) for k, v in flatten_dict(params, sep="/").items()}
        case["param_shards"] = first_shards(sharded)
        first = run["cache"][0]
        first = first[0] if isinstance(first, tuple) else first  # a scanned group's: stacked
        case["cache_shards"] = {
            type(first).__name__ + "." + field: list(leaf.addressable_shards[0].data.shape)
            for field, leaf in vars(first).items()
        }
        case["cache_bytes"] = bytes_on(one["cache"], 0)
        case["cache_bytes_per_device"] = [bytes_on(run["cache"], d) for d in range(DEVICES)]
        case["cache_donated"], case["cache_in_place"] = run["donated"], run["in_place"]


CHECKS = {
    **{name: (lambda o, n=name: check_model(n, MODELS[n], o)) for name in MODELS},
    "missing_axis": check_missing_axis,  # after "dense"
    "decode_step": check_decode_step,
    "bad_inputs": check_bad_inputs,
    "checkpoint": check_checkpoint,
    "frontier": check_frontier,
}


def main(path: str, names: list[str]) -> None:
    """Run the checks `names` (default: all) in order; write {name: numbers} to `path`."""
    jax.monitoring.register_event_duration_secs_listener(count_compilations)
    out: dict = {"devices": jax.device_count(), "seconds": {}, "shape": [B, BUCKET, NEW]}
    for name in names or CHECKS:
        start = time.perf_counter()
        CHECKS[name](out.setdefault(name, {}))
        out["seconds"][name] = round(time.perf_counter() - start, 2)
    out["compilations"] = COMPILATIONS[0]
    Path(path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
