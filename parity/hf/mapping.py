"""One table per Hugging Face family: our torch key, the HF name, both shapes and the transform.

The HF names are those `save_pretrained` writes (transformers' legacy on-disk layout, which
transformers 5 still writes and reads): GPT-2's Conv1D weights are (in, out) and its q/k/v are
fused in `c_attn`; Mixtral's experts are `block_sparse_moe.experts.{e}.w1/w2/w3`; Qwen2-MoE
has `mlp.experts.{e}.*`, `mlp.shared_expert.*` and `mlp.shared_expert_gate`; Phi-3 fuses q/k/v
in `qkv_proj` and gate/up in `gate_up_proj` (rows stacked); GPT-OSS stacks its experts in
`mlp.experts.gate_up_proj` (E, d_model, 2 d_ff), gate and up interleaved in the last axis, and
`mlp.experts.down_proj` (E, d_ff, d_model), with their biases. `{i}` stands for the layer, `{e}`
for the expert.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from twin_core import LMConfig

from .config import FAMILIES

COPY, TRANSPOSE, FUSED_QKV, FUSED_ROWS = "copy", "transpose", "fused_qkv", "fused_rows"
EXPERTS = "experts"  # one expert's slice of a stacked (E, ...) tensor, stored (in, out)
PREFIXES = {"gpt2": "transformer."}  # the others: "model."


class HFRow(NamedTuple):
    """One weight: our torch key and shape, the HF name and shape, and how one becomes the other.

    `part` is 0, 1 or 2 for q, k, v inside GPT-2's fused `c_attn` (FUSED_QKV), or the index of
    our tensor among the row blocks of a FUSED_ROWS tensor, whose `sizes` are the rows of each
    block in order, or of an EXPERTS tensor whose last axis interleaves two (0: the even
    entries, 1: the odd; None: not interleaved); else None. `expert` is the expert an EXPERTS
    row of `expand` reads (None in the symbolic rows).
    """

    ours: str
    ours_shape: str
    hf: str
    hf_shape: str
    transform: str
    part: int | None = None
    sizes: tuple[int, ...] = ()
    expert: int | None = None


def _linear(ours: str, hf: str, out: str, inp: str, bias: bool, conv1d: bool = False):
    """A Linear layer: torch (out, in); HF the same, or (in, out) for GPT-2's Conv1D."""
    hf_shape = f"({inp}, {out})" if conv1d else f"({out}, {inp})"
    rows = [
        HFRow(
            f"{ours}.weight",
            f"({out}, {inp})",
            f"{hf}.weight",
            hf_shape,
            TRANSPOSE if conv1d else COPY,
        )
    ]
    if bias:
        rows.append(HFRow(f"{ours}.bias", f"({out},)", f"{hf}.bias", f"({out},)", COPY))
    return rows


def _norm(ours: str, hf: str, layernorm: bool, size: str = "(d_model,)") -> list[HFRow]:
    rows = [HFRow(f"{ours}.weight", size, f"{hf}.weight", size, COPY)]
    if layernorm:
        rows.append(HFRow(f"{ours}.bias", size, f"{hf}.bias", size, COPY))
    return rows


def _gpt2_block() -> list[HFRow]:
    b, h = "blocks.{i}", "transformer.h.{i}"
    rows = _norm(f"{b}.norm1", f"{h}.ln_1", True)
    for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
        rows += [
            HFRow(
                f"{b}.attention.{name}.weight",
                "(d_model, d_model)",
                f"{h}.attn.c_attn.weight",
                "(d_model, 3 d_model)",
                FUSED_QKV,
                part,
            ),
            HFRow(
                f"{b}.attention.{name}.bias",
                "(d_model,)",
                f"{h}.attn.c_attn.bias",
                "(3 d_model,)",
                FUSED_QKV,
                part,
            ),
        ]
    rows += _linear(f"{b}.attention.out_proj", f"{h}.attn.c_proj", "d_model", "d_model", True, True)
    rows += _norm(f"{b}.norm2", f"{h}.ln_2", True)
    rows += _linear(f"{b}.feed_forward.fc1", f"{h}.mlp.c_fc", "d_ff", "d_model", True, True)
    rows += _linear(f"{b}.feed_forward.fc2", f"{h}.mlp.c_proj", "d_model", "d_ff", True, True)
    return rows


