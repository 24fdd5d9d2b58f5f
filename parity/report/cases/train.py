"""Training parity: gradients and short optimizer trajectories of TransformerLM in both
frameworks from the same weights.

`gradient_case` and `trajectory_case` are report cases (registered with
`parity.report.registry.case`, configs "dense" and "moe", float32).

One parameter is left out of the error and reported apart: the attention key bias
(`attention.k_proj.bias`). Adding the same vector to every key adds q . b to every score of a
query, a shift that softmax cancels, so the loss does not depend on it and its exact gradient is
zero. Both frameworks give it rounding noise (~1e-9), which AdamW, dividing by the noise's own
scale, turns into lr-sized steps in unrelated directions; the two copies drift apart without any
effect on the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
import torch

import jax_block.train as jax_train
import torch_block.lm
import torch_block.train as torch_train
from twin_core import TrainConfig, expert_capacity
from twin_core.data import DEFAULT_TEXT, load_text

from ...convert import flax_to_torch, from_torch
from ..compare import Row, Tolerance, compare
from ..registry import Setup, case

LM_CONFIGS: dict[str, dict[str, Any]] = {
    "dense": dict(
        vocab_size=64, max_seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=64, dropout=0.0
    ),
    "moe": dict(
        vocab_size=64,
        max_seq_len=16,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        dropout=0.0,
        use_moe=True,
        num_experts=4,
        top_k_experts=2,
        expert_capacity_factor=1.0,  # capacity 32 per expert: drops whatever exceeds the mean
    ),
}
# 50 steps with warmup, cosine decay, weight decay, and clipping that acts on about 40% of them
TRAIN_KWARGS: dict[str, Any] = dict(
    steps=50, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=5, max_grad_norm=1.0
)
GRADIENT_TOLERANCE = Tolerance("rel", 1e-4)  # docs/design.md section 7
LOSS_TOLERANCE = Tolerance("abs", 1e-4)  # losses at every step
WEIGHT_TOLERANCE = Tolerance("rel", 1e-4)  # final weights
ZERO_GRADIENT = 1e-6  # |gradient| / gradient scale below which a gradient is rounding noise
SHIFT_INVARIANT = "attention.k_proj.bias"  # its loss gradient is exactly zero (see above)


def is_shift_invariant(torch_key: str) -> bool:
    """True for the attention key biases, which the loss does not depend on."""
    return torch_key.endswith(SHIFT_INVARIANT)


def training_text(vocab_size: int, size: int = 20_000) -> np.ndarray:
    """The start of the default text with every byte taken modulo `vocab_size` (N,) uint8."""
    return (load_text(DEFAULT_TEXT)[:size] % vocab_size).astype(np.uint8)


def build(config: str, seed: int) -> tuple[torch_block.lm.TransformerLM, Any, dict]:
    """A seeded torch TransformerLM of `config` and its Flax twin with the same weights."""
    with torch.random.fork_rng(devices=[]):  # the caller's torch RNG is left as it was
        torch.manual_seed(seed)
        model = torch_block.lm.TransformerLM(**LM_CONFIGS[config])
    flax_lm, params = from_torch(model)
    return model, flax_lm, params


def train_config(seed: int, **overrides: Any) -> TrainConfig:
    """The run of both frameworks: TRAIN_KWARGS with `seed` and `overrides`."""
    return TrainConfig(**{**TRAIN_KWARGS, "seed": seed, **overrides})


def _split_errors(
    torch_tree: dict[str, torch.Tensor], flax_lm: Any, flax_tree: dict
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Per torch key: max abs error, error relative to the torch tensor's max, torch max."""
    as_torch = flax_to_torch(flax_tree, flax_lm)
    abs_err, rel_err, scale = {}, {}, {}
    for key, expected in torch_tree.items():
        a = expected.detach().double().numpy()
        b = as_torch[key].double().numpy()
        abs_err[key] = float(np.max(np.abs(a - b)))
        scale[key] = float(np.max(np.abs(a)))
        rel_err[key] = abs_err[key] / scale[key] if scale[key] > 0 else abs_err[key]
    return abs_err, rel_err, scale


