"""`python -m parity` on Hugging Face folders: convert both ways, generate --hf, check --hf.

Every command runs in this process through `parity.cli.main`, which is what `python -m parity`
calls (tests/in_process.py): exit codes, stdout, --json and the refusals.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import hf_models
import numpy as np
import pytest
import torch
from in_process import run_parity
from tokenizers import Tokenizer, models, pre_tokenizers

import jax_block
import parity
import torch_block
from parity.cli import main
from parity.hf import HFCheckpoint
from parity.report.cases import hf as hf_report
from parity.report.render import WIDTH

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["[UNK]", *(f"w{i}" for i in range(1, hf_models.VOCAB))]


def run(*argv: object) -> subprocess.CompletedProcess:
    return run_parity(*argv)


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


def test_check_hf_bfloat16_passes_quietly_in_readable_lines(folder):
    """A healthy model passes in bfloat16; transformers' progress bars stay out of the output,
    and the table's lines fit WIDTH columns (notes beneath their rows)."""
    result = run("check", "--hf", folder, "--dtype", "bfloat16")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Loading weights" not in result.stderr and "it/s]" not in result.stderr
    lines = result.stdout.splitlines()
    table = lines[2 : lines.index("", 2)]  # after the header line and a blank line
    assert max(map(len, table)) <= WIDTH, "\n".join(table)
    greedy = [line for line in table if line.startswith("greedy:")]
    assert len(greedy) == 3
    for line in greedy:  # token rows: no numeric error, the tie rule as their tolerance
        assert line.split()[-5:] == ["-", "-", "tie", "5e-02", "PASS"], line


def with_greedy_fault(monkeypatch) -> None:
    """torch_block only: negate the LM head row of the token it picks first after row 0's
    prompt, so its greedy tokens part from the others' far from any tie."""
    load = HFCheckpoint.torch

    def faulty(checkpoint: HFCheckpoint) -> torch_block.TransformerLM:
        lm = load(checkpoint)
        ids, mask = hf_report._batch(lm.config.vocab_size, seed=0)
        width = max(hf_report.PROMPT_LENGTHS)
        with torch.no_grad():
            first = int(lm(ids[:, :width], mask[:, :width])[0, -1].argmax())
            lm.lm_head.weight[first] *= -1
        return lm

    monkeypatch.setattr(HFCheckpoint, "torch", faulty)


def test_check_bfloat16_still_fails_on_a_conversion_fault(folder, monkeypatch):
    with_greedy_fault(monkeypatch)
    rows, _ = hf_report.hf_report(HFCheckpoint(folder, "bfloat16"), seed=0)
    greedy = {row.case: row for row in rows if row.case.startswith("greedy")}
    row = greedy["greedy: torch_block vs transformers"]
    assert not row.passed and "row 0 parts at token 0, not a near tie" in row.note, row.note
    assert not greedy["greedy: jax_block vs torch_block"].passed
    assert greedy["greedy: jax_block vs transformers"].passed


@pytest.fixture(scope="module")
def twin_tokens(tmp_path_factory) -> Path:
    """A tiny llama whose LM head gives token t + 48 the same row as token t (t < 48): their
    logits are equal at every step, a tie that rounding may break either way."""
    model = hf_models.build("llama", num_hidden_layers=1)
    half = hf_models.VOCAB // 2
    with torch.no_grad():
        model.lm_head.weight[half:] = model.lm_head.weight[:half]
    return hf_models.save(model, tmp_path_factory.mktemp("twins"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_greedy_rows_part_at_a_near_tie_only_in_bfloat16(twin_tokens, monkeypatch, dtype):
    """jax_block's first token of row 0 swapped for its twin (as rounding could choose it):
    a near tie, excused in bfloat16 with its margin, a failure in float32."""
    half, generate = hf_models.VOCAB // 2, jax_block.generate

    def swapped(*args, **kwargs):
        tokens = np.array(generate(*args, **kwargs))
        tokens[0, 0] = (tokens[0, 0] + half) % (2 * half)
        return tokens

    monkeypatch.setattr(jax_block, "generate", swapped)
    rows, _ = hf_report.hf_report(HFCheckpoint(twin_tokens, dtype), seed=0)
    greedy = {row.case: row for row in rows if row.case.startswith("greedy")}
    row = greedy["greedy: jax_block vs transformers"]
    assert row.details["first_difference"] == [0, 0]
    if dtype == "float32":
        assert not row.passed and str(row.tolerance) == "identical"
        return
    assert all(row.passed for row in rows), [row.note for row in rows]
    assert "row 0 parts at token 0, a near tie: margin " in row.note
    (parting,) = row.details["partings"]
    assert parting["near_tie"] and parting["margin"] <= parting["bound"]
    assert greedy["greedy: jax_block vs torch_block"].details["partings"][0]["near_tie"]


def test_check_without_transformers_compares_the_twins(folder, monkeypatch):
    monkeypatch.setattr(hf_report, "_transformers", lambda *args: None)
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


def test_config_errors_say_what_is_missing_and_list_a_few_tensors(folder, tmp_path):
    """Through the command line: a config.json without num_hidden_layers says so; a wrong
    hidden_size names the first few mis-shaped tensors and how many there are, on one line."""
    for edit, words in (
        (lambda c: c.pop("num_hidden_layers"), ["config.json: num_hidden_layers is missing"]),
        (
            lambda c: c.update(hidden_size=48),
            ["problem(s): 'lm_head.weight': the config says shape (96, 48)", "... and "],
        ),
    ):
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(folder, copy)
        config = json.loads((copy / "config.json").read_text())
        edit(config)
        (copy / "config.json").write_text(json.dumps(config))
        result = run("convert", copy, tmp_path / "out.safetensors")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert all(word in result.stderr for word in words), result.stderr
        assert len(result.stderr) < 500


def test_per_layer_model_through_every_command(tmp_path):
    """Qwen3-MoE with a dense layer between MoE layers, a window and per-head q/k norms:
    check --hf passes, generate --hf --ids gives transformers' own greedy tokens past the
    window, convert to our file and back to HF reloads in transformers bit-identical."""
    reference = hf_models.build("qwen3_moe")
    folder = hf_models.save(reference, tmp_path / "qwen3_moe")
    result = run("check", "--hf", folder, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["all_passed"]

    prompt, new = [5, 17, 33, 2], 8  # 12 positions against a window of WINDOW
    result = run("generate", "--hf", folder, "--ids", "5,17,33,2", "--max-new-tokens", new)
    assert result.returncode == 0, result.stderr
    expected = hf_models.hf_greedy(reference, prompt, new)
    assert result.stdout.splitlines()[0] == ",".join(map(str, expected))
    assert hf_models.WINDOW < len(prompt) + new

    ours, back = tmp_path / "qwen3_moe.safetensors", tmp_path / "back"
    assert run("convert", folder, ours).returncode == 0
    result = run("convert", ours, back, "--to", "hf")
    assert result.returncode == 0, result.stderr
    assert "(qwen3_moe)" in result.stdout
    reloaded, expected_weights = hf_models.load(back), reference.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, expected_weights[key]), key
