"""Multi-head latent attention (DeepSeek-V3's MLA), attending from a latent KV cache."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from twin_core import (
    MLA_NORM_EPS,
    BlockConfig,
    RopeTables,
    mla_absorbs,
    mla_softmax_scale,
    rope_tables,
)

from . import attention
from .attention import check_mask
from .cache import LatentCache
from .linear import Linear, linear, linear_params
from .norm import NormParams, RMSNorm, norm
from .rope import apply_rope


class LatentAttentionParams(NamedTuple):
    """What `project_latent` and `attend_latent` read of a MultiHeadLatentAttention."""

    q_a: Linear | None  # (q_lora_rank, d_model), None without a q_lora_rank
    q_a_norm: NormParams | None  # (q_lora_rank,)
    q_b: Linear  # (H * (Dn + Dr), q_lora_rank or d_model): q_b_proj, or q_proj
    kv_a: Linear  # (R + Dr, d_model)
    kv_a_norm: NormParams  # (R,)
    kv_b: torch.Tensor  # (H * (Dn + Dv), R)
    out: Linear  # (d_model, H * Dv)
    n_heads: int
    nope_dim: int  # Dn
    rope_dim: int  # Dr
    v_dim: int  # Dv
    rank: int  # R
    rope: RopeTables  # its arrays float32 tensors
    scale: float


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """The pairs (x0, x1), (x2, x3), ... of the last axis as evens then odds: the rotate-half
    layout in which transformers' interleaved DeepSeek rope rotates them."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def project_latent(
    x: torch.Tensor, params: LatentAttentionParams, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of x (B, T, d_model) at rope `positions` (B|1, T): q_nope (B, H, T, Dn), rotated
    q_rope (B, H, T, Dr), the normalised latent (B, T, R) and the rotated rope key (B, T, Dr)."""
    B, T, d_model = x.shape
    H, Dn, Dr, R = params.n_heads, params.nope_dim, params.rope_dim, params.rank
    tokens = x.reshape(B * T, d_model)
    q_in = tokens if params.q_a is None else norm(linear(tokens, *params.q_a), params.q_a_norm)
    q = linear(q_in, *params.q_b).view(B, T, H, Dn + Dr).transpose(1, 2)  # (B, H, T, Dn + Dr)
    q_nope, q_rope = q.split([Dn, Dr], dim=-1)
    latent, rope_key = linear(tokens, *params.kv_a).view(B, T, R + Dr).split([R, Dr], dim=-1)
    latent = norm(latent, params.kv_a_norm)  # (B, T, R)
    q_rope = apply_rope(deinterleave(q_rope), positions, params.rope)
    rope_key = apply_rope(deinterleave(rope_key)[:, None], positions, params.rope)[:, 0]
    return q_nope, q_rope, latent, rope_key


def _softmax(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """softmax over the allowed keys of float32 scores (B, H, T, S); a row with none: zeros."""
    if allowed is None:
        return F.softmax(scores, dim=-1)
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    return F.softmax(scores, dim=-1) * allowed


def attend_latent(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    rope_key: torch.Tensor,
    allowed: torch.Tensor | None,
    params: LatentAttentionParams,
    dropout: nn.Dropout | None = None,
) -> torch.Tensor:
    """The heads' outputs (B, H, T, Dv) of queries q_nope, q_rope (B, H, T, Dn|Dr) over the S
    keys of latent (B, S, R) and rope_key (B, S, Dr); `allowed` broadcasts to (B, H, T, S).

    Where `twin_core.mla_absorbs` says so (few queries: decode), kv_b_proj is absorbed: the
    queries move into the latent space (q_nope W_k), the probabilities weight the latent
    itself and W_v maps the result to each head; otherwise the latent is expanded into
    per-head keys and values. Scores and softmax are float32.
    """
    B, H, T, Dn = q_nope.shape
    S, R = latent.shape[1], params.rank
    rope_scores = torch.matmul(q_rope.float(), rope_key.float()[:, None].transpose(-2, -1))
    weights = params.kv_b.view(H, Dn + params.v_dim, R)
    if mla_absorbs(T, R, Dn, params.v_dim):
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, weights[:, :Dn])  # (B, H, T, R)
        keys = latent.float()[:, None].transpose(-2, -1)  # (B, 1, R, S)
        scores = (torch.matmul(q_latent.float(), keys) + rope_scores) * params.scale
        probs = _softmax(scores, allowed).to(latent.dtype)  # (B, H, T, S)
        if dropout is not None:
            probs = dropout(probs)
        out_latent = torch.matmul(probs, latent[:, None])  # (B, H, T, R)
        return torch.einsum("bhtr,hvr->bhtv", out_latent, weights[:, Dn:])  # (B, H, T, Dv)
    kv = linear(latent, params.kv_b).view(B, S, H, Dn + params.v_dim).transpose(1, 2)
    k_nope, v = kv.split([Dn, params.v_dim], dim=-1)  # (B, H, S, Dn), (B, H, S, Dv)
    scores = torch.matmul(q_nope.float(), k_nope.float().transpose(-2, -1))
    probs = _softmax((scores + rope_scores) * params.scale, allowed).to(v.dtype)
    if dropout is not None:
        probs = dropout(probs)
    return torch.matmul(probs, v)  # (B, H, T, Dv)


def attend_latent_blocks(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    rope_key: torch.Tensor,
    start: int,
    mask: torch.Tensor | None,
    params: LatentAttentionParams,
) -> torch.Tensor:
    """`attend_latent` (causal, eval) a block of queries at a time (`attention.attend`, whose
    float32 kernel walks the keys with an online softmax): no (B, H, T, S) scores are ever held.
    Queries at slots start.., keys at slots 0..S-1, `mask` broadcasting to (B, H, T, S).

    Absorbed, it is attention with one key/value head shared by all H query heads: keys the
    latent and the rope key side by side (R + Dr), values the latent (R); expanded, H heads of
    keys [k_nope, rope_key] (Dn + Dr) and values (Dv). Returns (B, H, T, Dv).
    """
    B, H, T, Dn = q_nope.shape
    S, R, Dr = latent.shape[1], params.rank, params.rope_dim
    weights = params.kv_b.view(H, Dn + params.v_dim, R)
    absorbs = mla_absorbs(T, R, Dn, params.v_dim)
    if absorbs:
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, weights[:, :Dn])  # (B, H, T, R)
        q = torch.cat([q_latent, q_rope.to(q_latent.dtype)], dim=-1)  # (B, H, T, R + Dr)
        k = torch.cat([latent, rope_key], dim=-1)[:, None]  # (B, 1, S, R + Dr)
        v = latent[:, None]  # (B, 1, S, R)
    else:
        kv = linear(latent, params.kv_b).view(B, S, H, Dn + params.v_dim).transpose(1, 2)
        k_nope, v = kv.split([Dn, params.v_dim], dim=-1)  # (B, H, S, Dn), (B, H, S, Dv)
        shared = rope_key[:, None].expand(B, H, S, Dr).to(k_nope.dtype)
        k = torch.cat([k_nope, shared], dim=-1)  # (B, H, S, Dn + Dr)
        q = torch.cat([q_nope, q_rope.to(q_nope.dtype)], dim=-1)  # (B, H, T, Dn + Dr)
    if mask is not None:
        mask = mask.to(torch.bool)
        mask = mask[(None,) * (4 - mask.dim())]  # (B|1, H|1, T|1, S|1)
    fused = q.dtype == torch.float32
    per_query = B * S if fused else B * H * S  # mask entries or scores
    rows = max(1, min(attention.QUERY_BLOCK, attention.SCORE_ELEMENTS // per_query))
    blocks = []
    for a in range(0, T, rows):
        b = min(T, a + rows)
        end = start + b  # keys [0, end): the causal rule's for the block's last query
        allowed = (
            torch.arange(end, device=q.device)[None, :]
            <= torch.arange(start + a, end, device=q.device)[:, None]
        )  # (Tb, end)
        if mask is not None:
            block = mask[:, :, a:b] if mask.shape[2] == T else mask
            allowed = allowed & (block[..., :end] if mask.shape[3] > 1 else block)
        blocks.append(
            attention.attend(
                q[:, :, a:b], k[:, :, :end], v[:, :, :end], allowed, fused=fused, scale=params.scale
            )
        )
    out = torch.cat(blocks, dim=2)  # (B, H, T, R | Dv)
    if absorbs:
        return torch.einsum("bhtr,hvr->bhtv", out, weights[:, Dn:])  # (B, H, T, Dv)
    return out


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V3's multi-head latent attention (causal); the fields are BlockConfig's.

    q: q_a_proj -> RMSNorm (`q_a_norm`) -> q_b_proj, or q_proj without a q_lora_rank; split
    per head into qk_nope_head_dim and qk_rope_head_dim dims. kv_a_proj gives the latent
    (RMSNorm'd, `kv_a_norm`) and one rope key shared by every head; kv_b_proj expands the
    latent into per-head no-rope keys and values. The cache (a LatentCache) holds the latent
    and the rotated rope key of each token.
    """

    def __init__(self, config: BlockConfig):
        super().__init__()
        if not config.is_mla:
            raise ValueError("MultiHeadLatentAttention needs a config with kv_lora_rank set")
        self.config = config
        H, d_model = config.n_heads, config.d_model
        Dn, Dr, Dv, R = (
            config.qk_nope_head_dim,
            config.qk_rope_head_dim,
            config.v_head_dim,
            config.kv_lora_rank,
        )
        q_heads = H * (Dn + Dr)
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, q_heads, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, config.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(config.q_lora_rank, MLA_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_heads, bias=False)
        self.kv_a_proj = nn.Linear(d_model, R + Dr, bias=False)
        self.kv_a_norm = RMSNorm(R, MLA_NORM_EPS)
        self.kv_b_proj = nn.Linear(R, H * (Dn + Dv), bias=False)
        self.out_proj = nn.Linear(H * Dv, d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.scale = mla_softmax_scale(Dn + Dr, config.rope_scaling)
        self.rope_tables = rope_tables(Dr, config.rope_theta, config.rope_scaling)
        if self.rope_tables.original_length is not None:
            raise ValueError("MLA supports the rope types whose frequencies do not vary by length")
        self.register_buffer(
            "inv_freq", torch.from_numpy(self.rope_tables.inv_freq), persistent=False
        )

    def _apply(self, fn, recurse=True):
        """As every module, but the rope frequencies stay float32 on a dtype cast."""
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def params(self) -> LatentAttentionParams:
        """The tensors and sizes `project_latent` and `attend_latent` read."""
        c = self.config
        lora = c.q_lora_rank is not None
        return LatentAttentionParams(
            q_a=linear_params(self.q_a_proj) if lora else None,
            q_a_norm=self.q_a_norm.params() if lora else None,
            q_b=linear_params(self.q_b_proj if lora else self.q_proj),
            kv_a=linear_params(self.kv_a_proj),
            kv_a_norm=self.kv_a_norm.params(),
            kv_b=self.kv_b_proj.weight,
            out=linear_params(self.out_proj),
            n_heads=c.n_heads,
            nope_dim=c.qk_nope_head_dim,
            rope_dim=c.qk_rope_head_dim,
            v_dim=c.v_head_dim,
            rank=c.kv_lora_rank,
            rope=self.rope_tables._replace(inv_freq=self.inv_freq),
            scale=self.scale,
        )

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: LatentCache | None = None,
        cache_position: int | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend x (B, T, d_model) to itself and, with a cache, to the tokens cached before it.

        `positions` (B|1, T) are the rope positions (default: cache position + arange(T)).
        """
        B, T, _ = x.shape
        params = self.params()
        start = 0
        if kv_cache is not None:
            start = kv_cache.cache_position if cache_position is None else cache_position
            kv_cache.check_write(B, params.rank, params.rope_dim, start, T)
        S = start + T
        if mask is not None:
            check_mask(mask, (B, params.n_heads, T, S))
        if positions is None:
            positions = start + torch.arange(T, device=x.device)[None, :]  # (1, T)
        q_nope, q_rope, latent, rope_key = project_latent(x, params, positions)
        if kv_cache is not None:  # attend to what the cache holds after the write
            latent, rope_key = kv_cache.write(latent, rope_key, start)  # (B, S, R), (B, S, Dr)
            latent, rope_key = latent.to(x.dtype), rope_key.to(x.dtype)
        if not self.training and B * params.n_heads * T * S > attention.WHOLE_SCORES:
            out = attend_latent_blocks(q_nope, q_rope, latent, rope_key, start, mask, params)
            heads = out.transpose(1, 2).reshape(B * T, -1)  # (B * T, H * Dv)
            return linear(heads, *params.out).view(B, T, -1)  # (B, T, d_model)
        query_pos = torch.arange(start, S, device=x.device)[:, None]  # (T, 1)
        allowed = torch.arange(S, device=x.device)[None, :] <= query_pos  # (T, S)
        if mask is not None:
            allowed = allowed & mask.to(torch.bool)
        dropout = self.dropout if self.training else None
        out = attend_latent(q_nope, q_rope, latent, rope_key, allowed, params, dropout)
        heads = out.transpose(1, 2).reshape(B * T, -1)  # (B * T, H * Dv)
        return linear(heads, *params.out).view(B, T, -1)  # (B, T, d_model)