# --------------------------------------------------------------------------- gradients
@dataclass(frozen=True)
class GradientComparison:
    """Every parameter's gradient in both frameworks from the same weights and batch."""

    loss_abs_error: float
    max_abs_error: float  # over the compared parameters
    max_rel_error: float  # max over parameters of max|g_t - g_j| / max|g_t|
    worst: str  # torch key of the worst relative error
    noise_gradients: dict[str, float]  # shift-invariant keys: max |g| / gradient scale, worst fw
    dropped: int  # MoE assignments dropped by capacity (torch's expert counter), 0 for dense
    assignments: int
    details: dict[str, float] = field(default_factory=dict)  # relative error per torch key


def compare_gradients(config: str, seed: int = 0) -> GradientComparison:
    """Gradients of one training-mode step (dropout 0; MoE with capacity dropping)."""
    model, flax_lm, params = build(config, seed)
    run = train_config(seed)
    data = training_text(model.vocab_size)
    torch_state = torch_train.create_train_state(model, run)
    jax_state = jax_train.create_train_state(flax_lm, params, run)
    counts = _reset_expert_counts(model)
    torch_metrics, torch_grads = torch_train.loss_and_grads(
        torch_state, torch_train.get_batch(data, 0, run)
    )
    jax_metrics, jax_grads = jax_train.loss_and_grads(
        jax_state, jax_train.get_batch(data, 0, run), jax.random.PRNGKey(seed)
    )
    dropped, assignments = _dropped(model, counts, run)
    abs_err, rel_err, scale = _split_errors(torch_grads, flax_lm, jax_grads)
    jax_as_torch = flax_to_torch(jax_grads, flax_lm)
    grad_scale = max(scale.values())
    noise = {
        k: max(scale[k], float(jax_as_torch[k].abs().max())) / grad_scale
        for k in torch_grads
        if is_shift_invariant(k)
    }
    compared = [k for k in torch_grads if not is_shift_invariant(k)]
    worst = max(compared, key=rel_err.get)
    return GradientComparison(
        loss_abs_error=abs(float(torch_metrics["loss"]) - float(jax_metrics["loss"])),
        max_abs_error=max(abs_err[k] for k in compared),
        max_rel_error=rel_err[worst],
        worst=worst,
        noise_gradients=noise,
        dropped=dropped,
        assignments=assignments,
        details={k: rel_err[k] for k in compared},
    )


def _reset_expert_counts(model: torch_block.lm.TransformerLM) -> list[torch.Tensor]:
    """The MoE layers' assignment counters, zeroed (the forward pass adds to them)."""
    counters = [m.expert_counts for m in model.modules() if hasattr(m, "expert_counts")]
    for counter in counters:
        counter.zero_()
    return counters


def _dropped(
    model: torch_block.lm.TransformerLM, counters: list[torch.Tensor], config: TrainConfig
) -> tuple[int, int]:
    """(assignments past capacity, all assignments) of one training forward pass."""
    if not counters:
        return 0, 0
    c = model.config
    tokens = config.batch_size * config.seq_len
    capacity = expert_capacity(tokens, c.top_k_experts, c.num_experts, c.expert_capacity_factor)
    dropped = sum(int((counts - capacity).clamp(min=0).sum()) for counts in counters)
    return dropped, len(counters) * tokens * c.top_k_experts


@case("train gradients")
def gradient_case(setup: Setup) -> list[Row]:
    """Report case: every parameter's gradient, relative to its tensor's largest gradient."""
    result = compare_gradients(setup.config, setup.seed)
    noise = max(result.noise_gradients.values())
    note = (
        f"worst {result.worst}; loss diff {result.loss_abs_error:.1e}; k_proj.bias gradient "
        f"(exactly 0) is noise: {noise:.0e} of the gradient scale"
    )
    passed = noise < ZERO_GRADIENT and result.loss_abs_error <= LOSS_TOLERANCE.value
    if result.assignments:
        note += f"; dropped {result.dropped}/{result.assignments} assignments"
        passed = passed and result.dropped > 0
    row = Row(
        "train gradients",
        setup.config,
        "float32",
        result.max_abs_error,
        result.max_rel_error,
        GRADIENT_TOLERANCE,
        passed and GRADIENT_TOLERANCE.holds(result.max_abs_error, result.max_rel_error),
        note=note,
        details={"per_parameter_rel_error": result.details, "dropped": result.dropped},
    )
    return [row]


