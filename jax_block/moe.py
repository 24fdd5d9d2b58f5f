"""Mixture of Experts: top-k gating, expert capacity and the load-balancing loss."""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from twin_core import check_moe_config, expert_capacity

from .feed_forward import FeedForward
from .sharding import AxisNamedModule, active_split_count, constrain, dense_axes, named_init


class Routing(NamedTuple):
    """Where each of the k * N assignments goes, slot-major: (slot s, token n) -> s*N + n."""

    probs: jax.Array  # (N, E) float32 router probabilities
    expert: jax.Array  # (k*N,) chosen expert
    weight: jax.Array  # (k*N,) gate weight (renormalised over the k, unless told not to)
    rank: jax.Array  # (k*N,) place in its expert's queue; kept when rank < capacity
    counts: jax.Array  # (E,) assignments per expert before dropping


def route(logits: jax.Array, top_k: int, norm_topk_prob: bool = True) -> Routing:
    """Top-k routing of N tokens with float32 `logits` (N, E); ties go to the lower expert.

    The k weights are the selected probabilities, renormalised to sum to 1 if `norm_topk_prob`.
    """
    N, E = logits.shape
    probs = jax.nn.softmax(logits, axis=-1)  # (N, E)
    top_probs, top_experts = jax.lax.top_k(probs, top_k)  # (N, k), ties to the lower index
    if norm_topk_prob:
        top_probs = top_probs / top_probs.sum(axis=-1, keepdims=True)

    return _routing(probs, top_experts, top_probs)


