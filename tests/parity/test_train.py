"""Training in each framework alone: the run configuration, batches, loss, AdamW steps against
a NumPy reference, checkpoint files and bad input. The training command:
tests/cli/test_train_cli.py.

The tiny model and run are those of `parity.report.cases.train` (dense), so that the jitted JAX step
compiles once for this file and tests/parity/test_parity_train.py.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

import jax_block.lm
import jax_block.train as jt
import torch_block.lm
import torch_block.train as tt
import twin_core.files
from twin_core import TrainConfig
from twin_core.data import DEFAULT_TEXT, check_data, check_model_fits, load_text

FRAMEWORKS = ("torch", "jax")
MODULES = {"torch": tt, "jax": jt}
LM = dict(vocab_size=64, max_seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=64, dropout=0.0)
RUN = dict(steps=50, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=5, max_grad_norm=1.0)
RNG = jax.random.PRNGKey(0)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tensors are tiny: one thread is much faster than two competing with XLA's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def text(vocab_size: int = 64) -> np.ndarray:
    """The default text, every byte modulo vocab_size."""
    return (load_text(DEFAULT_TEXT)[:20_000] % vocab_size).astype(np.uint8)


def new_state(framework: str, seed: int = 0, **lm_overrides):
    """A seeded model of LM (+ overrides) and its step-0 state with RUN."""
    config = {**LM, **lm_overrides}
    if framework == "torch":
        torch.manual_seed(seed)
        return tt.create_train_state(torch_block.lm.TransformerLM(**config), TrainConfig(**RUN))
    lm = jax_block.lm.TransformerLM.create(**config)
    return jt.create_train_state(lm, numpy_params(lm, seed), TrainConfig(**RUN))


def numpy_params(lm: jax_block.lm.TransformerLM, seed: int) -> dict:
    """Flax params drawn with NumPy (LayerNorm scales 1, biases 0, the rest N(0, 0.02)): as
    Flax's init, without compiling it op by op."""
    shapes = jax.eval_shape(lm.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf) -> jax.Array:
        name = path[-1].key
        if name in ("scale", "bias"):
            return jnp.full(leaf.shape, 1.0 if name == "scale" else 0.0, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, 0.02, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def lm_of(jax_state) -> jax_block.lm.TransformerLM:
    """The module of a JAX state (its apply_fn is the module's bound apply)."""
    return jax_state.apply_fn.__self__


def step(framework: str, state, index: int):
    """(state, metrics as floats) after update `index` on batch `index` of text()."""
    if framework == "torch":
        metrics = tt.train_step(state, tt.get_batch(text(), index, state.config))
    else:
        state, metrics = jt.train_step(state, jt.get_batch(text(), index, state.config), RNG)
    return state, {k: float(v) for k, v in metrics.items()}


def params_of(framework: str, state) -> dict[str, np.ndarray]:
    """Native names -> float64 copies."""
    if framework == "torch":
        return {k: v.detach().double().numpy() for k, v in state.model.named_parameters()}
    return {k: np.asarray(v, np.float64) for k, v in flatten_dict(state.params, sep="/").items()}


def grads_of(framework: str, state, index: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(metrics, gradients) at the state's params on batch `index`; the state is unchanged."""
    if framework == "torch":
        metrics, grads = tt.loss_and_grads(state, tt.get_batch(text(), index, state.config))
        grads = {k: g.double().numpy() for k, g in grads.items()}
    else:
        metrics, grads = jt.loss_and_grads(state, jt.get_batch(text(), index, state.config), RNG)
        grads = {k: np.asarray(v, np.float64) for k, v in flatten_dict(grads, sep="/").items()}
    return {k: float(v) for k, v in metrics.items()}, grads


def reference_lr(count: int, config) -> float:
    if count < config.warmup_steps:
        return config.lr * count / config.warmup_steps
    progress = (count - config.warmup_steps) / (config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def decayed(framework: str, name: str) -> bool:
    """Weights of linear layers (torch .weight outside norms and embeddings; Flax kernels)."""
    if framework == "jax":
        return name.endswith("/kernel")
    return name.endswith(".weight") and "norm" not in name and "embedding" not in name


@pytest.mark.parametrize(
    "module, refused",
    [("jax_block.train", ("torch",)), ("torch_block.train", ("jax", "flax", "optax"))],
)
def test_each_trainer_imports_without_the_other_framework(module, refused):
    blocked = "".join(f"sys.modules[{name!r}] = None\n" for name in refused)
    code = f"import sys\n{blocked}import {module}\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


TRAINING_ONLY = ("optax", "safetensors", "matplotlib", "torch_block.train", "jax_block.train")


@pytest.mark.parametrize("package", ["torch_block", "jax_block"])
def test_importing_a_package_loads_no_training_module(package):
    code = (
        f"import sys, {package}\n"
        f"print(sorted(m for m in {TRAINING_ONLY!r} if m in sys.modules))\n"
        f"import {package}.train\n"
        f"print(sorted(m for m in {TRAINING_ONLY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    before, after = result.stdout.splitlines()
    assert before == "[]"
    assert f"{package}.train" in after and "safetensors" in after  # the probe can see them


# --------------------------------------------------------------------------- configuration
BAD_CONFIGS = [
    (dict(lr=0.0), ValueError, "lr must be"),
    (dict(lr=-1e-3), ValueError, "lr must be"),
    (dict(lr=float("nan")), ValueError, "lr must be"),
    (dict(lr=float("inf")), ValueError, "lr must be"),
    (dict(steps=0), ValueError, "steps must be >= 1"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(seq_len=0), ValueError, "seq_len must be >= 1"),
    (dict(warmup_steps=50), ValueError, "warmup_steps must be in"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps must be in"),
    (dict(beta2=1.0), ValueError, "beta2 must be"),
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm must be"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be"),
    (dict(steps=2.5), TypeError, "steps must be an int"),
    (dict(batch_size=True), TypeError, "batch_size must be an int"),
    (dict(lr="1e-3"), TypeError, "lr must be a float"),
]


@pytest.mark.parametrize("overrides, error, message", BAD_CONFIGS)
def test_train_config_rejects_bad_values(overrides, error, message):
    with pytest.raises(error, match=message):
        TrainConfig(**{**RUN, **overrides})


@pytest.mark.parametrize(
    "steps, warmup", [(400, 100), (1000, 100), (50, 12), (7, 1), (3, 0), (1, 0)]
)
def test_default_warmup_is_a_quarter_of_the_run_at_most_100(steps, warmup):
    assert TrainConfig(steps=steps).warmup_steps == warmup
    assert TrainConfig(steps=steps, warmup_steps=0).warmup_steps == 0  # given: kept
    with pytest.raises(ValueError, match=f"warmup_steps must be in \\[0, steps={steps}\\)"):
        TrainConfig(steps=steps, warmup_steps=steps)  # given and invalid: still an error


def test_train_config_round_trips_through_a_dict():
    config = TrainConfig(steps=50, lr=1e-3, seed=3)
    assert config.to_dict()["warmup_steps"] == 12
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown keys \['lrate'\]"):
        TrainConfig.from_dict({**config.to_dict(), "lrate": 1.0})


def test_model_must_fit_the_rows():
    with pytest.raises(ValueError, match="seq_len 32 exceeds the model's max_seq_len 16"):
        check_model_fits(TrainConfig(**{**RUN, "seq_len": 32}), 16)


def test_text_must_hold_one_batch_of_known_tokens():
    config = TrainConfig(**RUN)  # one batch: 4 x 16 + 1 = 65 bytes
    check_data(np.zeros(65, np.uint8), config, 64, "t")
    with pytest.raises(ValueError, match="t has 64 tokens, shorter than one batch.*65 tokens"):
        check_data(np.zeros(64, np.uint8), config, 64, "t")
    with pytest.raises(ValueError, match="token id 64 >= vocab_size 64"):
        check_data(np.full(65, 64, np.uint8), config, 64, "t")
    with pytest.raises(FileNotFoundError, match="no text file at"):
        load_text("/nonexistent/text.txt")


# --------------------------------------------------------------------------- data and loss
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_batches_are_windows_of_the_text_fixed_by_seed_and_step(framework):
    module = MODULES[framework]
    data = np.random.default_rng(1).integers(0, 64, 3000).astype(np.uint8)
    config = TrainConfig(**RUN)
    windows = np.lib.stride_tricks.sliding_window_view(data, config.seq_len + 1)  # (N-T, T+1)
    batch = np.asarray(module.get_batch(data, 3, config))
    assert batch.shape == (config.batch_size, config.seq_len + 1)
    for row in batch:
        assert np.sum(np.all(windows == row, axis=1)) == 1  # one window of the text, exactly
    assert np.array_equal(batch, np.asarray(module.get_batch(data, 3, config)))
    assert not np.array_equal(batch, np.asarray(module.get_batch(data, 4, config)))
    other_seed = TrainConfig(**{**RUN, "seed": 1})
    assert not np.array_equal(batch, np.asarray(module.get_batch(data, 3, other_seed)))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


MOE = dict(use_moe=True, num_experts=4, top_k_experts=2, expert_capacity_factor=1.0)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_loss_is_next_token_cross_entropy_plus_weighted_aux(framework):
    state = new_state(framework, **MOE)
    batch = np.asarray(MODULES[framework].get_batch(text(), 0, state.config))  # (B, T+1)
    if framework == "torch":
        state.model.train()  # capacity dropping, as in the step
        with torch.no_grad():
            logits, aux = state.model(torch.from_numpy(batch[:, :-1]), return_aux_loss=True)
        logits, aux = logits.double().numpy(), float(aux)
    else:
        forward = jax.jit(
            lambda params, x: state.apply_fn(
                {"params": params},
                x,
                deterministic=False,
                return_aux_loss=True,
                rngs={"dropout": RNG},
            )
        )
        logits, aux = forward(state.params, batch[:, :-1])
        logits, aux = np.asarray(logits, np.float64), float(aux)
    metrics, _ = grads_of(framework, state, 0)
    targets = batch[:, 1:]  # (B, T)
    ce = -np.take_along_axis(log_softmax(logits), targets[..., None], axis=-1).mean()
    assert aux > 0.5  # the load-balancing loss is about 1, not a vacuous 0
    assert metrics["ce"] == pytest.approx(ce, abs=1e-5)
    assert metrics["aux"] == pytest.approx(aux, abs=1e-5)
    assert metrics["loss"] == pytest.approx(ce + state.config.aux_loss_coef * aux, abs=1e-5)


# --------------------------------------------------------------------------- optimizer
UPDATES = 20


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_updates_are_clipped_adamw_with_the_schedule(framework):
    """Twenty updates (warmup, then cosine) against AdamW written out in NumPy, from each
    framework's own gradients: global-norm clipping, bias-corrected moments, decoupled weight
    decay on the linear weights only, the schedule's learning rate of each update count."""
    state = new_state(framework, seed=3)
    config = state.config
    expected = params_of(framework, state)
    m = {k: np.zeros_like(v) for k, v in expected.items()}
    v = {k: np.zeros_like(x) for k, x in expected.items()}
    clipped = 0
    for t in range(UPDATES):
        _, grads = grads_of(framework, state, t)
        norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
        scale = min(1.0, config.max_grad_norm / norm)
        clipped += scale < 1
        lr = reference_lr(t, config)
        for k, g in grads.items():
            g = g * scale
            m[k] = config.beta1 * m[k] + (1 - config.beta1) * g
            v[k] = config.beta2 * v[k] + (1 - config.beta2) * g * g
            m_hat, v_hat = (
                m[k] / (1 - config.beta1 ** (t + 1)),
                v[k] / (1 - config.beta2 ** (t + 1)),
            )
            decay = config.weight_decay * expected[k] if decayed(framework, k) else 0.0
            expected[k] = expected[k] - lr * (m_hat / (np.sqrt(v_hat) + config.eps) + decay)
        state, metrics = step(framework, state, t)
        assert metrics["lr"] == pytest.approx(lr, rel=1e-6, abs=1e-12)
        assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)
        actual = params_of(framework, state)
        for k in expected:
            assert np.max(np.abs(actual[k] - expected[k])) <= 1e-6, (t, k)
    assert 0 < clipped < UPDATES  # both branches of the clipping ran
    assert sum(decayed(framework, k) for k in expected) == 2 * 6  # q k v out fc1 fc2 per block


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_weight_decay_mask_is_the_linear_weights(framework):
    lm = dict(LM, n_layers=1, tie_embeddings=False, use_moe=True, num_experts=2)
    if framework == "torch":
        state = new_state(framework, **lm)
        mask = tt.weight_decay_mask(state.model)
        groups = [
            {n for n, p in state.model.named_parameters() if any(p is q for q in g["params"])}
            for g in state.optimizer.param_groups
        ]
        assert [g["weight_decay"] for g in state.optimizer.param_groups] == [0.1, 0.0]
        assert groups == [{n for n in mask if mask[n]}, {n for n in mask if not mask[n]}]
    else:
        flax_lm = jax_block.lm.TransformerLM.create(**lm)
        shapes = jax.eval_shape(flax_lm.init, RNG, jnp.zeros((1, 1), jnp.int32))["params"]
        mask = flatten_dict(jt.weight_decay_mask(shapes), sep="/")
    wanted = {
        "torch": {f"blocks.0.attention.{p}_proj.weight" for p in "qkv"}
        | {
            "blocks.0.attention.out_proj.weight",
            "blocks.0.feed_forward.gate.weight",
            "lm_head.weight",
        }
        | {f"blocks.0.feed_forward.experts.{e}.fc{i}.weight" for e in (0, 1) for i in (1, 2)},
        "jax": {f"blocks_0/attention/{p}_proj/kernel" for p in ("q", "k", "v", "out")}
        | {"blocks_0/feed_forward/gate/kernel", "lm_head/kernel"}
        | {f"blocks_0/feed_forward/experts/fc{i}/kernel" for i in (1, 2)},
    }[framework]
    assert {name for name, decay in mask.items() if decay} == wanted
    assert len(mask) > len(wanted)  # biases, norms and embeddings are there, undecayed


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_thirty_steps_lower_the_loss(framework):
    state = new_state(framework, seed=1)
    losses = []
    for t in range(30):
        state, metrics = step(framework, state, t)
        losses.append(metrics["loss"])
    assert losses[0] == pytest.approx(math.log(64), abs=0.3)  # uniform guess at start
    assert np.mean(losses[-5:]) < losses[0] - 0.5


def test_torch_expert_without_tokens_still_decays_and_advances_its_moments():
    """optax updates every parameter at every step; torch's AdamW skips a parameter whose
    gradient is None. The step fills in zero gradients, so an expert no token reached still
    decays and its moments still advance, as in optax."""
    state = new_state("torch", seed=0, **{**MOE, "top_k_experts": 1})
    state, _ = step("torch", state, 0)
    experts = state.model.blocks[0].feed_forward.experts
    e = next(e for e in (2, 3) if torch.count_nonzero(experts[e].fc1.weight.grad) > 0)
    expert = experts[e].fc1.weight  # had tokens at step 0: its moments are not zero
    gate = state.model.blocks[0].feed_forward.gate.weight
    with torch.no_grad():  # logit_1 = -logit_0 and logit_e = 0: e is never the top expert
        gate[1] = -gate[0]
        gate[e] = 0
    before = expert.detach().clone()
    moments = {k: state.optimizer.state[expert][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    state, metrics = step("torch", state, 1)
    config = state.config
    assert torch.count_nonzero(expert.grad) == 0
    assert float(state.optimizer.state[expert]["step"]) == 2
    assert torch.allclose(
        state.optimizer.state[expert]["exp_avg"], config.beta1 * moments["exp_avg"]
    )
    assert torch.allclose(
        state.optimizer.state[expert]["exp_avg_sq"], config.beta2 * moments["exp_avg_sq"]
    )
    m_hat = config.beta1 * moments["exp_avg"] / (1 - config.beta1**2)
    v_hat = config.beta2 * moments["exp_avg_sq"] / (1 - config.beta2**2)
    update = m_hat / (v_hat.sqrt() + config.eps) + config.weight_decay * before
    assert torch.allclose(expert.detach(), before - metrics["lr"] * update, atol=1e-7)


# --------------------------------------------------------------------------- checkpoint files
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_failed_checkpoint_write_leaves_the_previous_file(framework, tmp_path, monkeypatch):
    state = new_state(framework)
    path = tmp_path / "m.safetensors"
    save = {
        "torch": lambda: tt.save_model(path, state.model),
        "jax": lambda: jt.save_model(path, lm_of(state), state.params),
    }[framework]
    save()
    before = path.read_bytes()
    state, _ = step(framework, state, 0)  # new weights

    def no_rename(*args):
        raise OSError("disk full")

    monkeypatch.setattr(twin_core.files.os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        save()
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary file left


def save_state(framework: str, state, path) -> None:
    if framework == "torch":
        tt.save_train_state(path, state)
    else:
        jt.save_train_state(path, lm_of(state), state)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_damaged_training_state_is_refused(framework, tmp_path):
    module = MODULES[framework]
    state = new_state(framework)
    path = tmp_path / "s.train.safetensors"
    save_state(framework, state, path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits in the last tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt"):
        module.load_train_state(path)
    path.write_bytes(bytes(raw[:100]))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        module.load_train_state(path)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_training_state_round_trips_and_extends(framework, tmp_path):
    """Saved and loaded: the same weights, moments and step; `steps` sets a longer run whose
    schedule is that of the new total, and refuses a length the run has already reached."""
    state = new_state(framework, seed=2)
    for t in range(3):
        state, _ = step(framework, state, t)
    path = tmp_path / "s.train.safetensors"
    save_state(framework, state, path)
    lm, loaded, metadata = MODULES[framework].load_train_state(path)
    assert int(loaded.step) == 3 and metadata["step"] == "3"
    assert {k: lm.config.to_dict()[k] for k in LM} == LM
    for k, v in params_of(framework, state).items():
        assert np.array_equal(params_of(framework, loaded)[k], v), k
    _, after = step(framework, loaded, 3)
    _, expected = step(framework, state, 3)
    assert after["loss"] == pytest.approx(expected["loss"], abs=1e-6)

    _, longer, _ = MODULES[framework].load_train_state(path, steps=80)
    assert longer.config == TrainConfig(**{**RUN, "steps": 80})
    _, metrics = step(framework, longer, 3)
    assert metrics["lr"] == pytest.approx(reference_lr(3, longer.config), rel=1e-6)
    with pytest.raises(ValueError, match="--steps 3 does not extend .* done 3 steps"):
        MODULES[framework].load_train_state(path, steps=3)
