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
from in_process import run_parity

import torch_block
from parity import cli, from_torch
from parity.cli.check import case_list
from parity.convert import checkpoint
from parity.report import runner as report
from parity.report.compare import TOLERANCES, Row
from parity.report.registry import Case, Setup
from parity.report.run import run_both

ROOT = Path(__file__).resolve().parents[2]
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


def python_m_parity(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "parity", *args],
        cwd=cwd,
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
        if row["tolerance"]["kind"] == "exact":  # token ids: agreement, not a numeric error
            assert row["max_abs_error"] is None and row["max_rel_error"] is None
            assert row["details"]["tokens_identical"] == row["details"]["tokens"]
            continue
        assert row["max_abs_error"] <= 1e-5 or row["dtype"] == "bfloat16"
        assert row["max_rel_error"] <= row["tolerance"]["value"] or row["dtype"] == "float32"
    assert {row["dtype"] for row in rows} == {"float32", "bfloat16"}
    cases = {row["case"] for row in rows}
    assert {"forward causal", "forward masked", "cached prefill", "cached decode"} <= cases
    assert {"lm forward", "lm cached prefill", "lm cached decode", "lm greedy generation"} <= cases
    assert {"torch", "jax", "flax", "jax_device"} <= set(document["environment"])
    assert cases <= declared_rows(), "check --help must list every row of the report"


def declared_rows() -> set[str]:
    """The row names that `check --help` lists, read from its text."""
    rows = set()
    for entry in report.all_cases():
        assert f"  {entry.name} " in case_list()
        rows.update(entry.row_names)
    help_text = case_list()
    assert all(name in help_text for name in rows)
    return rows