def _gated(ours: str, hf: str, names: tuple[str, str, str], d_ff: str, bias: bool):
    """fc1 (the activated projection), fc3 (multiplied in) and fc2 (down) of a gated FFN."""
    fc1, fc3, fc2 = names
    return (
        _linear(f"{ours}.fc1", f"{hf}.{fc1}", d_ff, "d_model", bias)
        + _linear(f"{ours}.fc3", f"{hf}.{fc3}", d_ff, "d_model", bias)
        + _linear(f"{ours}.fc2", f"{hf}.{fc2}", "d_model", d_ff, bias)
    )


LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_EXPERT = ("w1", "w3", "w2")
# the symbolic row spans of Phi-3's fused blocks, in part order
FUSED_SPANS = {
    "qkv_proj": ("[0, H*D)", "[H*D, (H+KV)*D)", "[(H+KV)*D, (H+2KV)*D)"),
    "gate_up_proj": ("[0, d_ff)", "[d_ff, 2 d_ff)"),
}
PHI3_QKV = (("q_proj", "H*D"), ("k_proj", "KV*D"), ("v_proj", "KV*D"))


def _fused(ours: list[tuple[str, str]], hf: str, hf_shape: str, sizes: tuple[int, ...]):
    """Our (key, shape) weights stacked by rows into the one HF weight `hf`."""
    return [
        HFRow(f"{key}.weight", shape, f"{hf}.weight", hf_shape, FUSED_ROWS, part, sizes)
        for part, (key, shape) in enumerate(ours)
    ]


def _phi3_block(config: LMConfig) -> list[HFRow]:
    b, h = "blocks.{i}", "model.layers.{i}"
    H, KV, D = config.n_heads, config.resolved_n_kv_heads, config.resolved_head_dim
    attention = [(f"{b}.attention.{n}", f"({s}, d_model)") for n, s in PHI3_QKV]
    ffn = [(f"{b}.feed_forward.{n}", "(d_ff, d_model)") for n in ("fc1", "fc3")]
    return [
        *_norm(f"{b}.norm1", f"{h}.input_layernorm", False),
        *_fused(
            attention,
            f"{h}.self_attn.qkv_proj",
            "((H+2KV)*D, d_model)",
            (H * D, KV * D, KV * D),
        ),
        *_linear(f"{b}.attention.out_proj", f"{h}.self_attn.o_proj", "d_model", "H*D", False),
        *_norm(f"{b}.norm2", f"{h}.post_attention_layernorm", False),
        *_fused(ffn, f"{h}.mlp.gate_up_proj", "(2 d_ff, d_model)", (config.d_ff,) * 2),
        *_linear(f"{b}.feed_forward.fc2", f"{h}.mlp.down_proj", "d_model", "d_ff", False),
    ]


MOE_MLP = {"mixtral": "block_sparse_moe"}  # the others: "mlp"