def route_grouped_sigmoid(
    logits: jax.Array,
    top_k: int,
    bias: jax.Array,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    scaling: float,
) -> Routing:
    """DeepSeek-V3's routing of N tokens with float32 `logits` (N, E).

    The rule is `twin_core.BlockConfig`'s router "grouped_sigmoid", with `bias` (E,) the
    e_score_correction_bias and `scaling` the routed_scaling_factor; the k choices go in order
    of biased score (ties to the lower expert); `probs` holds the sigmoid scores (the
    load-balancing loss's P_e).
    """
    N, E = logits.shape
    scores = jax.nn.sigmoid(logits)  # (N, E)
    biased = scores + bias  # (N, E)
    group_scores = jax.lax.top_k(biased.reshape(N, n_group, E // n_group), 2)[0].sum(axis=-1)
    best_groups = jax.lax.top_k(group_scores, topk_group)[1]  # (N, topk_group)
    in_best = jnp.zeros((N, n_group), bool).at[jnp.arange(N)[:, None], best_groups].set(True)
    in_best = jnp.repeat(in_best, E // n_group, axis=1)  # (N, E)
    choice = jnp.where(in_best, biased, -jnp.inf)
    top_experts = jax.lax.top_k(choice, top_k)[1]  # (N, k)
    top_scores = jnp.take_along_axis(scores, top_experts, axis=1)  # (N, k)
    if norm_topk_prob:
        top_scores = top_scores / (top_scores.sum(axis=-1, keepdims=True) + 1e-20)
    return _routing(scores, top_experts, top_scores * scaling)


def _routing(probs: jax.Array, top_experts: jax.Array, weights: jax.Array) -> Routing:
    """The Routing of N tokens' k choices top_experts (N, k) with weights (N, k)."""
    E = probs.shape[1]
    expert = top_experts.T.reshape(-1)  # (k*N,) slot-major: every first choice, then seconds
    weight = weights.T.reshape(-1)  # (k*N,)
    counts = jnp.bincount(expert, length=E)  # (E,)
    order = jnp.argsort(expert, stable=True)  # assignments grouped by expert, priority kept
    group_start = jnp.cumsum(counts) - counts  # (E,)
    rank_sorted = jnp.arange(expert.size) - group_start[expert[order]]
    rank = jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)  # (k*N,)
    return Routing(probs, expert, weight, rank, counts)


def load_balancing_loss(routing: Routing, top_k: int) -> jax.Array:
    """Switch Transformer loss E * sum_e f_e * P_e; 1.0 at perfect balance."""
    N, E = routing.probs.shape
    f = routing.counts.astype(jnp.float32) / (N * top_k)  # (E,) share of assignments
    P = routing.probs.mean(axis=0)  # (E,) mean router probability
    return E * jnp.sum(f * P)


def router_z_loss(logits: jax.Array) -> jax.Array:
    """Mean over tokens of logsumexp(logits)^2."""
    return jnp.square(jax.nn.logsumexp(logits, axis=-1)).mean()


def group_block_size(num_assignments: int, num_experts: int) -> int:
    """Rows per block of the grouped path: 1 for decode-sized inputs, up to 256 for large ones."""
    target = num_assignments // (4 * num_experts)
    return 1 if target < 2 else min(256, 2 ** int(math.log2(target)))


def grouped_experts(
    expert: FeedForward,
    params: dict,
    tokens: jax.Array,
    routing: Routing,
    block: int,
    dtype: jnp.dtype,
    dropout_rng: jax.Array | None,
) -> jax.Array:
    """Every assignment through its expert, reading only the experts' weights that are used.

    `expert` is the (unbound) FeedForward of one expert and `params` the experts' stacked
    parameters (E, ...). Each expert's assignments are padded to a whole number of
    `block`-row blocks; a scan over the blocks applies one expert's weights to each, and skips
    the empty blocks after the used ones (the static count is an upper bound). Cost grows with
    k * N, not E * N. Returns (k*N, d_model) outputs, in assignment order.
    """
    A, (N, d_model) = routing.expert.size, tokens.shape
    E = routing.counts.size
    padded = -(-routing.counts // block) * block  # (E,) rows per expert, whole blocks
    pad_start = jnp.cumsum(padded) - padded  # (E,)
    num_blocks = (A + E * (block - 1)) // block  # static bound on sum(padded) / block
    dest = pad_start[routing.expert] + routing.rank  # (A,) row of each assignment
    rows = jnp.zeros((num_blocks * block, d_model), dtype)
    rows = rows.at[dest].set(tokens[jnp.arange(A) % N].astype(dtype), unique_indices=True)
    block_expert = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(num_blocks) * block, "right")
    block_expert = jnp.minimum(block_expert, E - 1)  # (num_blocks,); trailing blocks are empty
    keys = (
        jax.random.split(dropout_rng, num_blocks)
        if dropout_rng is not None
        else jnp.zeros((num_blocks,), jnp.uint32)
    )

    used_blocks = jnp.sum(padded) // block  # the blocks after these are empty: skipped

    def one_block(args):
        x, e, key, i = args  # (block, d_model), (), key, ()

        def expert_ffn() -> jax.Array:
            weights = jax.tree_util.tree_map(lambda p: p[e], params)
            if dropout_rng is None:
                return expert.apply({"params": weights}, x)  # (block, d_model)
            return expert.apply({"params": weights}, x, False, rngs={"dropout": key})

        return jax.lax.cond(i < used_blocks, expert_ffn, lambda: jnp.zeros_like(x))

    blocks = (rows.reshape(num_blocks, block, d_model), block_expert, keys, jnp.arange(num_blocks))
    out = jax.lax.map(one_block, blocks)
    return out.reshape(num_blocks * block, d_model)[dest]  # (A, d_model)


class MixtureOfExperts(AxisNamedModule):
    """Top-k gated experts with capacity-based dropping in training and a load-balancing loss.

    Every expert, and the optional shared expert (applied to every token, scaled by
    sigmoid(x @ w) with `shared_expert_gate`), is a FeedForward of the given kind. The router
    has a bias with `router_bias` (GPT-OSS, whose top-k of the logits followed by a softmax
    over the k is this top-k of the probabilities renormalised); `router` "grouped_sigmoid"
    routes as DeepSeek-V3 (parameter `e_score_correction_bias`). The experts
    are one `nn.vmap`-ped FeedForward with stacked parameters (E, ...). Training
    with a capacity factor dispatches tokens into per-expert buffers (E, C, d_model); dropless
    calls (eval, or factor None) use `grouped_experts`, whose cost grows with k * N, except on
    a mesh that splits the experts (logical axis "expert"): there every call uses the buffers,
    each device running its own experts on them (dropless: C = N rows per expert).
    `dispatch` forces one of the two ("buffers" or "grouped"; default "auto").
    """

    d_model: int
    d_ff: int
    num_experts: int = 8
    top_k: int = 2
    dropout: float = 0.1
    expert_capacity_factor: float | None = 1.25
    router_z_loss_coef: float = 0.0
    dispatch: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    norm_topk_prob: bool = True
    activation: str = "gelu"
    gated: bool = False
    bias: bool = True
    shared_expert_d_ff: int | None = None
    shared_expert_gate: bool = False
    router_bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    router: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    @nn.compact
    def __call__(
        self, x: jax.Array, deterministic: bool = True, return_aux_loss: bool = False
    ) -> tuple[jax.Array, jax.Array | None]:
        """x (B, T, d_model) -> (output (B, T, d_model), aux loss or None)."""
        check_moe_config(self.num_experts, self.top_k, self.expert_capacity_factor)
        if self.dispatch not in ("auto", "buffers", "grouped"):
            raise ValueError(f"dispatch must be auto, buffers or grouped, got {self.dispatch!r}")
        B, T, d_model = x.shape
        N, k, E = B * T, self.top_k, self.num_experts
        tokens = jnp.asarray(x).reshape(N, d_model)  # (N, d_model); NumPy input too
        logits = nn.Dense(
            E,
            use_bias=self.router_bias,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            name="gate",
            **dense_axes("embed", None),  # the router is small: replicated
        )(tokens.astype(jnp.float32))  # (N, E)
        if self.router == "grouped_sigmoid":  # the bias moves the choice only: no gradient
            bias = self.param(
                "e_score_correction_bias",
                named_init(nn.initializers.zeros_init(), None),
                (E,),
                jnp.float32,
            )
            routing = route_grouped_sigmoid(
                logits,
                k,
                bias.astype(jnp.float32),
                self.n_group,
                self.topk_group,
                self.norm_topk_prob,
                self.routed_scaling_factor,
            )
        else:
            routing = route(logits, k, self.norm_topk_prob)
        factor = None if deterministic else self.expert_capacity_factor
        capacity = expert_capacity(N, k, E, factor)
        if not deterministic and self.is_mutable_collection("moe_stats"):
            counts = self.variable("moe_stats", "expert_counts", jnp.zeros, (E,), jnp.float32)
            counts.value += routing.counts.astype(jnp.float32)

        ffn = dict(activation=self.activation, gated=self.gated, bias=self.bias)
        ffn.update(swiglu_limit=self.swiglu_limit, swiglu_alpha=self.swiglu_alpha)
        expert = FeedForward(  # one expert, unbound: the grouped path applies it to each block
            d_model, self.d_ff, self.dropout, self.dtype, self.param_dtype, **ffn, parent=None
        )
        experts = nn.vmap(
            FeedForward,
            in_axes=(0, None),
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            axis_size=E,
            metadata_params={nn.PARTITION_NAME: "expert"},
        )(d_model, self.d_ff, self.dropout, self.dtype, self.param_dtype, **ffn, name="experts")
        use_buffers = (
            self.dispatch == "buffers"
            or (self.dispatch == "auto" and factor is not None)
            or self.is_initializing()  # the vmapped call creates the stacked parameters
            or (self.dispatch == "auto" and active_split_count("expert") > 1)
        )
        kept = routing.rank < capacity  # (k*N,)
        if use_buffers:
            dest = jnp.where(kept, routing.expert * capacity + routing.rank, E * capacity)
            buffers = jnp.zeros((E * capacity, d_model), self.dtype)
            buffers = buffers.at[dest].set(
                tokens[jnp.arange(k * N) % N].astype(self.dtype), mode="drop"
            )
            buffers = constrain(buffers.reshape(E, capacity, d_model), ("expert", None, "embed"))
            expert_out = experts(buffers, deterministic)  # (E, C, d_model)
            expert_out = constrain(expert_out, ("expert", None, "embed"))
            assigned = (
                expert_out.reshape(E * capacity, d_model).at[dest].get(mode="fill", fill_value=0)
            )  # (k*N, d_model); dropped assignments give zeros
        else:
            dropout_rng = None if deterministic or not self.dropout else self.make_rng("dropout")
            assigned = grouped_experts(
                expert,
                experts.variables["params"],
                tokens,
                routing,
                group_block_size(k * N, E),
                self.dtype,
                dropout_rng,
            )
        weight = jnp.where(kept, routing.weight, 0.0)  # (k*N,); dropped assignments add nothing
        weighted = assigned * weight[:, None].astype(assigned.dtype)
        out = jnp.zeros((N, d_model), assigned.dtype).at[jnp.arange(k * N) % N].add(weighted)
        if self.shared_expert_d_ff is not None:
            shared = FeedForward(
                d_model,
                self.shared_expert_d_ff,
                self.dropout,
                self.dtype,
                self.param_dtype,
                **ffn,
                name="shared_expert",
            )(tokens, deterministic)  # (N, d_model)
            if self.shared_expert_gate:
                gate = nn.Dense(
                    1,
                    use_bias=False,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name="shared_expert_gate",
                    **dense_axes("embed", None),
                )(tokens)  # (N, 1)
                shared = jax.nn.sigmoid(gate) * shared
            out = out + shared.astype(out.dtype)

        aux = None
        if return_aux_loss:
            aux = load_balancing_loss(routing, k)
            if self.router_z_loss_coef:
                aux = aux + self.router_z_loss_coef * router_z_loss(logits)
        return out.reshape(B, T, d_model).astype(self.dtype), aux
