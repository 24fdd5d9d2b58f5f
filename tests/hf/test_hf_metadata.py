"""What travels with a Hugging Face model besides its weights: token ids, generation_config.json
and the tokenizer files, from a folder through checkpoint files (.safetensors, .pt, .msgpack)
and back into a folder that transformers loads with its tokenizer.

The folder is a tiny Qwen2 saved by transformers with bos 1 and eos 2, a generation config
of its own and a byte-level BPE tokenizer trained here. The commands run in this process
through `parity.cli.main`, what `python -m parity` calls (tests/in_process.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import hf_models
import jax
import numpy as np
import pytest
import torch
import transformers
from in_process import run_parity
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import jax_block
import parity
import torch_block
import twin_core.files
from parity.cli import main
from parity.errors import CheckpointError, FolderConflict
from parity.hf import HFMetadata, metadata_of

ROOT = Path(__file__).resolve().parents[2]
BOS, EOS = 1, 2
PROMPT = "hello world, the quick fox"
NEW = 12
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a tiny model says hello to the world",
    "hello there, how are you today?",
    "we convert weights between two frameworks",
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def run(*argv: object) -> subprocess.CompletedProcess:
    return run_parity(*argv)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny qwen2 with bos/eos ids, a generation config and a trained BPE tokenizer."""
    directory = tmp_path_factory.mktemp("qwen2")
    model = hf_models.build("qwen2", bos_token_id=BOS, eos_token_id=EOS)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=BOS, eos_token_id=EOS, do_sample=False, max_new_tokens=20
    )
    hf_models.save(model, directory)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(SENTENCES, trainer)
    assert tokenizer.get_vocab_size() <= hf_models.VOCAB
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special))
    return directory


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def usable(directory: Path) -> dict[str, object]:
    """What makes a folder usable besides its weights: the files other than config.json and
    the weights, as bytes, and config.json's token ids."""
    config = json.loads((directory / "config.json").read_text())
    out: dict[str, object] = {k: config.get(k) for k in ("bos_token_id", "eos_token_id")}
    skip = ("config.json", "model.safetensors")
    return out | {n: b for n, b in snapshot(directory).items() if n not in skip}


