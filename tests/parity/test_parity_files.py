"""Checkpoint files: every format into both frameworks, atomic writes, damaged and hostile files."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import re
import shlex

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.flax
import safetensors.torch
import torch
from flax.traverse_util import flatten_dict

import jax_block
import jax_block.lm
from parity import convert_file, from_torch, load, save
from torch_block import TransformerBlock
from torch_block.lm import TransformerLM
from twin_core import BlockConfig, LMConfig
from twin_core import files as twin_files

D_MODEL = 16
CASES = {
    "dense": dict(d_model=D_MODEL, n_heads=2, d_ff=32, dropout=0.0),
    "moe": dict(
        d_model=D_MODEL,
        n_heads=2,
        d_ff=24,
        dropout=0.0,
        use_moe=True,
        num_experts=3,
        top_k_experts=2,
    ),
}
DTYPES = {"float32": (torch.float32, jnp.float32), "bfloat16": (torch.bfloat16, jnp.bfloat16)}
# file name and save() keywords of each way to write a file
FILES = {
    "safetensors": ("w.safetensors", {}),
    "pt": ("w.pt", {}),
    "msgpack": ("w.msgpack", {}),
    "safetensors-jax": ("w.safetensors", {"naming": "jax"}),
}
FLAX_NAMED = {"msgpack", "safetensors-jax"}  # these hold no torch-only buffer
ATOL = 1e-5  # docs/design.md section 7, float32
X = np.random.default_rng(0).standard_normal((2, 5, D_MODEL)).astype(np.float32)  # (B, T, D)


# --------------------------------------------------------------------------- originals
def torch_original(case: str, dtype: str) -> TransformerBlock:
    """A block with every weight random (LayerNorms too) and a nonzero expert counter."""
    torch.manual_seed(0)
    block = TransformerBlock(**CASES[case])
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.startswith("norm"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
        if CASES[case].get("use_moe"):
            block.feed_forward.expert_counts.copy_(torch.arange(1.0, 4.0))
    return block.to(DTYPES[dtype][0]).eval()


def flax_module_of(case: str, dtype: str) -> jax_block.TransformerBlock:
    jdt = DTYPES[dtype][1]
    return jax_block.TransformerBlock.create(**CASES[case], dtype=jdt, param_dtype=jdt)


def flax_original(case: str, dtype: str) -> tuple[jax_block.TransformerBlock, dict]:
    """A Flax block with random params in the structure Flax's own init gives (LayerNorms too)."""
    module = flax_module_of(case, dtype)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 1, D_MODEL)))
    leaves, tree = jax.tree.flatten(shapes["params"])
    rng = np.random.default_rng(1)
    leaves = [jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype) for leaf in leaves]
    return module, jax.tree.unflatten(tree, leaves)


# --------------------------------------------------------------------------- references
def flax_view(state_dict: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """float32 Flax-layout arrays of a block or LM state_dict, written out independently of
    parity: Linear weight (out, in) -> kernel (in, out), LayerNorm weight -> scale, embedding
    weight -> embedding, `blocks.i` -> `blocks_i`, experts stacked along a leading axis."""
    flat, experts = {}, {}
    for key, tensor in state_dict.items():
        if key.endswith("expert_counts"):
            continue
        *owner, leaf = key.split(".")
        array = tensor.float().numpy()
        if owner[-1].endswith("embedding"):
            leaf = "embedding"
        elif leaf == "weight" and array.ndim == 2:
            leaf, array = "kernel", array.T
        elif leaf == "weight":
            leaf = "scale"
        if owner[0] == "blocks":
            owner = [f"blocks_{owner[1]}", *owner[2:]]
        if "experts" in owner:
            at = owner.index("experts")
            path = "/".join([*owner[: at + 1], *owner[at + 2 :], leaf])
            experts.setdefault(path, {})[int(owner[at + 1])] = array
        else:
            flat["/".join([*owner, leaf])] = array
    for path, by_expert in experts.items():
        flat[path] = np.stack([by_expert[e] for e in range(len(by_expert))])
    return flat


def assert_state_dicts_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


def assert_params_match(params: dict, want: dict[str, np.ndarray], dtype: str) -> None:
    """Flax params equal, bit for bit and in `dtype`, to float32 arrays by Flax path."""
    flat = flatten_dict(params, sep="/")
    assert sorted(flat) == sorted(want)
    for path, array in flat.items():
        assert array.dtype == DTYPES[dtype][1], path
        assert np.array_equal(np.asarray(array, np.float32), want[path]), path


def as_float32(params: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32) for k, v in flatten_dict(params, sep="/").items()}


