"""The parity report of a Hugging Face checkpoint three ways: torch_block, jax_block and
transformers (when installed): logits of a full forward, of cached prefill plus one-token
decode steps, and greedy tokens, on seeded left-padded prompts.

transformers is imported here only, at run time and only when installed: it is the independent
reference, never a dependency of the package.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import jax
import numpy as np
import torch

import jax_block
import torch_block

from ...dtypes import JAX_DTYPES, TORCH_DTYPES
from ...hf import HFCheckpoint
from ..compare import Row, Tolerance, compare
from ..render import environment
from ..tokens import compare_tokens

PROMPT_LENGTHS = (7, 4)  # the check's left-padded prompts
DECODE_STEPS = 4  # one-token cached steps after the prompts
NEW_TOKENS = 8  # greedy tokens after each prompt
# ours against transformers: float32 relative to the logits' scale (real models have logits of
# tens, where float32 sums over thousands of features differ by more than 1e-5 absolute);
# bfloat16 as docs/design.md section 7, loosened for three orders of rounding
HF_TOLERANCES = {"float32": Tolerance("rel", 1e-4), "bfloat16": Tolerance("rel", 5e-2)}
# greedy tokens: identical in float32; in bfloat16 identical until a row parts at a near tie,
# two logits within the bfloat16 tolerance of the logits' scale (docs/design.md section 7)
GREEDY_TIES = {"bfloat16": HF_TOLERANCES["bfloat16"].value}


def hf_report(checkpoint: HFCheckpoint, seed: int) -> tuple[list[Row], dict[str, str]]:
    """Rows comparing torch_block, jax_block and transformers on the checkpoint's model, and
    the environment (with transformers' version, or "not installed")."""
    config, dtype = checkpoint.hf.config, checkpoint.dtype
    family = checkpoint.hf.family
    width = max(PROMPT_LENGTHS)
    needed = width + max(DECODE_STEPS, NEW_TOKENS)
    if needed > config.max_seq_len:
        raise ValueError(
            f"the check needs max_seq_len >= {needed}, the model has {config.max_seq_len}"
        )
    ids, mask = _batch(config.vocab_size, seed)  # (B, S)
    torch_lm = checkpoint.torch()
    flax_model = checkpoint.flax()
    reference = _transformers(checkpoint.directory, dtype, checkpoint.hf.quantization)
    env = environment()
    env["transformers"] = "not installed" if reference is None else _version("transformers")
    real = mask.numpy().astype(bool)  # pads' logits are left out: they attend to nothing

    logits = {
        "torch_block": _torch_logits(torch_lm, ids, mask),
        "jax_block": _jax_logits(flax_model, ids, mask),
    }
    cached = {
        "torch_block": _torch_cached(torch_lm, ids, mask, dtype),
        "jax_block": _jax_cached(flax_model, ids, mask, dtype),
    }
    prompts, prompt_mask = ids[:, :width], mask[:, :width]
    tokens = {
        "torch_block": torch_block.generate(
            torch_lm, prompts, prompt_mask, max_new_tokens=NEW_TOKENS
        ).numpy(),
        "jax_block": np.asarray(
            jax_block.generate(
                *flax_model,
                prompts.numpy().astype(np.int32),
                prompt_mask.numpy().astype(np.int32),
                max_new_tokens=NEW_TOKENS,
            )
        ),
    }
    forwards = {  # (ids, mask) -> logits, each framework's full forward
        "torch_block": functools.partial(_torch_logits, torch_lm),
        "jax_block": functools.partial(_jax_logits, flax_model),
    }
    if reference is not None:
        forwards["transformers"] = functools.partial(_hf_logits, reference)
        logits["transformers"] = _hf_logits(reference, ids, mask)
        tokens["transformers"] = _hf_greedy(reference, prompts, prompt_mask)
    base = "transformers" if reference is not None else "torch_block"
    tolerance = HF_TOLERANCES[dtype]
    rows = []
    pairs = [(base, name) for name in ("torch_block", "jax_block") if name != base]
    if base == "transformers":
        pairs.append(("torch_block", "jax_block"))
    for expected, actual in pairs:
        rows.append(
            compare(
                f"logits: {actual} vs {expected}",
                family,
                dtype,
                logits[expected][real],
                logits[actual][real],
                tolerance,
                note=f"{int(real.sum())} real positions of {tuple(ids.shape)}",
            )
        )
    for name, values in cached.items():
        rows.append(
            compare(
                f"cached decode: {name} vs {base}",
                family,
                dtype,
                logits[base][real],
                values[real],
                tolerance,
                note=f"prefill {width} slots, then {DECODE_STEPS} one-token steps",
            )
        )
    tie = GREEDY_TIES.get(dtype)
    for expected, actual in pairs:
        step_logits = None
        if tie is not None and not np.array_equal(tokens[expected], tokens[actual]):
            step_ids, step_mask = _continued(prompts, prompt_mask, tokens[expected])
            step_logits = tuple(
                forwards[name](step_ids, step_mask)[:, width - 1 :] for name in (expected, actual)
            )
        rows.append(
            compare_tokens(
                f"greedy: {actual} vs {expected}",
                family,
                dtype,
                tokens[expected],
                tokens[actual],
                note=f"{NEW_TOKENS} new after prompts of {PROMPT_LENGTHS}",
                tie=tie,
                step_logits=step_logits,
            )
        )
    return rows, env


def _continued(
    prompts: torch.Tensor, mask: torch.Tensor, new: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) (B, width + N - 1): the prompts followed by all but the last of the N new
    tokens, whose full forward gives at positions width - 1 ... the logits of each greedy step."""
    following = torch.from_numpy(np.asarray(new, dtype=np.int64))[:, :-1]  # (B, N - 1)
    ids = torch.cat([prompts, following], dim=1)
    return ids, torch.cat([mask, torch.ones_like(following)], dim=1)


def _batch(vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) (B, width + DECODE_STEPS): seeded prompts left-padded with 0, then more."""
    width = max(PROMPT_LENGTHS)
    B, S = len(PROMPT_LENGTHS), width + DECODE_STEPS
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (B, S), generator=generator)
    pads = torch.tensor([width - n for n in PROMPT_LENGTHS])[:, None]  # (B, 1)
    mask = (torch.arange(S)[None, :] >= pads).long()  # (B, S)
    return ids.masked_fill(mask == 0, 0), mask