def until_eos(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def hf_generate(directory: Path, prompt: str) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new tokens) of transformers with the folder's own tokenizer and
    generation config, up to its eos."""
    model = hf_models.load(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False
        )
    return ids[0].tolist(), until_eos(out[0, ids.shape[1] :].tolist())


def our_generate(model, ids: list[int]) -> list[int]:
    """Greedy new tokens of torch_block or jax_block, up to eos."""
    if isinstance(model, tuple):
        tokens, steps = jax_block.generate(
            *model,
            np.asarray([ids], np.int32),
            max_new_tokens=NEW,
            eos_token_id=EOS,
            rng=jax.random.PRNGKey(0),
            return_num_steps=True,
        )
        return until_eos(np.asarray(tokens)[0, :steps].tolist())
    tokens, steps = torch_block.generate(
        model, torch.tensor([ids]), max_new_tokens=NEW, eos_token_id=EOS, return_num_steps=True
    )
    return until_eos(tokens[0, :steps].tolist())


def text_of(folder: Path, ids: list[int]) -> str:
    return Tokenizer.from_file(str(folder / "tokenizer.json")).decode(ids)


@pytest.fixture(scope="module")
def converted(folder, tmp_path_factory) -> dict[str, Path]:
    """The folder converted by the command line to .msgpack (jax) and .safetensors (torch)."""
    out = tmp_path_factory.mktemp("converted")
    paths = {"jax": out / "qwen2.msgpack", "torch": out / "qwen2.safetensors"}
    for framework, path in paths.items():
        result = run("convert", folder, path, "--to", framework)
        assert result.returncode == 0, result.stderr
    return paths


# --------------------------------------------------------------------------- the library
def test_metadata_travels_through_every_checkpoint_format(folder, tmp_path):
    expected = HFMetadata.from_folder(folder)
    assert expected.token_ids == {"bos_token_id": BOS, "eos_token_id": EOS}
    assert expected.generation_config["max_new_tokens"] == 20
    assert set(expected.files) == set(TOKENIZER_FILES)
    for framework in ("torch", "jax"):
        model = parity.from_hf(folder, framework)
        assert metadata_of(model) == expected
        for suffix in (".safetensors", ".pt", ".msgpack"):
            path = tmp_path / f"{framework}{suffix}"
            parity.save(path, model)
            for back in ("torch", "jax"):
                assert metadata_of(parity.load(path, back)) == expected, (path, back)
    parity.convert_file(tmp_path / "torch.pt", tmp_path / "again.msgpack", "jax")
    assert metadata_of(parity.load(tmp_path / "again.msgpack")) == expected
    # a model of no folder carries nothing, and its files store nothing
    bare = torch_block.TransformerLM(
        vocab_size=16, max_seq_len=8, d_model=8, n_layers=1, n_heads=2, d_ff=16
    )
    parity.save(tmp_path / "bare.safetensors", bare)
    assert metadata_of(parity.load(tmp_path / "bare.safetensors")) == HFMetadata()


def test_a_header_past_the_safetensors_limit_is_refused(folder, tmp_path, monkeypatch):
    model = parity.from_hf(folder)
    monkeypatch.setattr(twin_core.files, "MAX_HEADER_BYTES", 1000)
    with pytest.raises(ValueError, match="above the format's limit of 1000"):
        parity.save(tmp_path / "big.safetensors", model)
    assert not list(tmp_path.iterdir())


def test_malformed_metadata_is_refused():
    with pytest.raises(CheckpointError, match="not a tokenizer file name"):
        HFMetadata.from_dict({"files": {"../config.json": {"text": "{}"}}})
    with pytest.raises(CheckpointError, match="eos_token_id must be a token id"):
        HFMetadata.from_dict({"token_ids": {"eos_token_id": "two"}})
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        HFMetadata.from_dict({"generation_config": [1]})
    binary = HFMetadata(files={"tokenizer.model": bytes(range(256))})
    assert HFMetadata.from_dict(json.loads(json.dumps(binary.to_dict()))) == binary


def test_to_hf_keeps_what_the_folder_holds_or_refuses(folder, tmp_path):
    target = shutil.copytree(folder, tmp_path / "copy")
    model = parity.from_hf(folder)
    bare = torch_block.TransformerLM.from_config(model.config)
    bare.load_state_dict(model.state_dict())  # the same weights, carrying nothing
    parity.to_hf(bare, target)  # keeps the folder's ids, generation config, tokenizer files
    assert usable(target) == usable(folder)
    parity.to_hf(model, target)  # what it carries is what the folder holds
    assert usable(target) == usable(folder)

    generation = json.loads((folder / "generation_config.json").read_text())
    extra = {**generation, "temperature": 0.7, "top_k": 5}  # theirs has more keys: kept
    (target / "generation_config.json").write_text(json.dumps(extra))
    parity.to_hf(model, target)
    assert json.loads((target / "generation_config.json").read_text()) == extra

    (target / "generation_config.json").write_text(json.dumps({**extra, "max_new_tokens": 5}))
    (target / "tokenizer_config.json").write_text("{}")
    before = snapshot(target)
    with pytest.raises(FolderConflict) as caught:
        parity.to_hf(model, target)
    assert caught.value.names == ["generation_config.json", "tokenizer_config.json"]
    assert "max_new_tokens: 5 here, 20 in the model" in str(caught.value)
    assert snapshot(target) == before  # nothing was written


def test_to_hf_takes_what_the_model_lacks_from_a_source_folder(folder, tmp_path):
    model = parity.from_hf(folder)
    bare = torch_block.TransformerLM.from_config(model.config)
    bare.load_state_dict(model.state_dict())
    out = parity.to_hf(bare, tmp_path / "out", source=folder, token_ids={"pad_token_id": 0})
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (folder / name).read_bytes()


# --------------------------------------------------------------------------- the commands
def test_converted_checkpoints_generate_text_as_transformers(folder, converted):
    prompt_ids, expected = hf_generate(folder, PROMPT)
    for path in converted.values():  # tokens: each file in each framework
        for framework in ("torch", "jax"):
            assert our_generate(parity.load(path, framework), prompt_ids) == expected
    for framework, path in converted.items():  # text: the command line, no --hf needed
        result = run(
            "generate",
            "--checkpoint",
            path,
            "--framework",
            framework,
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            NEW,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == text_of(folder, prompt_ids + expected)


def test_export_loads_in_transformers_with_its_tokenizer(folder, converted, tmp_path):
    out = tmp_path / "out-hf"
    result = run("convert", converted["jax"], out, "--to", "hf")
    assert result.returncode == 0, result.stderr
    assert "note:" not in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (BOS, EOS)
    assert json.loads((out / "generation_config.json").read_text()) == json.loads(
        (folder / "generation_config.json").read_text()
    )
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (folder / name).read_bytes(), name

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS, EOS)
    reloaded = hf_models.load(out)
    assert (reloaded.generation_config.bos_token_id, reloaded.generation_config.eos_token_id) == (
        BOS,
        EOS,
    )
    prompt_ids, expected = hf_generate(out, PROMPT)
    assert our_generate(parity.load(converted["jax"], "jax"), prompt_ids) == expected
    result = run("generate", "--hf", out, "--prompt", PROMPT, "--max-new-tokens", NEW)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == tokenizer.decode(
        prompt_ids + expected, skip_special_tokens=True
    )


def test_convert_into_a_folder_keeps_or_refuses(folder, converted, tmp_path, capsys):
    target = shutil.copytree(folder, tmp_path / "copy")
    result = run("convert", converted["torch"], target, "--to", "hf")
    assert result.returncode == 0, result.stderr
    assert usable(target) == usable(folder)  # eos_token_id stays 2, nothing lost
    (target / "tokenizer.json").write_text("{}")
    before = snapshot(target)
    result = run("convert", converted["torch"], target, "--to", "hf")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "tokenizer.json (other content)" in result.stderr
    assert snapshot(target) == before
    with pytest.raises(SystemExit):
        main(["convert", str(folder), str(tmp_path / "x.pt"), "--hf-source"])
    capsys.readouterr()
    argv = ["convert", str(folder), str(tmp_path / "x.pt"), "--hf-source", str(folder)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--hf-source goes with --to hf" in err and err.count("\n") == 1


def test_hf_source_and_tokenizer_flags_for_a_bare_checkpoint(folder, tmp_path):
    model = parity.from_hf(folder)
    bare = torch_block.TransformerLM.from_config(model.config)
    bare.load_state_dict(model.state_dict())
    path = tmp_path / "bare.safetensors"
    parity.save(path, bare)

    result = run("generate", "--checkpoint", path, "--prompt", PROMPT)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "has no tokenizer.json" in result.stderr and "--tokenizer DIR" in result.stderr
    result = run(
        "generate",
        "--checkpoint",
        path,
        "--tokenizer",
        folder,
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        NEW,
        "--eos-id",
        EOS,
    )
    assert result.returncode == 0, result.stderr
    prompt_ids, expected = hf_generate(folder, PROMPT)
    assert result.stdout.splitlines()[0] == text_of(folder, prompt_ids + expected)

    result = run("convert", path, tmp_path / "plain", "--to", "hf")
    assert result.returncode == 0 and "note:" in result.stdout and "--hf-source" in result.stdout
    result = run("convert", path, tmp_path / "full", "--to", "hf", "--hf-source", folder)
    assert result.returncode == 0 and "note:" not in result.stdout, result.stderr
    assert snapshot(tmp_path / "full").keys() == snapshot(folder).keys()
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (BOS, EOS)
