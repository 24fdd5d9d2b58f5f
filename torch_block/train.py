"""Training TransformerLM with torch.optim: the optimizer, the step and the checkpoint tensors.

The training command `python -m parity train --framework torch` (flags, run files, the loop's
bookkeeping) calls the hooks at the end of this file; the JAX twin `jax_block/train.py` has the
same names in the same order. Both take the same batches and learning rates step for step, so
the same initial weights give the same trajectory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Mapping

import numpy as np
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from twin_core import TrainConfig, atomic_write
from twin_core.data import batch_windows, check_model_fits
from twin_core.run_files import (
    NAMINGS,
    RunPaths,
    check_shapes,
    model_metadata,
    read_train_state,
    train_state_metadata,
)

from .generate import generate
from .lm import TransformerLM

FRAMEWORK = "torch"
DESCRIPTION = "torch.optim.AdamW, warmup + cosine schedule (LambdaLR) and clip_grad_norm_"


def get_batch(data: np.ndarray, step: int, config: TrainConfig) -> torch.Tensor:
    """Batch `step` of a run: (batch_size, seq_len + 1) int64 windows of `data`."""
    return torch.from_numpy(batch_windows(data, step, config).astype(np.int64))


# --------------------------------------------------------------------------- optimizer
def lr_schedule(config: TrainConfig) -> Callable[[int], float]:
    """Learning rate of update `count` (0-based): linear warmup from 0, then cosine decay.

    The formula of `optax.warmup_cosine_decay_schedule(0, lr, warmup_steps, steps,
    lr * min_lr_ratio)`, which the JAX twin uses.
    """

    def schedule(count: int) -> float:
        if count < config.warmup_steps:
            return config.lr * count / config.warmup_steps
        decay_steps = config.steps - config.warmup_steps
        progress = min(count - config.warmup_steps, decay_steps) / decay_steps
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return config.lr * ((1 - config.min_lr_ratio) * cosine + config.min_lr_ratio)

    return schedule


def weight_decay_mask(model: nn.Module) -> dict[str, bool]:
    """True for the weights of Linear layers; biases, norms and embeddings are not decayed."""
    decayed = {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }
    return {name: name in decayed for name, _ in model.named_parameters()}


def create_optimizer(
    model: nn.Module, config: TrainConfig, step: int = 0
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over two groups (decayed, not decayed) and a LambdaLR of `lr_schedule` at `step`.

    Clipping is `clip_grad_norm_` in `train_step`: torch.optim has no clipping transform.
    """
    mask = weight_decay_mask(model)
    params = dict(model.named_parameters())
    groups = [
        {"params": [p for n, p in params.items() if mask[n]], "weight_decay": config.weight_decay},
        {"params": [p for n, p in params.items() if not mask[n]], "weight_decay": 0.0},
    ]
    for group in groups:
        group["initial_lr"] = config.lr  # LambdaLR multiplies it by the schedule
    optimizer = torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps
    )
    schedule = lr_schedule(config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda count: schedule(count) / config.lr, last_epoch=step - 1
    )
    return optimizer, scheduler


@dataclasses.dataclass
class TrainState:
    """The model, its optimizer and schedule, the number of updates done, the configuration."""

    model: TransformerLM
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    config: TrainConfig
    step: int = 0


def create_train_state(model: TransformerLM, config: TrainConfig) -> TrainState:
    """Step 0 of training `model` (in place): fresh Adam moments."""
    check_model_fits(config, model.max_seq_len)
    optimizer, scheduler = create_optimizer(model, config)
    return TrainState(model, optimizer, scheduler, config)


# --------------------------------------------------------------------------- the step
def next_token_loss(
    model: TransformerLM, batch: torch.Tensor, aux_loss_coef: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy + aux_loss_coef * MoE aux loss on batch (B, T+1)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T), (B, T)
    logits, aux = model(inputs, return_aux_loss=True)  # (B, T, V), ()
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss = ce + aux_loss_coef * aux
    return loss, {"loss": loss.detach(), "ce": ce.detach(), "aux": aux.detach()}


def loss_and_grads(
    state: TrainState, batch: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(metrics, gradients of the loss) at the current params, in training mode.

    The gradients are the parameters' `.grad` tensors. A parameter the loss did not reach (an
    expert that received no token) gets a zero gradient rather than None, so that AdamW still
    advances its moments and decays it, as optax does.
    """
    state.model.train()
    state.optimizer.zero_grad(set_to_none=True)
    loss, metrics = next_token_loss(state.model, batch, state.config.aux_loss_coef)
    loss.backward()
    grads = {}
    for name, param in state.model.named_parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads[name] = param.grad
    return metrics, grads


def train_step(state: TrainState, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """One optimizer update on batch (B, T+1), in place; returns the metrics.

    metrics: loss, ce, aux (of the params before the update), grad_norm (before clipping), lr
    (the learning rate this update used). One difference from optax remains: clip_grad_norm_
    scales by max_norm / (norm + 1e-6) where optax scales by max_norm / norm, a relative
    difference of 1e-6 / norm in a clipped gradient.
    """
    metrics, _ = loss_and_grads(state, batch)
    params = state.model.parameters()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, state.config.max_grad_norm)
    lr = torch.tensor(state.optimizer.param_groups[0]["lr"])
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    return {**metrics, "grad_norm": grad_norm, "lr": lr}


# --------------------------------------------------------------------------- checkpoints
def save_model(
    path: str | os.PathLike, model: TransformerLM, extra: Mapping[str, str] | None = None
) -> None:
    """A safetensors checkpoint that `parity.load` reads (torch state_dict keys); `extra`:
    metadata entries stored besides."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = model_metadata(NAMINGS[FRAMEWORK], model.config, tensors, extra)
    atomic_write(path, safetensors.torch.save(tensors, metadata))


