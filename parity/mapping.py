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

# torch buffers that have no Flax parameter: written as zeros when converting to torch.
TORCH_ONLY_BUFFERS = {"feed_forward.expert_counts"}


def block_table(use_moe: bool) -> list[Row]:
    """Rows of one TransformerBlock."""
    return ATTENTION + NORMS + (MOE_FFN if use_moe else DENSE_FFN)


def markdown_table() -> str:
    """The whole mapping as a Markdown table, for README.md."""
    lines = ["| torch key | Flax path | transform |", "|---|---|---|"]
    for row in ATTENTION + NORMS + DENSE_FFN + MOE_FFN:
        if "{e}" in row.torch_key:
            transform = "stack over e; transpose (in, out)" if row.transpose else "stack over e"
        else:
            transform = "transpose (out, in) -> (in, out)" if row.transpose else "copy"
        lines.append(f"| `{row.torch_key}` | `{row.flax_path}` | {transform} |")
    for key in sorted(TORCH_ONLY_BUFFERS):
        lines.append(f"| `{key}` | (none: torch buffer) | zeros when converting to torch |")
    return "\n".join(lines)
