"""Hugging Face checkpoints in and out: `from_hf` and `to_hf` for the families of FAMILIES.

Reading checks config.json, every file header, every tensor name and shape before the model is
allocated, then copies one tensor at a time into it: the torch model directly, the Flax params
row by row of `parity.convert.mapping`'s table, so converting N bytes of weights needs about N
bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax.traverse_util import flatten_dict, unflatten_dict

import jax_block
import torch_block
from jax_block.scan import scanned_path
from twin_core import LMConfig, atomic_write
from twin_core.files import write_safetensors
from twin_core.run_files import framework_name

from ..convert import flax_to_torch
from ..convert.carried import carried, carry
from ..convert.mapping import lm_table
from ..dtypes import JAX_DTYPES, TORCH_DTYPES, dtype_name
from ..errors import WeightsMismatch
from .config import (
    CHECKPOINT_DTYPES,
    HFConfig,
    family_of,
    hf_config_from_lm,
    lm_config_from_hf,
)
from .files import (
    CONFIG,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    ST_NAMES,
    WeightFiles,
    parse_size,
    read_json,
    remove_stale,
    shard_names,
)
from .mapping import COPY, HFRow, expand, expected_hf_shapes, hf_from_ours, ours_from_hf
from .metadata import HFMetadata, folder_files
from .mxfp4 import BLOCKS_SUFFIX, SCALES_SUFFIX, dequantize_mxfp4, dequantized_shape

# names that old checkpoints carry and transformers ignores: GPT-2's mask buffers, rope tables
IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$|(^|\.)rotary_emb\.inv_freq$")
BASE_PREFIX = {"gpt2": "transformer."}  # the others: "model."
ALIGNMENT = 64  # bytes
INTEGER_OF_SIZE = {2: np.int16, 4: np.int32}  # bytes per element -> an integer of that size


class HFCheckpoint:
    """An opened HF directory whose config, names and shapes have been checked against each
    other: `hf` (family, LMConfig, dtype, token ids), `dtype` (what the model will hold) and
    `entries` (our key, HF name, row) in reading order. Nothing large is read until `torch()`
    or `flax()`."""

    def __init__(self, path: str | Path, dtype: Any = None):
        directory = Path(path)
        if not directory.is_dir():
            raise ValueError(f"{path}: not a directory (a Hugging Face checkpoint is a folder)")
        self.directory = directory
        self.hf: HFConfig = lm_config_from_hf(read_json(directory / CONFIG, "the model config"))
        self.dtype = resolve_dtype(self.hf.dtype, dtype)
        self.files = WeightFiles(directory)
        config = self.hf.config
        with torch.device("meta"):
            meta = torch_block.TransformerLM.from_config(config)
        self.our_shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
        self.entries = sorted(expand(self.hf.family, config), key=lambda e: e[1])
        self.buffers = sorted(set(self.our_shapes) - {ours for ours, _, _ in self.entries})
        self.shapes, self.quantized = stored_weights(self.files.shapes, self.hf.quantization)
        self._names = self._check_names()
        self._last: tuple[str, torch.Tensor] | None = None  # the tensor read last

    def _check_names(self) -> dict[str, str]:
        """HF name -> name in the files (with or without the base model's prefix); ValueError
        listing missing, unexpected and mis-shaped tensors, and integer tensors that are not
        MXFP4 blocks or scales."""
        prefix = BASE_PREFIX.get(self.hf.family, "model.")
        stored = list(self.shapes)
        bare = not any(name.startswith(prefix) for name in stored)
        names = {}
        for name in stored:
            canonical = prefix + name if bare and not name.startswith("lm_head.") else name
            names[canonical] = name
        expected = expected_hf_shapes(self.entries, self.our_shapes)
        integer = [name for name in names.values() if self.shapes[name][1] == torch.uint8]
        problems = [
            f"{name!r} is uint8: integer tensors are read only as MXFP4 blocks and scales "
            "(GPT-OSS with quantization_config quant_method 'mxfp4')"
            for name in integer
        ]
        problems += [f"missing tensor {name!r}" for name in expected if name not in names]
        for canonical, name in names.items():
            if name in integer:
                continue
            if canonical in expected:
                shape = self.shapes[name][0]
                if shape != expected[canonical]:
                    problems.append(
                        f"{name!r}: the config says shape {expected[canonical]}, "
                        f"the file holds {shape}"
                    )
            elif not (
                IGNORED.search(name)
                or (canonical == "lm_head.weight" and self.hf.config.tie_embeddings)
            ):
                problems.append(f"unexpected tensor {name!r}")
        if problems:
            raise WeightsMismatch(self.directory, self.files.kind, self.hf.family, problems)
        return names

    def read(self, hf_name: str) -> torch.Tensor:
        """One HF tensor from the files (MXFP4 blocks and scales dequantized to the model's
        dtype); the last one read is kept, as every expert's slice of a stacked tensor reads it."""
        if self._last is not None and self._last[0] == hf_name:
            return self._last[1]
        self._last = None  # one tensor in flight at a time
        name = self._names[hf_name]
        if name in self.quantized:
            blocks, scales = (self.files.get(n) for n in self.quantized[name])
            tensor = dequantize_mxfp4(blocks, scales, TORCH_DTYPES[self.dtype])
        else:
            tensor = self.files.get(name)
        self._last = (hf_name, tensor)
        return tensor

    def stored_dtype(self, hf_name: str) -> torch.dtype | None:
        """The dtype of one HF tensor in the files (None for MXFP4 blocks and scales)."""
        name = self._names[hf_name]
        return None if name in self.quantized else self.files.shapes[name][1]

    def torch(self) -> torch_block.TransformerLM:
        """The torch_block LM in eval mode, built in the target dtype: a weight stored as it is
        used maps the file's bytes copy-on-write (`WeightFiles.mapped`), any other is converted
        into the model's memory."""
        previous = torch.get_default_dtype()
        torch.set_default_dtype(TORCH_DTYPES[self.dtype])  # parameters made in the target dtype
        try:
            with torch.device("meta"):  # no random initialisation: every weight is read below
                model = torch_block.TransformerLM.from_config(self.hf.config)
            model.to_empty(device="cpu")  # memory not touched until read into (rope tables kept)
        finally:
            torch.set_default_dtype(previous)
        state, parameters = model.state_dict(), dict(model.named_parameters())
        with torch.no_grad():
            for ours, hf_name, row in self.entries:  # q, k, v of a fused c_attn share one read
                stored_as_is = self.stored_dtype(hf_name) == state[ours].dtype
                if row.transform == COPY and stored_as_is and ours in parameters:
                    parameters[ours].data = self.files.mapped(self._names[hf_name])  # no read yet
                    continue
                state[ours].copy_(ours_from_hf(row, self.read(hf_name)))
            for key in self.buffers:
                state[key].zero_()
        self._last = None
        return model.eval()

    def flax(self, scan_layers: bool = False) -> tuple[jax_block.TransformerLM, dict]:
        """(Flax LM, params), built row by row of parity.convert.mapping's table from the HF
        tensors: each array read (and transposed) into memory that the JAX array then uses;
        with `scan_layers`, each layer's into its slice of the stacked array (`jax_block.scan`)."""
        dtype = JAX_DTYPES[self.dtype]
        config = self.hf.config
        lm = jax_block.TransformerLM.from_config(
            config, dtype=dtype, param_dtype=dtype, scan_layers=scan_layers
        )
        groups = lm.layer_groups
        source = {ours: (hf_name, row) for ours, hf_name, row in self.entries}
        stacks: dict[str, np.ndarray] = {}
        for row in lm_table(config):
            if "{e}" in row.torch_key:
                keys = [row.torch_key.format(e=e) for e in range(config.num_experts)]
            else:
                keys = [row.torch_key]
            shape = self.our_shapes[keys[0]]
            if row.transpose:
                shape = shape[:-2] + (shape[-1], shape[-2])
            shape = ((len(keys),) if len(keys) > 1 else ()) + shape
            path, repeat, repeats = scanned_path(row.flax_path, groups)
            if path not in stacks:
                stacks[path] = aligned_empty(shape if repeat is None else (repeats, *shape), dtype)
            array = stacks[path] if repeat is None else stacks[path][repeat]
            for i, key in enumerate(keys):
                self._read_flax(source[key], array[i] if len(keys) > 1 else array, row.transpose)
            del array
        self._last = None
        flat = {}
        for path in list(stacks):  # each array handed to JAX, which uses its memory
            flat[tuple(path.split("/"))] = jax.device_put(stacks.pop(path), may_alias=True)
        params = unflatten_dict(flat)
        _check_flax_shapes(lm, params)
        return lm, params

    def _read_flax(self, source: tuple[str, HFRow], out: np.ndarray, transpose: bool) -> None:
        """Our tensor in the target dtype into `out` (transposed to Flax's (in, out) when
        `transpose`): read straight into it when the file holds it as it is."""
        hf_name, row = source
        target = TORCH_DTYPES[self.dtype]
        if row.transform == COPY and not transpose and self.stored_dtype(hf_name) == target:
            self.files.read_into(self._names[hf_name], out)
            return
        tensor = ours_from_hf(row, self.read(hf_name)).to(target)
        if transpose:
            tensor = tensor.transpose(-1, -2)
        bits = INTEGER_OF_SIZE[tensor.element_size()]  # the same bits: NumPy has no bfloat16
        torch.from_numpy(out.view(bits)).copy_(tensor.view(getattr(torch, bits.__name__)))


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary, which JAX's
    CPU arrays can use in place (`jax.device_put(..., may_alias=True)`) instead of copying."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def stored_weights(
    shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]], quantization: str | None
) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict[str, tuple[str, str]]]:
    """(name -> (shape, dtype) of the weights the files hold, name -> (blocks, scales) of the
    quantized ones). With MXFP4, each `{name}_blocks` beside a `{name}_scales` stands for
    `{name}` of the dequantized shape; a lone one is left as it is (refused as uint8)."""
    out, quantized = dict(shapes), {}
    if quantization != "mxfp4":
        return out, quantized
    for blocks in [n for n in shapes if n.endswith(BLOCKS_SUFFIX)]:
        name = blocks.removesuffix(BLOCKS_SUFFIX)
        scales = name + SCALES_SUFFIX
        if scales not in shapes:
            continue
        (block_shape, block_dtype), (scale_shape, scale_dtype) = shapes[blocks], shapes[scales]
        if block_dtype != torch.uint8 or scale_dtype != torch.uint8:
            raise ValueError(
                f"MXFP4 {blocks!r} and {scales!r} must be uint8, got {block_dtype}, {scale_dtype}"
            )
        try:
            shape = dequantized_shape(block_shape, scale_shape)
        except ValueError as err:
            raise ValueError(f"{name!r}: {err}") from err
        del out[blocks], out[scales]
        out[name] = (shape, torch.float32)  # dequantized into the model's dtype on reading
        quantized[name] = (blocks, scales)
    return out, quantized


