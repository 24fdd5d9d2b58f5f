"""Training in torch and JAX from the same weights: gradients, 50-step trajectories, learning
rates, weight-decay groups, training state carried from one framework to the other.

Every comparison is computed here with NumPy; `parity.report.cases.train` only builds the models.
The attention key bias is compared apart: the loss does not depend on it (softmax cancels a
shift common to a query's scores; proven below), so its exact gradient is 0 and AdamW turns
each framework's rounding noise into unrelated steps.
"""

from __future__ import annotations

import functools
import json
import math

import jax
import numpy as np
import optax
import pytest
import safetensors
import torch
from flax.traverse_util import flatten_dict

import jax_block.train as jt
import torch_block.train as tt
from parity.convert import convert_train_state, flax_to_torch, from_torch, load, torch_to_flax
from parity.convert.mapping import lm_table
from parity.report.cases import train as tc
from parity.report.registry import CASES, Setup
from torch_block.lm import TransformerLM
from twin_core import LLAMA_OPTIONS, LMConfig, TrainConfig

CONFIGS = ("dense", "moe")
STEPS = tc.TRAIN_KWARGS["steps"]
GRAD_RTOL = 1e-4  # docs/design.md section 7
LOSS_ATOL = 1e-4  # every step
WEIGHT_RTOL = 1e-4  # final weights
NOISE = 1e-6  # a gradient below this fraction of the largest one is rounding noise
RNG = jax.random.PRNGKey(0)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tensors are tiny: one thread is much faster than two competing with XLA's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def data() -> np.ndarray:
    return tc.training_text(tc.LM_CONFIGS["dense"]["vocab_size"])


def states(config: str, seed: int = 0):
    """(torch state, JAX state, torch model, flax module): the same weights, step 0."""
    model, flax_lm, params = tc.build(config, seed)
    run = tc.train_config(seed)
    return (
        tt.create_train_state(model, run),
        jt.create_train_state(flax_lm, params, run),
        model,
        flax_lm,
    )


def as_torch_numpy(tree: dict, flax_lm) -> dict[str, np.ndarray]:
    """Flax params (or a tree shaped like them) as float64 arrays under torch parameter names."""
    state_dict = flax_to_torch(tree, flax_lm)
    return {k: v.double().numpy() for k, v in state_dict.items() if not k.endswith("_counts")}