def torch_forward(block: TransformerBlock) -> np.ndarray:
    dtype = next(block.parameters()).dtype
    with torch.no_grad():
        return block(torch.from_numpy(X).to(dtype))[0].float().numpy()


@functools.cache
def _jitted_apply(case: str, dtype: str):
    module = flax_module_of(case, dtype)
    return jax.jit(lambda params, x: module.apply({"params": params}, x)[0])


def flax_forward(case: str, dtype: str, params: dict) -> np.ndarray:
    out = _jitted_apply(case, dtype)(params, jnp.asarray(X, DTYPES[dtype][1]))
    return np.asarray(out, np.float32)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert float(np.max(np.abs(got - want))) <= ATOL


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt", FILES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_torch_module_round_trips_into_both_frameworks(tmp_path, case, dtype, fmt):
    original = torch_original(case, dtype)
    name, kwargs = FILES[fmt]
    save(tmp_path / name, original, **kwargs)

    loaded = load(tmp_path / name, "torch")
    assert isinstance(loaded, TransformerBlock) and not loaded.training
    assert loaded.config == original.config
    want = dict(original.state_dict())
    if fmt in FLAX_NAMED and "feed_forward.expert_counts" in want:
        want["feed_forward.expert_counts"] = torch.zeros_like(want["feed_forward.expert_counts"])
    assert_state_dicts_equal(loaded.state_dict(), want)
    assert_close(torch_forward(loaded), torch_forward(original))

    flax_module, params = load(tmp_path / name, "jax")
    assert flax_module == flax_module_of(case, dtype)
    assert_params_match(params, flax_view(original.state_dict()), dtype)
    if dtype == "float32":  # bfloat16 parity is the parity report's job; weights are exact here
        assert_close(flax_forward(case, dtype, params), torch_forward(original))