def save_train_state(
    path: str | os.PathLike,
    state: TrainState,
    data_sha256: str = "",
    extra: Mapping[str, str] | None = None,
) -> None:
    """Everything needed to resume: params, Adam moments, step, model and run configuration
    (`extra`: metadata entries stored besides).

    Tensors are `params/<key>` (the state_dict), `exp_avg/<name>` and `exp_avg_sq/<name>` with
    torch names; `parity.convert.convert_train_state` rewrites the file for jax_block.
    """
    params = dict(state.model.named_parameters())
    moments = {name: state.optimizer.state.get(p, {}) for name, p in params.items()}
    groups = {
        "params": state.model.state_dict(),
        **{
            group: {n: m.get(group, torch.zeros_like(params[n])) for n, m in moments.items()}
            for group in ("exp_avg", "exp_avg_sq")
        },
    }
    tensors = {
        f"{group}/{k}": v.detach().cpu().contiguous()
        for group, tree in groups.items()
        for k, v in tree.items()
    }
    metadata = train_state_metadata(
        NAMINGS[FRAMEWORK],
        state.model.config,
        state.config,
        state.step,
        data_sha256,
        tensors,
        extra,
    )
    atomic_write(path, safetensors.torch.save(tensors, metadata))


def load_train_state(
    path: str | os.PathLike, steps: int | None = None
) -> tuple[TransformerLM, TrainState, dict]:
    """(model, state at the saved step, metadata) from a `save_train_state` file, torch names.

    `steps` extends the run to that many steps (the schedule of the new total).
    """
    saved = read_train_state(path, safetensors.torch.load_file, FRAMEWORK, steps)
    model = TransformerLM.from_config(saved.lm_config)
    try:
        model.load_state_dict(saved.groups["params"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not match the model: {err}") from err
    for group in ("exp_avg", "exp_avg_sq"):
        check_params(model, saved.groups[group], f"{path} (Adam moments)")
    check_model_fits(saved.config, model.max_seq_len)
    optimizer, scheduler = create_optimizer(model, saved.config, saved.step)
    if saved.step > 0:
        for name, param in model.named_parameters():
            optimizer.state[param] = {
                "step": torch.tensor(float(saved.step)),
                "exp_avg": saved.groups["exp_avg"][name].clone(),
                "exp_avg_sq": saved.groups["exp_avg_sq"][name].clone(),
            }
    return model, TrainState(model, optimizer, scheduler, saved.config, saved.step), saved.metadata


def check_params(model: TransformerLM, tensors: dict, name: str) -> None:
    """Raise ValueError unless `tensors` has exactly the names and shapes of `model`'s params."""
    wanted = {k: tuple(v.shape) for k, v in model.named_parameters()}
    check_shapes(wanted, {k: tuple(v.shape) for k, v in tensors.items()}, name)


# --------------------------------------------------------------------------- the command's hooks
def start(model: TransformerLM, config: TrainConfig) -> tuple[TransformerLM, TrainState]:
    """(model, step-0 state) of training `model` (in place) with `config`."""
    return model, create_train_state(model, config)


def dropout_seed(seed: int, step: int) -> int:
    """The torch seed of step `step`'s dropout masks: a resumed run draws the same masks."""
    return int(np.random.SeedSequence([seed, step, 1]).generate_state(1)[0])


def run_step(state: TrainState, data: np.ndarray, step: int) -> tuple[TrainState, dict]:
    """(state, metrics as floats) after update `step` on batch `step` of `data`."""
    torch.manual_seed(dropout_seed(state.config.seed, step))
    metrics = train_step(state, get_batch(data, step, state.config))
    return state, {k: float(v) for k, v in metrics.items()}


def save_checkpoint(
    paths: RunPaths,
    model: TransformerLM,
    state: TrainState,
    data_sha256: str,
    extra: Mapping[str, str],
) -> None:
    """The training state, then the model checkpoint, each with the metadata entries `extra`."""
    save_train_state(paths.train_state, state, data_sha256, extra)
    save_model(paths.checkpoint, model, extra)


def count_params(state: TrainState) -> int:
    """The number of trained parameters."""
    return sum(p.numel() for p in state.model.parameters())


def sample(
    model: TransformerLM,
    state: TrainState,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
) -> list[int]:
    """`max_new_tokens` token ids after the ids `prompt`, drawn with the run's seed."""
    tokens = generate(
        model,
        torch.tensor([prompt], dtype=torch.int64),  # (1, L)
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        generator=torch.Generator().manual_seed(state.config.seed),
    )  # (1, max_new_tokens)
    return tokens[0].tolist()


def set_threads(threads: int) -> None:
    """torch's intra-op threads (`--threads`)."""
    torch.set_num_threads(threads)


MOVED = (
    "python -m torch_block.train moved: use python -m parity train --framework torch "
    "(same flags; python -m parity train --help)"
)

if __name__ == "__main__":
    print(MOVED, file=sys.stderr)
    sys.exit(2)
