"""Training TransformerLM with optax: the optimizer, the jitted step and the checkpoint tensors.

The training command `python -m parity train --framework jax` (flags, run files, the loop's
bookkeeping) calls the hooks at the end of this file; the torch twin `torch_block/train.py` has
the same names in the same order. Both take the same batches and learning rates step for step,
so the same initial weights give the same trajectory. Files hold Flax names (metadata "naming":
"flax"), so jax_block never imports torch.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy
from flax.training import train_state
from flax.traverse_util import flatten_dict, unflatten_dict

from twin_core import FROZEN_MOE_TENSORS, TrainConfig, atomic_write
from twin_core.data import batch_windows, check_model_fits
from twin_core.run_files import (
    NAMINGS,
    TRAIN_GROUPS,
    RunPaths,
    check_shapes,
    model_metadata,
    read_train_state,
    train_state_metadata,
)

from .generate import generate
from .lm import TransformerLM
from .scan import per_layer
from .sharding import (
    check_batch,
    check_mesh,
    check_rules,
    constrain,
    place_on_mesh,
    shard_params,
    use_mesh,
)

FRAMEWORK = "jax"
DESCRIPTION = "optax AdamW, warmup + cosine schedule and global-norm clipping (jitted step)"


def get_batch(data: np.ndarray, step: int, config: TrainConfig) -> jax.Array:
    """Batch `step` of a run: (batch_size, seq_len + 1) int32 windows of `data`."""
    return jnp.asarray(batch_windows(data, step, config), jnp.int32)


# --------------------------------------------------------------------------- optimizer
def lr_schedule(config: TrainConfig) -> optax.Schedule:
    """Learning rate of update `count` (0-based): linear warmup from 0, then cosine decay."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=config.warmup_steps,
        decay_steps=config.steps,
        end_value=config.lr * config.min_lr_ratio,
    )


def weight_decay_mask(params: dict) -> dict:
    """True for the kernels of Dense layers; biases, norms and embeddings are not decayed."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def frozen_mask(params: dict) -> dict:
    """True for the parameters no update may change (twin_core.FROZEN_MOE_TENSORS): torch_block's
    buffers."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key in FROZEN_MOE_TENSORS, params
    )


@functools.cache
def create_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with `lr_schedule` and decoupled weight decay; the
    FROZEN_MOE_TENSORS' updates are zero (torch_block's buffers are outside its optimizer).

    Cached per configuration: the same optimizer object keeps the jitted step from recompiling.
    """
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(
            lr_schedule(config),
            b1=config.beta1,
            b2=config.beta2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=weight_decay_mask,
        ),
        optax.masked(optax.set_to_zero(), frozen_mask),
    )


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, optimizer state) with the run's configuration."""

    config: TrainConfig = flax.struct.field(pytree_node=False, default=TrainConfig())
    mesh: jax.sharding.Mesh | None = flax.struct.field(pytree_node=False, default=None)
    rules: tuple | None = flax.struct.field(pytree_node=False, default=None)


@functools.cache
def apply_fn_of(lm: TransformerLM) -> Callable:
    """`lm.apply`, one bound method per distinct model configuration.

    A bound method compares equal only to itself; sharing one per configuration lets every
    state of equal models reuse the jitted step's compilation.
    """
    return lm.apply


def create_train_state(
    lm: TransformerLM,
    params: dict,
    config: TrainConfig,
    mesh: jax.sharding.Mesh | None = None,
    rules: tuple | None = None,
) -> TrainState:
    """Step 0 of training `lm` from `params`: fresh Adam moments.

    With `mesh` the params are placed by `jax_block.shard_params` (`rules`: a tuple of pairs,
    default `jax_block.sharding.DEFAULT_RULES`), the moments like them, and `train_step` runs
    sharded (batch over data, gradients reduced by the partitioner).
    """
    check_model_fits(config, lm.config.max_seq_len)
    if mesh is not None:
        mesh, rules = check_mesh(mesh), check_rules(rules)
        check_batch(config.batch_size, mesh, rules)
        params = shard_params(lm, params, mesh, rules)
    state = TrainState.create(
        apply_fn=apply_fn_of(lm),
        params=params,
        tx=create_optimizer(config),
        config=config,
        mesh=mesh,
        rules=rules,
    )
    state = state.replace(step=jnp.zeros((), jnp.int32))
    return state if mesh is None else place_on_mesh(state, mesh)  # counters too: one compile