def rel_errors(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> dict:
    """Per key: max |expected - actual| / max |expected|."""
    return {
        k: float(np.max(np.abs(e - actual[k])) / max(np.max(np.abs(e)), 1e-30))
        for k, e in expected.items()
    }


def is_key_bias(key: str) -> bool:
    return key.endswith("attention.k_proj.bias")


def expand(rows, config: LMConfig) -> dict[str, bool]:
    """torch key -> transpose flag of every row (experts expanded)."""
    out = {}
    for row in rows:
        keys = [row.torch_key.format(e=e) for e in range(config.num_experts)]
        for key in keys if "{e}" in row.torch_key else [row.torch_key]:
            out[key] = row.transpose
    return out


# --------------------------------------------------------------------------- optimizer setup
@pytest.mark.parametrize("overrides", [{}, {"use_moe": True}, {"tie_embeddings": False}])
def test_weight_decay_groups_are_the_linear_weights_in_both(overrides):
    """Decayed = transposed between the frameworks = a Linear weight, by the mapping table."""
    torch.manual_seed(0)
    config = {**tc.LM_CONFIGS["dense"], **overrides}
    model = TransformerLM(**config)
    flax_lm, params = from_torch(model)
    table = lm_table(model.config)
    expected_torch = expand(table, model.config)
    expected_flax = {row.flax_path: row.transpose for row in table}

    assert tt.weight_decay_mask(model) == expected_torch
    assert flatten_dict(jt.weight_decay_mask(params), sep="/") == expected_flax
    if not model.config.tie_embeddings:
        assert expected_torch["lm_head.weight"]
    assert not expected_torch["token_embedding.weight"]


def reference_lr(count: int, lr: float, warmup: int, steps: int, ratio: float) -> float:
    """Linear warmup from 0 over `warmup` updates, then cosine to lr * ratio at `steps`."""
    if count < warmup:
        return lr * count / warmup
    progress = min(count - warmup, steps - warmup) / (steps - warmup)
    return lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(steps=50, warmup_steps=5, lr=3e-3, min_lr_ratio=0.1),
        dict(steps=20, warmup_steps=0, lr=1.0, min_lr_ratio=0.0),
        dict(steps=7, warmup_steps=6, lr=0.5, min_lr_ratio=1.0),
    ],
)
def test_update_t_uses_the_same_learning_rate_in_both(kwargs):
    """optax evaluates its schedule at the count of updates before this one; LambdaLR, stepped
    after each update, must hand the optimizer exactly that value, in both param groups."""
    torch_config = TrainConfig(**kwargs)
    jax_schedule = jt.lr_schedule(TrainConfig(**kwargs))
    model = torch.nn.Linear(3, 3)  # one decayed and one not-decayed parameter
    optimizer, scheduler = tt.create_optimizer(model, torch_config)
    lr, warmup, steps, ratio = (kwargs[k] for k in ("lr", "warmup_steps", "steps", "min_lr_ratio"))
    jax_lrs = np.asarray(jax_schedule(np.arange(steps + 3)))
    for count in range(steps + 3):
        want = reference_lr(count, lr, warmup, steps, ratio)
        used = [group["lr"] for group in optimizer.param_groups]
        assert used == pytest.approx([want, want], rel=1e-12, abs=1e-15)
        assert jax_lrs[count] == pytest.approx(want, rel=1e-5, abs=1e-9)  # float32
        optimizer.step()  # no gradients: nothing moves, but the order of calls is a real run's
        scheduler.step()


def test_resumed_torch_optimizer_starts_at_the_saved_step():
    config = TrainConfig(**tc.TRAIN_KWARGS)
    optimizer, _ = tt.create_optimizer(torch.nn.Linear(2, 2), config, step=17)
    want = reference_lr(17, config.lr, config.warmup_steps, config.steps, config.min_lr_ratio)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([want, want], rel=1e-12)


# --------------------------------------------------------------------------- gradients
@functools.cache
def gradients_of(config: str) -> dict:
    """Both frameworks' loss and gradients at the same weights on batch 0, in training mode."""
    torch_state, jax_state, model, flax_lm = states(config)
    counters = [m.expert_counts for m in model.modules() if hasattr(m, "expert_counts")]
    for counter in counters:
        counter.zero_()
    torch_metrics, torch_grads = tt.loss_and_grads(
        torch_state, tt.get_batch(data(), 0, torch_state.config)
    )
    jax_metrics, jax_grads = jt.loss_and_grads(
        jax_state, jt.get_batch(data(), 0, jax_state.config), RNG
    )
    return dict(
        model=model,
        counters=[c.clone() for c in counters],
        torch_loss=float(torch_metrics["loss"]),
        jax_loss=float(jax_metrics["loss"]),
        torch=as_torch_numpy(torch_to_flax(torch_grads, flax_lm), flax_lm),
        jax=as_torch_numpy(jax_grads, flax_lm),
    )


@pytest.fixture(params=CONFIGS)
def gradients(request) -> dict:
    return gradients_of(request.param)


def test_losses_agree(gradients):
    assert abs(gradients["torch_loss"] - gradients["jax_loss"]) <= 1e-5


def test_every_gradient_agrees_within_1e_4_relative(gradients):
    torch_grads, jax_grads = gradients["torch"], gradients["jax"]
    assert set(torch_grads) == {k for k, _ in gradients["model"].named_parameters()}
    compared = {k: v for k, v in torch_grads.items() if not is_key_bias(k)}
    errors = rel_errors(compared, jax_grads)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_RTOL, (worst, errors[worst])