def resolve_dtype(stored: str | None, requested: Any) -> str:
    """The dtype the model will hold: `requested` if given, else the checkpoint's; float32 when
    the checkpoint says nothing, and for float16 checkpoints (an exact widening)."""
    if requested is not None:
        if isinstance(requested, torch.dtype):
            name = str(requested).removeprefix("torch.")
        elif isinstance(requested, str):
            name = requested
        else:
            try:
                name = np.dtype(requested).name
            except TypeError:
                name = None
        if name not in TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(TORCH_DTYPES)}, got {requested!r}")
        return name
    if stored is None or stored == "float16":
        return "float32"
    if stored not in CHECKPOINT_DTYPES:
        raise ValueError(
            f"config.json: dtype {stored!r} is not supported; pass dtype='float32' or "
            "'bfloat16' to cast"
        )
    return stored


def _check_flax_shapes(lm: jax_block.TransformerLM, params: dict) -> None:
    variables = jax.eval_shape(lambda: lm.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), int)))
    want = {k: tuple(v.shape) for k, v in flatten_dict(variables["params"]).items()}
    got = {k: tuple(v.shape) for k, v in flatten_dict(params).items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:5]
        raise ValueError(f"internal: Flax params do not match the module: {diff}")


def from_hf(
    path: str | Path, framework: str = "torch", *, dtype: Any = None, scan_layers: bool = False
):
    """A Hugging Face checkpoint directory as a torch_block TransformerLM in eval mode
    (framework="torch"), or as `(jax_block.TransformerLM, params)` (framework="jax" or "flax";
    with `scan_layers`, a model that scans its layers, its params stacked: `jax_block.scan`).

    `dtype` ("float32" or "bfloat16", or the torch/JAX dtype) casts the weights; by default they
    keep the checkpoint's dtype (float32 when config.json names none, or float16). Everything is
    checked before any large allocation; a ValueError names what is wrong or unsupported.
    The model carries the folder's token ids, generation config and tokenizer files
    (`parity.hf.metadata`): `parity.save` stores them with the weights, `to_hf` writes them back.
    """
    framework = framework_name(framework)
    if scan_layers and framework == "torch":
        raise ValueError("scan_layers=True is for framework='jax', got framework='torch'")
    checkpoint = HFCheckpoint(path, dtype)
    metadata = HFMetadata.from_folder(checkpoint.directory)
    model = checkpoint.torch() if framework == "torch" else checkpoint.flax(scan_layers)
    carry(model, metadata.to_dict())
    return model


