"""Multi-head self-attention with an optional KV cache, grouped key/value heads and rope."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from twin_core import RopeScaling, RopeTables, rope_tables
from twin_core.checks import check_mask

from .cache import KVCache
from .linear import Linear, linear, linear_params
from .norm import NormParams, make_norm, norm
from .rope import apply_rope

QUERY_BLOCK = 128  # queries attended together: one block's keys end at its last query's slot
SCORE_ELEMENTS = 1 << 19  # the most attention scores (or mask entries) one block holds at once
WHOLE_SCORES = 1 << 20  # eval inputs with at most this many scores (B*H*T*S) are attended whole


class AttentionParams(NamedTuple):
    """What `project` and `merge_heads` read of a MultiHeadAttention."""

    q: Linear  # (H * D, d_model)
    k: Linear  # (KV * D, d_model)
    v: Linear  # (KV * D, d_model)
    out: Linear  # (d_model, H * D)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope: RopeTables | None  # its arrays float32 tensors, with rope
    scale: float  # the scores' factor: head_dim ** -0.5, or query_pre_attn_scalar ** -0.5
    softcap: float | None  # scores capped to softcap * tanh(scores / softcap)
    qk_norm: str | None  # "head", "projection" or None
    q_norm: NormParams | None  # (D,) per head, (H * D,) over the projection
    k_norm: NormParams | None  # (D,) per head, (KV * D,) over the projection
    sinks: torch.Tensor | None = None  # (H,) sink logits, with attention_sinks


def split_heads(y: torch.Tensor, B: int, T: int, n: int, D: int) -> torch.Tensor:
    """(B * T, n * D) -> (B, n, T, D). One token per row (a decode step) is a view alone."""
    return y.view(B, n, 1, D) if T == 1 else y.view(B, T, n, D).transpose(1, 2)


def project(
    x: torch.Tensor, params: AttentionParams, positions: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, H, T, D), k and v (B, KV, T, D) of x (B, T, d_model); q and k normed (qk_norm)
    and, with rope, rotated at `positions` (B|1, T)."""
    B, T, d_model = x.shape
    H, KV, D = params.n_heads, params.n_kv_heads, params.head_dim
    tokens = x.reshape(B * T, d_model)  # nn.Linear's own product of a 3-d input
    q, k = linear(tokens, *params.q), linear(tokens, *params.k)  # (B * T, H|KV * D)
    if params.qk_norm == "projection":
        q, k = norm(q, params.q_norm), norm(k, params.k_norm)
    q, k = split_heads(q, B, T, H, D), split_heads(k, B, T, KV, D)
    if params.qk_norm == "head":
        q, k = norm(q, params.q_norm), norm(k, params.k_norm)
    v = split_heads(linear(tokens, *params.v), B, T, KV, D)
    if params.rope is not None:
        q = apply_rope(q, positions, params.rope)
        k = apply_rope(k, positions, params.rope)
    return q, k, v