def test_only_experts_without_tokens_have_zero_gradients(gradients):
    """Nothing is compared vacuously: a gradient is exactly zero in both frameworks where, and
    only where, an expert received no token from the batch."""
    unused = {
        f"blocks.{layer}.feed_forward.experts.{e}."
        for layer, counts in enumerate(gradients["counters"])
        for e in np.flatnonzero(counts.numpy() == 0)
    }
    for key, grad in gradients["torch"].items():
        expert_unused = any(key.startswith(prefix) for prefix in unused)
        assert (np.max(np.abs(grad)) == 0) == expert_unused, key
        assert (np.max(np.abs(gradients["jax"][key])) == 0) == expert_unused, key


def test_key_bias_gradient_is_rounding_noise_in_both(gradients):
    scale = max(np.max(np.abs(v)) for v in gradients["torch"].values())
    keys = [k for k in gradients["torch"] if is_key_bias(k)]
    assert len(keys) == tc.LM_CONFIGS["dense"]["n_layers"]
    for key in keys:
        for framework in ("torch", "jax"):
            assert np.max(np.abs(gradients[framework][key])) <= NOISE * scale


def test_the_loss_does_not_depend_on_the_key_bias():
    """Why the key bias is compared apart: a random key bias leaves the logits unchanged."""
    torch.manual_seed(0)
    model = TransformerLM(**tc.LM_CONFIGS["dense"]).eval()
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        before = model(tokens)
        for block in model.blocks:
            block.attention.k_proj.bias.add_(torch.randn(32) * 10)
        after = model(tokens)
    assert torch.max(torch.abs(before - after)) <= 1e-5
    assert torch.max(torch.abs(before)) > 0.1


def test_moe_capacity_dropped_assignments():
    gradients = gradients_of("moe")
    config = tc.LM_CONFIGS["moe"]
    tokens = tc.TRAIN_KWARGS["batch_size"] * tc.TRAIN_KWARGS["seq_len"]
    k, experts = config["top_k_experts"], config["num_experts"]
    capacity = math.ceil(config["expert_capacity_factor"] * tokens * k / experts)
    counts = np.stack([c.numpy() for c in gradients["counters"]])  # (layers, E) before dropping
    assert counts.sum() == config["n_layers"] * tokens * k
    assert np.clip(counts - capacity, 0, None).sum() > 0


# --------------------------------------------------------------------------- trajectories
@functools.cache
def trajectories_of(config: str) -> dict:
    """50 updates from the same weights on the same batches in both frameworks."""
    torch_state, jax_state, model, flax_lm = states(config)
    torch_log, jax_log = [], []
    for step in range(STEPS):
        torch_batch = tt.get_batch(data(), step, torch_state.config)
        jax_batch = jt.get_batch(data(), step, jax_state.config)
        assert np.array_equal(torch_batch.numpy(), np.asarray(jax_batch))
        torch_log.append({k: float(v) for k, v in tt.train_step(torch_state, torch_batch).items()})
        jax_state, metrics = jt.train_step(jax_state, jax_batch, RNG)
        jax_log.append({k: float(v) for k, v in metrics.items()})
    moments = {}
    for name in ("exp_avg", "exp_avg_sq"):
        params = dict(model.named_parameters())
        moments[name] = {
            k: torch_state.optimizer.state[p][name].double().numpy() for k, p in params.items()
        }
    return dict(
        torch_log=torch_log,
        jax_log=jax_log,
        torch_weights={k: v.detach().double().numpy() for k, v in model.named_parameters()},
        jax_weights=as_torch_numpy(jax_state.params, flax_lm),
        torch_moments=moments,
        jax_moments={
            name: as_torch_numpy(optax.tree_utils.tree_get(jax_state.opt_state, key), flax_lm)
            for name, key in (("exp_avg", "mu"), ("exp_avg_sq", "nu"))
        },
        max_grad_norm=torch_state.config.max_grad_norm,
    )