def metadata_of(model: Any) -> HFMetadata:
    """What a model carries from a Hugging Face folder (read by `from_hf` or from a checkpoint
    file converted from one); empty when nothing."""
    data = carried(model)
    return HFMetadata() if data is None else HFMetadata.from_dict(data)


# --------------------------------------------------------------------------- writing
def _state_dict_of(model: Any) -> tuple[LMConfig, dict[str, torch.Tensor]]:
    if isinstance(model, torch_block.TransformerLM):
        return model.config, {k: v.detach() for k, v in model.state_dict().items()}
    if (
        isinstance(model, tuple)
        and len(model) == 2
        and isinstance(model[0], jax_block.TransformerLM)
    ):
        return model[0].config, flax_to_torch(model[1], model[0])
    raise TypeError(
        "model must be a torch_block.TransformerLM or a (jax_block.TransformerLM, params) "
        f"pair, got {type(model).__name__}"
    )


def to_hf(
    model: Any,
    path: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    token_ids: Mapping[str, Any] | None = None,
    source: str | Path | None = None,
) -> Path:
    """Write `model` (a torch_block TransformerLM or a `(flax_lm, params)` pair) as a Hugging Face
    checkpoint directory: config.json, model.safetensors (or shards of at most
    `max_shard_size` with model.safetensors.index.json) and generation_config.json.

    The family is the one the model was read from when its config fits it, else the first whose
    layout the config fits (ValueError otherwise, naming for each family the field that rules it
    out).

    What the model carries from a Hugging Face folder (`from_hf`, or a checkpoint converted from
    one) is written back: token ids, generation_config.json and the tokenizer files. `token_ids`
    (bos_token_id, eos_token_id, pad_token_id) override the carried ones; `source`, an HF folder,
    gives what the model does not carry; then the token ids of a folder already at `path` are
    kept. A FolderConflict, before anything is written, when `path` holds a tokenizer file or a
    generation setting that differs from the model's; files it holds that the model does not
    carry are kept. Each file is written atomically; weight files of an earlier save in the
    folder are replaced. Returns the folder.
    """
    config, state = _state_dict_of(model)
    limit = parse_size(max_shard_size)
    directory = Path(path)
    metadata = metadata_of(model).with_token_ids(token_ids)
    if source is not None:
        if not Path(source).is_dir():
            raise ValueError(f"{source}: not a directory (the Hugging Face folder to take from)")
        metadata = metadata.or_else(HFMetadata.from_folder(source))
    family = family_of(config, metadata.model_type)
    if directory.is_dir():
        there = HFMetadata.from_folder(directory, lenient=True)
        metadata = metadata.or_else(HFMetadata(token_ids=there.token_ids))
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) != 1 or dtype_name(next(iter(dtypes))) not in TORCH_DTYPES:
        raise ValueError(f"the weights must all be float32 or all bfloat16, got {dtypes}")
    dtype = next(iter(dtypes))
    hf_config = hf_config_from_lm(config, dtype_name(dtype), metadata.token_ids, family)

    grouped: dict[str, list[tuple[str, HFRow]]] = {}
    entries = expand(family, config)
    for ours, hf_name, row in entries:
        grouped.setdefault(hf_name, []).append((ours, row))
    missing = sorted({ours for ours, _, _ in entries} - set(state))
    if missing:
        raise ValueError(f"the model's state_dict lacks {missing[:5]}")
    shapes = expected_hf_shapes(entries, {k: tuple(v.shape) for k, v in state.items()})
    tensors = [
        (
            hf_name,
            lambda group=group: hf_from_ours([r for _, r in group], [state[k] for k, _ in group]),
            shapes[hf_name],
            ST_NAMES[dtype],
        )
        for hf_name, group in grouped.items()
    ]
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = [int(np.prod(shape)) * itemsize for _, _, shape, _ in tensors]
    shard_of = list(shard_names(sizes, limit))
    count = shard_of[-1] + 1

    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    extra = folder_files(metadata, directory)  # conflicts are refused before any write
    directory.mkdir(exist_ok=True)
    files = [
        SAFETENSORS if count == 1 else f"model-{s + 1:05d}-of-{count:05d}.safetensors"
        for s in range(count)
    ]
    for s, name in enumerate(files):
        write_safetensors(
            directory / name, [t for t, k in zip(tensors, shard_of, strict=True) if k == s]
        )
    if count > 1:
        index = {
            "metadata": {"total_size": sum(sizes)},
            "weight_map": {t[0]: files[k] for t, k in zip(tensors, shard_of, strict=True)},
        }
        atomic_write(directory / SAFETENSORS_INDEX, _json(index))
        files.append(SAFETENSORS_INDEX)
    remove_stale(directory, set(files))
    for name, data in extra.items():
        atomic_write(directory / name, data)
    atomic_write(directory / CONFIG, _json(hf_config))
    return directory


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
