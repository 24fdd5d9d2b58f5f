"""Mixture of Experts: top-k gating, expert capacity and the load-balancing loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from twin_core import check_moe_config, expert_capacity

from .feed_forward import FeedForward


class Routing(NamedTuple):
    """Where each of the k * N assignments goes, slot-major: (slot s, token n) -> s*N + n."""

    probs: torch.Tensor  # (N, E) float32 router probabilities
    expert: torch.Tensor  # (k*N,) chosen expert
    weight: torch.Tensor  # (k*N,) gate weight (renormalised over the k, unless told not to)
    rank: torch.Tensor  # (k*N,) place in its expert's queue; kept when rank < capacity
    counts: torch.Tensor  # (E,) assignments per expert before dropping


def route(logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True) -> Routing:
    """Top-k routing of N tokens with float32 `logits` (N, E); ties go to the lower expert.

    The k weights are the selected probabilities, renormalised to sum to 1 if `norm_topk_prob`.
    """
    N, E = logits.shape
    probs = F.softmax(logits, dim=-1)  # (N, E)
    top_probs, top_experts = torch.sort(probs, dim=-1, descending=True, stable=True)
    top_probs, top_experts = top_probs[:, :top_k], top_experts[:, :top_k]  # (N, k)
    if norm_topk_prob:
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)

    return _routing(probs, top_experts, top_probs)


def route_grouped_sigmoid(
    logits: torch.Tensor,
    top_k: int,
    bias: torch.Tensor,
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
    scores = torch.sigmoid(logits)  # (N, E)
    biased = scores + bias  # (N, E)
    group_scores = biased.view(N, n_group, E // n_group).topk(2, dim=-1).values.sum(dim=-1)
    best_groups = torch.topk(group_scores, topk_group, dim=-1).indices  # (N, topk_group)
    in_best = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    in_best = in_best[:, :, None].expand(N, n_group, E // n_group).reshape(N, E)
    choice = biased.masked_fill(~in_best, float("-inf"))
    top_experts = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :top_k]
    top_scores = scores.gather(1, top_experts)  # (N, k)
    if norm_topk_prob:
        top_scores = top_scores / (top_scores.sum(dim=-1, keepdim=True) + 1e-20)
    return _routing(scores, top_experts, top_scores * scaling)


def _routing(probs: torch.Tensor, top_experts: torch.Tensor, weights: torch.Tensor) -> Routing:
    """The Routing of N tokens' k choices top_experts (N, k) with weights (N, k)."""
    E = probs.shape[1]
    expert = top_experts.t().reshape(-1)  # (k*N,) slot-major: every first choice, then seconds
    weight = weights.t().reshape(-1)  # (k*N,)
    counts = torch.bincount(expert, minlength=E)  # (E,)
    order = torch.argsort(expert, stable=True)  # assignments grouped by expert, priority kept
    group_start = torch.cumsum(counts, 0) - counts  # (E,)
    rank_sorted = torch.arange(expert.numel(), device=probs.device) - group_start[expert[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)  # (k*N,)
    return Routing(probs, expert, weight, rank, counts)


def load_balancing_loss(routing: Routing, top_k: int) -> torch.Tensor:
    """Switch Transformer loss E * sum_e f_e * P_e; 1.0 at perfect balance."""
    N, E = routing.probs.shape
    f = routing.counts.float() / (N * top_k)  # (E,) share of assignments before dropping
    P = routing.probs.mean(dim=0)  # (E,) mean router probability
    return E * torch.sum(f * P)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class MixtureOfExperts(nn.Module):
    """Top-k gated experts with capacity-based dropping in training and a load-balancing loss.

    Every expert, and the optional shared expert (applied to every token, scaled by
    sigmoid(x @ w) with `shared_expert_gate`), is a FeedForward of the given kind. The router
    has a bias with `router_bias` (GPT-OSS, whose top-k of the logits followed by a softmax
    over the k is this top-k of the probabilities renormalised). `router` "grouped_sigmoid"
    routes as DeepSeek-V3 (`route_grouped_sigmoid`, with the buffer `e_score_correction_bias`).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int = 8,
        top_k: int = 2,
        dropout: float = 0.1,
        expert_capacity_factor: float | None = 1.25,
        *,
        router_z_loss_coef: float = 0.0,
        norm_topk_prob: bool = True,
        activation: str = "gelu",
        gated: bool = False,
        bias: bool = True,
        shared_expert_d_ff: int | None = None,
        shared_expert_gate: bool = False,
        router_bias: bool = False,
        swiglu_limit: float | None = None,
        swiglu_alpha: float = 1.702,
        router: str = "softmax",
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 1.0,
    ):
        super().__init__()
        check_moe_config(num_experts, top_k, expert_capacity_factor)
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k
        self.expert_capacity_factor = expert_capacity_factor
        self.router_z_loss_coef = router_z_loss_coef
        self.norm_topk_prob = norm_topk_prob
        ffn = dict(activation=activation, gated=gated, bias=bias)
        ffn.update(swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha)
        self.gate = nn.Linear(d_model, num_experts, bias=router_bias)
        self.experts = nn.ModuleList(
            [FeedForward(d_model, d_ff, dropout, **ffn) for _ in range(num_experts)]
        )
        self.shared_expert = None
        self.shared_expert_gate = None
        if shared_expert_d_ff is not None:
            self.shared_expert = FeedForward(d_model, shared_expert_d_ff, dropout, **ffn)
            if shared_expert_gate:
                self.shared_expert_gate = nn.Linear(d_model, 1, bias=False)
        self.register_buffer("expert_counts", torch.zeros(num_experts))
        self.router = router
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor = routed_scaling_factor
        if router == "grouped_sigmoid":  # moves the choice only: no gradient reaches it
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))

    def reset_expert_counts(self) -> None:
        """Zero the per-expert assignment counter."""
        self.expert_counts.zero_()

    def forward(
        self, x: torch.Tensor, return_aux_loss: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, d_model) -> (output (B, T, d_model), aux loss or None)."""
        B, T, d_model = x.shape
        N, k = B * T, self.top_k
        tokens = x.reshape(N, d_model)  # (N, d_model)
        bias = None if self.gate.bias is None else self.gate.bias.float()
        logits = F.linear(tokens.float(), self.gate.weight.float(), bias)  # (N, E)
        if self.router == "grouped_sigmoid":
            routing = route_grouped_sigmoid(
                logits,
                k,
                self.e_score_correction_bias.float(),
                self.n_group,
                self.topk_group,
                self.norm_topk_prob,
                self.routed_scaling_factor,
            )
        else:
            routing = route(logits, k, self.norm_topk_prob)
        factor = self.expert_capacity_factor if self.training else None
        capacity = expert_capacity(N, k, self.num_experts, factor)
        if self.training:
            self.expert_counts += routing.counts.to(self.expert_counts.dtype)

        kept = torch.nonzero(routing.rank < capacity).squeeze(1)  # kept assignments
        kept = kept[torch.argsort(routing.expert[kept], stable=True)]  # grouped by expert
        token = kept % N  # (A,)
        sizes = torch.bincount(routing.expert[kept], minlength=self.num_experts).tolist()
        expert_out = torch.cat(
            [
                self.experts[e](rows)
                for e, rows in enumerate(torch.split(tokens[token], sizes))
                if sizes[e] > 0
            ]
        )  # (A, d_model)
        weighted = expert_out * routing.weight[kept, None].to(expert_out.dtype)
        out = torch.zeros_like(tokens).index_add_(0, token, weighted)  # (N, d_model)
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)  # (N, d_model)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
            out = out + shared

        aux = None
        if return_aux_loss:
            aux = load_balancing_loss(routing, k)
            if self.router_z_loss_coef:
                aux = aux + self.router_z_loss_coef * router_z_loss(logits)
        return out.reshape(B, T, d_model), aux