@pytest.mark.parametrize("fmt", FILES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_flax_params_round_trip_into_both_frameworks(tmp_path, case, dtype, fmt):
    module, params = flax_original(case, dtype)
    name, kwargs = FILES[fmt]
    save(tmp_path / name, (module, params), **kwargs)

    got_module, got_params = load(tmp_path / name, "jax")
    assert got_module == module
    assert_params_match(got_params, as_float32(params), dtype)

    loaded = load(tmp_path / name, "torch")
    assert all(p.dtype == DTYPES[dtype][0] for p in loaded.parameters())
    assert_params_match(params, flax_view(loaded.state_dict()), dtype)
    if dtype == "float32":
        want = flax_forward(case, dtype, params)
        assert_close(flax_forward(case, dtype, got_params), want)
        assert_close(torch_forward(loaded), want)


def test_params_save_with_flax_module_keyword_or_as_variables(tmp_path):
    module, params = flax_original("moe", "float32")
    save(tmp_path / "a.msgpack", params, module)
    save(tmp_path / "b.msgpack", {"params": params}, flax_module=module)
    for name in ("a.msgpack", "b.msgpack"):
        assert_params_match(load(tmp_path / name, "jax")[1], as_float32(params), "float32")


@pytest.mark.parametrize("fmt", FILES)
def test_language_model_round_trips_into_both_frameworks(tmp_path, fmt):
    torch.manual_seed(0)
    original = TransformerLM(
        vocab_size=11,
        max_seq_len=8,
        d_model=D_MODEL,
        n_layers=2,
        n_heads=2,
        d_ff=32,
        dropout=0.0,
        use_moe=True,
        num_experts=3,
        tie_embeddings=False,
    ).eval()
    name, kwargs = FILES[fmt]
    save(tmp_path / name, original, **kwargs)

    loaded = load(tmp_path / name, "torch")
    assert isinstance(loaded, TransformerLM) and loaded.config == original.config
    want = {
        k: torch.zeros_like(v) if fmt in FLAX_NAMED and k.endswith("expert_counts") else v
        for k, v in original.state_dict().items()
    }
    assert_state_dicts_equal(loaded.state_dict(), want)
    flax_module, params = load(tmp_path / name, "jax")
    assert isinstance(flax_module, jax_block.lm.TransformerLM)
    assert_params_match(params, flax_view(original.state_dict()), "float32")


# --------------------------------------------------------------------------- safetensors itself
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_safetensors_file_reads_with_safetensors_own_loaders(tmp_path, case, dtype):
    original = torch_original(case, dtype)
    path = tmp_path / "w.safetensors"
    save(path, original)
    state_dict = original.state_dict()

    assert_state_dicts_equal(safetensors.torch.load_file(path), dict(state_dict))
    arrays = safetensors.flax.load_file(path)
    assert sorted(arrays) == sorted(state_dict)
    for key, tensor in state_dict.items():
        assert str(arrays[key].dtype) == str(tensor.dtype).removeprefix("torch.")
        assert np.array_equal(np.asarray(arrays[key], np.float32), tensor.float().numpy())
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "twin-block/1"
    assert metadata["module"] == "TransformerBlock"
    assert json.loads(metadata["config"]) == original.config.to_dict()


def test_flax_named_safetensors_holds_flax_paths(tmp_path):
    module, params = flax_original("moe", "bfloat16")
    save(tmp_path / "w.safetensors", (module, params), naming="flax")
    arrays = safetensors.flax.load_file(tmp_path / "w.safetensors")
    assert_params_match(arrays, as_float32(params), "bfloat16")


# --------------------------------------------------------------------------- atomic writes
SERIALISERS = {
    "safetensors": (twin_files, "safetensors_dtype"),  # per tensor, after the header is written
    "pt": (torch, "save"),
    "msgpack": (flax.serialization, "msgpack_serialize"),
}


@pytest.mark.parametrize("failure", ["serialiser", "fsync", "replace"])
@pytest.mark.parametrize("fmt", SERIALISERS)
def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path, monkeypatch, fmt, failure
):
    path = tmp_path / f"w.{fmt}"
    save(path, torch_original("dense", "float32"))
    old = path.read_bytes()
    seen_during_write = []

    def fail(*args, **kwargs):
        seen_during_write.extend(os.listdir(tmp_path))
        for arg in args:  # torch.save is handed the open file: leave half a write in it
            if hasattr(arg, "write"):
                arg.write(b"half a checkpoint")
        raise OSError("disk full")

    target = {"serialiser": SERIALISERS[fmt], "fsync": (os, "fsync"), "replace": (os, "replace")}
    monkeypatch.setattr(*target[failure], fail)
    with pytest.raises(OSError, match="disk full"):
        save(path, TransformerBlock(**CASES["dense"]))
    monkeypatch.undo()

    assert len(seen_during_write) == 2  # the write went to a temporary beside the old file
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == [path.name]


def test_failed_write_to_a_new_path_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(OSError("no")))
    with pytest.raises(OSError):
        save(tmp_path / "w.safetensors", torch_original("dense", "float32"))
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("fmt", FILES)
def test_truncated_file_is_refused(tmp_path, fmt):
    name, kwargs = FILES[fmt]
    path = tmp_path / name
    save(path, torch_original("moe", "float32"), **kwargs)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for framework in ("torch", "jax"):
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load(path, framework)


def _flip_bit_in(data: bytes, needle: bytes) -> bytes:
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0  # the weight's bytes occur exactly once
    damaged = bytearray(data)
    damaged[at + 5] ^= 0x04
    return bytes(damaged)


@pytest.mark.parametrize("damage", ["random bytes", "garbled header", "one bit in a weight"])
@pytest.mark.parametrize("fmt", FILES)
def test_corrupt_file_is_refused(tmp_path, fmt, damage):
    name, kwargs = FILES[fmt]
    path = tmp_path / name
    original = torch_original("dense", "float32")
    save(path, original, **kwargs)
    data = path.read_bytes()
    if damage == "random bytes":
        data = np.random.default_rng(3).bytes(len(data))
    elif damage == "garbled header":
        data = data[:8] + b"\xab" * 32 + data[40:]
    else:
        needle = original.state_dict()["attention.q_proj.bias"].numpy().tobytes()
        data = _flip_bit_in(data, needle)
    path.write_bytes(data)
    for framework in ("torch", "jax"):
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load(path, framework)