# --------------------------------------------------------------------------- trajectories
@dataclass(frozen=True)
class TrajectoryComparison:
    """Losses at every step and final weights after the same optimizer steps in both."""

    torch_losses: list[float]
    jax_losses: list[float]
    loss_abs_error: float  # max over steps
    weight_abs_error: float  # over the compared parameters
    weight_rel_error: float  # max over parameters of max|w_t - w_j| / max|w_t|
    worst: str
    clipped_steps: int  # steps whose gradient norm exceeded max_grad_norm (torch)
    lr_abs_error: float  # max over steps of the learning rates used


def compare_trajectories(config: str, seed: int = 0, steps: int = 50) -> TrajectoryComparison:
    """`steps` updates from the same weights on the same batches in both frameworks."""
    model, flax_lm, params = build(config, seed)
    run = train_config(seed, steps=steps)
    data = training_text(model.vocab_size)
    torch_state = torch_train.create_train_state(model, run)
    jax_state = jax_train.create_train_state(flax_lm, params, run)
    rng = jax.random.PRNGKey(seed)
    torch_log, jax_log = [], []
    for step in range(steps):
        torch_log.append(
            torch_train.train_step(torch_state, torch_train.get_batch(data, step, run))
        )
        jax_state, metrics = jax_train.train_step(
            jax_state, jax_train.get_batch(data, step, run), rng
        )
        jax_log.append(metrics)
    torch_losses = [float(m["loss"]) for m in torch_log]
    jax_losses = [float(m["loss"]) for m in jax_log]
    abs_err, rel_err, _ = _split_errors(model.state_dict(), flax_lm, jax_state.params)
    compared = [k for k, _ in model.named_parameters() if not is_shift_invariant(k)]
    worst = max(compared, key=rel_err.get)
    return TrajectoryComparison(
        torch_losses=torch_losses,
        jax_losses=jax_losses,
        loss_abs_error=float(np.max(np.abs(np.subtract(torch_losses, jax_losses)))),
        weight_abs_error=max(abs_err[k] for k in compared),
        weight_rel_error=rel_err[worst],
        worst=worst,
        clipped_steps=sum(float(m["grad_norm"]) > run.max_grad_norm for m in torch_log),
        lr_abs_error=max(
            abs(float(t["lr"]) - float(j["lr"])) for t, j in zip(torch_log, jax_log, strict=True)
        ),
    )


@case(
    f"train {TRAIN_KWARGS['steps']} steps",
    rows=tuple(f"train {TRAIN_KWARGS['steps']} steps: {part}" for part in ("losses", "weights")),
)
def trajectory_case(setup: Setup) -> list[Row]:
    """Report case: 50 AdamW steps (warmup, cosine, clipping, weight decay) in both."""
    result = compare_trajectories(setup.config, setup.seed)
    steps = len(result.torch_losses)
    span = f"loss {result.torch_losses[0]:.3f} -> {result.torch_losses[-1]:.3f}"
    losses = compare(
        f"train {steps} steps: losses",
        setup.config,
        "float32",
        result.torch_losses,
        result.jax_losses,
        LOSS_TOLERANCE,
        note=f"{span}; clipped {result.clipped_steps}/{steps} steps",
    )
    weights = Row(
        f"train {steps} steps: weights",
        setup.config,
        "float32",
        result.weight_abs_error,
        result.weight_rel_error,
        WEIGHT_TOLERANCE,
        WEIGHT_TOLERANCE.holds(result.weight_abs_error, result.weight_rel_error),
        note=f"worst {result.worst}; k_proj.bias (no effect on the loss) left out",
    )
    return [losses, weights]
