"""config.json of a Hugging Face checkpoint <-> twin_core.LMConfig, for the six families.

Reading follows transformers' own configuration classes (defaults, both rope spellings, the
per-layer sliding-window rules of Qwen2 and Qwen2-MoE); anything the block cannot compute
exactly is a ValueError that names it, never a silently different model (docs/design.md
section 9). Writing picks the one family whose layout the LMConfig fits, or says which field
rules out each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twin_core import LLAMA_OPTIONS, ROPE_TYPES, LMConfig, RopeScaling

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "phi3")
ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
CHECKPOINT_DTYPES = ("float32", "bfloat16", "float16")
MAX_SIZE = 1 << 24  # a size field above this is refused as absurd (vocab, width, depth, heads)
MAX_POSITIONS = 1 << 24

# transformers' ACT2FN names -> ours (exact: same formula; the tanh forms of GELU are one formula)
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}
GPT2_ACTIVATION_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu", "relu": "relu"}
ROPE_ACTIVATION_NAMES = {
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "silu": "silu",
    "relu": "relu",
}
DEFAULT_THETA = {"mixtral": 1_000_000.0}  # the others: 10000.0
# transformers' config defaults where a field is absent (save_pretrained leaves defaults out)
LLAMA_DEFAULTS = dict(
    hidden_size=4096,
    max_position_embeddings=2048,
    vocab_size=32000,
    intermediate_size=11008,
    rms_norm_eps=1e-6,
)
FAMILY_DEFAULTS = {
    "mixtral": dict(rms_norm_eps=1e-5),
    "phi3": dict(
        hidden_size=3072,
        max_position_embeddings=4096,
        vocab_size=32064,
        intermediate_size=8192,
        rms_norm_eps=1e-5,
    ),
}
# the rope types each family reads (besides "default"): longrope is Phi-3's alone, whose generate
# recomputes the sequence when it passes the original length (as ours does); the others: all
FAMILY_ROPE_TYPES = {"phi3": ("longrope",)}
OTHER_ROPE_TYPES = tuple(t for t in ROPE_TYPES if t != "longrope")
PHI3_ORIGINAL_LENGTH = 4096  # Phi3Config's original_max_position_embeddings
# fields that change the computation in ways no family here supports, when set (not null)
UNSUPPORTED_KEYS = {
    "attn_logit_softcapping": "attention logit softcapping",
    "final_logit_softcapping": "final logit softcapping",
    "quantization_config": "quantized weights",
}


@dataclass(frozen=True)
class HFConfig:
    """What a config.json says: the family, our LMConfig, the stored dtype and the token ids."""

    family: str
    config: LMConfig
    dtype: str | None  # as config.json names it (dtype or torch_dtype), None when absent
    token_ids: dict[str, Any]  # bos_token_id, eos_token_id, pad_token_id (int, list or None)


# --------------------------------------------------------------------------- reading
def lm_config_from_hf(data: Mapping[str, Any]) -> HFConfig:
    """Parse a config.json dict; ValueError names an unknown family or an unsupported option."""
    if not isinstance(data, Mapping):
        raise ValueError(f"config.json must hold a JSON object, got {type(data).__name__}")
    family = data.get("model_type")
    if family not in FAMILIES:
        raise ValueError(
            f"config.json: unsupported model_type {family!r}; supported: {', '.join(FAMILIES)}"
        )
    for key, what in UNSUPPORTED_KEYS.items():
        if data.get(key) not in (None, {}, False):
            raise ValueError(f"config.json: {key}={data[key]!r} ({what}) is not supported")
    fields = _gpt2_fields(data) if family == "gpt2" else _rope_family_fields(data, family)
    try:
        config = LMConfig(dropout=0.0, **fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config.json ({family}): {err}") from err
    dtype = data.get("dtype", data.get("torch_dtype"))
    if dtype is not None and not isinstance(dtype, str):
        raise ValueError(f"config.json: dtype must be a string, got {dtype!r}")
    token_ids = {k: data.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return HFConfig(family, config, dtype, token_ids)


def _gpt2_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    for key, default, wanted in (
        ("scale_attn_weights", True, True),
        ("scale_attn_by_inverse_layer_idx", False, False),
        ("add_cross_attention", False, False),
    ):
        if data.get(key, default) != wanted:
            raise ValueError(f"config.json (gpt2): {key}={data[key]!r} is not supported")
    d_model = _size(data, "n_embd", 768)
    d_ff = data.get("n_inner")
    return dict(
        vocab_size=_size(data, "vocab_size", 50257),
        max_seq_len=_size(data, "n_positions", 1024, MAX_POSITIONS),
        d_model=d_model,
        n_layers=_size(data, "n_layer", None),
        n_heads=_size(data, "n_head", 12),
        d_ff=4 * d_model if d_ff is None else _size(data, "n_inner", None),
        activation=_activation(data, "activation_function", "gelu_new"),
        norm="layernorm",
        norm_eps=_positive(data, "layer_norm_epsilon", 1e-5),
        positions="learned",
        tie_embeddings=_bool(data, "tie_word_embeddings", True),
    )


def _rope_family_fields(data: Mapping[str, Any], family: str) -> dict[str, Any]:
    defaults = {**LLAMA_DEFAULTS, **FAMILY_DEFAULTS.get(family, {})}
    d_model = _size(data, "hidden_size", defaults["hidden_size"])
    n_heads = _size(data, "num_attention_heads", 32)
    n_kv_heads = data.get("num_key_value_heads")
    head_dim = data.get("head_dim")
    max_seq_len = _size(
        data, "max_position_embeddings", defaults["max_position_embeddings"], MAX_POSITIONS
    )
    fields: dict[str, Any] = dict(
        LLAMA_OPTIONS,
        vocab_size=_size(data, "vocab_size", defaults["vocab_size"]),
        max_seq_len=max_seq_len,
        d_model=d_model,
        n_layers=_size(data, "num_hidden_layers", None),  # no default: it sizes the weights
        n_heads=n_heads,
        n_kv_heads=None if n_kv_heads is None else _size(data, "num_key_value_heads", None),
        head_dim=None if head_dim is None else _size(data, "head_dim", None),
        d_ff=_size(data, "intermediate_size", defaults["intermediate_size"]),
        norm_eps=_positive(data, "rms_norm_eps", defaults["rms_norm_eps"]),
        activation=_activation(data, "hidden_act", "silu"),
        tie_embeddings=_bool(data, "tie_word_embeddings", False),
    )
    fields["rope_theta"], fields["rope_scaling"], fields["partial_rotary_factor"] = _rope(
        data, family, max_seq_len
    )
    if fields["rope_scaling"] is not None and fields["rope_scaling"].rope_type == "dynamic":
        # dynamic NTK stretches the trained length max_position_embeddings by its factor
        fields["max_seq_len"] = max(max_seq_len, int(fields["rope_scaling"].factor * max_seq_len))
    if family == "llama":
        fields["qkv_bias"] = fields["out_bias"] = _bool(data, "attention_bias", False)
        fields["ffn_bias"] = _bool(data, "mlp_bias", False)
    elif family in ("mistral", "mixtral", "phi3"):
        window = data.get("sliding_window", 4096 if family == "mistral" else None)
        fields["sliding_window"] = None if window is None else _size(data, "sliding_window", None)
    elif family in ("qwen2", "qwen2_moe"):
        fields["qkv_bias"] = True if family == "qwen2" else _bool(data, "qkv_bias", True)
        fields["sliding_window"] = _qwen_window(data, family, fields["n_layers"])
    if family == "mixtral":
        fields.update(
            use_moe=True,
            num_experts=_size(data, "num_local_experts", 8),
            top_k_experts=_size(data, "num_experts_per_tok", 2),
            norm_topk_prob=True,
            expert_capacity_factor=None,
        )
    elif family == "qwen2_moe":
        if data.get("decoder_sparse_step", 1) != 1:
            raise ValueError(
                f"config.json (qwen2_moe): decoder_sparse_step={data['decoder_sparse_step']!r} "
                "mixes dense and MoE layers; only 1 (every layer MoE) is supported"
            )
        if data.get("mlp_only_layers"):
            raise ValueError(
                f"config.json (qwen2_moe): mlp_only_layers={data['mlp_only_layers']!r} mixes "
                "dense and MoE layers; only [] is supported"
            )
        fields.update(
            use_moe=True,
            d_ff=_size(data, "moe_intermediate_size", 1408),
            num_experts=_size(data, "num_experts", 60),
            top_k_experts=_size(data, "num_experts_per_tok", 4),
            norm_topk_prob=_bool(data, "norm_topk_prob", False),
            shared_expert_d_ff=_size(data, "shared_expert_intermediate_size", 5632),
            shared_expert_gate=True,
            expert_capacity_factor=None,
        )
    return fields


def _rope(
    data: Mapping[str, Any], family: str, max_seq_len: int
) -> tuple[float, RopeScaling | None, float]:
    """(theta, scaling, partial rotary factor) from transformers 4's rope_theta/rope_scaling or
    5's rope_parameters, as transformers' config classes standardise them."""
    params = data.get("rope_scaling") or data.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"config.json: rope parameters must be an object, got {params!r}")
    if any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(
            f"config.json: per-layer rope parameters {sorted(params)} are not supported"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if family == "phi3" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # Phi3Config's reading of its older names
    partial = params.get("partial_rotary_factor", data.get("partial_rotary_factor", 1.0))
    if partial != 1.0 and family != "phi3":
        raise ValueError(
            f"config.json ({family}): partial rotary (partial_rotary_factor={partial!r}) is not "
            "supported (transformers rotates every dim in this family)"
        )
    theta = params.get("rope_theta", data.get("rope_theta", DEFAULT_THETA.get(family, 10000.0)))
    theta = _positive({"rope_theta": theta}, "rope_theta", None)
    if rope_type == "default":
        return theta, None, partial
    supported = FAMILY_ROPE_TYPES.get(family, OTHER_ROPE_TYPES)
    if rope_type not in supported:
        raise ValueError(
            f"config.json ({family}): rope type {rope_type!r} is not supported (supported: "
            f"default, {', '.join(supported)})"
        )
    needed, optional = ROPE_TYPES[rope_type]
    fields = {k: params[k] for k in needed + optional if params.get(k) is not None}
    original_key = "original_max_position_embeddings"
    if rope_type == "dynamic":  # transformers scales from max_position_embeddings
        fields[original_key] = max_seq_len
    elif family == "phi3":  # Phi3Config's top-level field wins (4096 when absent)
        fields[original_key] = data.get(original_key, PHI3_ORIGINAL_LENGTH)
    elif original_key in needed:
        fields[original_key] = data.get(original_key, params.get(original_key, max_seq_len))
    if rope_type in ("yarn", "longrope") and fields.get("factor") is None:
        fields["factor"] = _ratio(max_seq_len, fields[original_key])
    if rope_type == "yarn" and "truncate" in params:
        fields["truncate"] = bool(params["truncate"])  # null: falsy, as transformers tests it
    missing = [k for k in needed if k not in fields]
    if missing:
        raise ValueError(f"config.json: {rope_type} rope parameters lack {missing}")
    try:
        scaling = RopeScaling(rope_type=rope_type, **fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config.json: {err}") from err
    return theta, scaling, partial


def _ratio(max_seq_len: int, original: Any) -> float:
    """max_position_embeddings / original_max_position_embeddings: transformers' factor when
    none is given."""
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise ValueError(
            f"config.json: original_max_position_embeddings must be a positive int, "
            f"got {original!r}"
        )
    return max_seq_len / original


def _qwen_window(data: Mapping[str, Any], family: str, n_layers: int) -> int | None:
    """One window for every layer, from use_sliding_window and the per-layer types (as
    transformers derives them); a mix of sliding and full layers is refused."""
    use_window = _bool(data, "use_sliding_window", False)
    layer_types = data.get("layer_types")
    if layer_types is None:
        window_layers = data.get("max_window_layers", 28)
        if family == "qwen2":
            sliding = [use_window and i >= window_layers for i in range(n_layers)]
        else:
            sliding = [
                use_window and (i + 1) % 2 == 1 and i < window_layers for i in range(n_layers)
            ]
    else:
        if not isinstance(layer_types, list) or len(layer_types) != n_layers:
            raise ValueError(
                f"config.json: layer_types must list {n_layers} layer types, got {layer_types!r}"
            )
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(f"config.json: unsupported layer types {unknown}")
        sliding = [kind == "sliding_attention" for kind in layer_types]
    if not any(sliding):
        return None
    if not all(sliding):
        which = [i for i, s in enumerate(sliding) if s]
        raise ValueError(
            f"config.json ({family}): layers {which} use sliding-window attention and the others "
            "full attention; only one window for every layer is supported"
        )
    return _size(data, "sliding_window", None)


def _size(data: Mapping[str, Any], key: str, default: Any, limit: int = MAX_SIZE) -> int:
    value = data.get(key, default)
    if value is None and default is None and key not in data:
        raise ValueError(f"config.json: {key} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ValueError(f"config.json: {key} must be an int in [1, {limit}], got {value!r}")
    return value


def _positive(data: Mapping[str, Any], key: str, default: Any) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"config.json: {key} must be a finite number > 0, got {value!r}")
    if not value > 0:
        raise ValueError(f"config.json: {key} must be a finite number > 0, got {value!r}")
    return float(value)


def _bool(data: Mapping[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"config.json: {key} must be true or false, got {value!r}")
    return value


def _activation(data: Mapping[str, Any], key: str, default: str) -> str:
    name = data.get(key, default)
    if name not in HF_ACTIVATIONS:
        raise ValueError(
            f"config.json: {key}={name!r} is not supported (supported: {', '.join(HF_ACTIVATIONS)})"
        )
    return HF_ACTIVATIONS[name]


# --------------------------------------------------------------------------- family of a config
Requirement = tuple[str, Callable[[LMConfig], bool], str]  # field, test, what the family needs


def _is(field: str, value: Any) -> Requirement:
    return field, lambda c: getattr(c, field) == value, f"{value!r}"


_NOT_PHI3: list[Requirement] = [
    _is("partial_rotary_factor", 1.0),
    (
        "rope_scaling",
        lambda c: c.rope_scaling is None or c.rope_scaling.rope_type in OTHER_ROPE_TYPES,
        f"None or one of {OTHER_ROPE_TYPES}",
    ),
]
_PHI3: list[Requirement] = [
    _is("norm", "rmsnorm"),
    _is("positions", "rope"),
    _is("gated_ffn", True),
    _is("use_moe", False),
]
_ROPE_DENSE: list[Requirement] = _PHI3 + _NOT_PHI3
_ROPE_MOE: list[Requirement] = [
    _is("norm", "rmsnorm"),
    _is("positions", "rope"),
    _is("gated_ffn", True),
    _is("use_moe", True),
    _is("out_bias", False),
    _is("ffn_bias", False),
    *_NOT_PHI3,
]
REQUIREMENTS: dict[str, list[Requirement]] = {
    "gpt2": [
        _is("norm", "layernorm"),
        _is("positions", "learned"),
        _is("gated_ffn", False),
        _is("use_moe", False),
        _is("qkv_bias", True),
        _is("out_bias", True),
        _is("ffn_bias", True),
        _is("sliding_window", None),
        ("n_kv_heads", lambda c: c.n_kv_heads in (None, c.n_heads), "None or n_heads"),
        ("head_dim", lambda c: c.head_dim in (None, c.d_model // c.n_heads), "d_model // n_heads"),
    ],
    "llama": _ROPE_DENSE
    + [
        ("qkv_bias", lambda c: c.qkv_bias == c.out_bias, "equal to out_bias (attention_bias)"),
        _is("sliding_window", None),
    ],
    "mistral": _ROPE_DENSE + [_is(f, False) for f in ("qkv_bias", "out_bias", "ffn_bias")],
    "qwen2": _ROPE_DENSE + [_is("qkv_bias", True), _is("out_bias", False), _is("ffn_bias", False)],
    "mixtral": _ROPE_MOE
    + [_is("qkv_bias", False), _is("shared_expert_d_ff", None), _is("norm_topk_prob", True)],
    "qwen2_moe": _ROPE_MOE
    + [
        ("shared_expert_d_ff", lambda c: c.shared_expert_d_ff is not None, "a shared expert"),
        _is("shared_expert_gate", True),
    ],
    "phi3": _PHI3
    + [_is(f, False) for f in ("qkv_bias", "out_bias", "ffn_bias")]
    + [
        ("head_dim", lambda c: c.head_dim in (None, c.d_model // c.n_heads), "d_model // n_heads"),
        (
            "rope_scaling",
            lambda c: c.rope_scaling is None or c.rope_scaling.rope_type == "longrope",
            "None or longrope",
        ),
    ],
}


def family_of(config: LMConfig, preferred: str | None = None) -> str:
    """`preferred` (the family a model was read from) when `config` fits it, else the first
    family (in FAMILIES order) whose layout `config` fits; ValueError otherwise, saying for
    each family which fields rule it out."""
    reasons = {}
    order = ([preferred] if preferred in FAMILIES else []) + list(FAMILIES)
    for family in order:
        failed = [
            f"{field}={getattr(config, field)!r} (needs {wanted})"
            for field, ok, wanted in REQUIREMENTS[family]
            if not ok(config)
        ]
        if not failed:
            return family
        reasons[family] = ", ".join(failed)
    lines = "\n".join(f"  {family}: {why}" for family, why in reasons.items())
    raise ValueError(f"no Hugging Face family matches this model:\n{lines}")


# --------------------------------------------------------------------------- writing
def hf_config_from_lm(
    config: LMConfig,
    dtype: str,
    token_ids: Mapping[str, Any] | None = None,
    preferred: str | None = None,
) -> dict[str, Any]:
    """The config.json of `config` in the layout of its family (see family_of)."""
    family = family_of(config, preferred)
    if dtype not in CHECKPOINT_DTYPES:
        raise ValueError(f"dtype must be one of {CHECKPOINT_DTYPES}, got {dtype!r}")
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **(token_ids or {})}
    out: dict[str, Any] = {"architectures": [ARCHITECTURES[family]], "model_type": family}
    if family == "gpt2":
        out.update(
            vocab_size=config.vocab_size,
            n_positions=config.max_seq_len,
            n_embd=config.d_model,
            n_layer=config.n_layers,
            n_head=config.n_heads,
            n_inner=config.d_ff,
            activation_function=GPT2_ACTIVATION_NAMES[config.activation],
            layer_norm_epsilon=config.norm_eps,
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False,
        )
    else:
        out.update(_rope_family_config(config, family))
    out.update(tie_word_embeddings=config.tie_embeddings, dtype=dtype, use_cache=True, **ids)
    return out


def _rope_family_config(config: LMConfig, family: str) -> dict[str, Any]:
    scaling = None if config.rope_scaling is None else config.rope_scaling.to_dict()
    max_positions = config.max_seq_len
    if scaling is not None and scaling["rope_type"] == "dynamic":
        # transformers reads dynamic NTK's original length from max_position_embeddings
        max_positions = scaling.pop("original_max_position_embeddings")
    rope = {"rope_type": "default", **(scaling or {}), "rope_theta": config.rope_theta}
    out: dict[str, Any] = dict(
        vocab_size=config.vocab_size,
        max_position_embeddings=max_positions,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.resolved_n_kv_heads,
        head_dim=config.resolved_head_dim,
        hidden_act=ROPE_ACTIVATION_NAMES[config.activation],
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,  # transformers 4's spelling, beside 5's rope_parameters
        rope_scaling=scaling,
        rope_parameters=rope,
        attention_dropout=0.0,
    )
    window = config.sliding_window
    if family == "llama":
        out.update(attention_bias=config.qkv_bias, mlp_bias=config.ffn_bias)
    elif family in ("mistral", "mixtral"):
        out.update(sliding_window=window)
    elif family == "phi3":
        partial = config.partial_rotary_factor
        rope["partial_rotary_factor"] = partial
        out.update(sliding_window=window, partial_rotary_factor=partial)
        out.update(resid_pdrop=0.0, embd_pdrop=0.0)
        if scaling is not None:  # Phi3Config reads the original length at the top level
            out["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    else:  # qwen2, qwen2_moe: the window of every layer, spelled out per layer
        kind = "full_attention" if window is None else "sliding_attention"
        out.update(
            use_sliding_window=window is not None,
            sliding_window=window,
            max_window_layers=0 if window is not None else config.n_layers,
            layer_types=[kind] * config.n_layers,
        )
    if family == "mixtral":
        out.update(
            num_local_experts=config.num_experts,
            num_experts_per_tok=config.top_k_experts,
            router_jitter_noise=0.0,
        )
    elif family == "qwen2_moe":
        out.update(
            qkv_bias=config.qkv_bias,
            num_experts=config.num_experts,
            num_experts_per_tok=config.top_k_experts,
            moe_intermediate_size=config.d_ff,
            shared_expert_intermediate_size=config.shared_expert_d_ff,
            norm_topk_prob=config.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    return out
