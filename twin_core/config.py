"""The one configuration both twins read: BlockConfig, LMConfig and the rope scaling they hold.

A config is a frozen dataclass, validated once when it is made; `to_dict()` / `from_dict()`
carry it through checkpoint metadata as plain JSON types. The fields of `Architecture` choose
the family (DESIGN: docs/design.md section 8); their defaults are the original project's block.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from typing import Any

NORMS = ("layernorm", "rmsnorm", "gemma_rmsnorm")
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' names of attention kinds
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
POSITIONS = ("learned", "rope")
QK_NORMS = ("head", "projection")  # q/k norm over each head, or over the whole projection
# MoE tensors that routing reads but training never changes: a torch buffer, a Flax parameter
# that jax_block's optimizer freezes (DeepSeek-V3 updates its correction bias outside the gradient)
FROZEN_MOE_TENSORS = ("e_score_correction_bias",)
ROUTERS = ("softmax", "grouped_sigmoid")  # top-k of softmax probabilities; DeepSeek-V3's routing
# the fields that MultiHeadAttention (both twins) takes by keyword, after d_model, n_heads,
# dropout and causal: `Architecture.attention_options()`
ATTENTION_OPTIONS = (
    "n_kv_heads",
    "head_dim",
    "qkv_bias",
    "out_bias",
    "positions",
    "rope_theta",
    "rope_scaling",
    "partial_rotary_factor",
    "sliding_window",
    "query_pre_attn_scalar",
    "attn_logit_softcap",
    "qk_norm",
    "norm",
    "norm_eps",
    "attention_sinks",
)
# the fields that MixtureOfExperts (both twins) takes by keyword under their own names, besides
# the feed-forward's: `Architecture.moe_options()`
MOE_OPTIONS = (
    "norm_topk_prob",
    "shared_expert_d_ff",
    "shared_expert_gate",
    "router_bias",
    "router",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
)
MLA_NORM_EPS = 1e-6  # the eps of MLA's latent norms (transformers' DeepseekV3RMSNorm default)
# The Llama family's switches, which Mistral, Qwen2 and Mixtral start from: RMSNorm, gated SiLU
# feed-forward, rope, no biases. `BlockConfig(**LLAMA_OPTIONS, d_model=...)`, or
# `dict(LLAMA_OPTIONS, qkv_bias=True)` for Qwen2's attention.
LLAMA_OPTIONS: Mapping[str, Any] = types.MappingProxyType(
    dict(
        norm="rmsnorm",
        activation="silu",
        gated_ffn=True,
        ffn_bias=False,
        qkv_bias=False,
        out_bias=False,
        positions="rope",
    )
)


# rope_type -> (the fields it needs, the fields it may have), named as transformers' rope
# parameters name them (docs/design.md section 8)
ROPE_TYPES: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = types.MappingProxyType(
    {
        "llama3": (
            ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            (),
        ),
        "linear": (("factor",), ()),
        "dynamic": (("factor", "original_max_position_embeddings"), ()),
        "yarn": (
            ("factor", "original_max_position_embeddings"),
            ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
        ),
        "longrope": (
            ("factor", "original_max_position_embeddings", "short_factor", "long_factor"),
            ("attention_factor",),
        ),
    }
)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A rope frequency scaling as transformers computes it (`twin_core.rope`), by `rope_type`:

    "llama3": factor, low_freq_factor, high_freq_factor, original_max_position_embeddings.
    "linear": factor (every frequency divided by it).
    "dynamic": factor, original_max_position_embeddings (transformers' max_position_embeddings:
        longer sequences rotate with a base grown from their length, dynamic NTK).
    "yarn": factor, original_max_position_embeddings; optional attention_factor, beta_fast (32),
        beta_slow (1), mscale, mscale_all_dim, truncate (True).
    "longrope": factor, original_max_position_embeddings, short_factor and long_factor (one per
        frequency; the long ones for sequences longer than the original); optional
        attention_factor.
    A field that its type does not read is refused; None is "not set".
    """

    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    rope_type: str = "llama3"
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling.rope_type must be one of {list(ROPE_TYPES)} (or no scaling), "
                f"got {self.rope_type!r}"
            )
        needed, optional = ROPE_TYPES[self.rope_type]
        fields = [f.name for f in dataclasses.fields(self) if f.name != "rope_type"]
        missing = [name for name in needed if getattr(self, name) is None]
        extra = [n for n in fields if n not in needed + optional and getattr(self, n) is not None]
        if missing or extra:
            raise ValueError(
                f"rope_scaling ({self.rope_type!r}): missing {missing}, not read by this type "
                f"{extra}; it needs {list(needed)}"
                + (f" and may have {list(optional)}" if optional else "")
            )
        positive = ("factor", "low_freq_factor", "high_freq_factor", "attention_factor")
        for name in (*positive, "beta_fast", "beta_slow"):
            value = getattr(self, name)
            if value is not None:
                _check_number(f"rope_scaling.{name}", value, "> 0", lambda v: v > 0)
        for name in ("mscale", "mscale_all_dim"):
            if getattr(self, name) is not None:
                _check_number(f"rope_scaling.{name}", getattr(self, name), "", lambda v: True)
        if self.truncate is not None and not isinstance(self.truncate, bool):
            raise TypeError(f"rope_scaling.truncate must be a bool, got {self.truncate!r}")
        if self.original_max_position_embeddings is not None:
            _check_positive_int(
                "rope_scaling.original_max_position_embeddings",
                self.original_max_position_embeddings,
            )
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must be > "
                f"low_freq_factor ({self.low_freq_factor})"
            )
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"rope_scaling.{name} must be a list of numbers, got {value!r}")
            for v in value:
                _check_number(f"rope_scaling.{name} entries", v, "> 0", lambda v: v > 0)
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.rope_type == "longrope" and len(self.short_factor) != len(self.long_factor):
            raise ValueError(
                f"rope_scaling: short_factor ({len(self.short_factor)}) and long_factor "
                f"({len(self.long_factor)}) must have one entry per frequency each"
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set, as plain JSON types (rope_type always)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Architecture:
    """The family options of a block; the defaults are the original project's (GPT-2-era) block.

    norm: "layernorm" (weight and bias), "rmsnorm" (weight only) or "gemma_rmsnorm" (Gemma's:
        x * rsqrt(mean(x^2) + eps) * (1 + weight) in float32, weight starting at 0), `norm_eps`.
    activation, gated_ffn, ffn_bias: the feed-forward, every expert and the shared expert;
        gated is down(act(gate(x)) * up(x)).
    n_kv_heads: key/value heads (GQA; 1 is MQA; None: n_heads).
    head_dim: the size of a head (None: d_model // n_heads).
    qkv_bias, out_bias: biases of the q/k/v projections and of the output projection.
    positions: "learned" (an embedding in the LM) or "rope" (rotate q and k by `rope_theta`,
        optionally with a `rope_scaling`); `partial_rotary_factor` f rotates only the first
        int(head_dim * f) dims of each head (transformers' rounding), the rest pass through.
    sliding_window: a query at p attends keys k with p - W < k <= p (None: every earlier key).
    qk_norm: a norm of the block's kind on q and k before rope: "head" over each head's
        head_dim (Qwen3), "projection" over the whole q and k projections before the split
        into heads (OLMoE); None: none.
    norm_topk_prob: renormalise the k routing weights (False keeps the softmax probabilities).
    shared_expert_d_ff: a shared expert applied to every token (None: none);
        shared_expert_gate scales it by sigmoid(x @ w).
    sandwich_norms: a norm of the attention output and one of the feed-forward output, each
        before its residual add (Gemma 2 and 3: `post_attention_norm`, `post_feed_forward_norm`).
    query_pre_attn_scalar: scores scaled by query_pre_attn_scalar ** -0.5 (None: head_dim).
    attn_logit_softcap: scores capped to cap * tanh(scores / cap) before the mask (None: no cap).
    attention_sinks: a learned logit per query head (`sinks`) that joins each query's softmax
        denominator and attends to nothing (GPT-OSS).
    router_bias: the MoE router (`gate`) has a bias.
    swiglu_limit: the gated feed-forward becomes GPT-OSS's clamped SwiGLU:
        (clamp(up, -l, l) + 1) * g * sigmoid(swiglu_alpha * g), g = clamp(gate, max=l), with
        gate = fc1(x), up = fc3(x) (needs gated_ffn and activation "silu"; None: plain).
    kv_lora_rank: set, attention is multi-head latent attention (DeepSeek-V3's MLA): keys and
        values come from a latent of this width (RMSNorm'd, MLA_NORM_EPS) and one rope key of
        `qk_rope_head_dim` shared by all heads, which is all its cache holds; each head's query
        and key are `qk_nope_head_dim` unrotated dims then `qk_rope_head_dim` rotated ones (the
        interleaved pairs of transformers' DeepSeek-V3), values `v_head_dim`; the query comes
        through a low-rank `q_lora_rank` projection and RMSNorm, or one projection when None.
        Scores are scaled by (qk_nope_head_dim + qk_rope_head_dim) ** -0.5, times mscale^2 of a
        yarn rope_scaling with mscale_all_dim. head_dim, n_kv_heads and biases are not read.
    router: "softmax" (top-k of softmax probabilities) or "grouped_sigmoid" (DeepSeek-V3:
        sigmoid scores; choice by scores + e_score_correction_bias within the best `topk_group`
        of `n_group` groups, ranked by the sum of their top-2 biased scores; weights the
        unbiased scores of the chosen, renormalised if norm_topk_prob, times
        `routed_scaling_factor`).
    """

    n_kv_heads: int | None = None
    head_dim: int | None = None
    qkv_bias: bool = True
    out_bias: bool = True
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"
    gated_ffn: bool = False
    ffn_bias: bool = True
    positions: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 1.0
    sliding_window: int | None = None
    qk_norm: str | None = None
    norm_topk_prob: bool = True
    shared_expert_d_ff: int | None = None
    shared_expert_gate: bool = False
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    attention_sinks: bool = False
    router_bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    router: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    @property
    def is_mla(self) -> bool:
        """Whether attention is multi-head latent attention (kv_lora_rank set)."""
        return self.kv_lora_rank is not None

    @property
    def resolved_n_kv_heads(self) -> int:
        """The key/value heads the cache holds."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def resolved_head_dim(self) -> int:
        """The size of one attention head."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    def architecture(self) -> dict[str, Any]:
        """The family options alone, as keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Architecture)}

    def kwargs(self) -> dict[str, Any]:
        """Every field as keyword arguments (rope_scaling stays a RopeScaling)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def attention_options(self) -> dict[str, Any]:
        """The keyword arguments of MultiHeadAttention (both twins) that this config sets."""
        return {name: getattr(self, name) for name in ATTENTION_OPTIONS}

    def feed_forward_options(self) -> dict[str, Any]:
        """The keyword arguments of FeedForward (both twins; MixtureOfExperts takes them too)
        that this config sets: the kind of every feed-forward and expert."""
        return dict(
            activation=self.activation,
            gated=self.gated_ffn,
            bias=self.ffn_bias,
            swiglu_limit=self.swiglu_limit,
            swiglu_alpha=self.swiglu_alpha,
        )

    def moe_options(self) -> dict[str, Any]:
        """The keyword arguments of MixtureOfExperts (both twins) beyond its sizes and the
        feed-forward's options: routing and the shared expert."""
        return {name: getattr(self, name) for name in MOE_OPTIONS}

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON types (rope_scaling as a dict)."""
        family = [f.name for f in dataclasses.fields(Architecture)]
        names = [f.name for f in dataclasses.fields(self) if f.name not in family] + family
        out = {name: getattr(self, name) for name in names}
        out.update({k: list(v) for k, v in out.items() if isinstance(v, tuple)})
        if self.rope_scaling is not None:
            out["rope_scaling"] = self.rope_scaling.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """The config from `to_dict()`'s output; missing optional fields take their defaults.

        Unknown keys, missing required keys and values of the wrong type are a ValueError that
        names them.
        """
        if not isinstance(data, Mapping):
            raise ValueError(
                f"{cls.__name__}: expected a dict of fields, got {type(data).__name__}"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        missing = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and name not in data
        ]
        if unknown or missing:
            raise ValueError(
                f"{cls.__name__}: unknown keys {unknown}, missing keys {missing}; "
                f"the fields are {list(fields)}"
            )
        values = dict(data)
        wrong = [
            f"{name}={value!r} (expected {fields[name].type})"
            for name, value in values.items()
            if not _is_of_type(value, fields[name].type)
        ]
        if wrong:
            raise ValueError(f"{cls.__name__}: wrong types: {', '.join(wrong)}")
        if isinstance(values.get("rope_scaling"), Mapping):
            values["rope_scaling"] = _rope_scaling_from_dict(values["rope_scaling"])
        return cls(**values)

    def _check_architecture(self) -> None:
        for name, value, allowed in (
            ("norm", self.norm, NORMS),
            ("activation", self.activation, ACTIVATIONS),
            ("positions", self.positions, POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        if self.qk_norm is not None and self.qk_norm not in QK_NORMS:
            raise ValueError(
                f"qk_norm must be one of {list(QK_NORMS)} or None, got {self.qk_norm!r}"
            )
        for name in (
            "qkv_bias",
            "out_bias",
            "gated_ffn",
            "ffn_bias",
            "norm_topk_prob",
            "shared_expert_gate",
            "sandwich_norms",
            "attention_sinks",
            "router_bias",
        ):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _check_number("norm_eps", self.norm_eps, "> 0", lambda v: v > 0)
        _check_number("rope_theta", self.rope_theta, "> 0", lambda v: v > 0)
        for name in ("query_pre_attn_scalar", "attn_logit_softcap"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name), "> 0 (or None)", lambda v: v > 0)
        if self.n_kv_heads is not None:
            _check_positive_int("n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads != 0:
                raise ValueError(
                    f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
                )
        if self.head_dim is not None:
            _check_positive_int("head_dim", self.head_dim)
        _check_number(
            "partial_rotary_factor", self.partial_rotary_factor, "in (0, 1]", lambda v: 0 < v <= 1
        )
        if self.positions != "rope" and self.partial_rotary_factor != 1.0:
            raise ValueError("partial_rotary_factor is set but positions is not 'rope'")
        self._check_mla()
        if self.positions == "rope":
            dims = rotary_dims(self.resolved_head_dim, self.partial_rotary_factor)
            if self.is_mla:
                dims = self.qk_rope_head_dim
            if dims % 2 != 0 or dims < 2:
                raise ValueError(
                    f"positions='rope' needs an even number >= 2 of rotated dims per head, got "
                    f"int(head_dim * partial_rotary_factor) = int({self.resolved_head_dim} * "
                    f"{self.partial_rotary_factor}) = {dims}"
                )
            _check_rope_scaling(self.rope_scaling, dims)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise TypeError(
                "rope_scaling must be None or a RopeScaling, "
                f"got {type(self.rope_scaling).__name__}"
            )
        if self.rope_scaling is not None and self.positions != "rope":
            raise ValueError("rope_scaling is set but positions is not 'rope'")
        if self.sliding_window is not None:
            _check_positive_int("sliding_window", self.sliding_window, "window")
        if self.shared_expert_d_ff is not None:
            _check_positive_int("shared_expert_d_ff", self.shared_expert_d_ff)
            if not self.use_moe:
                raise ValueError(
                    "shared_expert_d_ff needs use_moe=True (the shared expert of an MoE)"
                )
        if self.shared_expert_gate and self.shared_expert_d_ff is None:
            raise ValueError("shared_expert_gate=True needs a shared expert (shared_expert_d_ff)")
        self._check_router()
        self._check_gpt_oss()

    def _check_mla(self) -> None:
        sizes = ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        if not self.is_mla:
            given = [n for n in ("q_lora_rank", *sizes) if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{given} are set but kv_lora_rank is None (not MLA)")
            return
        for name in ("kv_lora_rank", *sizes):
            _check_positive_int(name, getattr(self, name))
        if self.q_lora_rank is not None:
            _check_positive_int("q_lora_rank", self.q_lora_rank)
        if self.positions != "rope" or self.qk_rope_head_dim % 2 != 0:
            raise ValueError(
                f"MLA (kv_lora_rank set) needs positions='rope' and an even qk_rope_head_dim, got "
                f"positions={self.positions!r}, qk_rope_head_dim={self.qk_rope_head_dim}"
            )
        unread = {
            "n_kv_heads": None,
            "qk_norm": None,
            "sliding_window": None,
            "query_pre_attn_scalar": None,
            "attn_logit_softcap": None,
            "partial_rotary_factor": 1.0,
            "qkv_bias": False,
            "out_bias": False,
            "attention_sinks": False,
        }
        wrong = {n: getattr(self, n) for n, v in unread.items() if getattr(self, n) != v}
        if wrong:
            raise ValueError(f"MLA (kv_lora_rank set) computes none of {wrong}; it needs {unread}")

    def _check_router(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {list(ROUTERS)}, got {self.router!r}")
        for name in ("n_group", "topk_group"):
            _check_positive_int(name, getattr(self, name))
        _check_number("routed_scaling_factor", self.routed_scaling_factor, "> 0", lambda v: v > 0)
        if self.router == "softmax":
            if (self.n_group, self.topk_group, self.routed_scaling_factor) != (1, 1, 1.0):
                raise ValueError(
                    "n_group, topk_group and routed_scaling_factor are read by "
                    "router='grouped_sigmoid' only; router='softmax' needs 1, 1, 1.0"
                )
            return
        E, G = self.num_experts, self.n_group
        if not self.use_moe or E % G != 0 or E // G < 2 or not self.topk_group <= G:
            raise ValueError(
                f"router='grouped_sigmoid' needs use_moe=True, num_experts ({E}) a multiple of "
                f"n_group ({G}) with at least 2 experts a group (a group's score is its top 2), "
                f"topk_group ({self.topk_group}) <= n_group"
            )
        if self.top_k_experts > self.topk_group * (E // G):
            raise ValueError(
                f"top_k_experts ({self.top_k_experts}) must be <= the experts of the topk_group "
                f"({self.topk_group}) chosen groups ({self.topk_group * (E // G)})"
            )

    def _check_gpt_oss(self) -> None:
        """GPT-OSS's options: router bias with MoE, the clamped SwiGLU with a gated SiLU FFN."""
        if self.router_bias and not self.use_moe:
            raise ValueError("router_bias=True needs use_moe=True (the router of an MoE)")
        _check_number("swiglu_alpha", self.swiglu_alpha, "> 0", lambda v: v > 0)
        if self.swiglu_limit is None:
            if self.swiglu_alpha != 1.702:
                raise ValueError(
                    f"swiglu_alpha={self.swiglu_alpha!r} is set but swiglu_limit is None (the "
                    "alpha belongs to the clamped SwiGLU)"
                )
            return
        _check_number("swiglu_limit", self.swiglu_limit, "> 0 (or None)", lambda v: v > 0)
        if not self.gated_ffn or self.activation != "silu":
            raise ValueError(
                f"swiglu_limit needs gated_ffn=True and activation='silu' (a clamped SwiGLU), "
                f"got gated_ffn={self.gated_ffn!r}, activation={self.activation!r}"
            )


@dataclasses.dataclass(frozen=True)
class BlockConfig(Architecture):
    """Everything that defines a TransformerBlock in both frameworks."""

    d_model: int
    n_heads: int
    d_ff: int
    dropout: float = 0.1
    use_moe: bool = False
    num_experts: int = 8
    top_k_experts: int = 2
    causal: bool = True
    expert_capacity_factor: float | None = 1.25
    router_z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        _check_block(self)


@dataclasses.dataclass(frozen=True)
class LMConfig(Architecture):
    """Everything that defines a TransformerLM in both frameworks (always causal).

    Per layer (`block_configs()` resolves them; None and () keep every layer the same):
    layer_types: one of LAYER_TYPES per layer, transformers' names; a "sliding_attention"
        layer attends within `sliding_window`, a "full_attention" one to every earlier key
        (None: every layer sliding when sliding_window is set, else full).
    dense_layers: in an MoE model, the layers whose feed-forward is dense, of width
        `dense_d_ff` (None: d_ff) and without a shared expert.
    embed_scale: the token embeddings times sqrt(d_model), that factor rounded to the compute
        dtype (Gemma). final_logit_softcap: logits capped to cap * tanh(logits / cap) (None: no
        cap). local_rope_theta: the rope base of the sliding-window layers, which then rotate
        without rope_scaling; the full-attention layers keep rope_theta and rope_scaling
        (Gemma 3; None: every layer rope_theta).
    """

    vocab_size: int
    max_seq_len: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    dropout: float = 0.1
    use_moe: bool = False
    num_experts: int = 8
    top_k_experts: int = 2
    expert_capacity_factor: float | None = 1.25
    tie_embeddings: bool = True
    router_z_loss_coef: float = 0.0
    layer_types: tuple[str, ...] | None = None
    dense_layers: tuple[int, ...] = ()
    dense_d_ff: int | None = None
    embed_scale: bool = False
    final_logit_softcap: float | None = None
    local_rope_theta: float | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransformerLM: {name} must be a positive int, got {value!r}")
        _check_block(self)
        if not isinstance(self.embed_scale, bool):
            raise TypeError(f"embed_scale must be a bool, got {self.embed_scale!r}")
        for name in ("final_logit_softcap", "local_rope_theta"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name), "> 0 (or None)", lambda v: v > 0)
        if self.local_rope_theta is not None and self.positions != "rope":
            raise ValueError("local_rope_theta is set but positions is not 'rope'")
        self._check_layers()

    def _check_layers(self) -> None:
        """Validate the per-layer fields; lists become tuples (the config stays hashable)."""
        if self.layer_types is not None:
            types_ = _as_tuple("layer_types", self.layer_types)
            object.__setattr__(self, "layer_types", types_)
            if len(types_) != self.n_layers:
                raise ValueError(
                    f"layer_types must name {self.n_layers} layers (n_layers), got {len(types_)}"
                )
            unknown = sorted({t for t in types_ if t not in LAYER_TYPES}, key=str)
            if unknown:
                raise ValueError(f"layer_types must hold {list(LAYER_TYPES)}, got {unknown}")
            if "sliding_attention" in types_ and self.sliding_window is None:
                sliding = [i for i, t in enumerate(types_) if t == "sliding_attention"]
                raise ValueError(
                    f"layer_types: layers {sliding} are 'sliding_attention' but sliding_window "
                    "is None (set the window's width)"
                )
        dense = _as_tuple("dense_layers", self.dense_layers)
        wrong = [i for i in dense if isinstance(i, bool) or not isinstance(i, int)]
        wrong += [i for i in dense if i not in wrong and not 0 <= i < self.n_layers]
        if wrong:
            raise ValueError(
                f"dense_layers must hold layer indices in [0, n_layers={self.n_layers}), "
                f"got {wrong}"
            )
        if len(set(dense)) != len(dense):
            raise ValueError(f"dense_layers must not repeat a layer, got {list(dense)}")
        object.__setattr__(self, "dense_layers", tuple(sorted(dense)))
        if dense and not self.use_moe:
            raise ValueError("dense_layers needs use_moe=True (the dense layers of an MoE model)")
        if self.dense_d_ff is not None:
            _check_positive_int("dense_d_ff", self.dense_d_ff)
            if not dense:
                raise ValueError("dense_d_ff is set but dense_layers is empty (no dense layer)")

    def block_configs(self) -> tuple[BlockConfig, ...]:
        """The config of each block, layer 0 first (n_layers of them).

        A "full_attention" layer of `layer_types` has no window (sliding_window None); a
        sliding one rotates with `local_rope_theta` and no scaling when that is set; a layer of
        `dense_layers` has a dense feed-forward of width `dense_d_ff` (None: d_ff), no
        shared expert and the default router fields. The LMs build each layer, and size its
        cache, from its own entry.
        """
        block = BlockConfig(
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_ff=self.d_ff,
            dropout=self.dropout,
            use_moe=self.use_moe,
            num_experts=self.num_experts,
            top_k_experts=self.top_k_experts,
            causal=True,
            expert_capacity_factor=self.expert_capacity_factor,
            router_z_loss_coef=self.router_z_loss_coef,
            **self.architecture(),
        )
        full = dataclasses.replace(block, sliding_window=None)
        if self.local_rope_theta is not None:  # Gemma 3: the sliding layers' own rope
            block = dataclasses.replace(block, rope_theta=self.local_rope_theta, rope_scaling=None)
        blocks = []
        for i in range(self.n_layers):
            layer = full if self.layer_type(i) == "full_attention" else block
            if i in self.dense_layers:
                layer = dataclasses.replace(
                    layer,
                    use_moe=False,
                    d_ff=self.d_ff if self.dense_d_ff is None else self.dense_d_ff,
                    shared_expert_d_ff=None,
                    shared_expert_gate=False,
                    router_bias=False,
                    router="softmax",
                    n_group=1,
                    topk_group=1,
                    routed_scaling_factor=1.0,
                )
            blocks.append(layer)
        return tuple(blocks)

    def layer_type(self, i: int) -> str:
        """Layer i's attention kind: "sliding_attention" (a window of sliding_window) or
        "full_attention"; without layer_types every layer is sliding when sliding_window is set."""
        if self.layer_types is not None:
            return self.layer_types[i]
        return "full_attention" if self.sliding_window is None else "sliding_attention"


