"""The configurations the report checks, the Setup a case runs on, and the registry of cases.

A case is a function `Setup -> list[Row]` registered with `@case(name, configs, dtypes)`. The
report runs the cases of the modules listed in `parity.report.runner.CASE_MODULES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from flax import linen as nn

import torch_block
from twin_core import LLAMA_OPTIONS, RopeScaling

from ..convert import from_torch
from ..dtypes import TORCH_DTYPES
from .compare import NEAR_TIES, TOLERANCES, Row, Tolerance, compare
from .run import Run

_BLOCK = dict(d_model=64, n_heads=4, d_ff=128, dropout=0.0)
# Llama 3: RMSNorm, gated SiLU without biases, rope with llama3 scaling, GQA 4:1, no attention
# biases. head_dim 8, theta 5e5: wavelengths 6.3, 167, 4.4e3, 1.2e5 against 256 / 4 and 256 / 1,
# so the scaling keeps one frequency, smooths one and divides two.
_LLAMA = dict(
    _BLOCK,
    **LLAMA_OPTIONS,
    n_heads=8,
    n_kv_heads=2,
    norm_eps=1e-6,
    rope_theta=500000.0,
    rope_scaling=RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256
    ),
)
_ROPE_1E6 = dict(rope_theta=1e6, rope_scaling=None)  # Mistral's, Qwen2's and Mixtral's rope
# Gemma: its RMSNorm (1 + w), sandwich norms, gated gelu_tanh, its own query scale; softcaps small
# enough to act on this model's scores and logits (Gemma 2's 50 and 30 would not)
_GEMMA = dict(
    _LLAMA,
    rope_theta=10000.0,
    rope_scaling=None,
    norm="gemma_rmsnorm",
    activation="gelu_tanh",
    sandwich_norms=True,
    query_pre_attn_scalar=16,
)
SLIDING_WINDOW = 4  # shorter than the prefill, the block's sequence and every LM prompt
CONFIGS: dict[str, dict[str, Any]] = {
    "dense": _BLOCK,
    "moe": dict(_BLOCK, use_moe=True, num_experts=8, top_k_experts=2),
    "gpt2": dict(_BLOCK, activation="gelu_tanh"),
    "llama": _LLAMA,
    "mistral": dict(_LLAMA, **_ROPE_1E6, sliding_window=SLIDING_WINDOW),
    "qwen2": dict(_LLAMA, **_ROPE_1E6, qkv_bias=True),
    "mixtral": dict(_LLAMA, **_ROPE_1E6, use_moe=True, num_experts=8, top_k_experts=2),
    "qwen2_moe": dict(
        _LLAMA,
        **_ROPE_1E6,
        qkv_bias=True,
        use_moe=True,
        num_experts=8,
        top_k_experts=4,
        norm_topk_prob=False,
        shared_expert_d_ff=96,
        shared_expert_gate=True,
    ),
    "qwen3": dict(_LLAMA, **_ROPE_1E6, qk_norm="head"),
    "qwen3_moe": dict(
        _LLAMA, **_ROPE_1E6, qk_norm="head", use_moe=True, num_experts=8, top_k_experts=2
    ),
    "olmoe": dict(
        _LLAMA,
        rope_theta=10000.0,
        rope_scaling=None,
        qk_norm="projection",
        use_moe=True,
        num_experts=8,
        top_k_experts=2,
        norm_topk_prob=False,
    ),
    # Phi-3 with longrope: 6 of each head's 8 dims rotated; the prompts, cached steps and
    # generation pass the original length 24 (long factors, the sequence recomputed)
    "phi3": dict(
        _LLAMA,
        rope_theta=1e4,
        partial_rotary_factor=0.75,
        rope_scaling=RopeScaling(
            rope_type="longrope",
            factor=4.0,
            original_max_position_embeddings=24,
            short_factor=(1.0, 1.3, 2.0),
            long_factor=(1.0, 4.0, 9.0),
        ),
    ),
    "gemma2": dict(_GEMMA, attn_logit_softcap=2.0),
    # Gemma 3: q/k norm per head; global layers at base 1e6, linear-scaled (its local layers:
    # LM_LAYERS)
    "gemma3": dict(
        _GEMMA,
        qk_norm="head",
        rope_theta=1e6,
        rope_scaling=RopeScaling(rope_type="linear", factor=8.0),
    ),
    # GPT-OSS: biases on q/k/v/o, a sink logit per head, router bias, experts with biases and
    # the clamped SwiGLU at a limit this model's activations reach (7.0 they never would), yarn
    # rope whose original length 8 the prompts and generation pass (its LM: LM_LAYERS)
    "gpt_oss": dict(
        _LLAMA,
        qkv_bias=True,
        out_bias=True,
        ffn_bias=True,
        attention_sinks=True,
        use_moe=True,
        num_experts=8,
        top_k_experts=2,
        router_bias=True,
        swiglu_limit=0.3,
        rope_theta=150000.0,
        rope_scaling=RopeScaling(
            rope_type="yarn",
            factor=4.0,
            original_max_position_embeddings=8,
            beta_fast=32.0,
            beta_slow=1.0,
            truncate=False,
        ),
    ),
    # DeepSeek-V3: latent attention (q through a rank-32 latent, keys and values from a rank-32
    # latent and one rope key), yarn with mscale_all_dim, grouped sigmoid routing, 2 shared
    # experts' width; its LM's first layer dense (LM_LAYERS)
    "deepseek_v3": dict(
        _LLAMA,
        n_kv_heads=None,
        rope_theta=1e4,
        rope_scaling=RopeScaling(
            rope_type="yarn",
            factor=4.0,
            original_max_position_embeddings=8,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        use_moe=True,
        num_experts=8,
        top_k_experts=2,
        router="grouped_sigmoid",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        shared_expert_d_ff=64,
    ),
}
# The fields of a configuration's language model that only LMConfig has: Qwen3 with one layer of
# full attention and one within the window, Qwen3-MoE with a dense layer; Gemma's sliding and full
# layers, embedding scale, logit softcap (2) and local rope base (3).
_ALTERNATING = dict(
    sliding_window=SLIDING_WINDOW, layer_types=("sliding_attention", "full_attention")
)
LM_LAYERS: dict[str, dict[str, Any]] = {
    "qwen3": dict(
        sliding_window=SLIDING_WINDOW, layer_types=("full_attention", "sliding_attention")
    ),
    "qwen3_moe": dict(dense_layers=(1,), dense_d_ff=96),
    "gemma2": dict(_ALTERNATING, embed_scale=True, final_logit_softcap=1.0),
    "gemma3": dict(_ALTERNATING, embed_scale=True, local_rope_theta=10000.0),
    "gpt_oss": _ALTERNATING,
    "deepseek_v3": dict(dense_layers=(0,), dense_d_ff=96),
}
ORIGINAL = ("dense", "moe")  # the original architecture: every block case
# The families of the default report, then those that run only when named (`check --config
# qwen3`): the default run stays near a minute on 2 cores.
FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "phi3")
NAMED_FAMILIES = (
    "qwen3",
    "qwen3_moe",
    "olmoe",
    "gemma2",
    "gemma3",
    "gpt_oss",
    "deepseek_v3",
)
DEFAULT_CONFIGS = ORIGINAL + FAMILIES  # `python -m parity`, `check --config all`
MOE_FAMILIES = tuple(name for name in FAMILIES + NAMED_FAMILIES if CONFIGS[name].get("use_moe"))
BATCH, SEQ_LEN, PREFILL_LEN = 2, 16, 8
TRAIN_CAPACITY_FACTOR = 0.5  # capacity 4 per expert < 64 assignments / 8 experts: drops certain
Z_LOSS_COEF = 0.1


@dataclass(frozen=True)
class Setup:
    """What one case runs on: a configuration name, a dtype name and a seed."""

    config: str
    dtype: str
    seed: int

    @property
    def tolerance(self) -> Tolerance:
        return TOLERANCES[self.dtype]

    def build(self, **overrides: Any) -> tuple[torch_block.TransformerBlock, nn.Module, dict]:
        """A seeded torch block of this configuration (eval mode, this dtype), and its twin."""
        with torch.random.fork_rng(devices=[]):  # the caller's torch RNG is left as it was
            torch.manual_seed(self.seed)
            block = torch_block.TransformerBlock(**{**CONFIGS[self.config], **overrides})
        block = block.to(TORCH_DTYPES[self.dtype]).eval()
        flax_module, params = from_torch(block)
        return block, flax_module, params

    def input(self) -> torch.Tensor:
        """A seeded unit-scale input (BATCH, SEQ_LEN, d_model) of this dtype."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        x = torch.randn(BATCH, SEQ_LEN, CONFIGS[self.config]["d_model"], generator=generator)
        return x.to(TORCH_DTYPES[self.dtype])

    def compare(self, case: str, expected: Any, actual: Any, **kwargs: Any) -> Row:
        return compare(case, self.config, self.dtype, expected, actual, self.tolerance, **kwargs)

    def compare_output(self, case: str, run: Run, **kwargs: Any) -> Row:
        """Compare the first output, with routing agreement and near-tie exclusions."""
        routing, excluded = run.agreement(NEAR_TIES[self.dtype])
        return self.compare(
            case, run.torch_out[0], run.jax_out[0], routing=routing, excluded=excluded, **kwargs
        )