@pytest.fixture(params=CONFIGS)
def trajectories(request) -> dict:
    return trajectories_of(request.param)


def test_losses_agree_at_every_step(trajectories):
    torch_losses = np.array([m["loss"] for m in trajectories["torch_log"]])
    jax_losses = np.array([m["loss"] for m in trajectories["jax_log"]])
    assert len(torch_losses) == STEPS
    assert np.max(np.abs(torch_losses - jax_losses)) <= LOSS_ATOL
    assert torch_losses[-5:].mean() < torch_losses[0] - 0.5  # a real trajectory: it learns


def test_clipping_acted_on_some_steps_and_not_others(trajectories):
    norms = np.array([m["grad_norm"] for m in trajectories["torch_log"]])
    jax_norms = np.array([m["grad_norm"] for m in trajectories["jax_log"]])
    assert np.allclose(norms, jax_norms, rtol=1e-4)
    clipped = norms > trajectories["max_grad_norm"]
    assert 0 < clipped.sum() < len(norms)


def test_learning_rates_used_agree(trajectories):
    torch_lrs = [m["lr"] for m in trajectories["torch_log"]]
    jax_lrs = [m["lr"] for m in trajectories["jax_log"]]
    assert torch_lrs == pytest.approx(jax_lrs, rel=1e-6, abs=1e-12)
    assert torch_lrs[0] == 0 and max(torch_lrs) == pytest.approx(tc.TRAIN_KWARGS["lr"])


def test_final_weights_agree_within_1e_4_relative(trajectories):
    expected = {k: v for k, v in trajectories["torch_weights"].items() if not is_key_bias(k)}
    errors = rel_errors(expected, trajectories["jax_weights"])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= WEIGHT_RTOL, (worst, errors[worst])


def test_final_adam_moments_agree(trajectories):
    for name in ("exp_avg", "exp_avg_sq"):
        expected = {
            k: v for k, v in trajectories["torch_moments"][name].items() if not is_key_bias(k)
        }
        errors = rel_errors(expected, trajectories["jax_moments"][name])
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 1e-4, (name, worst, errors[worst])


# --------------------------------------------------------------------------- report cases
@pytest.mark.parametrize("config", CONFIGS)
def test_report_cases_pass_and_name_their_evidence(config):
    setup = Setup(config, "float32", 0)
    rows = tc.gradient_case(setup) + tc.trajectory_case(setup)
    assert [row.case for row in rows] == [
        "train gradients",
        f"train {STEPS} steps: losses",
        f"train {STEPS} steps: weights",
    ]
    assert all(row.passed for row in rows), [(r.case, r.note) for r in rows]
    assert rows[1].max_abs_error <= LOSS_ATOL and rows[2].max_rel_error <= WEIGHT_RTOL
    if config == "moe":
        assert rows[0].details["dropped"] > 0
    registered = {entry.name: entry.run for entry in CASES}
    assert registered["train gradients"] is tc.gradient_case
    assert registered[f"train {STEPS} steps"] is tc.trajectory_case


# --------------------------------------------------------------------------- resume
def continue_torch(state, first: int, last: int) -> list[float]:
    return [
        float(tt.train_step(state, tt.get_batch(data(), s, state.config))["loss"])
        for s in range(first, last)
    ]


def continue_jax(state, first: int, last: int) -> tuple[object, list[float]]:
    losses = []
    for s in range(first, last):
        state, metrics = jt.train_step(state, jt.get_batch(data(), s, state.config), RNG)
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.parametrize("config", CONFIGS)
def test_torch_run_continues_in_jax_with_the_same_losses(config, tmp_path):
    torch_state, _, _, _ = states(config)
    continue_torch(torch_state, 0, 10)
    src, dst = tmp_path / "t.train.safetensors", tmp_path / "j.train.safetensors"
    tt.save_train_state(src, torch_state)
    convert_train_state(src, dst, "jax")
    lm, jax_state, _ = jt.load_train_state(dst)
    assert int(jax_state.step) == 10

    _, jax_losses = continue_jax(jax_state, 10, 20)
    torch_losses = continue_torch(torch_state, 10, 20)
    assert np.max(np.abs(np.subtract(jax_losses, torch_losses))) <= LOSS_ATOL

    # the moments matter: a fresh optimizer at the same weights and step takes other steps
    _, loaded, _ = jt.load_train_state(dst)
    fresh = jt.create_train_state(lm, loaded.params, loaded.config).replace(step=loaded.step)
    _, fresh_losses = continue_jax(fresh, 10, 20)
    assert np.max(np.abs(np.subtract(fresh_losses, torch_losses))) > 10 * LOSS_ATOL


