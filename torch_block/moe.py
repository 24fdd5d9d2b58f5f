"""Mixture of Experts: top-k gating, expert capacity and the load-balancing loss."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .feed_forward import FeedForward


class Routing(NamedTuple):
    """Where each of the k * N assignments goes, slot-major: (slot s, token n) -> s*N + n."""

    probs: torch.Tensor  # (N, E) float32 router probabilities
    expert: torch.Tensor  # (k*N,) chosen expert
    weight: torch.Tensor  # (k*N,) renormalised gate weight
    rank: torch.Tensor  # (k*N,) place in its expert's queue; kept when rank < capacity
    counts: torch.Tensor  # (E,) assignments per expert before dropping


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float | None) -> int:
    """Assignments each expert may take: max(1, ceil(c * N * k / E)), or N when dropless."""
    if factor is None:
        return num_tokens
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


def route(logits: torch.Tensor, top_k: int) -> Routing:
    """Top-k routing of N tokens with float32 `logits` (N, E); ties go to the lower expert."""
    N, E = logits.shape
    probs = F.softmax(logits, dim=-1)  # (N, E)
    top_probs, top_experts = torch.sort(probs, dim=-1, descending=True, stable=True)
    top_probs, top_experts = top_probs[:, :top_k], top_experts[:, :top_k]  # (N, k)
    top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)

    expert = top_experts.t().reshape(-1)  # (k*N,) slot-major: every first choice, then seconds
    weight = top_probs.t().reshape(-1)  # (k*N,)
    counts = torch.bincount(expert, minlength=E)  # (E,)
    order = torch.argsort(expert, stable=True)  # assignments grouped by expert, priority kept
    group_start = torch.cumsum(counts, 0) - counts  # (E,)
    rank_sorted = torch.arange(expert.numel(), device=logits.device) - group_start[expert[order]]
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
    """Top-k gated experts with capacity-based dropping in training and a load-balancing loss."""

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
    ):
        super().__init__()
        check_moe_config(num_experts, top_k, expert_capacity_factor)
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k
        self.expert_capacity_factor = expert_capacity_factor
        self.router_z_loss_coef = router_z_loss_coef
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(
            [FeedForward(d_model, d_ff, dropout) for _ in range(num_experts)]
        )
        self.register_buffer("expert_counts", torch.zeros(num_experts))

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
        logits = F.linear(tokens.float(), self.gate.weight.float())  # (N, E)
        routing = route(logits, k)
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

        aux = None
        if return_aux_loss:
            aux = load_balancing_loss(routing, k)
            if self.router_z_loss_coef:
                aux = aux + self.router_z_loss_coef * router_z_loss(logits)
        return out.reshape(B, T, d_model), aux


def check_moe_config(num_experts: int, top_k: int, expert_capacity_factor: float | None) -> None:
    """Raise ValueError for an expert count, top-k or capacity factor that cannot work."""
    for name, value in (("num_experts", num_experts), ("top_k", top_k)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if expert_capacity_factor is not None and not expert_capacity_factor > 0:
        raise ValueError(
            f"expert_capacity_factor must be > 0 or None, got {expert_capacity_factor}"
        )