def _edit_config(path, fmt: str, edit: dict) -> None:
    """Rewrite the stored configuration with the file format's own tools, weights untouched."""
    if fmt == "safetensors":
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata()
        tensors = safetensors.torch.load_file(path)
        metadata["config"] = json.dumps({**json.loads(metadata["config"]), **edit})
        safetensors.torch.save_file(tensors, path, metadata)
    elif fmt == "pt":
        obj = torch.load(path, weights_only=True)
        obj["config"].update(edit)
        torch.save(obj, path)
    else:
        obj = flax.serialization.msgpack_restore(path.read_bytes())
        obj["config"].update(edit)
        path.write_bytes(flax.serialization.msgpack_serialize(obj))


EXPERT_2 = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
STACKED = ("fc1/kernel", "fc1/bias", "fc2/kernel", "fc2/bias")
# config edit -> (offending torch keys, offending Flax paths)
MISMATCHES = {
    "dense": (
        {"d_ff": 40},
        ["feed_forward.fc1.weight", "feed_forward.fc1.bias", "feed_forward.fc2.weight"],
        ["feed_forward/fc1/kernel", "feed_forward/fc1/bias", "feed_forward/fc2/kernel"],
    ),
    "moe": (
        {"num_experts": 2},
        ["feed_forward.gate.weight", *(f"feed_forward.experts.2.{p}" for p in EXPERT_2)],
        ["feed_forward/gate/kernel", *(f"feed_forward/experts/{p}" for p in STACKED)],
    ),
}


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "msgpack"])
@pytest.mark.parametrize("case", CASES)
def test_config_that_the_weights_contradict_is_refused_listing_every_key(tmp_path, case, fmt):
    edit, torch_keys, flax_paths = MISMATCHES[case]
    path = tmp_path / f"w.{fmt}"
    save(path, torch_original(case, "float32"))
    _edit_config(path, fmt, edit)
    offending = flax_paths if fmt == "msgpack" else torch_keys
    for framework in ("torch", "jax"):
        with pytest.raises(ValueError) as info:
            load(path, framework)
        message = str(info.value)
        assert str(path) in message
        assert [key for key in offending if repr(key) not in message] == []


# --------------------------------------------------------------------------- hostile .pt
class OpensAFile:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


class RunsAShell:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


@pytest.mark.parametrize("container", ["torch.save", "bare pickle"])
@pytest.mark.parametrize("payload", [OpensAFile, RunsAShell])
def test_pt_carrying_code_is_refused_and_the_code_never_runs(tmp_path, payload, container):
    def write(path, marker):
        obj = {"state_dict": {"w": torch.zeros(2)}, "hook": payload(str(marker))}
        if container == "torch.save":
            torch.save(obj, path)
        else:
            path.write_bytes(pickle.dumps(obj, protocol=2))

    control, control_marker = tmp_path / "control.pt", tmp_path / "control-ran"
    write(control, control_marker)
    if container == "torch.save":
        torch.load(control, weights_only=False)
    else:
        pickle.loads(control.read_bytes())
    assert control_marker.exists()  # the payload does run when unpickled unsafely

    path, marker = tmp_path / "hostile.pt", tmp_path / "hostile-ran"
    write(path, marker)
    for framework in ("torch", "jax"):
        with pytest.raises(ValueError, match="refused"):
            load(path, framework, config=CASES["dense"])
    assert not marker.exists()


# --------------------------------------------------------------------------- plain state_dicts
@pytest.mark.parametrize("case", CASES)
def test_plain_state_dict_pt_loads_with_config(tmp_path, case):
    original = torch_original(case, "float32")
    path = tmp_path / "original.pt"
    torch.save(original.state_dict(), path)

    with pytest.raises(ValueError, match="config="):
        load(path)
    loaded = load(path, config=CASES[case])
    assert loaded.config == original.config
    assert_state_dicts_equal(loaded.state_dict(), dict(original.state_dict()))
    assert_close(torch_forward(loaded), torch_forward(original))
    _, params = load(path, "jax", config=CASES[case], module="TransformerBlock")
    assert_params_match(params, flax_view(original.state_dict()), "float32")


