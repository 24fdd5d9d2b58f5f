"""`python -m parity` on Hugging Face folders: convert both ways, generate --hf, check --hf.

The main paths run as subprocesses (exit codes, stdout, --json); the refusals run in-process
through `parity.cli.main`, which is what the subprocess calls.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import hf_models
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

import parity
import torch_block
from parity.cli import main
from parity.hf import HFCheckpoint
from parity.report.cases import hf as hf_report

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["[UNK]", *(f"w{i}" for i in range(1, hf_models.VOCAB))]


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "parity", *map(str, argv)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny llama saved by transformers, with a word-level tokenizer.json of its vocabulary."""
    model = hf_models.build("llama", num_hidden_layers=1)
    directory = hf_models.save(model, tmp_path_factory.mktemp("llama"))
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, "[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def test_check_hf_json_three_ways(folder):
    result = run("check", "--hf", folder, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["all_passed"] and report["total"] == 8
    assert report["environment"]["transformers"] != "not installed"
    cases = [row["case"] for row in report["rows"]]
    assert "logits: jax_block vs transformers" in cases
    assert "cached decode: torch_block vs transformers" in cases
    assert "greedy: jax_block vs torch_block" in cases
    assert all(row["config"] == "llama" and row["dtype"] == "float32" for row in report["rows"])


def test_check_without_transformers_compares_the_twins(folder, monkeypatch):
    monkeypatch.setattr(hf_report, "_transformers", lambda folder, dtype: None)
    rows, env = hf_report.hf_report(HFCheckpoint(folder), seed=1)
    assert env["transformers"] == "not installed"
    assert [row.case for row in rows] == [
        "logits: jax_block vs torch_block",
        "cached decode: torch_block vs torch_block",
        "cached decode: jax_block vs torch_block",
        "greedy: jax_block vs torch_block",
    ]
    assert all(row.passed for row in rows)


def test_convert_both_ways(folder, tmp_path):
    ours = tmp_path / "llama.safetensors"
    result = run("convert", folder, ours)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    loaded = parity.load(ours)
    ids = torch.randint(0, hf_models.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(ids).numpy(), parity.from_hf(folder)(ids).numpy())

    back = tmp_path / "back"
    result = run("convert", ours, back, "--to", "hf")
    assert result.returncode == 0, result.stderr
    assert "(llama)" in result.stdout
    with torch.no_grad():
        np.testing.assert_array_equal(
            hf_models.load(back)(ids).logits.numpy(), hf_models.load(folder)(ids).logits.numpy()
        )


def test_generate_hf_text_through_the_tokenizer(folder):
    prompt = "w5 w17 w33 w2"
    result = run("generate", "--hf", folder, "--prompt", prompt, "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    text = result.stdout.splitlines()[0]
    ids = [WORDS.index(word) for word in prompt.split()]
    lm = parity.from_hf(folder)
    expected = torch_block.generate(lm, torch.tensor([ids]), max_new_tokens=6)[0].tolist()
    assert text == " ".join(WORDS[i] for i in ids + expected)


def test_errors_are_one_line_and_exit_2(folder, tmp_path, capsys):
    result = run("check", "--hf", tmp_path / "nowhere")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not a directory" in result.stderr
    block = tmp_path / "block.safetensors"
    parity.save(block, torch_block.TransformerBlock(d_model=8, n_heads=2, d_ff=16))
    no_tokenizer = tmp_path / "no_tokenizer"
    hf_models.save(hf_models.build("llama", num_hidden_layers=1), no_tokenizer)
    capsys.readouterr()  # transformers' progress bar
    cases = {
        ("convert", block, tmp_path / "out", "--to", "hf"): "needs a LM",
        ("convert", block, tmp_path / "out.safetensors"): "--to is required",
        ("convert", folder, tmp_path / "again", "--to", "hf"): "already a Hugging Face folder",
        ("generate", "--hf", no_tokenizer, "--prompt", "w1"): "no tokenizer.json",
        ("check", "--hf", folder, "--config", "llama"): "--config picks built-in",
    }
    for argv, message in cases.items():
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