# --------------------------------------------------------------------------- the step
def next_token_loss(
    params: dict,
    apply_fn: Callable,
    batch: jax.Array,
    dropout_rng: jax.Array,
    aux_loss_coef: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy + aux_loss_coef * MoE aux loss on batch (B, T+1)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T), (B, T)
    logits, aux = apply_fn(
        {"params": params},
        inputs,
        deterministic=False,
        return_aux_loss=True,
        rngs={"dropout": dropout_rng},
    )  # (B, T, V), ()
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    ce = ce.mean()
    loss = ce + aux_loss_coef * aux
    return loss, {"loss": loss, "ce": ce, "aux": aux}


@jax.jit
def loss_and_grads(
    state: TrainState, batch: jax.Array, rng: jax.Array
) -> tuple[dict[str, jax.Array], dict]:
    """(metrics, gradients of the loss) at the current params, in training mode.

    Dropout uses `rng` folded with the step, so a constant `rng` gives each step its own masks.
    """
    dropout_rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(next_token_loss, has_aux=True)
    if state.mesh is not None:
        check_batch(batch.shape[0], state.mesh, state.rules)
    with use_mesh(state.mesh, state.rules):
        batch = constrain(batch, ("batch", "length"))
        (_, metrics), grads = grad_fn(
            state.params, state.apply_fn, batch, dropout_rng, state.config.aux_loss_coef
        )
    return metrics, grads