@pytest.mark.parametrize("kind", ["safetensors without metadata", "Flax to_bytes msgpack"])
def test_weights_only_files_of_other_tools_load_with_config(tmp_path, kind):
    if kind == "safetensors without metadata":
        state_dict = dict(torch_original("dense", "float32").state_dict())
        path, want = tmp_path / "w.safetensors", flax_view(state_dict)
        safetensors.torch.save_file(state_dict, path)
    else:
        _, params = flax_original("dense", "float32")
        path, want = tmp_path / "w.msgpack", as_float32(params)
        path.write_bytes(flax.serialization.to_bytes(params))
    with pytest.raises(ValueError, match="config="):
        load(path, "jax")
    _, got = load(path, "jax", config=CASES["dense"])
    assert_params_match(got, want, "float32")


def test_config_argument_is_checked(tmp_path):
    path = tmp_path / "original.pt"
    torch.save(torch_original("dense", "float32").state_dict(), path)
    block = dict(module="TransformerBlock")
    with pytest.raises(ValueError, match=r"unknown keys \['d_hidden'\]"):
        load(path, config={**CASES["dense"], "d_hidden": 8}, **block)
    with pytest.raises(ValueError, match=r"missing keys \['n_heads'\]"):
        load(path, config={"d_model": D_MODEL, "d_ff": 32})
    with pytest.raises(ValueError, match=r"wrong types: d_ff='32'"):
        load(path, config={**CASES["dense"], "d_ff": "32"})
    with pytest.raises(ValueError, match="unknown module 'Transformer'"):
        load(path, config=CASES["dense"], module="Transformer")
    with pytest.raises(ValueError, match="needs a BlockConfig"):
        load(
            path,
            config=LMConfig(
                vocab_size=4, max_seq_len=4, d_model=16, n_layers=1, n_heads=2, d_ff=32
            ),
            **block,
        )
    save(tmp_path / "w.safetensors", torch_original("dense", "float32"))
    with pytest.raises(ValueError, match="d_ff: given 64, file 32"):
        load(tmp_path / "w.safetensors", config={"d_ff": 64})
    with pytest.raises(ValueError, match="d_ff: given 64, file 32"):
        load(tmp_path / "w.safetensors", config=BlockConfig(**{**CASES["dense"], "d_ff": 64}))
    assert load(tmp_path / "w.safetensors", config=BlockConfig(**CASES["dense"])) is not None


def test_a_config_object_or_its_fields_tell_the_module(tmp_path):
    """A weights-only file needs no module= : an LMConfig (or fields with vocab_size) is a
    TransformerLM, a BlockConfig (or block fields) a TransformerBlock."""
    torch.manual_seed(0)
    lm_fields = dict(vocab_size=11, max_seq_len=8, d_model=D_MODEL, n_layers=1, n_heads=2, d_ff=32)
    lm = TransformerLM(**lm_fields)
    torch.save(lm.state_dict(), tmp_path / "lm.pt")
    for config in (lm_fields, LMConfig(**lm_fields)):
        loaded = load(tmp_path / "lm.pt", config=config)
        assert isinstance(loaded, TransformerLM) and loaded.config == lm.config
        assert_state_dicts_equal(loaded.state_dict(), dict(lm.state_dict()))
    block = torch_original("dense", "float32")
    torch.save(block.state_dict(), tmp_path / "block.pt")
    loaded = load(tmp_path / "block.pt", config=BlockConfig(**CASES["dense"]))
    assert isinstance(loaded, TransformerBlock) and loaded.config == block.config


# Fields of the configuration that files written before the family options carried.
LEGACY_BLOCK_KEYS = (
    "d_model", "n_heads", "d_ff", "dropout", "use_moe", "num_experts", "top_k_experts", "causal",
    "expert_capacity_factor", "router_z_loss_coef",
)  # fmt: skip
LEGACY_LM_KEYS = (
    "vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "d_ff", "dropout", "use_moe",
    "num_experts", "top_k_experts", "expert_capacity_factor", "tie_embeddings",
    "router_z_loss_coef",
)  # fmt: skip