def _torch_logits(lm, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return lm(ids, mask).double().numpy()


def _jax_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """The full forward, jitted: one compilation instead of one per operation."""
    lm, params = model
    ids, mask = ids.numpy().astype(np.int32), mask.numpy().astype(np.int32)
    out = jax.jit(lm.apply)({"params": params}, ids, mask)
    return np.asarray(out).astype(np.float64)


def _torch_cached(lm, ids: torch.Tensor, mask: torch.Tensor, dtype: str) -> np.ndarray:
    """Logits of the prompts' prefill, then of one-token cached steps, (B, S, V)."""
    B, S = ids.shape
    cache = lm.create_kv_cache(B, S, TORCH_DTYPES[dtype])
    chunks = [(0, max(PROMPT_LENGTHS))] + [(t, t + 1) for t in range(max(PROMPT_LENGTHS), S)]
    out = []
    with torch.no_grad():
        for start, end in chunks:
            logits, _ = lm(ids[:, start:end], mask[:, :end], kv_cache=cache)
            out.append(logits.double().numpy())
    return np.concatenate(out, axis=1)


def _jax_cached(model, ids: torch.Tensor, mask: torch.Tensor, dtype: str) -> np.ndarray:
    lm, params = model
    B, S = ids.shape
    cache = lm.create_kv_cache(B, S, JAX_DTYPES[dtype])
    jax_ids, jax_mask = ids.numpy().astype(np.int32), mask.numpy().astype(np.int32)
    chunks = [(0, max(PROMPT_LENGTHS))] + [(t, t + 1) for t in range(max(PROMPT_LENGTHS), S)]
    out = []
    for start, end in chunks:
        logits, cache = jax_block.cached_forward(lm, params, jax_ids[:, start:end], jax_mask, cache)
        out.append(np.asarray(logits).astype(np.float64))
    return np.concatenate(out, axis=1)


def _transformers(folder: Path, dtype: str, quantization: str | None = None):
    """transformers' own model of the folder in `dtype` (eval), or None when not installed. An
    MXFP4 folder's experts are dequantized into `dtype` as our import does (transformers would
    otherwise run its MXFP4 kernels where Triton is installed, and needs accelerate either way)."""
    if importlib.util.find_spec("transformers") is None:
        return None
    import transformers

    options = {}
    if quantization == "mxfp4":
        options["quantization_config"] = transformers.Mxfp4Config(dequantize=True)

    logging = transformers.utils.logging
    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # its bars would break into the report's output
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=TORCH_DTYPES[dtype], **options
        )
    except Exception as err:  # transformers raises many kinds; the report cannot go on
        raise ValueError(f"transformers cannot load {folder}: {err}") from err
    finally:
        if bars:
            logging.enable_progress_bar()
    return model.eval()


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position among its row's real tokens (as transformers' generate sets it)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _hf_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask))
    return out.logits.double().numpy()


def _hf_greedy(model, prompts: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """NEW_TOKENS greedy tokens from transformers' forward, one full forward per token (no
    generation settings of the folder apply: no end token, no minimum length)."""
    ids, mask, new = prompts, mask, []
    for _ in range(NEW_TOKENS):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
        token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        new.append(token)
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return torch.cat(new, dim=1).numpy()
