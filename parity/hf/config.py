"""config.json of a Hugging Face checkpoint <-> twin_core.LMConfig, for the families of FAMILIES.

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

FAMILIES = (
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "mixtral",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "olmoe",
    "phi3",
    "gemma2",
    "gemma3_text",
    "gpt_oss",
    "deepseek_v3",
)
GEMMA = ("gemma2", "gemma3_text")
ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
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
DEFAULT_THETA = {"mixtral": 1_000_000.0, "gemma3_text": 1_000_000.0, "gpt_oss": 150_000.0}
# (the others: 10000.0)
DEFAULT_HEAD_DIM = {"qwen3": 128}  # the others: hidden_size // num_attention_heads
FULL, SLIDING = "full_attention", "sliding_attention"
QWEN_WINDOWS = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")  # use_sliding_window, layer types
# transformers' defaults of the MoE families: (expert width, experts, experts per token)
MOE_DEFAULTS = {"qwen2_moe": (1408, 60, 4), "qwen3_moe": (768, 128, 8), "olmoe": (2048, 64, 8)}
DENSE_D_FF = {"qwen2_moe": 5632, "qwen3_moe": 6144}  # intermediate_size: the dense layers' width
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
    "olmoe": dict(rms_norm_eps=1e-5),
    "phi3": dict(
        hidden_size=3072,
        max_position_embeddings=4096,
        vocab_size=32064,
        intermediate_size=8192,
        rms_norm_eps=1e-5,
    ),
}
# Gemma2Config's and GptOssConfig's defaults of the fields `_llama_sizes` reads (Gemma3TextConfig's
# differ from Gemma 2's in vocab_size only: GEMMA3_VOCAB_SIZE)
GEMMA_DEFAULTS = dict(
    vocab_size=256_000,
    hidden_size=2304,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    intermediate_size=9216,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
GEMMA3_VOCAB_SIZE = 262_208
GPT_OSS_DEFAULTS = dict(
    vocab_size=201_088,
    hidden_size=2880,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=64,
    intermediate_size=2880,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# the rope types each family reads (besides "default"): longrope is Phi-3's alone, whose generate
# recomputes the sequence when it passes the original length (as ours does); Gemma's: linear (Gemma
# 3's global layers; the others untested there); the others: all
FAMILY_ROPE_TYPES = {"phi3": ("longrope",), "gemma2": ("linear",), "gemma3_text": ("linear",)}
FAMILY_ROPE_TYPES["deepseek_v3"] = ("linear", "llama3", "yarn")  # frequencies fixed per model
OTHER_ROPE_TYPES = tuple(t for t in ROPE_TYPES if t != "longrope")
PHI3_ORIGINAL_LENGTH = 4096  # Phi3Config's original_max_position_embeddings
GPT_OSS_ROPE = {  # GptOssConfig's rope parameters when config.json gives none
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}
GEMMA3_LOCAL_THETA = 10_000.0  # Gemma 3's sliding layers' base when config.json gives none
# fields that change the computation in ways no family here supports, when set (not null);
# the Gemma families compute the softcappings
SOFTCAPPING_KEYS = ("attn_logit_softcapping", "final_logit_softcapping")
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
    quantization: str | None = None  # "mxfp4": GPT-OSS's expert weights as blocks and scales


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
    quantization = _quantization(data, family)
    for key, what in UNSUPPORTED_KEYS.items():
        if family in GEMMA and key in SOFTCAPPING_KEYS:
            continue
        if key == "quantization_config" and quantization is not None:
            continue
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
    return HFConfig(family, config, dtype, token_ids, quantization)


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
    if family in GEMMA:
        return _gemma_fields(data, family)
    if family == "gpt_oss":
        return _gpt_oss_fields(data)
    if family == "deepseek_v3":
        return _deepseek_fields(data)
    defaults = {**LLAMA_DEFAULTS, **FAMILY_DEFAULTS.get(family, {})}
    d_model = _size(data, "hidden_size", defaults["hidden_size"])
    n_heads = _size(data, "num_attention_heads", 32)
    n_kv_heads = data.get("num_key_value_heads")
    head_dim = data.get("head_dim", DEFAULT_HEAD_DIM.get(family))
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
        head_dim=None if head_dim is None else _size({"head_dim": head_dim}, "head_dim", None),
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
    elif family in ("qwen3", "qwen3_moe", "olmoe"):  # q/k norms; attention_bias on all four
        fields["qkv_bias"] = fields["out_bias"] = _bool(data, "attention_bias", False)
        fields["qk_norm"] = "projection" if family == "olmoe" else "head"
    if family in QWEN_WINDOWS:
        fields["sliding_window"], fields["layer_types"] = _qwen_windows(
            data, family, fields["n_layers"]
        )
    if family == "olmoe":
        if data.get("clip_qkv") is not None:
            raise ValueError(
                f"config.json (olmoe): clip_qkv={data['clip_qkv']!r} (clamping q, k and v) is "
                "not supported"
            )
        if head_dim is not None and fields["head_dim"] != d_model // n_heads:
            raise ValueError(
                f"config.json (olmoe): head_dim={head_dim!r} must be hidden_size // "
                f"num_attention_heads = {d_model // n_heads} (OLMoE's q/k norms are that wide)"
            )
    if family == "mixtral":
        fields.update(
            use_moe=True,
            num_experts=_size(data, "num_local_experts", 8),
            top_k_experts=_size(data, "num_experts_per_tok", 2),
            norm_topk_prob=True,
            expert_capacity_factor=None,
        )
    elif family in MOE_DEFAULTS:
        experts_key = "num_local_experts" if "num_local_experts" in data else "num_experts"
        d_ff, num_experts, top_k = MOE_DEFAULTS[family]
        fields.update(
            use_moe=True,
            d_ff=_size(
                data, "intermediate_size" if family == "olmoe" else "moe_intermediate_size", d_ff
            ),
            num_experts=_size(data, experts_key, num_experts),
            top_k_experts=_size(data, "num_experts_per_tok", top_k),
            norm_topk_prob=_bool(data, "norm_topk_prob", False),
            expert_capacity_factor=None,
        )
        if family == "qwen2_moe":
            fields.update(
                shared_expert_d_ff=_size(data, "shared_expert_intermediate_size", 5632),
                shared_expert_gate=True,
            )
        if family != "olmoe":
            fields["dense_layers"] = _dense_layers(data, family, fields["n_layers"])
            if fields["dense_layers"]:
                fields["dense_d_ff"] = _size(data, "intermediate_size", DENSE_D_FF[family])
    return fields


def _gemma_fields(data: Mapping[str, Any], family: str) -> dict[str, Any]:
    """Gemma 2 and Gemma 3 (text) as transformers' Gemma2Config and Gemma3TextConfig read them:
    Gemma's RMSNorm, sandwich norms, embeddings times sqrt(hidden_size), the query scale
    query_pre_attn_scalar ** -0.5, softcapping, and sliding and full layers."""
    gemma3 = family == "gemma3_text"
    if data.get("use_bidirectional_attention"):
        raise ValueError(
            f"config.json ({family}): use_bidirectional_attention=true (bidirectional "
            "attention) is not supported"
        )
    if gemma3 and data.get("attn_logit_softcapping") is not None:
        raise ValueError(
            f"config.json (gemma3_text): attn_logit_softcapping="
            f"{data['attn_logit_softcapping']!r} is set, but transformers' Gemma 3 does not "
            "apply it; refused rather than guessed"
        )
    n_layers = _size(data, "num_hidden_layers", None)  # no default: it sizes the weights
    max_seq_len = _size(data, "max_position_embeddings", 131_072 if gemma3 else 8192, MAX_POSITIONS)
    attention_bias = _bool(data, "attention_bias", False)
    defaults = dict(GEMMA_DEFAULTS, vocab_size=GEMMA3_VOCAB_SIZE) if gemma3 else GEMMA_DEFAULTS
    fields: dict[str, Any] = dict(
        norm="gemma_rmsnorm",
        activation=_activation(data, "hidden_activation", "gelu_pytorch_tanh"),
        gated_ffn=True,
        ffn_bias=False,
        qkv_bias=attention_bias,
        out_bias=attention_bias,
        positions="rope",
        **_llama_sizes(data, defaults),
        max_seq_len=max_seq_len,
        n_layers=n_layers,
        sandwich_norms=True,
        embed_scale=True,
        qk_norm="head" if gemma3 else None,
        query_pre_attn_scalar=_size(data, "query_pre_attn_scalar", 256),  # an int, as HF's
        final_logit_softcap=_optional_positive(
            data, "final_logit_softcapping", None if gemma3 else 30.0
        ),
    )
    if not gemma3:
        fields["attn_logit_softcap"] = _optional_positive(data, "attn_logit_softcapping", 50.0)
        fields["rope_theta"], fields["rope_scaling"], _ = _rope(data, family, max_seq_len)
    else:
        full, sliding = _gemma3_rope_parameters(data)
        fields["rope_theta"], fields["rope_scaling"], _ = _rope(
            {**data, "rope_scaling": None, "rope_parameters": full}, family, max_seq_len
        )
        local_theta, local_scaling, _ = _rope(
            {**data, "rope_scaling": None, "rope_parameters": sliding}, family, max_seq_len
        )
        if local_scaling is not None:
            raise ValueError(
                f"config.json (gemma3_text): rope type {sliding.get('rope_type')!r} of the "
                "sliding_attention layers is not supported (supported: default)"
            )
        fields["local_rope_theta"] = local_theta
    # without layer_types: Gemma 2 alternates, Gemma 3 slides but every sliding_window_pattern-th
    layer_types = data.get("layer_types")
    if layer_types is None:
        pattern = _size(data, "sliding_window_pattern", 6) if gemma3 else 2
        layer_types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]
    window = data.get("sliding_window", 4096)
    window = None if window is None else _size(data, "sliding_window", None)
    fields["sliding_window"], fields["layer_types"] = _layer_kinds(
        layer_types, n_layers, window, family, f"sliding_window={window!r}"
    )
    return fields


def _gpt_oss_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """GPT-OSS as transformers' GptOssConfig reads it: biases on q/k/v/o, attention sinks,
    sliding and full layers (alternating when layer_types is absent), yarn rope by default, a
    router with bias, top-k on the logits then a softmax over the k (our renormalised top-k),
    experts with biases and the clamped SwiGLU."""
    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(
            f"config.json (gpt_oss): hidden_act={act!r} is not supported (GptOssExperts apply "
            "their clamped SwiGLU whatever it says; only 'silu' is read)"
        )
    n_layers = _size(data, "num_hidden_layers", None)  # no default: it sizes the weights
    max_seq_len = _size(data, "max_position_embeddings", 131_072, MAX_POSITIONS)
    rope = data
    if data.get("rope_scaling") is None and data.get("rope_parameters") is None:
        rope = {**data, "rope_parameters": GPT_OSS_ROPE}  # GptOssConfig's default
    fields: dict[str, Any] = dict(
        LLAMA_OPTIONS,
        qkv_bias=_bool(data, "attention_bias", True),
        out_bias=_bool(data, "attention_bias", True),
        ffn_bias=True,
        **_llama_sizes(data, GPT_OSS_DEFAULTS),
        max_seq_len=max_seq_len,
        n_layers=n_layers,
        use_moe=True,
        num_experts=_size(data, "num_local_experts", 128),
        top_k_experts=_size(data, "num_experts_per_tok", 4),
        norm_topk_prob=True,
        expert_capacity_factor=None,
        attention_sinks=True,
        router_bias=True,
        swiglu_limit=_positive(data, "swiglu_limit", 7.0),
        swiglu_alpha=_positive(data, "swiglu_alpha", 1.702),
    )
    fields["rope_theta"], fields["rope_scaling"], _ = _rope(rope, "gpt_oss", max_seq_len)
    layer_types = data.get("layer_types")
    if layer_types is None:
        layer_types = [SLIDING if (i + 1) % 2 else FULL for i in range(n_layers)]
    window = data.get("sliding_window", 128)
    window = None if window is None else _size(data, "sliding_window", None)
    fields["sliding_window"], fields["layer_types"] = _layer_kinds(
        layer_types, n_layers, window, "gpt_oss", f"sliding_window={window!r}"
    )
    return fields


def _llama_sizes(data: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The vocabulary, widths, heads, norm eps and tied embeddings as Llama's config.json names
    them, each from `defaults` (by key) where absent."""
    return dict(
        vocab_size=_size(data, "vocab_size", defaults["vocab_size"]),
        d_model=_size(data, "hidden_size", defaults["hidden_size"]),
        n_heads=_size(data, "num_attention_heads", defaults["num_attention_heads"]),
        n_kv_heads=_size(data, "num_key_value_heads", defaults["num_key_value_heads"]),
        head_dim=_size(data, "head_dim", defaults["head_dim"]),
        d_ff=_size(data, "intermediate_size", defaults["intermediate_size"]),
        norm_eps=_positive(data, "rms_norm_eps", defaults["rms_norm_eps"]),
        tie_embeddings=_bool(data, "tie_word_embeddings", defaults["tie_word_embeddings"]),
    )