def _legacy_digest(arrays: dict) -> str:
    """The weights checksum as files carried it from the start: sha256 over each name (sorted),
    its shape, its byte count and its raw bytes."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        array = arrays[name]
        if isinstance(array, torch.Tensor):
            raw = array.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        else:
            raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        h.update(f"{name} {tuple(array.shape)} {raw.size}\n".encode())
        h.update(raw.tobytes())
    return h.hexdigest()


def _write_legacy_file(path, fmt: str, module: str, config: dict, model) -> None:
    """A file as the first releases wrote it, made with each format's own tools."""
    header = {"format": "twin-block/1", "module": module}
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        metadata = {**header, "config": json.dumps(config), "sha256": _legacy_digest(state_dict)}
        safetensors.torch.save_file(state_dict, path, metadata)
    elif fmt == "pt":
        obj = {**header, "config": config, "sha256": _legacy_digest(state_dict)}
        torch.save({**obj, "state_dict": state_dict}, path)
    else:
        params = {"/".join(k): np.asarray(v) for k, v in flatten_dict(from_torch(model)[1]).items()}
        obj = {**header, "config": config, "sha256": _legacy_digest(params)}
        nested = flax.traverse_util.unflatten_dict(params, sep="/")
        path.write_bytes(flax.serialization.msgpack_serialize({**obj, "params": nested}))


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "msgpack"])
def test_files_with_the_legacy_config_keys_still_load(tmp_path, fmt):
    torch.manual_seed(0)
    lm = TransformerLM(
        vocab_size=11, max_seq_len=8, d_model=D_MODEL, n_layers=1, n_heads=2, d_ff=32,
        dropout=0.0, use_moe=True, num_experts=3, expert_capacity_factor=None,
    ).eval()  # fmt: skip
    block = torch_original("moe", "float32")
    for module, model, keys in (
        ("TransformerLM", lm, LEGACY_LM_KEYS),
        ("TransformerBlock", block, LEGACY_BLOCK_KEYS),
    ):
        path = tmp_path / f"{module}.{fmt}"
        config = {key: getattr(model.config, key) for key in keys}
        _write_legacy_file(path, fmt, module, config, model)
        loaded = load(path, "torch")
        assert type(loaded) is type(model) and loaded.config == model.config
        flax_module, params = load(path, "jax")
        assert flax_module.config == model.config
        assert_params_match(params, flax_view(model.state_dict()), "float32")


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "msgpack"])
def test_metadata_config_is_the_dataclass_to_dict_and_bad_fields_are_named(tmp_path, fmt):
    path = tmp_path / f"w.{fmt}"
    original = torch_original("dense", "float32")
    save(path, original)
    if fmt == "safetensors":
        with safetensors.safe_open(path, framework="pt") as f:
            stored = json.loads(f.metadata()["config"])
    elif fmt == "pt":
        stored = torch.load(path, weights_only=True)["config"]
    else:
        stored = flax.serialization.msgpack_restore(path.read_bytes())["config"]
    assert stored == original.config.to_dict()
    assert BlockConfig.from_dict(stored) == original.config

    _edit_config(path, fmt, {"d_hidden": 8})
    with pytest.raises(ValueError, match=r"unknown keys \['d_hidden'\]") as info:
        load(path)
    assert str(path) in str(info.value)
    save(path, original)
    _edit_config(path, fmt, {"n_heads": "2"})
    with pytest.raises(ValueError, match=r"wrong types: n_heads='2'"):
        load(path, "jax")


