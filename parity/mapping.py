"""The one table that maps torch state_dict keys to Flax parameter paths, both directions."""

from __future__ import annotations

from typing import NamedTuple


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


ATTENTION = [
    row
    for name in ("q_proj", "k_proj", "v_proj", "out_proj")
    for row in _linear(f"attention.{name}", f"attention/{name}")
]
NORMS = _norm("norm1", "norm1") + _norm("norm2", "norm2")
DENSE_FFN = _linear("feed_forward.fc1", "feed_forward/fc1") + _linear(
    "feed_forward.fc2", "feed_forward/fc2"
)
MOE_FFN = (
    _linear("feed_forward.gate", "feed_forward/gate", bias=False)
    + _linear("feed_forward.experts.{e}.fc1", "feed_forward/experts/fc1")
    + _linear("feed_forward.experts.{e}.fc2", "feed_forward/experts/fc2")
)

LM_EMBEDDINGS = [
    Row("token_embedding.weight", "token_embedding/embedding", False),
    Row("position_embedding.weight", "position_embedding/embedding", False),
]
LM_NORM = _norm("norm", "norm")
LM_HEAD = _linear("lm_head", "lm_head", bias=False)  # only when tie_embeddings=False

# torch buffers that have no Flax parameter: written as zeros when converting to torch.
TORCH_ONLY_BUFFERS = {"feed_forward.expert_counts"}


def block_table(use_moe: bool) -> list[Row]:
    """Rows of one TransformerBlock."""
    return ATTENTION + NORMS + (MOE_FFN if use_moe else DENSE_FFN)


# Symbolic shapes for the README table, by the last part of the torch key.
_TORCH_SHAPES = {
    "proj.weight": ("(d_model, d_model)", "(d_model, d_model)"),
    "proj.bias": ("(d_model,)", "(d_model,)"),
    "fc1.weight": ("(d_ff, d_model)", "(d_model, d_ff)"),
    "fc1.bias": ("(d_ff,)", "(d_ff,)"),
    "fc2.weight": ("(d_model, d_ff)", "(d_ff, d_model)"),
    "fc2.bias": ("(d_model,)", "(d_model,)"),
    "gate.weight": ("(E, d_model)", "(d_model, E)"),
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
    if key.split(".")[0] in ("norm1", "norm2", "norm"):
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
    block_rows = ATTENTION + NORMS + DENSE_FFN + MOE_FFN
    lm_rows = LM_EMBEDDINGS + [Row("blocks.{i}.<block key>", "blocks_{i}/<block path>", False)]
    for row in block_rows + lm_rows + LM_NORM + LM_HEAD:
        if "{e}" in row.torch_key:
            transform = "stack over e; transpose (in, out)" if row.transpose else "stack over e"
        elif "{i}" in row.torch_key:
            transform = "the block's row, for each layer i"
        else:
            transform = "transpose (out, in) -> (in, out)" if row.transpose else "copy"
        if row in LM_HEAD:
            transform += " (untied head only)"
        torch_shape, flax_shape = _shapes(row)
        lines.append(
            f"| `{row.torch_key}` | {torch_shape} | `{row.flax_path}` | {flax_shape} "
            f"| {transform} |"
        )
    for key in sorted(TORCH_ONLY_BUFFERS):
        lines.append(f"| `{key}` | (E,) | (none: torch buffer) | | zeros into torch |")
    return "\n".join(lines)


def lm_table(config: dict) -> list[Row]:
    """Rows of one TransformerLM: embeddings, every block under its prefix, norm, untied head."""
    rows = list(LM_EMBEDDINGS)
    for i in range(config["n_layers"]):
        rows += [
            Row(f"blocks.{i}.{row.torch_key}", f"blocks_{i}/{row.flax_path}", row.transpose)
            for row in block_table(config["use_moe"])
        ]
    rows += LM_NORM
    if not config["tie_embeddings"]:
        rows += LM_HEAD
    return rows