def test_check_help_lists_the_rows_of_the_moe_only_cases():
    """Rows that only the MoE configuration gives (the dense run above never sees them)."""
    entries = [e for e in report.all_cases() if e.name in ("aux loss", "z-loss", "lm forward")]
    given = set()
    for entry in entries:
        given.update(row.case for row in report.run_case(entry, Setup("moe", "float32", 0)))
    assert {"aux loss", "z-loss", "lm forward", "lm aux loss"} <= given <= declared_rows()


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
    "argv, message",
    [
        (
            ["generate", "--checkpoint", "missing.safetensors", "--prompt", "hi"],
            "checkpoint file not found: missing.safetensors",
        ),
        (["generate", "--checkpoint", ".", "--prompt", "hi"], "got the folder ."),
        (
            ["convert", "missing.safetensors", "out.msgpack", "--to", "jax"],
            "no such file or folder: missing.safetensors",
        ),
        (["convert", "nope", "out.safetensors"], "no such file or folder: nope"),  # before --to
        (
            ["generate", "--ids", "1,2", "--top-k", "5", "--top-p", "0.5"],
            "--top-k and --top-p apply only when sampling: give --temperature > 0",
        ),
        (
            ["generate", "--ids", "1,2", "--top-p", "0.5", "--temperature", "0"],
            "--top-p applies only when sampling",
        ),
        (["convert", "in.safetensors", "no-folder/out.pt", "--to", "torch"], "'no-folder'"),
        (["convert", "in.safetensors", "out.txt", "--to", "jax"], "unknown suffix '.txt'"),
        (["convert", "in.safetensors", "out.pt", "--to", "jax"], "--to jax writes a .msgpack"),
    ],
)
def test_bad_paths_are_one_line_errors_with_exit_2(tmp_path, argv, message):
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "in.safetensors", torch_block.TransformerBlock(16, 2, 32))
    done = run_parity(*argv, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("python -m parity")
    assert message in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_generate_takes_flax_as_the_name_of_jax():
    done = run_parity("generate", "--framework", "flax", "--ids", "1,2", "--max-new-tokens", "3")
    assert done.returncode == 0, done.stderr
    tokens, speed = done.stdout.strip().splitlines()
    assert len(tokens.split(",")) == 3 and speed.startswith("jax: 3 new tokens in ")


@pytest.mark.parametrize(
    "command,words",
    [
        (
            ["check", "--help"],
            ["--config", "--dtype", "--seed", "--json", "near ties", "lm greedy generation"],
        ),
        (["convert", "--help"], ["IN", "OUT", "--to {torch,jax", "--config", "--module"]),
        (
            ["generate", "--help"],
            [
                "--framework {torch,jax}",
                "(default: torch)",
                "tokens to generate (default: 64)",
                "(needs --temperature > 0)",
            ],
        ),
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
        ["generate", "--ids", "1", "--framework", "tensorflow"],
        ["generate", "--ids", "1", "--max-new-tokens", "0"],
        ["generate", "--ids", "1", "--temperature", "-1"],
        ["generate", "--ids", "1", "--top-k", "0"],
        ["generate", "--ids", "-1"],
        ["convert", "a", "b", "--to", "flax", "--config", "[1, 2]"],
        ["convert", "a", "b", "--to", "flax", "--config", "{not json"],
        ["frobnicate"],
    ],
)
def test_bad_arguments_exit_2(capsys, argv):
    assert exit_code(argv) == 2
    assert "error:" in capsys.readouterr().err


def exit_code(argv: list[str]) -> int:
    """What `python -m parity ARGV` exits with: an argparse error raises SystemExit."""
    try:
        return cli.main(argv)
    except SystemExit as exit:
        return exit.code


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

    def fake_run_cases(config, dtype, seed, workers):
        assert workers == report.WORKERS  # the command line spreads configurations
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


@pytest.mark.parametrize("to", ["jax", "flax"])
def test_convert_writes_a_file_the_other_framework_loads(tmp_path, capsys, block, to):
    src, dst = tmp_path / "block.safetensors", tmp_path / "block.msgpack"
    checkpoint.save(src, block)
    assert cli.main(["convert", str(src), str(dst), "--to", to]) == 0
    assert capsys.readouterr().out == f"wrote {dst} (jax)\n"
    _, want = from_torch(block)
    _, got = checkpoint.load(dst, framework="jax")
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
    assert cli.main(["convert", str(src), str(dst), "--to", "jax"]) == 2
    err = capsys.readouterr().err
    assert "without a configuration: pass --config" in err and "config=" not in err
    assert '\'{"d_model": 64, "n_heads": 4, "d_ff": 128}\'' in err  # JSON, as --config takes
    config = json.dumps(block.config.to_dict())
    assert cli.main(["convert", str(src), str(dst), "--to", "jax", "--config", config]) == 0
    _, params = checkpoint.load(dst, framework="jax")
    gate = np.asarray(params["feed_forward"]["gate"]["kernel"])  # (d_model, E)
    assert np.array_equal(gate, block.feed_forward.gate.weight.detach().numpy().T)


@pytest.mark.parametrize(
    "content,expected",
    [
        (None, "no such file or folder"),
        (b"\x00garbage, not a checkpoint", "cannot convert"),
    ],
)
def test_convert_a_bad_file_exits_2_and_writes_nothing(tmp_path, capsys, content, expected):
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.msgpack"
    if content is not None:
        src.write_bytes(content)
    assert cli.main(["convert", str(src), str(dst), "--to", "jax"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "format=" not in err  # the command line has no format flag
    assert not dst.exists()


def test_convert_errors_name_the_flags_folders_and_suffixes(tmp_path, capsys, block):
    src = tmp_path / "block.safetensors"
    checkpoint.save(src, block)
    missing = tmp_path / "no-such-folder"
    assert cli.main(["convert", str(src), str(missing / "b.pt"), "--to", "torch"]) == 2
    err = capsys.readouterr().err
    assert f"folder '{missing}' does not exist" in err and ".tmp" not in err
    assert cli.main(["convert", str(src), str(tmp_path / "x.txt"), "--to", "jax"]) == 2
    err = capsys.readouterr().err
    assert "unknown suffix '.txt'" in err and ".safetensors, .pt, .pth, .msgpack" in err
    assert "format=" not in err
    assert cli.main(["convert", str(src), str(tmp_path / "b.pt"), "--to", "jax"]) == 2
    assert "--to jax writes a .msgpack or .safetensors file" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path), str(tmp_path / "b.pt"), "--to", "torch"]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # a folder that holds no model
    assert cli.main(["convert", str(src), str(tmp_path), "--to", "torch"]) == 2
    assert f"OUT must be a checkpoint file, got the folder {tmp_path}" in capsys.readouterr().err
    config = json.dumps({"d_model": 16, "n_heads": 2, "d_ff": 64})
    argv = ["convert", str(src), str(tmp_path / "b.pt"), "--to", "torch", "--config", config]
    assert cli.main(argv) == 2
    assert "--config disagrees with the file's: d_ff: given 64, file 32" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block.safetensors"]


def test_generate_with_a_weights_only_file_says_how_to_give_it_a_config(tmp_path, capsys):
    path = tmp_path / "plain.pt"
    torch.save(torch_block.TransformerBlock(16, 2, 32).state_dict(), path)
    assert cli.main(["generate", "--checkpoint", str(path), "--ids", "1"]) == 2
    err = capsys.readouterr().err
    assert f"write it with one first: python -m parity convert {path} OUT.safetensors" in err
    assert "config=" not in err and err.count("\n") == 1


def test_convert_refuses_to_overwrite_its_input(tmp_path, capsys, block):
    src = tmp_path / "block.safetensors"
    checkpoint.save(src, block)
    before = src.read_bytes()
    assert cli.main(["convert", str(src), str(src), "--to", "torch"]) == 2
    assert "same file" in capsys.readouterr().err
    assert src.read_bytes() == before