@pytest.mark.parametrize("config", CONFIGS)
def test_jax_run_continues_in_torch_with_the_same_losses(config, tmp_path):
    _, jax_state, _, flax_lm = states(config)
    jax_state, _ = continue_jax(jax_state, 0, 10)
    src, dst = tmp_path / "j.train.safetensors", tmp_path / "t.train.safetensors"
    jt.save_train_state(src, flax_lm, jax_state)
    convert_train_state(src, dst, "torch")
    _, torch_state, _ = tt.load_train_state(dst)
    assert torch_state.step == 10

    torch_losses = continue_torch(torch_state, 10, 20)
    _, jax_losses = continue_jax(jax_state, 10, 20)
    assert np.max(np.abs(np.subtract(jax_losses, torch_losses))) <= LOSS_ATOL


def test_train_state_round_trip_keeps_every_tensor(tmp_path):
    torch_state, _, _, _ = states("moe")
    continue_torch(torch_state, 0, 3)
    src, mid, back = (tmp_path / f"{n}.train.safetensors" for n in ("t", "j", "t2"))
    tt.save_train_state(src, torch_state)
    convert_train_state(src, mid, "flax")
    convert_train_state(mid, back, "torch")
    with safetensors.safe_open(src, "np") as a, safetensors.safe_open(back, "np") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            want = a.get_tensor(key)
            if key.endswith("expert_counts"):  # a torch statistic: zeros after Flax
                want = np.zeros_like(want)
            assert np.array_equal(want, b.get_tensor(key)), key
        assert json.loads(a.metadata()["train_config"]) == json.loads(b.metadata()["train_config"])


def test_convert_train_state_rejects_bad_requests(tmp_path):
    torch_state, _, _, _ = states("dense")
    path = tmp_path / "t.train.safetensors"
    tt.save_train_state(path, torch_state)
    with pytest.raises(ValueError, match="to must be"):
        convert_train_state(path, tmp_path / "x", "keras")
    with pytest.raises(ValueError, match="already holds torch"):
        convert_train_state(path, tmp_path / "x", "torch")
    with pytest.raises(FileNotFoundError):
        convert_train_state(tmp_path / "missing", tmp_path / "x", "jax")
    with pytest.raises(ValueError, match="holds torch names, not flax.*--resume` converts it"):
        jt.load_train_state(path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "bad.train.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt"):
        convert_train_state(tmp_path / "bad.train.safetensors", tmp_path / "x", "jax")
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- model files
def test_model_files_of_both_trainers_load_through_parity(tmp_path):
    _, jax_state, model, flax_lm = states("moe")
    tt.save_model(tmp_path / "t.safetensors", model)
    jt.save_model(tmp_path / "j.safetensors", flax_lm, jax_state.params)

    _, params = load(tmp_path / "t.safetensors", "flax")
    want = as_torch_numpy(torch_to_flax(model.state_dict(), flax_lm), flax_lm)
    assert rel_errors(want, as_torch_numpy(params, flax_lm)) == dict.fromkeys(want, 0.0)

    loaded = load(tmp_path / "j.safetensors", "torch")
    want = as_torch_numpy(jax_state.params, flax_lm)
    got = {k: v.double().numpy() for k, v in loaded.state_dict().items() if k in want}
    assert set(got) == set(want) and rel_errors(want, got) == dict.fromkeys(want, 0.0)
    assert loaded.config == model.config
    with safetensors.safe_open(tmp_path / "j.safetensors", "np") as f:
        assert f.metadata()["naming"] == "flax"  # the names, not the framework