def _quantization(data: Mapping[str, Any], family: str) -> str | None:
    """ "mxfp4" for a GPT-OSS config.json whose quantization_config says so; None when there is
    none. Any other quantization stays refused (by UNSUPPORTED_KEYS)."""
    config = data.get("quantization_config")
    if family != "gpt_oss" or not isinstance(config, Mapping):
        return None
    return "mxfp4" if config.get("quant_method") == "mxfp4" else None


def _gemma3_rope_parameters(data: Mapping[str, Any]) -> tuple[dict, dict]:
    """The rope parameters of Gemma 3's full and sliding layers, as Gemma3TextConfig reads them:
    transformers 5's rope_parameters per layer type, or 4's rope_theta and rope_scaling (full
    layers) and rope_local_base_freq (sliding layers)."""
    params = data.get("rope_parameters")
    if params is None:
        params = {"sliding_attention": {"rope_type": "default"}, "full_attention": None}
    if not isinstance(params, Mapping) or not all(
        key in ("full_attention", "sliding_attention") and isinstance(value, (Mapping, type(None)))
        for key, value in params.items()
    ):
        raise ValueError(
            "config.json (gemma3_text): rope_parameters must map full_attention and "
            f"sliding_attention to their parameters, got {params!r}"
        )
    full = dict(params.get("full_attention") or {"rope_type": "default"})
    if data.get("rope_scaling") is not None:
        if not isinstance(data["rope_scaling"], Mapping):
            raise ValueError(
                f"config.json: rope_scaling must be an object, got {data['rope_scaling']!r}"
            )
        full.update(data["rope_scaling"])
    full.setdefault("rope_theta", data.get("rope_theta", DEFAULT_THETA["gemma3_text"]))
    sliding = dict(params.get("sliding_attention") or {"rope_type": "default"})
    sliding.setdefault("rope_theta", data.get("rope_local_base_freq", GEMMA3_LOCAL_THETA))
    return full, sliding