@dataclass(frozen=True)
class Case:
    """A registered case: `run(setup)` returns its rows for each config and dtype it covers."""

    name: str
    run: Callable[[Setup], list[Row]]
    configs: tuple[str, ...]
    dtypes: tuple[str, ...]
    rows: tuple[str, ...] = ()  # names of the rows it gives, when not the one row `name`

    @property
    def row_names(self) -> tuple[str, ...]:
        """The names of the rows it gives (listed by `python -m parity check --help`)."""
        return self.rows or (self.name,)


CASES: list[Case] = []  # every case registered so far, from any module


def case(
    name: str,
    configs: tuple[str, ...] = ORIGINAL,
    dtypes: tuple[str, ...] = ("float32",),
    rows: tuple[str, ...] | None = None,
) -> Callable[[Callable[[Setup], list[Row]]], Callable[[Setup], list[Row]]]:
    """Register a case function `Setup -> list[Row]` under `name`; `rows` names the rows it
    gives when they are not the one row `name`."""

    def register(run: Callable[[Setup], list[Row]]) -> Callable[[Setup], list[Row]]:
        CASES.append(Case(name, run, configs, dtypes, rows or ()))
        return run

    return register


def with_note(row: Row, note: str, passed: bool = True, **details: Any) -> Row:
    """`row` with `note` appended, `details` added, and failed unless `passed`."""
    return replace(
        row,
        passed=row.passed and passed,
        note="; ".join(filter(None, (row.note, note))),
        details={**row.details, **details},
    )