def merge_heads(out: torch.Tensor, params: AttentionParams) -> torch.Tensor:
    """The heads' outputs (B, H, T, D) through the output projection -> (B * T, d_model)."""
    B, H, T, D = out.shape
    heads = out.reshape(B, H * D) if T == 1 else out.transpose(1, 2).reshape(B * T, H * D)
    return linear(heads, *params.out)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None,
    dropout: nn.Dropout | None = None,
    fused: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over the allowed keys: q (B, H, T, D), k (B, KV, S, D) and v
    (B, KV, S, Dv) (Dv may differ from D, as MLA's) -> (B, H, T, Dv).

    `allowed` (bool, broadcastable to (B, H, T, S)) marks the keys each query may see; None
    allows all. A query that may see no key gets zeros. `scale` defaults to D ** -0.5; with
    `softcap` the scores become softcap * tanh(scores / softcap) before the mask. `sinks` (H,)
    join each row's softmax as one more logit whose column is then dropped (GPT-OSS). The original
    project's arithmetic: in float32 without dropout, softcap or masked key,
    F.scaled_dot_product_attention; otherwise the scores are written out, softmax in float32,
    and `dropout` (a module, training) applies to the probabilities. `fused=True` (float32, no
    dropout, no softcap) takes the fused kernel with a mask too: its CPU kernel walks the keys
    in blocks with an online softmax, never holding the (T, S) scores.
    """
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    plain = dropout is None and softcap is None and sinks is None and q.dtype == torch.float32
    if plain and (allowed is None or fused):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=scale, enable_gqa=KV != H
        )
    G = H // KV
    grouped_q = q.float().reshape(B, KV, G * T, D)  # query head h = kv * G + g
    scores = torch.matmul(grouped_q, k.float().transpose(-2, -1)) * scale
    scores = scores.view(B, H, T, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    if sinks is None:
        probs = F.softmax(scores, dim=-1)  # (B, H, T, S)
    else:  # one more column per row: the head's sink logit, dropped after the softmax
        sink = sinks.float().view(1, H, 1, 1).expand(B, H, T, 1)
        probs = F.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :S]  # (B, H, T, S)
    if allowed is not None:
        probs = probs * allowed  # a row with no allowed key is all zeros
    probs = probs.to(v.dtype)
    if dropout is not None:
        probs = dropout(probs)
    return torch.matmul(probs.view(B, KV, G * T, S), v).view(B, H, T, v.shape[-1])


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over n_heads query heads; causal unless `causal=False`.

    Query head h reads key/value head h // (n_heads // n_kv_heads) (GQA; MQA at 1). With
    `positions="rope"` q and k are rotated at their tokens' positions before the cache write.
    With `sliding_window` W a query at p sees keys k with p - W < k <= p. `qk_norm` ("head" or
    "projection") norms q and k before rope with a norm of kind `norm` (`q_norm`, `k_norm`).
    Scores are scaled by `query_pre_attn_scalar` ** -0.5 when given (else head_dim ** -0.5)
    and, with `attn_logit_softcap`, capped to cap * tanh(scores / cap). With
    `attention_sinks` each head has a learned sink logit (`sinks`, (H,)) in every query's
    softmax denominator, attending to nothing (GPT-OSS).

    Training calls, and eval calls with at most WHOLE_SCORES scores, attend every query at once
    with the original project's arithmetic (its outputs bit for bit). Longer eval inputs are
    attended in blocks of queries, each against only the keys its rules can allow, so that no
    call holds heads x T x S scores (see `attend`); the result agrees to float32 rounding.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.1,
        *,
        causal: bool = True,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        positions: str = "learned",
        rope_theta: float = 10000.0,
        rope_scaling: RopeScaling | None = None,
        partial_rotary_factor: float = 1.0,
        sliding_window: int | None = None,
        query_pre_attn_scalar: float | None = None,
        attn_logit_softcap: float | None = None,
        qk_norm: str | None = None,
        norm: str = "rmsnorm",
        norm_eps: float = 1e-6,
        attention_sinks: bool = False,
    ):
        super().__init__()
        if n_heads < 1 or (head_dim is None and d_model % n_heads != 0):
            raise ValueError(
                f"d_model ({d_model}) must be divisible by n_heads ({n_heads}), n_heads >= 1"
            )
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.head_dim = d_model // n_heads if head_dim is None else head_dim
        self.causal = causal
        self.sliding_window = sliding_window
        self.scale = (
            self.head_dim if query_pre_attn_scalar is None else query_pre_attn_scalar
        ) ** -0.5
        self.softcap = attn_logit_softcap
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        self.q_proj = nn.Linear(d_model, H * D, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, KV * D, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, KV * D, bias=qkv_bias)
        self.out_proj = nn.Linear(H * D, d_model, bias=out_bias)
        self.qk_norm = qk_norm
        if qk_norm is not None:
            q_dim, k_dim = (D, D) if qk_norm == "head" else (H * D, KV * D)
            self.q_norm = make_norm(norm, q_dim, norm_eps)
            self.k_norm = make_norm(norm, k_dim, norm_eps)
        self.sinks = nn.Parameter(torch.zeros(H)) if attention_sinks else None  # (H,)
        self.dropout = nn.Dropout(dropout)
        self.rope = positions == "rope"
        self.rope_buffers: list[str] = []  # float32 whatever the module's dtype
        if self.rope:
            tables = rope_tables(D, rope_theta, rope_scaling, partial_rotary_factor)
            self.rope_tables = tables
            arrays = dict(
                inv_freq=tables.inv_freq,  # (R/2,)
                long_inv_freq=tables.long_inv_freq,  # (R/2,) longrope
                rope_exponent=None if tables.ntk is None else tables.ntk.exponent,  # (R/2,)
            )
            for name, array in arrays.items():
                if array is not None:
                    self.register_buffer(name, torch.from_numpy(array), persistent=False)
                    self.rope_buffers.append(name)

    def _apply(self, fn, recurse=True):
        """As every module (`.to`, `.cuda`, `.bfloat16`, ...), but the rope frequencies stay
        float32 on a dtype cast: rounded frequencies would rotate by other angles."""
        before = {name: getattr(self, name) for name in self.rope_buffers}
        super()._apply(fn, recurse)
        for name, tensor in before.items():
            setattr(self, name, tensor.to(getattr(self, name).device))
        return self

    def rope_params(self) -> RopeTables | None:
        """The rope constants with this module's float32 tensors in place of the arrays."""
        if not self.rope:
            return None
        tables = self.rope_tables
        ntk = tables.ntk
        return tables._replace(
            inv_freq=self.inv_freq,
            long_inv_freq=getattr(self, "long_inv_freq", None),
            ntk=None if ntk is None else ntk._replace(exponent=self.rope_exponent),
        )

    def params(self) -> AttentionParams:
        """The tensors and sizes `project` and `merge_heads` read."""
        return AttentionParams(
            q=linear_params(self.q_proj),
            k=linear_params(self.k_proj),
            v=linear_params(self.v_proj),
            out=linear_params(self.out_proj),
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            rope=self.rope_params(),
            scale=self.scale,
            softcap=self.softcap,
            qk_norm=self.qk_norm,
            q_norm=None if self.qk_norm is None else self.q_norm.params(),
            k_norm=None if self.qk_norm is None else self.k_norm.params(),
            sinks=self.sinks,
        )

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_position: int | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend x (B, T, d_model) to itself and, with a cache, to the tokens cached before it.

        `positions` (B|1, T) are the rope positions (default: cache position + arange(T)).
        """
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        start = 0
        if kv_cache is not None:
            start = kv_cache.cache_position if cache_position is None else cache_position
            kv_cache.check_write(B, KV, D, start, T)
        S = start + T
        if mask is not None:
            check_mask(mask, (B, H, T, S))

        if self.rope and positions is None:
            positions = start + torch.arange(T, device=x.device)[None, :]  # (1, T)
        params = self.params()
        q, k, v = project(x, params, positions)  # (B, H, T, D), (B, KV, T, D) twice
        if kv_cache is not None:
            # attend to what the cache holds after the write: new keys rounded to its dtype
            k, v = kv_cache.write(k, v, start)  # (B, KV, S, D)
            k, v = k.to(q.dtype), v.to(q.dtype)
        out = self.attend_blocks(q, k, v, start, mask)  # (B, H, T, D)
        return merge_heads(out, params).view(B, T, -1)  # (B, T, d_model)

    def attend_blocks(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """q (B, H, T, D) at slots start.., k and v (B, KV, S, D) -> (B, H, T, D).

        In training, or with at most WHOLE_SCORES scores, every query against every key at once
        (dropout then draws over the same probabilities as ever); otherwise a block of queries
        at a time, each against the keys [lo, hi) that its causal and window rules can allow.
        """
        B, H, T, _ = q.shape
        S = k.shape[2]
        dropout = self.dropout if self.training else None
        if mask is not None:
            mask = mask.to(torch.bool)
            mask = mask[(None,) * (4 - mask.dim())]  # (B|1, H|1, T|1, S|1)
        scores = dict(scale=self.scale, softcap=self.softcap, sinks=self.sinks)
        if dropout is not None or B * H * T * S <= WHOLE_SCORES:
            allowed = self.allowed(start, start + T, 0, S, mask, 0, T, q.device)
            return attend(q, k, v, allowed, dropout, **scores)
        fused = q.dtype == torch.float32 and self.softcap is None and self.sinks is None
        per_query = B * S if fused else B * H * S  # mask entries or scores
        rows = max(1, min(QUERY_BLOCK, SCORE_ELEMENTS // per_query))
        blocks = []
        for a in range(0, T, rows):
            b = min(T, a + rows)
            lo, hi = self.key_range(start + a, start + b, S)
            allowed = self.allowed(start + a, start + b, lo, hi, mask, a, T, q.device)
            blocks.append(
                attend(q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi], allowed, fused=fused, **scores)
            )
        return torch.cat(blocks, dim=2)

    def key_range(self, first: int, end: int, S: int) -> tuple[int, int]:
        """The key slots [lo, hi) that queries at slots [first, end) may see."""
        hi = min(S, end) if self.causal else S
        lo = 0 if self.sliding_window is None else max(0, first - self.sliding_window + 1)
        return lo, hi

    def allowed(
        self,
        first: int,
        end: int,
        lo: int,
        hi: int,
        mask: torch.Tensor | None,
        row: int,
        T: int,
        device: torch.device,
    ) -> torch.Tensor | None:
        """Which keys at slots [lo, hi) the queries at slots [first, end) may see: the causal
        and window rules and rows [row, row + end - first) of the 4-d `mask` (T rows, or 1).
        None when every key there is allowed (a single query in decode, say)."""
        W = self.sliding_window
        causal = self.causal and hi > first + 1  # some key follows the first query
        window = W is not None and lo <= end - 1 - W  # some key is too old for the last query
        allowed = None
        if causal or window:
            query_pos = torch.arange(first, end, device=device)[:, None]  # (Tb, 1)
            key_pos = torch.arange(lo, hi, device=device)[None, :]  # (1, Sb)
            if causal:
                allowed = key_pos <= query_pos
            if window:
                recent = key_pos > query_pos - W
                allowed = recent if allowed is None else allowed & recent
        if mask is not None:
            block = mask[:, :, row : row + end - first] if mask.shape[2] == T else mask
            block = block[..., lo:hi] if mask.shape[3] > 1 else block
            allowed = block if allowed is None else allowed & block
        return allowed
