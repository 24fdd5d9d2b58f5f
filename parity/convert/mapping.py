"""The one table that maps torch state_dict keys to Flax parameter paths, both directions."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

from twin_core import FROZEN_MOE_TENSORS, BlockConfig


class Row(NamedTuple):
    """One weight: torch key, Flax path, and whether the matrix is transposed between them.

    `{e}` in a torch key stands for the expert index: those torch tensors are stacked along a
    leading expert axis on the Flax side.
    """

    torch_key: str
    flax_path: str
    transpose: bool


def _linear(torch_prefix: str, flax_prefix: str, bias: bool = True) -> list[Row]:
    rows = [Row(f"{torch_prefix}.weight", f"{flax_prefix}/kernel", True)]
    if bias:
        rows.append(Row(f"{torch_prefix}.bias", f"{flax_prefix}/bias", False))
    return rows


def _norm(torch_prefix: str, flax_prefix: str) -> list[Row]:
    return [
        Row(f"{torch_prefix}.weight", f"{flax_prefix}/scale", False),
        Row(f"{torch_prefix}.bias", f"{flax_prefix}/bias", False),
    ]


def _norm_rows(torch_prefix: str, flax_prefix: str, kind: str) -> list[Row]:
    rows = _norm(torch_prefix, flax_prefix)
    return rows if kind == "layernorm" else rows[:1]


def _ffn(torch_prefix: str, flax_prefix: str, gated: bool, bias: bool) -> list[Row]:
    names = ("fc1", "fc3", "fc2") if gated else ("fc1", "fc2")
    return [
        row
        for name in names
        for row in _linear(f"{torch_prefix}.{name}", f"{flax_prefix}/{name}", bias)
    ]


SHARED_EXPERT_GATE = _linear(
    "feed_forward.shared_expert_gate", "feed_forward/shared_expert_gate", bias=False
)

SINKS = Row("attention.sinks", "attention/sinks", False)

ROUTER_BIAS = Row(
    "feed_forward.e_score_correction_bias", "feed_forward/e_score_correction_bias", False
)
LM_EMBEDDINGS = [
    Row("token_embedding.weight", "token_embedding/embedding", False),
    Row("position_embedding.weight", "position_embedding/embedding", False),
]
LM_HEAD = _linear("lm_head", "lm_head", bias=False)  # only when tie_embeddings=False

# torch buffers that have no Flax parameter: written as zeros when converting to torch.
TORCH_ONLY_BUFFERS = {"feed_forward.expert_counts"}
# torch buffers that are Flax parameters frozen by jax_block's optimizer: no Adam moments in
# torch, zero moments in JAX.
FROZEN_BUFFERS = {f"feed_forward.{name}" for name in FROZEN_MOE_TENSORS}


BLOCK_NORMS = ("norm1", "norm2", "post_attention_norm", "post_feed_forward_norm")


def _mla_rows(config: Any) -> list[Row]:
    """Rows of multi-head latent attention (MLA)."""
    names = ("q_proj",) if config.q_lora_rank is None else ("q_a_proj", "q_b_proj")
    rows = [
        r
        for n in (*names, "kv_a_proj", "kv_b_proj", "out_proj")
        for r in _linear(f"attention.{n}", f"attention/{n}", False)
    ]
    norms = ("kv_a_norm",) if config.q_lora_rank is None else ("q_a_norm", "kv_a_norm")
    return rows + [
        r for n in norms for r in _norm_rows(f"attention.{n}", f"attention/{n}", "rmsnorm")
    ]


def block_table(config: Any) -> list[Row]:
    """Rows of one TransformerBlock of `config` (a BlockConfig or LMConfig)."""
    rows = _mla_rows(config) if config.is_mla else []
    for name in () if config.is_mla else ("q_proj", "k_proj", "v_proj", "out_proj"):
        bias = config.out_bias if name == "out_proj" else config.qkv_bias
        rows += _linear(f"attention.{name}", f"attention/{name}", bias)
    if config.qk_norm is not None:
        for name in ("q_norm", "k_norm"):
            rows += _norm_rows(f"attention.{name}", f"attention/{name}", config.norm)
    if config.attention_sinks:
        rows.append(SINKS)
    norms = BLOCK_NORMS if config.sandwich_norms else BLOCK_NORMS[:2]
    rows += [row for name in norms for row in _norm_rows(name, name, config.norm)]
    ffn = dict(gated=config.gated_ffn, bias=config.ffn_bias)
    if not config.use_moe:
        return rows + _ffn("feed_forward", "feed_forward", **ffn)
    rows += _linear("feed_forward.gate", "feed_forward/gate", bias=config.router_bias)
    if config.router == "grouped_sigmoid":
        rows.append(ROUTER_BIAS)
    rows += _ffn("feed_forward.experts.{e}", "feed_forward/experts", **ffn)
    if config.shared_expert_d_ff is not None:
        rows += _ffn("feed_forward.shared_expert", "feed_forward/shared_expert", **ffn)
        if config.shared_expert_gate:
            rows += SHARED_EXPERT_GATE
    return rows


# Symbolic shapes for the README table, by the last part of the torch key.
_TORCH_SHAPES = {
    "q_proj.weight": ("(H*D, d_model)", "(d_model, H*D)"),
    "q_proj.bias": ("(H*D,)", "(H*D,)"),
    "k_proj.weight": ("(KV*D, d_model)", "(d_model, KV*D)"),
    "k_proj.bias": ("(KV*D,)", "(KV*D,)"),
    "v_proj.weight": ("(KV*D, d_model)", "(d_model, KV*D)"),
    "v_proj.bias": ("(KV*D,)", "(KV*D,)"),
    "out_proj.weight": ("(d_model, H*D)", "(H*D, d_model)"),
    "out_proj.bias": ("(d_model,)", "(d_model,)"),
    "fc1.weight": ("(d_ff, d_model)", "(d_model, d_ff)"),
    "fc1.bias": ("(d_ff,)", "(d_ff,)"),
    "fc2.weight": ("(d_model, d_ff)", "(d_ff, d_model)"),
    "fc2.bias": ("(d_model,)", "(d_model,)"),
    "fc3.weight": ("(d_ff, d_model)", "(d_model, d_ff)"),
    "fc3.bias": ("(d_ff,)", "(d_ff,)"),
    "shared_expert_gate.weight": ("(1, d_model)", "(d_model, 1)"),
    "gate.weight": ("(E, d_model)", "(d_model, E)"),
    "gate.bias": ("(E,)", "(E,)"),
    "attention.sinks": ("(H,)", "(H,)"),
    **{
        f"{n}_norm.{w}": (f"(D,) or ({h}*D,)", f"(D,) or ({h}*D,)")
        for n, h in (("q", "H"), ("k", "KV"))
        for w in ("weight", "bias")
    },
    "lm_head.weight": ("(vocab, d_model)", "(d_model, vocab)"),
}


def _shapes(row: Row) -> tuple[str, str]:
    key = row.torch_key
    if key.startswith("token_embedding"):
        return "(vocab, d_model)", "(vocab, d_model)"
    if key.startswith("position_embedding"):
        return "(max_seq_len, d_model)", "(max_seq_len, d_model)"
    if "{i}" in key:
        return "as the block", "as the block"
    if key.split(".")[0] in ("norm", *BLOCK_NORMS):
        return "(d_model,)", "(d_model,)"
    torch_shape, flax_shape = next(v for k, v in _TORCH_SHAPES.items() if key.endswith(k))
    if "{e}" in key:
        return torch_shape + " each", ("(E, " + flax_shape[1:]).replace(",)", ")")
    return torch_shape, flax_shape


def markdown_table() -> str:
    """The whole mapping as a Markdown table, for README.md."""
    lines = [
        "| torch key | torch shape | Flax path | Flax shape | transform |",
        "|---|---|---|---|---|",
    ]
    every_option = BlockConfig(
        d_model=2,
        n_heads=1,
        d_ff=2,
        gated_ffn=True,
        qk_norm="head",
        sandwich_norms=True,
        attention_sinks=True,
    )
    moe_options = replace(
        every_option,
        use_moe=True,
        shared_expert_d_ff=2,
        shared_expert_gate=True,
        router_bias=True,
    )
    block_rows = list(dict.fromkeys(block_table(every_option) + block_table(moe_options)))
    lm_rows = LM_EMBEDDINGS + [Row("blocks.{i}.<block key>", "blocks_{i}/<block path>", False)]
    for row in block_rows + lm_rows + _norm("norm", "norm") + LM_HEAD:
        if "{e}" in row.torch_key:
            transform = "stack over e; transpose (in, out)" if row.transpose else "stack over e"
        elif "{i}" in row.torch_key:
            transform = "the block's row, for each layer i"
        else:
            transform = "transpose (out, in) -> (in, out)" if row.transpose else "copy"
        transform += _CONDITIONS.get(row.torch_key, "")
        torch_shape, flax_shape = _shapes(row)
        lines.append(
            f"| `{row.torch_key}` | {torch_shape} | `{row.flax_path}` | {flax_shape} "
            f"| {transform} |"
        )
    for key in sorted(TORCH_ONLY_BUFFERS):
        lines.append(f"| `{key}` | (E,) | (none: torch buffer) | | zeros into torch |")
    return "\n".join(lines)


def lm_table(config: Any) -> list[Row]:
    """Rows of one TransformerLM: embeddings, every block (of its own config) under its prefix,
    norm, untied head."""
    rows = list(LM_EMBEDDINGS if config.positions == "learned" else LM_EMBEDDINGS[:1])
    for i, block in enumerate(config.block_configs()):  # a dense layer of an MoE model: dense rows
        rows += [
            Row(f"blocks.{i}.{row.torch_key}", f"blocks_{i}/{row.flax_path}", row.transpose)
            for row in block_table(block)
        ]
    rows += _norm_rows("norm", "norm", config.norm)
    if not config.tie_embeddings:
        rows += LM_HEAD
    return rows


# When a row exists, for rows that depend on the configuration (README's table).
_CONDITIONS = {
    "lm_head.weight": " (untied head only)",
    "position_embedding.weight": " (positions='learned' only)",
    **{f"{n}.bias": " (layernorm only)" for n in ("norm", *BLOCK_NORMS)},
    **{f"{n}.weight": " (sandwich_norms only)" for n in BLOCK_NORMS[2:]},
    **{f"{n}.bias": " (sandwich_norms, layernorm only)" for n in BLOCK_NORMS[2:]},
    **{f"attention.{n}_proj.bias": " (qkv_bias only)" for n in "qkv"},
    "attention.out_proj.bias": " (out_bias only)",
    **{f"attention.{n}_norm.weight": " (qk_norm only; (D,) when 'head')" for n in "qk"},
    **{f"attention.{n}_norm.bias": " (qk_norm and layernorm only)" for n in "qk"},
    **{
        f"feed_forward.{p}fc3.{w}": " (gated_ffn only)"
        for p in ("", "experts.{e}.", "shared_expert.")
        for w in ("weight", "bias")
    },
    **{
        f"feed_forward.shared_expert.fc{n}.{w}": " (shared_expert_d_ff only)"
        for n in "12"
        for w in ("weight", "bias")
    },
    "feed_forward.shared_expert_gate.weight": " (shared_expert_gate only)",
    "attention.sinks": " (attention_sinks only)",
    "feed_forward.gate.bias": " (router_bias only)",
}