def _dense_layers(data: Mapping[str, Any], family: str, n_layers: int) -> tuple[int, ...]:
    """The dense layers of a Qwen MoE model, as transformers decides: layer i is MoE unless it
    is in mlp_only_layers or (i + 1) is not a multiple of decoder_sparse_step."""
    step = _size(data, "decoder_sparse_step", 1)
    only = data.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in only
    ):
        raise ValueError(
            f"config.json ({family}): mlp_only_layers must be a list of layer indices, got {only!r}"
        )
    return tuple(i for i in range(n_layers) if i in only or (i + 1) % step != 0)


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


def _qwen_windows(
    data: Mapping[str, Any], family: str, n_layers: int
) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding_window, layer_types) as transformers derives them: the window only with
    use_sliding_window; the layer types from config.json's layer_types, else Qwen2's and Qwen3's
    rule (layers >= max_window_layers slide), Qwen2-MoE's (even layers < max_window_layers
    slide) or Qwen3-MoE's (every layer; it reads no layer_types). A uniform model comes back in
    the compact form (layer_types None)."""
    use_window = _bool(data, "use_sliding_window", False)
    window = data.get("sliding_window", 4096) if use_window else None
    window = None if window in (None, 0) else _size(data, "sliding_window", None)
    layer_types = data.get("layer_types") if family != "qwen3_moe" else None
    if layer_types is None:
        window_layers = data.get("max_window_layers", 28)
        if family == "qwen3_moe":
            sliding = [window is not None] * n_layers
        elif family == "qwen2_moe":
            sliding = [use_window and i % 2 == 0 and i < window_layers for i in range(n_layers)]
        else:
            sliding = [window is not None and i >= window_layers for i in range(n_layers)]
        layer_types = [SLIDING if s else FULL for s in sliding]
    settings = f"use_sliding_window={use_window}, sliding_window={data.get('sliding_window')!r}"
    return _layer_kinds(layer_types, n_layers, window, family, settings)


def _layer_kinds(
    layer_types: Any, n_layers: int, window: int | None, family: str, settings: str
) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding_window, layer_types) of config.json's layer types (a list, one per layer) and
    window; a uniform model in the compact form (layer_types None). `settings` says where the
    window came from, for the error of sliding layers without one."""
    if not isinstance(layer_types, list) or len(layer_types) != n_layers:
        raise ValueError(
            f"config.json: layer_types must list {n_layers} layer types, got {layer_types!r}"
        )
    unknown = sorted(set(layer_types) - {FULL, SLIDING}, key=str)
    if unknown:
        raise ValueError(f"config.json: unsupported layer types {unknown}")
    sliding = [i for i, kind in enumerate(layer_types) if kind == SLIDING]
    if sliding and window is None:
        raise ValueError(
            f"config.json ({family}): layers {sliding} are sliding_attention but no window is "
            f"set ({settings})"
        )
    if len(set(layer_types)) == 1:
        return (window if sliding else None), None
    return window, tuple(layer_types)


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