@functools.partial(jax.jit, donate_argnums=0)
def train_step(
    state: TrainState, batch: jax.Array, rng: jax.Array
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on batch (B, T+1): (new state, metrics). `state` is donated.

    metrics: loss, ce, aux (of the params before the update), grad_norm (before clipping), lr
    (the learning rate this update used).
    """
    metrics, grads = loss_and_grads(state, batch, rng)
    grad_norm = optax.tree.norm(grads)
    lr = lr_schedule(state.config)(state.step)
    state = state.apply_gradients(grads=grads)
    return state, {**metrics, "grad_norm": grad_norm, "lr": lr}


# --------------------------------------------------------------------------- checkpoints
def _flat(tree: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flatten_dict(tree, sep="/").items()}


def save_model(
    path: str | os.PathLike,
    lm: TransformerLM,
    params: dict,
    extra: Mapping[str, str] | None = None,
) -> None:
    """A safetensors checkpoint that `parity.load` reads (Flax names, "naming": "flax", one entry
    per layer also when `lm` scans its layers); `extra`: metadata entries stored besides.

    `python -m parity convert` rewrites it with torch names.
    """
    tensors = _flat(per_layer(lm, params)[1])
    metadata = model_metadata(NAMINGS[FRAMEWORK], lm.config, tensors, extra)
    atomic_write(path, safetensors.numpy.save(tensors, metadata))


def save_train_state(
    path: str | os.PathLike,
    lm: TransformerLM,
    state: TrainState,
    data_sha256: str = "",
    extra: Mapping[str, str] | None = None,
) -> None:
    """Everything needed to resume: params, Adam moments, step, model and run configuration
    (`extra`: metadata entries stored besides).

    Tensors are `params/<name>`, `exp_avg/<name>` and `exp_avg_sq/<name>` with Flax names, one
    entry per layer also when `lm` scans its layers (`load_train_state` gives a model that
    does not); `parity.convert.convert_train_state` rewrites the file for torch_block.
    """
    groups = {
        "params": state.params,
        "exp_avg": optax.tree_utils.tree_get(state.opt_state, "mu"),
        "exp_avg_sq": optax.tree_utils.tree_get(state.opt_state, "nu"),
    }
    groups = {name: per_layer(lm, tree)[1] for name, tree in groups.items()}
    tensors = {f"{group}/{k}": v for group, tree in groups.items() for k, v in _flat(tree).items()}
    metadata = train_state_metadata(
        NAMINGS[FRAMEWORK],
        lm.config,
        state.config,
        int(state.step),
        data_sha256,
        tensors,
        extra,
    )
    atomic_write(path, safetensors.numpy.save(tensors, metadata))


def load_train_state(
    path: str | os.PathLike, steps: int | None = None
) -> tuple[TransformerLM, TrainState, dict]:
    """(lm, state at the saved step, metadata) from a `save_train_state` file with Flax names.

    `steps` extends the run to that many steps (the schedule of the new total).
    """
    saved = read_train_state(path, safetensors.numpy.load_file, FRAMEWORK, steps)
    lm = TransformerLM.from_config(saved.lm_config)
    trees = [
        unflatten_dict({k: jnp.asarray(v) for k, v in saved.groups[g].items()}, sep="/")
        for g in TRAIN_GROUPS
    ]
    check_params(lm, trees[0], str(path))
    for tree in trees[1:]:
        check_params(lm, tree, f"{path} (Adam moments)")
    params, mu, nu = trees
    state = create_train_state(lm, params, saved.config)
    step = jnp.asarray(saved.step, jnp.int32)
    opt_state = optax.tree_utils.tree_set(state.opt_state, mu=mu, nu=nu, count=step)
    state = state.replace(step=step, opt_state=opt_state)
    return lm, jax.tree.map(jnp.copy, state), saved.metadata  # one buffer per leaf: donatable


def check_params(lm: TransformerLM, params: dict, name: str) -> None:
    """Raise ValueError unless `params` has exactly the paths and shapes of `lm`'s parameters."""
    dummy = jnp.zeros((1, 1), jnp.int32)
    wanted = jax.eval_shape(lambda: lm.init(jax.random.PRNGKey(0), dummy))["params"]
    wanted = {k: tuple(v.shape) for k, v in flatten_dict(wanted, sep="/").items()}
    given = {k: tuple(v.shape) for k, v in flatten_dict(params, sep="/").items()}
    check_shapes(wanted, given, name)


# --------------------------------------------------------------------------- the command's hooks
def start(
    model: tuple[TransformerLM, dict], config: TrainConfig
) -> tuple[TransformerLM, TrainState]:
    """(lm, step-0 state) of training `model`, `(lm, params)`, with `config`."""
    lm, params = model
    return lm, jax.tree.map(jnp.copy, create_train_state(lm, params, config))


@functools.cache
def dropout_key(seed: int) -> jax.Array:
    """The key of a run's dropout masks, folded with the step in `loss_and_grads`."""
    return jax.random.PRNGKey(seed + 1)


def run_step(state: TrainState, data: np.ndarray, step: int) -> tuple[TrainState, dict]:
    """(state, metrics as floats) after update `step` on batch `step` of `data`."""
    batch = get_batch(data, step, state.config)
    state, metrics = train_step(state, batch, dropout_key(state.config.seed))
    return state, {k: float(v) for k, v in metrics.items()}


def save_checkpoint(
    paths: RunPaths,
    lm: TransformerLM,
    state: TrainState,
    data_sha256: str,
    extra: Mapping[str, str],
) -> None:
    """The training state, then the model checkpoint, each with the metadata entries `extra`."""
    save_train_state(paths.train_state, lm, state, data_sha256, extra)
    save_model(paths.checkpoint, lm, state.params, extra)


def count_params(state: TrainState) -> int:
    """The number of trained parameters."""
    return sum(x.size for x in jax.tree.leaves(state.params))


def sample(
    lm: TransformerLM,
    state: TrainState,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
) -> list[int]:
    """`max_new_tokens` token ids after the ids `prompt`, drawn with the run's seed."""
    tokens = generate(
        lm,
        state.params,
        np.asarray([prompt], np.int32),  # (1, L)
        max_new_tokens=max_new_tokens,
        rng=jax.random.PRNGKey(state.config.seed),
        temperature=temperature,
        top_k=top_k,
    )  # (1, max_new_tokens)
    return np.asarray(tokens[0]).tolist()


MOVED = (
    "python -m jax_block.train moved: use python -m parity train --framework jax "
    "(same flags; python -m parity train --help)"
)

if __name__ == "__main__":
    print(MOVED, file=sys.stderr)
    sys.exit(2)