def _rope_block(family: str, block: Any) -> list[HFRow]:
    """The rows of one layer of `block`'s config (a BlockConfig, or an LMConfig for its MoE
    layers), symbolic in {i} and {e}: a dense layer of an MoE family has a plain MLP."""
    b, h = "blocks.{i}", "model.layers.{i}"
    rows = _norm(f"{b}.norm1", f"{h}.input_layernorm", False)
    for name, hf_name, out in (
        ("q_proj", "q_proj", "H*D"),
        ("k_proj", "k_proj", "KV*D"),
        ("v_proj", "v_proj", "KV*D"),
    ):
        rows += _linear(
            f"{b}.attention.{name}", f"{h}.self_attn.{hf_name}", out, "d_model", block.qkv_bias
        )
    rows += _linear(
        f"{b}.attention.out_proj", f"{h}.self_attn.o_proj", "d_model", "H*D", block.out_bias
    )
    if block.qk_norm is not None:  # Qwen3, Gemma 3: over each head; OLMoE: the projections
        q, k = ("(D,)", "(D,)") if block.qk_norm == "head" else ("(H*D,)", "(KV*D,)")
        for name, shape in (("q_norm", q), ("k_norm", k)):
            rows += _norm(f"{b}.attention.{name}", f"{h}.self_attn.{name}", False, shape)
    if block.sandwich_norms:  # Gemma: each sublayer's input and output normed
        rows += _norm(f"{b}.post_attention_norm", f"{h}.post_attention_layernorm", False)
        rows += _norm(f"{b}.norm2", f"{h}.pre_feedforward_layernorm", False)
    else:  # Llama's "post_attention_layernorm" is the feed-forward's input norm
        rows += _norm(f"{b}.norm2", f"{h}.post_attention_layernorm", False)
    if block.attention_sinks:  # GPT-OSS
        rows.append(HFRow(f"{b}.attention.sinks", "(H,)", f"{h}.self_attn.sinks", "(H,)", COPY))
    ffn, moe = f"{b}.feed_forward", f"{h}.{MOE_MLP.get(family, 'mlp')}"
    if family == "gpt_oss":
        return rows + _gpt_oss_moe(ffn, moe)
    if not block.use_moe:
        rows += _gated(ffn, f"{h}.mlp", LLAMA_MLP, "d_ff", block.ffn_bias)
        if block.sandwich_norms:
            rows += _norm(f"{b}.post_feed_forward_norm", f"{h}.post_feedforward_layernorm", False)
        return rows
    rows += _linear(f"{ffn}.gate", f"{moe}.gate", "E", "d_model", False)
    expert = MIXTRAL_EXPERT if family == "mixtral" else LLAMA_MLP
    rows += _gated(f"{ffn}.experts.{{e}}", f"{moe}.experts.{{e}}", expert, "d_ff", False)
    if block.shared_expert_d_ff is not None:
        rows += _gated(
            f"{ffn}.shared_expert", f"{moe}.shared_expert", LLAMA_MLP, "shared_d_ff", False
        )
        rows += _linear(
            f"{ffn}.shared_expert_gate", f"{moe}.shared_expert_gate", "1", "d_model", False
        )
    return rows


def _gpt_oss_moe(ours: str, hf: str) -> list[HFRow]:
    """GPT-OSS's router (with bias) and stacked experts: fc1 and fc3 of expert e are the even
    and odd columns of gate_up_proj[e] (d_model, 2 d_ff), transposed; fc2 is down_proj[e]."""
    experts, expert = f"{hf}.experts", f"{ours}.experts.{{e}}"
    rows = _linear(f"{ours}.gate", f"{hf}.router", "E", "d_model", True)
    for part, name in enumerate(("fc1", "fc3")):
        rows += [
            HFRow(
                f"{expert}.{name}.weight",
                "(d_ff, d_model)",
                f"{experts}.gate_up_proj",
                "(E, d_model, 2 d_ff)",
                EXPERTS,
                part,
            ),
            HFRow(
                f"{expert}.{name}.bias",
                "(d_ff,)",
                f"{experts}.gate_up_proj_bias",
                "(E, 2 d_ff)",
                EXPERTS,
                part,
            ),
        ]
    return rows + [
        HFRow(
            f"{expert}.fc2.weight",
            "(d_model, d_ff)",
            f"{experts}.down_proj",
            "(E, d_ff, d_model)",
            EXPERTS,
        ),
        HFRow(
            f"{expert}.fc2.bias", "(d_model,)", f"{experts}.down_proj_bias", "(E, d_model)", EXPERTS
        ),
    ]