def _optional_positive(data: Mapping[str, Any], key: str, default: Any) -> float | None:
    return None if data.get(key, default) is None else _positive(data, key, default)


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
    _is("ffn_bias", False),
    *_NOT_PHI3,
]
_NO_QK_NORM = _is("qk_norm", None)
_UNIFORM = _is("layer_types", None)  # one attention kind on every layer
_EVERY_LAYER_MOE = _is("dense_layers", ())
_ATTENTION_BIAS = ("qkv_bias", lambda c: c.qkv_bias == c.out_bias, "equal to out_bias")
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
        _NO_QK_NORM,
        _UNIFORM,
        ("n_kv_heads", lambda c: c.n_kv_heads in (None, c.n_heads), "None or n_heads"),
        ("head_dim", lambda c: c.head_dim in (None, c.d_model // c.n_heads), "d_model // n_heads"),
    ],
    "llama": _ROPE_DENSE + [_ATTENTION_BIAS, _is("sliding_window", None), _NO_QK_NORM, _UNIFORM],
    "mistral": _ROPE_DENSE
    + [_is(f, False) for f in ("qkv_bias", "out_bias", "ffn_bias")]
    + [_NO_QK_NORM, _UNIFORM],
    "qwen2": _ROPE_DENSE
    + [_is("qkv_bias", True), _is("out_bias", False), _is("ffn_bias", False), _NO_QK_NORM],
    "mixtral": _ROPE_MOE
    + [
        _is("qkv_bias", False),
        _is("out_bias", False),
        _is("shared_expert_d_ff", None),
        _is("norm_topk_prob", True),
        _NO_QK_NORM,
        _UNIFORM,
        _EVERY_LAYER_MOE,
    ],
    "qwen2_moe": _ROPE_MOE
    + [
        _is("out_bias", False),
        ("shared_expert_d_ff", lambda c: c.shared_expert_d_ff is not None, "a shared expert"),
        _is("shared_expert_gate", True),
        _NO_QK_NORM,
    ],
    "qwen3": _ROPE_DENSE + [_ATTENTION_BIAS, _is("ffn_bias", False), _is("qk_norm", "head")],
    "qwen3_moe": _ROPE_MOE
    + [_ATTENTION_BIAS, _is("shared_expert_d_ff", None), _is("qk_norm", "head"), _UNIFORM],
    "olmoe": _ROPE_MOE
    + [
        _ATTENTION_BIAS,
        _is("shared_expert_d_ff", None),
        _is("qk_norm", "projection"),
        _is("sliding_window", None),
        _EVERY_LAYER_MOE,
        ("head_dim", lambda c: c.head_dim in (None, c.d_model // c.n_heads), "d_model // n_heads"),
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
_GEMMA: list[Requirement] = [
    _is("norm", "gemma_rmsnorm"),
    _is("positions", "rope"),
    _is("gated_ffn", True),
    _is("ffn_bias", False),
    _is("use_moe", False),
    _is("sandwich_norms", True),
    _is("embed_scale", True),
    _ATTENTION_BIAS,
    _is("partial_rotary_factor", 1.0),
    (
        "rope_scaling",
        lambda c: c.rope_scaling is None or c.rope_scaling.rope_type == "linear",
        "None or linear",
    ),
    (
        "query_pre_attn_scalar",
        lambda c: c.query_pre_attn_scalar is None or float(c.query_pre_attn_scalar).is_integer(),
        "a whole number (an int in config.json) or None",
    ),
]
REQUIREMENTS["gemma2"] = _GEMMA + [_is("qk_norm", None), _is("local_rope_theta", None)]
REQUIREMENTS["gemma3_text"] = _GEMMA + [
    _is("qk_norm", "head"),
    _is("attn_logit_softcap", None),
    (
        "local_rope_theta",
        lambda c: c.local_rope_theta is not None or c.rope_scaling is None,
        "set when rope_scaling is (the sliding layers rotate unscaled)",
    ),
]
REQUIREMENTS["gpt_oss"] = _ROPE_MOE[:4] + [
    _is("ffn_bias", True),
    _is("qkv_bias", True),
    _is("out_bias", True),
    _is("attention_sinks", True),
    _is("router_bias", True),
    ("swiglu_limit", lambda c: c.swiglu_limit is not None, "a limit (the clamped SwiGLU)"),
    _is("norm_topk_prob", True),
    _is("shared_expert_d_ff", None),
    _NO_QK_NORM,
    _EVERY_LAYER_MOE,
    *_NOT_PHI3,
]
REQUIREMENTS["deepseek_v3"] = [
    _is("norm", "rmsnorm"),
    _is("positions", "rope"),
    _is("gated_ffn", True),
    _is("ffn_bias", False),
    _is("use_moe", True),
    _is("shared_expert_gate", False),
    _is("router", "grouped_sigmoid"),
    _UNIFORM,
    ("kv_lora_rank", lambda c: c.is_mla, "set (latent attention)"),
    (
        "dense_layers",
        lambda c: c.dense_layers == tuple(range(len(c.dense_layers))),
        "the first layers (first_k_dense_replace)",
    ),
    (
        "rope_scaling",
        lambda c: (
            c.rope_scaling is None or c.rope_scaling.rope_type in FAMILY_ROPE_TYPES["deepseek_v3"]
        ),
        f"None or one of {FAMILY_ROPE_TYPES['deepseek_v3']}",
    ),
]
# GPT-OSS's options, which the other families lack
for _family in FAMILIES:
    if _family != "gpt_oss":
        REQUIREMENTS[_family] += [
            _is("attention_sinks", False),
            _is("router_bias", False),
            _is("swiglu_limit", None),
        ]
# DeepSeek-V3's options, which the other families lack
for _family in FAMILIES:
    if _family != "deepseek_v3":
        REQUIREMENTS[_family] += [_is("kv_lora_rank", None), _is("router", "softmax")]
# Gemma's options, which the other families lack (a model using one is none of them)
for _family in FAMILIES:
    if _family not in GEMMA:
        REQUIREMENTS[_family] += [
            _is("sandwich_norms", False),
            _is("embed_scale", False),
            _is("query_pre_attn_scalar", None),
            _is("attn_logit_softcap", None),
            _is("final_logit_softcap", None),
            _is("local_rope_theta", None),
        ]


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
    elif family in GEMMA:
        out.update(_gemma_config(config, family))
    elif family == "gpt_oss":
        out.update(_gpt_oss_config(config))
    elif family == "deepseek_v3":
        out.update(_deepseek_config(config))
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
    elif family in ("qwen3", "qwen3_moe", "olmoe"):
        out.update(attention_bias=config.qkv_bias)
    elif family == "phi3":
        partial = config.partial_rotary_factor
        rope["partial_rotary_factor"] = partial
        out.update(sliding_window=window, partial_rotary_factor=partial)
        out.update(resid_pdrop=0.0, embd_pdrop=0.0)
        if scaling is not None:  # Phi3Config reads the original length at the top level
            out["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    if family in QWEN_WINDOWS:  # the window of each layer, spelled out (Qwen3-MoE: uniform)
        out.update(use_sliding_window=window is not None, sliding_window=window)
        if family != "qwen3_moe":
            kinds = [config.layer_type(i) for i in range(config.n_layers)]
            out.update(
                max_window_layers=kinds.index(SLIDING) if SLIDING in kinds else config.n_layers,
                layer_types=kinds,
            )
    if family == "mixtral":
        out.update(
            num_local_experts=config.num_experts,
            num_experts_per_tok=config.top_k_experts,
            router_jitter_noise=0.0,
        )
    elif family in MOE_DEFAULTS:
        out.update(
            num_experts=config.num_experts,
            num_experts_per_tok=config.top_k_experts,
            norm_topk_prob=config.norm_topk_prob,
        )
    if family in DENSE_D_FF:  # Qwen MoE: the dense layers' width and where they are
        dense_d_ff = config.d_ff if config.dense_d_ff is None else config.dense_d_ff
        out.update(
            intermediate_size=dense_d_ff,
            moe_intermediate_size=config.d_ff,
            decoder_sparse_step=1,
            mlp_only_layers=list(config.dense_layers),
        )
    if family == "qwen2_moe":
        out.update(
            qkv_bias=config.qkv_bias,
            shared_expert_intermediate_size=config.shared_expert_d_ff,
        )
    return out


def _gemma_config(config: LMConfig, family: str) -> dict[str, Any]:
    """Gemma2Config's or Gemma3TextConfig's fields: the rope families' with Gemma's spellings
    (hidden_activation; Gemma 3's rope parameters per layer type) and options."""
    out = _rope_family_config(config, family)
    out["hidden_activation"] = out.pop("hidden_act")
    if family == "gemma3_text":
        local = config.rope_theta if config.local_rope_theta is None else config.local_rope_theta
        out["rope_local_base_freq"] = local  # transformers 4's spelling, beside 5's
        out["rope_parameters"] = {
            "full_attention": out["rope_parameters"],
            "sliding_attention": {"rope_type": "default", "rope_theta": local},
        }
    scalar = config.query_pre_attn_scalar
    out.update(
        attention_bias=config.qkv_bias,
        query_pre_attn_scalar=config.resolved_head_dim if scalar is None else int(scalar),
        sliding_window=config.sliding_window,
        layer_types=[config.layer_type(i) for i in range(config.n_layers)],
        final_logit_softcapping=_float_or_none(config.final_logit_softcap),
        attn_logit_softcapping=_float_or_none(config.attn_logit_softcap),
        use_bidirectional_attention=False,
    )
    return out


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)


def _gpt_oss_config(config: LMConfig) -> dict[str, Any]:
    """GptOssConfig's fields: the rope families' with its MoE, sinks and clamped SwiGLU."""
    out = _rope_family_config(config, "gpt_oss")
    out.update(
        attention_bias=True,
        sliding_window=config.sliding_window,
        layer_types=[config.layer_type(i) for i in range(config.n_layers)],
        num_local_experts=config.num_experts,
        num_experts_per_tok=config.top_k_experts,
        swiglu_limit=float(config.swiglu_limit),
        swiglu_alpha=float(config.swiglu_alpha),
        router_aux_loss_coef=0.0,
        output_router_logits=False,
    )
    return out


# --------------------------------------------------------------------------- DeepSeek-V3
# transformers' DeepseekV3Config defaults (save_pretrained leaves defaults out)
DEEPSEEK_DEFAULTS = dict(
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_attention_heads=128,
    n_shared_experts=1,
    n_routed_experts=256,
    routed_scaling_factor=2.5,
    kv_lora_rank=512,
    q_lora_rank=1536,
    qk_rope_head_dim=64,
    v_head_dim=128,
    qk_nope_head_dim=128,
    n_group=8,
    topk_group=4,
    num_experts_per_tok=8,
    first_k_dense_replace=3,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
)


def _deepseek_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """DeepseekV3Config's fields: MLA, grouped sigmoid routing, shared experts, the first
    first_k_dense_replace layers dense. Refused: attention_bias, rope_interleave=False,
    num_key_value_heads other than num_attention_heads."""
    d = {**DEEPSEEK_DEFAULTS, **{k: v for k, v in data.items() if v is not None}}
    if "q_lora_rank" in data and data["q_lora_rank"] is None:
        d["q_lora_rank"] = None
    for key, value, what in (
        ("attention_bias", False, "biases on q_a_proj, kv_a_proj_with_mqa and o_proj"),
        ("rope_interleave", True, "rope on the halves instead of interleaved pairs"),
    ):
        if d.get(key, value) != value:
            raise ValueError(
                f"config.json (deepseek_v3): {key}={d[key]!r} ({what}) is not supported"
            )
    n_heads = _size(d, "num_attention_heads", None)
    if d.get("num_key_value_heads", n_heads) != n_heads:
        raise ValueError(
            f"config.json (deepseek_v3): num_key_value_heads={d['num_key_value_heads']!r} must "
            f"equal num_attention_heads ({n_heads}): MLA's keys and values have every head"
        )
    n_layers = _size(d, "num_hidden_layers", None)
    max_seq_len = _size(d, "max_position_embeddings", None, MAX_POSITIONS)
    expert_d_ff = _size(d, "moe_intermediate_size", None)
    shared = d["n_shared_experts"]
    if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
        raise ValueError(
            f"config.json (deepseek_v3): n_shared_experts must be an int >= 0, got {shared!r}"
        )
    dense = min(_size({"k": d["first_k_dense_replace"] + 1}, "k", None) - 1, n_layers)
    fields: dict[str, Any] = dict(
        LLAMA_OPTIONS,
        vocab_size=_size(d, "vocab_size", None),
        max_seq_len=max_seq_len,
        d_model=_size(d, "hidden_size", None),
        n_layers=n_layers,
        n_heads=n_heads,
        d_ff=expert_d_ff,
        norm_eps=_positive(d, "rms_norm_eps", None),
        activation=_activation(d, "hidden_act", "silu"),
        tie_embeddings=_bool(d, "tie_word_embeddings", False),
        q_lora_rank=None if d["q_lora_rank"] is None else _size(d, "q_lora_rank", None),
        kv_lora_rank=_size(d, "kv_lora_rank", None),
        qk_nope_head_dim=_size(d, "qk_nope_head_dim", None),
        qk_rope_head_dim=_size(d, "qk_rope_head_dim", None),
        v_head_dim=_size(d, "v_head_dim", None),
        use_moe=True,
        num_experts=_size(d, "n_routed_experts", None),
        top_k_experts=_size(d, "num_experts_per_tok", None),
        norm_topk_prob=_bool(d, "norm_topk_prob", True),
        expert_capacity_factor=None,
        shared_expert_d_ff=expert_d_ff * shared if shared else None,
        router="grouped_sigmoid",
        n_group=_size(d, "n_group", None),
        topk_group=_size(d, "topk_group", None),
        routed_scaling_factor=_positive(d, "routed_scaling_factor", None),
        dense_layers=tuple(range(dense)),
    )
    if dense:
        fields["dense_d_ff"] = _size(d, "intermediate_size", None)
    fields["rope_theta"], fields["rope_scaling"], _ = _rope(data, "deepseek_v3", max_seq_len)
    return fields


def _deepseek_config(config: LMConfig) -> dict[str, Any]:
    """DeepseekV3Config's fields of `config` (family_of checked that it fits)."""
    scaling = None if config.rope_scaling is None else config.rope_scaling.to_dict()
    rope = {"rope_type": "default", **(scaling or {}), "rope_theta": config.rope_theta}
    shared = config.shared_expert_d_ff
    if shared is not None and shared % config.d_ff != 0:
        raise ValueError(
            f"deepseek_v3: shared_expert_d_ff ({shared}) must be a multiple of d_ff "
            f"({config.d_ff}): n_shared_experts experts of moe_intermediate_size"
        )
    return dict(
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_seq_len,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff if config.dense_d_ff is None else config.dense_d_ff,
        moe_intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads,
        n_shared_experts=0 if shared is None else shared // config.d_ff,
        n_routed_experts=config.num_experts,
        num_experts_per_tok=config.top_k_experts,
        routed_scaling_factor=config.routed_scaling_factor,
        n_group=config.n_group,
        topk_group=config.topk_group,
        norm_topk_prob=config.norm_topk_prob,
        first_k_dense_replace=len(config.dense_layers),
        q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        hidden_act=ROPE_ACTIVATION_NAMES[config.activation],
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        rope_scaling=scaling,
        rope_parameters=rope,
        rope_interleave=True,
        attention_bias=False,
        attention_dropout=0.0,
        num_nextn_predict_layers=0,
    )
