"""`python -m parity`: JSON output, help, exit codes 0/1/2, the convert command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

import torch_block
from parity import checkpoint, cli, from_torch, report
from parity.cases import Case, Setup
from parity.compare import TOLERANCES, Row
from parity.run import run_both

ROOT = Path(__file__).resolve().parents[1]
ROW_FIELDS = {
    "case",
    "config",
    "dtype",
    "max_abs_error",
    "max_rel_error",
    "tolerance",
    "routing",
    "note",
    "details",
    "passed",
    "result",
}


def python_m_parity(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "parity", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


# --------------------------------------------------------------------------- subprocess
def test_check_dense_json_exits_0_and_parses():
    done = python_m_parity("check", "--config", "dense", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(done.stdout)
    rows = document["rows"]
    assert rows and document["total"] == document["passed"] == len(rows)
    assert document["all_passed"] is True and document["seed"] == 0
    for row in rows:
        assert set(row) == ROW_FIELDS
        assert row["config"] == "dense" and row["result"] == "PASS" and row["passed"] is True
        assert row["max_abs_error"] <= 1e-5 or row["dtype"] == "bfloat16"
        assert row["max_rel_error"] <= row["tolerance"]["value"] or row["dtype"] == "float32"
    assert {row["dtype"] for row in rows} == {"float32", "bfloat16"}
    cases = {row["case"] for row in rows}
    assert {"forward causal", "forward masked", "cached prefill", "cached decode"} <= cases
    assert {"lm forward", "lm cached prefill", "lm cached decode", "lm greedy generation"} <= cases
    assert {"torch", "jax", "flax", "jax_device"} <= set(document["environment"])


def test_help_exits_0_and_names_every_command():
    done = python_m_parity("--help")
    assert done.returncode == 0
    for word in ("check", "convert", "--config", "--dtype", "--seed", "--json", "exit codes"):
        assert word in done.stdout


def test_bad_argument_exits_2_with_a_message():
    done = python_m_parity("check", "--config", "huge")
    assert done.returncode == 2
    assert "invalid choice: 'huge'" in done.stderr


# --------------------------------------------------------------------------- in process
@pytest.mark.parametrize(
    "command,words",
    [
        (
            ["check", "--help"],
            ["--config", "--dtype", "--seed", "--json", "near ties", "lm greedy generation"],
        ),
        (["convert", "--help"], ["IN", "OUT", "--to", "--config", "--module"]),
    ],
)
def test_subcommand_help_exits_0(capsys, command, words):
    with pytest.raises(SystemExit) as info:
        cli.main(command)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(word in out for word in words)


@pytest.mark.parametrize(
    "argv",
    [
        ["check", "--dtype", "float16"],
        ["check", "--seed", "one"],
        ["convert", "in.safetensors", "out.msgpack"],  # --to missing
        ["convert", "in.safetensors", "out.msgpack", "--to", "tensorflow"],
        ["convert", "a", "b", "--to", "flax", "--config", "[1, 2]"],
        ["convert", "a", "b", "--to", "flax", "--config", "{not json"],
        ["frobnicate"],
    ],
)
def test_bad_arguments_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def broken_conversion(setup: Setup) -> list[Row]:
    """A real comparison whose JAX weights are off by 1e-3 in one place."""
    block, flax_module, params = setup.build()
    params["feed_forward"]["fc1"]["bias"] = params["feed_forward"]["fc1"]["bias"].at[0].add(1e-3)
    run = run_both(block, flax_module, params, setup.input())
    return [setup.compare_output("broken conversion", run)]


@pytest.mark.parametrize("json_output", [False, True])
def test_a_failing_case_exits_1(monkeypatch, capsys, json_output):
    entry = Case("broken conversion", broken_conversion, ("dense",), ("float32",))
    monkeypatch.setattr(report, "all_cases", lambda: [entry])
    argv = ["check", "--config", "dense"] + (["--json"] if json_output else [])
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    if json_output:
        document = json.loads(out)
        assert document["all_passed"] is False and document["passed"] == 0
        (row,) = document["rows"]
        assert row["result"] == "FAIL" and row["max_abs_error"] > 1e-5
    else:
        assert "0/1 PASS; FAIL: broken conversion (dense, float32)" in out
        assert "torch " in out and "jax " in out and "flax " in out  # the header line


def test_no_command_checks_everything_and_exits_0_when_all_pass(monkeypatch, capsys):
    calls = []
    tolerance = TOLERANCES["float32"]

    def fake_run_cases(config, dtype, seed):
        calls.append((config, dtype, seed))
        return [Row("c", "dense", "float32", 0.0, 0.0, tolerance, True)]

    monkeypatch.setattr(report, "run_cases", fake_run_cases)
    assert cli.main([]) == 0
    assert calls == [("all", "all", 0)]
    assert "1/1 PASS" in capsys.readouterr().out
    assert cli.main(["--seed", "7", "check", "--dtype", "bfloat16"]) == 0
    assert calls[-1] == ("all", "bfloat16", 7)


# --------------------------------------------------------------------------- convert
@pytest.fixture
def block() -> torch_block.TransformerBlock:
    torch.manual_seed(0)
    return torch_block.TransformerBlock(
        16, 2, 32, dropout=0.0, use_moe=True, num_experts=4, top_k_experts=2
    ).eval()


def test_convert_writes_a_file_the_other_framework_loads(tmp_path, capsys, block):
    src, dst = tmp_path / "block.safetensors", tmp_path / "block.msgpack"
    checkpoint.save(src, block)
    assert cli.main(["convert", str(src), str(dst), "--to", "flax"]) == 0
    _, want = from_torch(block)
    _, got = checkpoint.load(dst, framework="flax")
    want, got = flatten_dict(want), flatten_dict(got)
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(np.asarray(got[k]), np.asarray(want[k])) for k in want)

    back = tmp_path / "back.pt"
    assert cli.main(["convert", str(dst), str(back), "--to", "torch"]) == 0
    loaded = checkpoint.load(back, framework="torch")
    for key, tensor in block.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_convert_a_plain_state_dict_needs_and_takes_config(tmp_path, capsys, block):
    src, dst = tmp_path / "plain.pt", tmp_path / "plain.msgpack"
    torch.save(block.state_dict(), src)
    assert cli.main(["convert", str(src), str(dst), "--to", "flax"]) == 2
    assert "configuration" in capsys.readouterr().err
    config = json.dumps(block.config)
    assert cli.main(["convert", str(src), str(dst), "--to", "flax", "--config", config]) == 0
    _, params = checkpoint.load(dst, framework="flax")
    gate = np.asarray(params["feed_forward"]["gate"]["kernel"])  # (d_model, E)
    assert np.array_equal(gate, block.feed_forward.gate.weight.detach().numpy().T)


@pytest.mark.parametrize(
    "content,expected",
    [
        (None, "input file not found"),
        (b"\x00garbage, not a checkpoint", "cannot convert"),
    ],
)
def test_convert_a_bad_file_exits_2_and_writes_nothing(tmp_path, capsys, content, expected):
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.msgpack"
    if content is not None:
        src.write_bytes(content)
    assert cli.main(["convert", str(src), str(dst), "--to", "flax"]) == 2
    assert expected in capsys.readouterr().err
    assert not dst.exists()


def test_convert_refuses_to_overwrite_its_input(tmp_path, capsys, block):
    src = tmp_path / "block.safetensors"
    checkpoint.save(src, block)
    before = src.read_bytes()
    assert cli.main(["convert", str(src), str(src), "--to", "torch"]) == 2
    assert "same file" in capsys.readouterr().err
    assert src.read_bytes() == before