def _deepseek_block(block: Any) -> list[HFRow]:
    """DeepSeek-V3's layer: latent attention (q_a/q_b or q_proj, kv_a, kv_b), a dense MLP or
    routed experts with e_score_correction_bias and shared experts."""
    b, h = "blocks.{i}", "model.layers.{i}"
    a, s = f"{b}.attention", f"{h}.self_attn"
    rows = _norm(f"{b}.norm1", f"{h}.input_layernorm", False)
    if block.q_lora_rank is None:
        rows += _linear(f"{a}.q_proj", f"{s}.q_proj", "H*(Dn+Dr)", "d_model", False)
    else:
        rows += _linear(f"{a}.q_a_proj", f"{s}.q_a_proj", "q_rank", "d_model", False)
        rows += _norm(f"{a}.q_a_norm", f"{s}.q_a_layernorm", False, "(q_rank,)")
        rows += _linear(f"{a}.q_b_proj", f"{s}.q_b_proj", "H*(Dn+Dr)", "q_rank", False)
    rows += _linear(f"{a}.kv_a_proj", f"{s}.kv_a_proj_with_mqa", "R+Dr", "d_model", False)
    rows += _norm(f"{a}.kv_a_norm", f"{s}.kv_a_layernorm", False, "(R,)")
    rows += _linear(f"{a}.kv_b_proj", f"{s}.kv_b_proj", "H*(Dn+Dv)", "R", False)
    rows += _linear(f"{a}.out_proj", f"{s}.o_proj", "d_model", "H*Dv", False)
    rows += _norm(f"{b}.norm2", f"{h}.post_attention_layernorm", False)
    ffn, moe = f"{b}.feed_forward", f"{h}.mlp"
    if not block.use_moe:
        return rows + _gated(ffn, moe, LLAMA_MLP, "d_ff", False)
    rows += _linear(f"{ffn}.gate", f"{moe}.gate", "E", "d_model", False)
    rows.append(
        HFRow(
            f"{ffn}.e_score_correction_bias",
            "(E,)",
            f"{moe}.gate.e_score_correction_bias",
            "(E,)",
            COPY,
        )
    )
    rows += _gated(f"{ffn}.experts.{{e}}", f"{moe}.experts.{{e}}", LLAMA_MLP, "d_ff", False)
    if block.shared_expert_d_ff is not None:
        rows += _gated(
            f"{ffn}.shared_expert", f"{moe}.shared_experts", LLAMA_MLP, "shared_d_ff", False
        )
    return rows