def test_framework_flax_is_an_alias_of_jax(tmp_path):
    path = tmp_path / "w.safetensors"
    save(path, torch_original("moe", "float32"))
    as_jax, as_flax = load(path, "jax"), load(path, framework="flax")
    assert as_jax[0] == as_flax[0]
    assert_params_match(as_flax[1], as_float32(as_jax[1]), "float32")
    module, params = as_jax
    save(tmp_path / "a.safetensors", (module, params), naming="jax")
    save(tmp_path / "b.safetensors", (module, params), naming="flax")
    metadata = {}
    for name in ("a", "b"):
        with safetensors.safe_open(tmp_path / f"{name}.safetensors", framework="pt") as f:
            metadata[name] = f.metadata()
    assert metadata["a"] == metadata["b"]
    assert_state_dicts_equal(
        safetensors.torch.load_file(tmp_path / "a.safetensors"),
        safetensors.torch.load_file(tmp_path / "b.safetensors"),
    )
    metadata = metadata["a"]
    assert metadata["naming"] == "flax"  # the names of Flax parameter paths, as always
    metadata["naming"] = "jax"  # a file that calls them by the framework's name reads too
    tensors = safetensors.torch.load_file(tmp_path / "a.safetensors")
    safetensors.torch.save_file(tensors, tmp_path / "c.safetensors", metadata)
    assert_params_match(load(tmp_path / "c.safetensors", "jax")[1], as_float32(params), "float32")


# --------------------------------------------------------------------------- convert_file
def test_convert_file_through_every_format(tmp_path):
    original = torch_original("moe", "bfloat16")
    save(tmp_path / "a.pt", original)
    convert_file(tmp_path / "a.pt", tmp_path / "b.msgpack", to="jax")
    convert_file(tmp_path / "b.msgpack", tmp_path / "c.safetensors", to="flax")  # an alias
    convert_file(tmp_path / "c.safetensors", tmp_path / "d.safetensors", to="torch")

    restored = flax.serialization.msgpack_restore((tmp_path / "b.msgpack").read_bytes())
    assert_params_match(restored["params"], flax_view(original.state_dict()), "bfloat16")
    flax_named = safetensors.flax.load_file(tmp_path / "c.safetensors")
    assert_params_match(flax_named, flax_view(original.state_dict()), "bfloat16")
    want = dict(original.state_dict())
    want["feed_forward.expert_counts"] = torch.zeros_like(want["feed_forward.expert_counts"])
    assert_state_dicts_equal(safetensors.torch.load_file(tmp_path / "d.safetensors"), want)


def test_convert_file_rejects_bad_requests_and_writes_nothing(tmp_path):
    src = tmp_path / "a.safetensors"
    save(src, torch_original("dense", "float32"))
    for dst, to, match in [
        ("b.msgpack", "torch", "b.msgpack"),
        ("b.pt", "jax", "b.pt"),
        ("b.pt", "flax", "b.pt"),
        ("b.safetensors", "tensorflow", re.escape("'tensorflow'")),
        ("b.txt", "jax", r"suffix '\.txt'.*\.safetensors, \.pt, \.pth, \.msgpack$"),
        ("b", "torch", "no suffix"),
    ]:
        with pytest.raises(ValueError, match=match):
            convert_file(src, tmp_path / dst, to=to)
    with pytest.raises(FileNotFoundError):
        convert_file(tmp_path / "missing.pt", tmp_path / "b.safetensors", to="torch")
    with pytest.raises(FileNotFoundError, match=r"folder '\S*no-such-folder' does not exist"):
        convert_file(src, tmp_path / "no-such-folder" / "b.pt", to="torch")
    with pytest.raises(ValueError, match="is a folder"):
        convert_file(tmp_path, tmp_path / "b.pt", to="torch")
    assert os.listdir(tmp_path) == ["a.safetensors"]


# --------------------------------------------------------------------------- bad input
def test_bad_input_raises_and_leaves_the_file_alone(tmp_path):
    path = tmp_path / "w.safetensors"
    save(path, torch_original("dense", "float32"))
    old = path.read_bytes()
    module, params = flax_original("dense", "float32")
    _, moe_params = flax_original("moe", "float32")
    with pytest.raises(TypeError, match="got str"):
        save(path, "a block")
    with pytest.raises(TypeError, match="flax_module"):
        save(path, params)
    with pytest.raises(ValueError, match="format must be one of"):
        save(path, (module, params), format="onnx")
    with pytest.raises(ValueError, match="naming"):
        save(tmp_path / "w.pt", (module, params), naming="flax")
    with pytest.raises(ValueError, match="feed_forward/gate/kernel"):
        save(path, (module, moe_params))
    with pytest.raises(ValueError, match="framework must be one of"):
        load(path, "tensorflow")
    with pytest.raises(ValueError, match=r"suffix '\.bin'"):
        save(tmp_path / "w.bin", (module, params))
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == [path.name]