def mla_absorbs(queries: int, rank: int, nope_dim: int, v_dim: int) -> bool:
    """Whether MLA attends `queries` queries from the latent by absorbing kv_b_proj into the
    query and output sides (cost ~ T S H 2R) rather than expanding the latent into per-head
    keys and values (~ S H R (Dn + Dv) + T S H (Dn + Dv)): T (2R - Dn - Dv) < R (Dn + Dv).
    Measured (torch, 1 thread, H 16, R 512, Dn 128, Dr 64, Dv 128): S 2048, T 1: absorbing
    18.5 ms, expanding 318 ms; T 4: 40 vs 360 ms; S = T = 512: 490 vs 215 ms."""
    return queries * (2 * rank - nope_dim - v_dim) < rank * (nope_dim + v_dim)


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


def check_heads(d_model: int, n_heads: int, head_dim: int | None) -> None:
    """Raise ValueError unless n_heads >= 1 and, without a head_dim, d_model splits into
    n_heads heads."""
    if n_heads < 1 or (head_dim is None and d_model % n_heads != 0):
        raise ValueError(
            f"d_model ({d_model}) must be divisible by n_heads ({n_heads}), n_heads >= 1"
        )


def _check_block(config: BlockConfig | LMConfig) -> None:
    for name in ("d_model", "n_heads", "d_ff"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    check_heads(config.d_model, config.n_heads, config.head_dim)
    if config.use_moe:
        check_moe_config(config.num_experts, config.top_k_experts, config.expert_capacity_factor)
    config._check_architecture()


def _as_tuple(name: str, value: Any) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a tuple (or list), got {type(value).__name__} {value!r}")
    return tuple(value)


def rotary_dims(head_dim: int, partial_rotary_factor: float) -> int:
    """The dims of a head that rope rotates: int(head_dim * partial_rotary_factor), the first
    ones (transformers' rounding)."""
    return int(head_dim * partial_rotary_factor)


def _check_rope_scaling(scaling: RopeScaling | None, dims: int) -> None:
    """Raise ValueError where a scaling cannot rotate `dims` dims as transformers does."""
    if scaling is None or not isinstance(scaling, RopeScaling):
        return
    if scaling.rope_type == "longrope" and len(scaling.short_factor) != dims // 2:
        raise ValueError(
            f"rope_scaling: short_factor and long_factor need one entry per frequency "
            f"(rotated dims / 2 = {dims // 2}), got {len(scaling.short_factor)}"
        )
    if scaling.rope_type == "dynamic" and dims <= 2:
        raise ValueError(
            f"rope_scaling 'dynamic' needs more than 2 rotated dims per head (its base grows "
            f"by the power dims / (dims - 2)), got {dims}"
        )


def _check_positive_int(name: str, value: Any, what: str = "int") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive {what} (>= 1), got {value!r}")


def _check_number(name: str, value: Any, wanted: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {wanted}, got {value!r}")
    if not ok(value):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")


_TYPES = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
}


def _is_of_type(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a field annotation such as "int | None" or "tuple[int, ...]"
    (a list or tuple of such values)."""
    for part in (p.strip() for p in annotation.split("|")):
        if part == "None" and value is None:
            return True
        if part.startswith("tuple[") and isinstance(value, (list, tuple)):
            item = part.removeprefix("tuple[").removesuffix(", ...]")
            if all(_is_of_type(v, item) for v in value):
                return True
        if part == "RopeScaling" and isinstance(value, (Mapping, RopeScaling)):
            return True
        kinds = _TYPES.get(part, ())
        if kinds and isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool)):
            return True
    return False


def _rope_scaling_from_dict(data: Mapping[str, Any]) -> RopeScaling:
    names = [f.name for f in dataclasses.fields(RopeScaling)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"rope_scaling: unknown keys {unknown}; the fields are {names}")
    try:
        return RopeScaling(**data)
    except TypeError as err:
        raise ValueError(f"rope_scaling: {err}") from err


# --------------------------------------------------------------------------- training
def default_warmup_steps(steps: int) -> int:
    """The warm-up of a run of `steps` updates when none is given: a quarter of the run, at most
    100 updates (400 steps: 100; 50 steps: 12; 3 steps: 0)."""
    return min(100, steps // 4)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything about a run except the model: batches, optimizer, schedule, seed.

    `seq_len` is the model's input length; each batch row holds seq_len + 1 tokens (the targets
    are the inputs shifted by one). The learning rate rises linearly from 0 over `warmup_steps`
    steps, then follows a cosine down to `lr * min_lr_ratio` at step `steps`. `warmup_steps`
    None is `default_warmup_steps(steps)`, resolved when the config is made.
    """

    steps: int = 400
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    aux_loss_coef: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.warmup_steps is None and isinstance(self.steps, int):
            object.__setattr__(self, "warmup_steps", default_warmup_steps(self.steps))
        for name in ("steps", "batch_size", "seq_len", "warmup_steps", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}"
            )
        floats = ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps", "max_grad_norm")
        for name in (*floats, "aux_loss_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        checks = (
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
            ("eps", self.eps > 0, "> 0"),
            ("max_grad_norm", self.max_grad_norm > 0, "> 0"),
            ("aux_loss_coef", self.aux_loss_coef >= 0, ">= 0"),
        )
        for name, ok, wanted in checks:
            if not ok:
                raise ValueError(f"{name} must be {wanted}, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON types (the warm-up resolved)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """The config from `to_dict()`'s output; unknown keys are a ValueError naming them."""
        if not isinstance(data, Mapping):
            raise ValueError(f"TrainConfig: expected a dict of fields, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"TrainConfig: unknown keys {unknown}; the fields are {names}")
        return cls(**data)