def _lm_rows(family: str, config: LMConfig) -> tuple[list[HFRow], list[HFRow]]:
    """The rows before the layers (embeddings) and after them (final norm, untied head)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if family == "gpt2":
        head = [
            HFRow(
                "token_embedding.weight",
                "(vocab, d_model)",
                "transformer.wte.weight",
                "(vocab, d_model)",
                COPY,
            ),
            HFRow(
                "position_embedding.weight",
                "(max_seq_len, d_model)",
                "transformer.wpe.weight",
                "(n_positions, d_model)",
                COPY,
            ),
        ]
        tail = _norm("norm", "transformer.ln_f", True)
    else:
        head = [
            HFRow(
                "token_embedding.weight",
                "(vocab, d_model)",
                "model.embed_tokens.weight",
                "(vocab, d_model)",
                COPY,
            )
        ]
        tail = _norm("norm", "model.norm", False)
    if not config.tie_embeddings:
        tail.append(
            HFRow("lm_head.weight", "(vocab, d_model)", "lm_head.weight", "(vocab, d_model)", COPY)
        )
    return head, tail


def _layer_rows(family: str, block: Any) -> list[HFRow]:
    if family == "gpt2":
        return _gpt2_block()
    if family == "deepseek_v3":
        return _deepseek_block(block)
    return _phi3_block(block) if family == "phi3" else _rope_block(family, block)


def hf_rows(family: str, config: LMConfig) -> list[HFRow]:
    """The weights of an LM of `family` with `config`, symbolic in {i} and {e}, its layers as
    `config`'s own fields say (an MoE layer in an MoE model; README's tables)."""
    head, tail = _lm_rows(family, config)
    return head + _layer_rows(family, config) + tail


def expand(family: str, config: LMConfig) -> list[tuple[str, str, HFRow]]:
    """(our key, HF name, row) of every weight: each layer i with the rows of its own block
    config (`config.block_configs()`: a dense layer of an MoE model has dense rows), each
    expert e."""
    head, tail = _lm_rows(family, config)
    out = [(row.ours, row.hf, row) for row in head]
    for i, block in enumerate(config.block_configs()):
        for row in _layer_rows(family, block):
            experts = range(block.num_experts) if "{e}" in row.ours else [None]
            out += [
                (
                    row.ours.format(i=i, e=e),
                    row.hf.format(i=i, e=e),
                    row._replace(expert=e) if row.transform == EXPERTS else row,
                )
                for e in experts
            ]
    return out + [(row.ours, row.hf, row) for row in tail]


def expected_hf_shapes(
    entries: list[tuple[str, str, HFRow]], our_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """HF name -> shape, from the shapes of our tensors."""
    shapes = {}
    num_experts: dict[str, int] = {}
    for _, hf, row in entries:
        if row.transform == EXPERTS:
            num_experts[hf] = max(num_experts.get(hf, 0), row.expert + 1)
    for ours, hf, row in entries:
        shape = tuple(our_shapes[ours])
        if row.transform == EXPERTS:  # (E, in, out), out doubled where two interleave
            shape = shape[::-1]
            if row.part is not None:
                shape = (*shape[:-1], 2 * shape[-1])
            shape = (num_experts[hf], *shape)
        elif row.transform == TRANSPOSE:
            shape = shape[::-1]
        elif row.transform == FUSED_QKV:
            shape = (shape[1], 3 * shape[0]) if len(shape) == 2 else (3 * shape[0],)
        elif row.transform == FUSED_ROWS:
            shape = (sum(row.sizes), *shape[1:])
        shapes[hf] = shape
    return shapes


def ours_from_hf(row: HFRow, tensor: torch.Tensor) -> torch.Tensor:
    """Our tensor (a view where possible) from the HF tensor the row names."""
    if row.transform == EXPERTS:
        tensor = tensor[row.expert]  # (in, out) or (out,)
        if row.part is not None:
            tensor = tensor[..., row.part :: 2]
        return tensor.t() if tensor.dim() == 2 else tensor
    if row.transform == TRANSPOSE:
        return tensor.t()
    if row.transform == FUSED_QKV:
        width = tensor.shape[-1] // 3
        piece = tensor[..., row.part * width : (row.part + 1) * width]
        return piece.t() if tensor.dim() == 2 else piece
    if row.transform == FUSED_ROWS:
        start = sum(row.sizes[: row.part])
        return tensor[start : start + row.sizes[row.part]]
    return tensor


def hf_from_ours(rows: list[HFRow], tensors: list[torch.Tensor]) -> torch.Tensor:
    """The HF tensor of one name from the rows (one, or q/k/v for c_attn, or every expert's
    for a stacked tensor) and our tensors."""
    if rows[0].transform == EXPERTS:
        pieces = [t.t() if t.dim() == 2 else t for t in tensors]  # (in, out) or (out,)
        interleaved = rows[0].part is not None
        width = pieces[0].shape[-1] * (2 if interleaved else 1)
        stacked = pieces[0].new_empty(
            (len(rows) // (2 if interleaved else 1), *pieces[0].shape[:-1], width)
        )
        for row, piece in zip(rows, pieces, strict=True):
            target = stacked[row.expert]
            target = target[..., row.part :: 2] if interleaved else target
            target.copy_(piece)
        return stacked
    if rows[0].transform in (FUSED_QKV, FUSED_ROWS):
        ordered = [t for _, t in sorted(zip((r.part for r in rows), tensors, strict=True))]
        if rows[0].transform == FUSED_QKV and ordered[0].dim() == 2:
            return torch.cat([t.t() for t in ordered], dim=1).contiguous()  # (in, 3 out)
        return torch.cat(ordered).contiguous()  # rows stacked
    if rows[0].transform == TRANSPOSE:
        return tensors[0].t().contiguous()
    return tensors[0].contiguous()


_TRANSFORM_TEXT = {
    COPY: "copy",
    TRANSPOSE: "transpose (Conv1D is (in, out))",
}


def _transform_text(row: HFRow) -> str:
    if row.transform == FUSED_ROWS:
        name = row.hf.split(".")[-2]
        return f"rows {FUSED_SPANS[name][row.part]} of {name}"
    if row.transform == EXPERTS:
        name = row.hf.split(".")[-1]
        columns = (
            "" if row.part is None else f"{('even', 'odd')[row.part]} entries of the last axis of "
        )
        return (
            f"{columns}{name}[e], transposed"
            if row.ours.endswith("weight")
            else f"{columns}{name}[e]"
        )
    if row.transform == FUSED_QKV:
        span = ("[0, d)", "[d, 2d)", "[2d, 3d)")[row.part]
        if row.ours.endswith("weight"):
            return f"columns {span} of c_attn, transposed"
        return f"entries {span} of c_attn.bias"
    return _TRANSFORM_TEXT[row.transform]


def markdown_tables() -> str:
    """The tables for README.md: GPT-2's and Llama's in full (every option on: biases where the
    family can have them, an untied head; Mistral and Qwen2 as Llama's), then one table of the
    rows where the other families differ from Llama's: Mixtral's and Qwen2-MoE's feed-forward,
    Phi-3's fused q/k/v and gate/up, Gemma 3's norms, GPT-OSS's sinks and stacked experts."""
    base = dict(vocab_size=8, max_seq_len=8, d_model=8, n_layers=1, n_heads=2, d_ff=8)
    rope = dict(
        norm="rmsnorm",
        positions="rope",
        gated_ffn=True,
        qkv_bias=False,
        out_bias=False,
        ffn_bias=False,
        tie_embeddings=False,
    )
    moe = dict(use_moe=True, num_experts=2)
    full = [
        ("gpt2", LMConfig(**base, tie_embeddings=False), "always"),
        (
            "llama",
            LMConfig(**base, **{**rope, "qkv_bias": True, "out_bias": True, "ffn_bias": True}),
            "with attention_bias (q/k/v and o_proj) and mlp_bias; mistral: the same rows, no "
            "biases; qwen2: the same rows, q/k/v biases only",
        ),
    ]
    shared = dict(shared_expert_d_ff=8, shared_expert_gate=True)
    gemma = dict(norm="gemma_rmsnorm", qk_norm="head", sandwich_norms=True, embed_scale=True)
    llama = set(hf_rows("llama", LMConfig(**base, **rope)))
    gpt_oss = dict(
        qkv_bias=True,
        out_bias=True,
        ffn_bias=True,
        attention_sinks=True,
        router_bias=True,
        swiglu_limit=7.0,
        activation="silu",
    )
    differences = [
        ("mixtral", LMConfig(**base, **rope, **moe), lambda row: ".feed_forward." in row.ours),
        (
            "qwen2_moe",
            LMConfig(**base, **{**rope, "qkv_bias": True}, **moe, **shared),
            lambda row: ".feed_forward." in row.ours,
        ),
        ("phi3", LMConfig(**base, **rope), lambda row: row.transform == FUSED_ROWS),
        ("gemma3_text", LMConfig(**base, **{**rope, **gemma}), lambda row: row not in llama),
        (
            "gpt_oss",
            LMConfig(**base, **{**rope, **gpt_oss}, **moe),
            lambda row: ".feed_forward." in row.ours or row.ours.endswith(".sinks"),
        ),
    ]
    header = "| our torch key | our shape | HF name | HF shape | transform |"
    parts = []
    for family, config, biases in full:
        parts += [
            f"**{family}** (biases: {biases}; `lm_head` only when untied; `{{i}}` layer)",
            "",
            header,
            "|---|---|---|---|---|",
            *(_markdown_row(row) for row in hf_rows(family, config)),
            "",
        ]
    parts += [
        "**mixtral, qwen2_moe, phi3, gemma3_text, gpt_oss**: the rows that differ from llama's "
        "(biases: qwen2_moe's q/k/v with qkv_bias, gemma's with attention_bias, gpt_oss's always "
        "(q/k/v/o as llama's, router, experts), none else; gemma2: gemma3_text's without q_norm, "
        "k_norm; `{e}` expert)",
        "",
        "| family " + header,
        "|---|---|---|---|---|---|",
    ]
    for family, config, keep in differences:
        parts += [f"| {family} " + _markdown_row(r) for r in hf_rows(family, config) if keep(r)]
    deepseek = LMConfig(
        **base,
        **rope,
        **moe,
        shared_expert_d_ff=8,
        router="grouped_sigmoid",
        q_lora_rank=4,
        kv_lora_rank=4,
        qk_nope_head_dim=2,
        qk_rope_head_dim=2,
        v_head_dim=2,
    )
    parts += [
        "",
        "**deepseek_v3** (no biases; `q_proj` (H*(Dn+Dr), d_model) in place of q_a_proj, "
        "q_a_layernorm and q_b_proj when q_lora_rank is null; the first_k_dense_replace dense "
        "layers have llama's mlp rows; `{e}` expert)",
        "",
        header,
        "|---|---|---|---|---|",
        *(_markdown_row(row) for row in hf_rows("deepseek_v3", deepseek)),
    ]
    return "\n".join(parts).rstrip() + "\n"


def _markdown_row(row: HFRow) -> str:
    return (
        f"| `{row.ours}` | {row.ours_shape} | `{row.hf}` | {row.hf_shape} "
        f"| {_transform_text(row)} |"
    )