# --------------------------------------------------------------------------- frozen buffers
DEEPSEEK = dict(
    vocab_size=32,
    max_seq_len=16,
    d_model=16,
    n_layers=1,
    n_heads=2,
    d_ff=16,
    dropout=0.0,
    **LLAMA_OPTIONS,
    use_moe=True,
    num_experts=4,
    router="grouped_sigmoid",
    n_group=2,
    kv_lora_rank=8,
    qk_nope_head_dim=4,
    qk_rope_head_dim=4,
    v_head_dim=4,
)
CORRECTION = "blocks.0.feed_forward.e_score_correction_bias"


def test_deepseek_correction_bias_stays_as_loaded_through_training_in_both(tmp_path):
    """DeepSeek-V3's e_score_correction_bias (a torch buffer, a Flax parameter): a step of
    AdamW with weight decay 0.5 leaves a loaded nonzero bias bit-identical in both frameworks
    while the router and the experts move (alike in both); JAX's optimizer gives it a zero
    update even for a nonzero gradient; training states carry it across frameworks (torch has
    no moments for it, JAX zero ones)."""
    bias = torch.tensor([0.5, -0.3, 0.2, -0.1])
    torch.manual_seed(0)
    model = TransformerLM(**DEEPSEEK)
    model.blocks[0].feed_forward.e_score_correction_bias.copy_(bias)
    flax_lm, params = from_torch(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = TrainConfig(steps=4, batch_size=2, seq_len=8, lr=1e-2, weight_decay=0.5, warmup_steps=0)
    batch = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(1))
    torch_state = tt.create_train_state(model, run)
    tt.train_step(torch_state, batch)
    jax_state = jt.create_train_state(flax_lm, jax.tree.map(jax.numpy.copy, params), run)
    jax_state, _ = jt.train_step(jax_state, jax.numpy.asarray(batch.numpy(), "int32"), RNG)

    after_jax = flax_to_torch(jax_state.params, flax_lm)
    assert torch.equal(model.state_dict()[CORRECTION], bias)
    assert torch.equal(after_jax[CORRECTION], bias)
    for key in ("blocks.0.feed_forward.gate.weight", "blocks.0.feed_forward.experts.0.fc1.weight"):
        moved = model.state_dict()[key] - before[key]
        assert moved.abs().max() > 1e-4, key
        np.testing.assert_allclose(after_jax[key] - before[key], moved, rtol=1e-3, atol=1e-6)

    tx = jt.create_optimizer(run)
    ones = jax.tree.map(jax.numpy.ones_like, params)
    updates, _ = jax.jit(tx.update)(ones, tx.init(params), params)
    assert not np.any(np.asarray(updates["blocks_0"]["feed_forward"]["e_score_correction_bias"]))
    assert np.all(np.asarray(updates["blocks_0"]["feed_forward"]["gate"]["kernel"]) != 0)

    src, mid, back = (tmp_path / f"{n}.train.safetensors" for n in ("t", "j", "t2"))
    tt.save_train_state(src, torch_state)
    convert_train_state(src, mid, "jax")
    _, loaded, _ = jt.load_train_state(mid)
    loaded_bias = loaded.params["blocks_0"]["feed_forward"]["e_score_correction_bias"]
    assert np.array_equal(np.asarray(loaded_bias), bias.numpy())
    mu = optax.tree_utils.tree_get(loaded.opt_state, "mu")
    assert not np.any(np.asarray(mu["blocks_0"]["feed_forward"]["e_score_correction_bias"]))
    jt.save_train_state(mid, flax_lm, loaded)
    convert_train_state(mid, back, "torch")
    _, resumed, _ = tt.load_train_state(back)
    assert torch.equal(resumed.model.state_dict()[CORRECTION], bias)
