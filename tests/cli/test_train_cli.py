"""The training command of both frameworks (`python -m parity train`), run in this process:
the files a run writes and where, runs that never replace each other, resume, extension and
resume across frameworks, the same start from the same seed, the default warm-up, fine-tuning
a Hugging Face folder's model (`--hf`) and one-line errors.

Every run is tiny (one layer, d_model 32, rows of 16 bytes): a run takes a few seconds, most of
it importing the framework.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import hf_models
import numpy as np
import pytest
import safetensors
import torch
import transformers
from in_process import run_parity
from tokenizers import Tokenizer
from tokenizers import models as tokenizer_models

import jax_block.train as jt
import torch_block.train as tt
from parity import cli as parity_cli
from twin_core.data import DEFAULT_TEXT
from twin_core.run_files import RunPaths

ROOT = Path(__file__).resolve().parents[2]
FRAMEWORKS = ("torch", "jax")
MODULES = {"torch": tt, "jax": jt}
MODEL = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-ff", "64"]
ROWS = ["--batch-size", "4", "--seq-len", "16"]
LOGS = ["--checkpoint-every", "4", "--log-every", "4"]
LR = 2e-3  # the default peak learning rate
LOSS_ATOL = 1e-4  # the two frameworks' losses at every step (tests/parity/test_parity_train.py)
ERROR = "python -m parity train: error: "


def parity(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m parity ARGS` run in folder `cwd`, in this process (tests/in_process.py)."""
    return run_parity(*args, cwd=cwd)


def cli(framework: str, *args: object, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m parity train --framework FRAMEWORK ARGS` run in folder `cwd`."""
    threads = ["--threads", "1"] if framework == "torch" else []
    return parity("train", "--framework", framework, *threads, *args, cwd=cwd)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr  # runpy's RuntimeWarning among them
    return result


def one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit 2 and one line on stderr that contains `message`: no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), result.stderr
    assert message in lines[0], lines[0]


def history(run: Path) -> tuple[str, list[dict]]:
    record = json.loads(RunPaths.of(run).history.read_text())
    return record["framework"], record["history"]


def state_metadata(run: Path) -> dict:
    with safetensors.safe_open(RunPaths.of(run).train_state, "np") as f:
        return f.metadata()


def files_under(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def reference_lr(count: int, warmup: int, steps: int, ratio: float = 0.1) -> float:
    """Linear warmup from 0 over `warmup` updates, then cosine to LR * ratio at `steps`."""
    if count < warmup:
        return LR * count / warmup
    progress = min(count - warmup, steps - warmup) / (steps - warmup)
    return LR * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """In-process runs: the tensors are tiny, one thread is faster than two competing."""
    threads = tt.torch.get_num_threads()
    tt.torch.set_num_threads(1)
    yield
    tt.torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the files of a run
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_run_writes_its_four_files_under_runs_and_nothing_else(framework, tmp_path):
    """Default paths runs/<framework>.*; the plot goes next to the run; a history file of the
    old "flax" naming is still read and drawn."""
    old = tmp_path / "old" / "flax.history.json"
    old.parent.mkdir()
    records = [{"step": s, "loss": 5.0 - 0.1 * s} for s in range(1, 9)]
    old.write_text(json.dumps({"framework": "flax", "config": {}, "history": records}))
    before = files_under(tmp_path)
    args = [*MODEL, *ROWS, *LOGS, "--steps", 8, "--plot", "--plot-with", old]
    result = ok(cli(framework, *args, "--sample-tokens", 8, "--prompt", "AB", cwd=tmp_path))
    assert "step     8 loss" in result.stdout and "--- 8 tokens after 'AB' ---" in result.stdout

    written = set(files_under(tmp_path)) - set(before)
    suffixes = ("safetensors", "train.safetensors", "history.json", "loss.png")
    assert written == {f"runs/{framework}.{suffix}" for suffix in suffixes}
    run = tmp_path / "runs" / framework
    assert (tmp_path / "runs" / f"{framework}.loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    name, steps = history(run)
    assert name == framework and [r["step"] for r in steps] == list(range(1, 9))
    assert steps[-1]["loss"] < steps[0]["loss"]
    with safetensors.safe_open(RunPaths.of(run).checkpoint, "np") as f:
        meta, names = f.metadata(), set(f.keys())
    assert meta["format"] == "twin-block/1" and meta["module"] == "TransformerLM"
    config = json.loads(meta["config"])
    assert config["vocab_size"] == 256 and config["d_model"] == 32 and config["max_seq_len"] == 16
    embedding = {"torch": "token_embedding.weight", "jax": "token_embedding/embedding"}
    assert embedding[framework] in names
    assert state_metadata(run)["step"] == "8"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_run_never_replaces_another_without_overwrite(framework, tmp_path):
    args = [*MODEL, *ROWS, *LOGS, "--steps", 4, "--out", "a"]
    ok(cli(framework, *args, cwd=tmp_path))
    (tmp_path / "b.history.json").write_text("{}")  # one file of a run is enough to refuse
    before = files_under(tmp_path)

    refused = cli(framework, *args, "--seed", 1, cwd=tmp_path)
    one_line_error(refused, "a.safetensors, a.train.safetensors, a.history.json already exist")
    assert "--overwrite replaces them" in refused.stderr
    resumed_elsewhere = cli(framework, "--resume", "a", "--steps", 6, "--out", "b", cwd=tmp_path)
    one_line_error(resumed_elsewhere, "b.history.json already exist")
    assert files_under(tmp_path) == before

    ok(cli(framework, *args, "--seed", 1, "--overwrite", cwd=tmp_path))
    after = files_under(tmp_path)
    assert after["a.safetensors"] != before["a.safetensors"]  # other seed, other weights
    assert json.loads(state_metadata(tmp_path / "a")["train_config"])["seed"] == 1


# --------------------------------------------------------------------------- resume and extend
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_resume_extends_the_run_in_its_own_files_with_the_new_schedule(framework, tmp_path):
    """--steps 8 without --warmup-steps: warm-up 2 (a quarter). --resume a --steps 12, without
    --out: a's files now hold 12 steps, the first 8 as they were, the last 4 on the schedule
    of a 12-step run; nothing is written anywhere else (no runs/ folder)."""
    ok(cli(framework, *MODEL, *ROWS, *LOGS, "--steps", 8, "--out", "a", cwd=tmp_path))
    _, first = history(tmp_path / "a")
    assert [r["lr"] for r in first] == pytest.approx(
        [reference_lr(t, warmup=2, steps=8) for t in range(8)], rel=1e-6, abs=1e-12
    )
    one_line_error(cli(framework, "--resume", "a", "--steps", 8, cwd=tmp_path), "does not extend")
    one_line_error(cli(framework, "--resume", "a", "--lr", 0.1, cwd=tmp_path), "drop --lr")

    ok(cli(framework, "--resume", "a.train.safetensors", "--steps", 12, *LOGS, cwd=tmp_path))
    assert set(files_under(tmp_path)) == {"a.safetensors", "a.train.safetensors", "a.history.json"}
    _, extended = history(tmp_path / "a")
    assert extended[:8] == first
    assert [r["step"] for r in extended] == list(range(1, 13))
    assert [r["lr"] for r in extended[8:]] == pytest.approx(
        [reference_lr(t, warmup=2, steps=12) for t in range(8, 12)], rel=1e-6
    )
    saved = state_metadata(tmp_path / "a")
    assert saved["step"] == "12" and json.loads(saved["train_config"])["steps"] == 12
    assert json.loads(saved["train_config"])["warmup_steps"] == 2


@functools.cache
def torch_runs(root: Path) -> Path:
    """A torch run of 8 steps (`t`) and its torch continuation to 12 (`t12`), in `root`."""
    ok(cli("torch", *MODEL, *ROWS, *LOGS, "--steps", 8, "--out", "t", cwd=root))
    ok(cli("torch", "--resume", "t", "--steps", 12, "--out", "t12", cwd=root))
    return root


@pytest.fixture(scope="module")
def cross_root(tmp_path_factory) -> Path:
    return torch_runs(tmp_path_factory.mktemp("cross"))


def test_resume_accepts_the_other_frameworks_training_state(cross_root):
    """JAX continues a torch run (converted through parity) with the losses torch itself gets,
    then torch continues that JAX run in its own files; the torch run is left as it was."""
    t = files_under(cross_root)
    ok(cli("jax", "--resume", "t.train.safetensors", "--steps", 12, "--out", "j", cwd=cross_root))
    assert {k: v for k, v in files_under(cross_root).items() if k in t} == t
    name, jax_steps = history(cross_root / "j")
    _, torch_steps = history(cross_root / "t12")
    assert name == "jax" and state_metadata(cross_root / "j")["naming"] == "flax"
    assert jax_steps[:8] == torch_steps[:8]
    jax_losses = [r["loss"] for r in jax_steps[8:]]
    torch_losses = [r["loss"] for r in torch_steps[8:]]
    assert len(jax_losses) == 4
    assert np.max(np.abs(np.subtract(jax_losses, torch_losses))) <= LOSS_ATOL

    ok(cli("torch", "--resume", "j", "--steps", 14, "--log-every", 2, cwd=cross_root))
    name, back = history(cross_root / "j")
    assert name == "torch" and state_metadata(cross_root / "j")["naming"] == "torch"
    assert back[:12] == jax_steps and [r["step"] for r in back] == list(range(1, 15))


def test_the_same_seed_starts_both_frameworks_from_the_same_weights(cross_root):
    """JAX with torch's flags and seed: the same first loss (the same initial weights and
    batches) to float32 rounding, and the same trajectory within the twins' 1e-4."""
    ok(cli("jax", *MODEL, *ROWS, *LOGS, "--steps", 8, "--out", "j0", cwd=cross_root))
    jax_losses = [r["loss"] for r in history(cross_root / "j0")[1]]
    torch_losses = [r["loss"] for r in history(cross_root / "t")[1]]
    assert abs(jax_losses[0] - torch_losses[0]) <= 1e-5, (jax_losses[0], torch_losses[0])
    assert np.max(np.abs(np.subtract(jax_losses, torch_losses))) <= LOSS_ATOL


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_old_command_says_where_it_went(framework, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", f"{framework}_block.train", "--steps", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"python -m {framework}_block.train moved: use python -m parity train --framework "
        f"{framework} (same flags; python -m parity train --help)"
    ]
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- interruption
CLI_RUN = [*MODEL, *ROWS, "--steps", 12, "--warmup-steps", 2]


def run_cli(framework: str, *args: object) -> int:
    """The command in this process (so that a test can interrupt a step)."""
    return parity_cli.main(["train", "--framework", framework, *map(str, args)])


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_interrupted_run_keeps_its_last_checkpoint_and_resumes_identically(
    framework, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    full, out = tmp_path / "full", tmp_path / "interrupted"
    assert run_cli(framework, *CLI_RUN, *LOGS, "--out", full) == 0
    module = MODULES[framework]
    real_step, calls = module.train_step, []

    def interrupted_step(*args):
        calls.append(1)
        if len(calls) == 7:  # during update 7: the last checkpoint is at step 4
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(module, "train_step", interrupted_step)
    assert run_cli(framework, *CLI_RUN, *LOGS, "--out", out) == 130
    monkeypatch.setattr(module, "train_step", real_step)
    assert state_metadata(out)["step"] == "4"
    assert len(history(out)[1]) == 4

    assert run_cli(framework, "--resume", RunPaths.of(out).train_state, *LOGS) == 0
    assert not (tmp_path / "runs").exists()  # written back to the resumed run
    resumed, uninterrupted = history(out)[1], history(full)[1]
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
    checkpoints = RunPaths.of(out).checkpoint, RunPaths.of(full).checkpoint
    with (
        safetensors.safe_open(checkpoints[0], "np") as a,
        safetensors.safe_open(checkpoints[1], "np") as b,
    ):
        for key in b.keys():
            assert np.max(np.abs(a.get_tensor(key) - b.get_tensor(key))) <= 1e-6, key


# --------------------------------------------------------------------------- bad input
def short_text(tmp_path: Path) -> Path:
    path = tmp_path / "short.txt"
    path.write_bytes(b"x" * 64)  # one batch of 4 x 16 needs 65
    return path


def bad_history(tmp_path: Path) -> Path:
    path = tmp_path / "bad.history.json"
    path.write_text("[1, 2")
    return path


BAD_CLI = [  # (extra flags, message); "--resume" runs take no run flags but --steps
    (lambda tmp: ["--data", tmp / "missing.txt"], "no text file at"),
    (lambda tmp: ["--data", short_text(tmp)], "shorter than one batch"),
    (lambda tmp: ["--seq-len", "32", "--max-seq-len", "16"], "exceeds the model's max_seq_len"),
    (lambda tmp: ["--lr", "0"], "lr must be a finite number > 0"),
    (lambda tmp: ["--lr", "nan"], "lr must be a finite number > 0"),
    (lambda tmp: ["--batch-size", "0"], "batch_size must be >= 1"),
    (lambda tmp: ["--steps", "2", "--warmup-steps", "2"], "warmup_steps must be in [0, steps=2)"),
    (lambda tmp: ["--sample-tokens", "20"], "exceeds the model's max_seq_len"),
    (lambda tmp: ["--n-heads", "3"], "divisible by n_heads"),
    (lambda tmp: ["--log-every", "0"], "--log-every must be >= 1"),
    (lambda tmp: ["--plot-with", bad_history(tmp)], "is not a loss history file"),
    (lambda tmp: ["--resume", tmp / "x.train.safetensors", "--lr", "0.1"], "drop --lr"),
    (lambda tmp: ["--resume", tmp / "x.train.safetensors"], "no training state file"),
    (lambda tmp: ["--resume", tmp / "x"], "no training state file at"),
]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("make_args, message", BAD_CLI)
def test_cli_rejects_bad_input_before_any_work(framework, make_args, message, tmp_path, capsys):
    out = tmp_path / "out" / "m"
    extra = make_args(tmp_path)
    base = [] if "--resume" in extra else [*MODEL, *ROWS, "--steps", 12]
    assert run_cli(framework, *base, *extra, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.parent.exists()  # nothing written


def test_flag_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("torch", "--steps", "many")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"{ERROR}argument --steps: invalid int value: 'many' (see python -m parity train --help)"
    ]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_command_line_errors_are_one_line_without_traceback(framework, tmp_path):
    (tmp_path / "x.train.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"not json")
    one_line_error(cli(framework, "--resume", "x", cwd=tmp_path), "not a readable safetensors")
    assert files_under(tmp_path) == {"x.train.safetensors": b"\x08" + b"\x00" * 7 + b"not json"}
    result = ok(cli(framework, "--help", cwd=tmp_path))
    assert "python -m parity train" in result.stdout
    assert "min(100, steps // 4)" in result.stdout and result.stderr == ""


# --------------------------------------------------------------------------- a Hugging Face model
HF_ROWS = ["--batch-size", "4", "--seq-len", "32"]
PROMPT = "ROMEO:"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny Qwen2 saved by transformers with a byte-level BPE tokenizer.json (384 tokens)."""
    return hf_models.tiny_folder(tmp_path_factory.mktemp("hf") / "tiny-qwen2")


def folder_ids(folder: Path, text: str) -> list[int]:
    """`text` through the folder's tokenizer.json, read by the tokenizers library."""
    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids


def first_batch_loss(folder: Path, text: str, batch_size: int, seq_len: int, seed: int) -> float:
    """transformers' next-token loss of the folder's model on a run's first batch: the text
    through the folder's tokenizer, rows at NumPy's draws."""
    ids = np.asarray(folder_ids(folder, text))
    starts = np.random.default_rng([seed, 0]).integers(0, ids.size - seq_len, size=batch_size)
    batch = torch.from_numpy(ids[starts[:, None] + np.arange(seq_len + 1)])  # (B, T+1)
    with torch.no_grad():
        return float(hf_models.load(folder)(batch, labels=batch).loss)


def test_fine_tune_a_hugging_face_model_resume_it_and_export_it(hf_folder, tmp_path):
    """JAX fine-tunes the folder's model on the text through its tokenizer (the first loss is
    transformers' on the first batch) and torch resumes the run; `generate --checkpoint` prints
    the text that transformers and its tokenizer generate greedily from the exported folder."""
    args = ["--hf", hf_folder, *HF_ROWS, "--steps", 4, "--log-every", 2, "--out", "ft"]
    trained = ok(cli("jax", *args, "--sample-tokens", 4, "--prompt", PROMPT, cwd=tmp_path))
    text = DEFAULT_TEXT.read_text(encoding="utf-8")
    assert f"{len(folder_ids(hf_folder, text)):,} tokens of text" in trained.stdout
    assert f"--- 4 tokens after '{PROMPT}' ---\n{PROMPT}" in trained.stdout
    _, steps = history(tmp_path / "ft")
    expected = first_batch_loss(hf_folder, text, batch_size=4, seq_len=32, seed=0)
    assert abs(steps[0]["loss"] - expected) <= 1e-5, (steps[0]["loss"], expected)

    ok(cli("torch", "--resume", "ft", "--steps", 6, "--log-every", 2, cwd=tmp_path))
    _, resumed = history(tmp_path / "ft")
    assert resumed[:4] == steps and [r["step"] for r in resumed] == list(range(1, 7))
    assert resumed[-1]["loss"] < resumed[0]["loss"]
    new = ["--max-new-tokens", 8]
    checkpoint = ["--checkpoint", "ft.safetensors"]
    generated = ok(parity("generate", *checkpoint, "--prompt", PROMPT, *new, cwd=tmp_path))

    exporting = ["convert", tmp_path / "ft.safetensors", tmp_path / "out", "--to", "hf"]
    assert parity_cli.main(list(map(str, exporting))) == 0
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((hf_folder / "config.json").read_text())
    assert exported["eos_token_id"] == original["eos_token_id"] == 0
    model = hf_models.load(tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == folder_ids(hf_folder, PROMPT)
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    expected_text = tokenizer.decode(tokens[0], skip_special_tokens=True)
    assert generated.stdout.startswith(expected_text + "\n"), (generated.stdout, expected_text)
    assert generated.stdout.count("\n") == expected_text.count("\n") + 2  # the text, the speed


def hf_bad_folders(folder: Path, tmp: Path) -> dict[str, Path]:
    """Copies of `folder`: without tokenizer.json, and with a tokenizer of 500 words."""
    no_tokenizer = shutil.copytree(folder, tmp / "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    big = shutil.copytree(folder, tmp / "big-vocabulary")
    words = {f"w{i}": i for i in range(500)}
    Tokenizer(tokenizer_models.WordLevel(words, "w0")).save(str(big / "tokenizer.json"))
    return {"no_tokenizer": no_tokenizer, "big": big}


HF_BAD = [  # (flags, message); FOLDER, NO_TOKENIZER and BIG are replaced by the folders
    (["--hf", "FOLDER", "--d-model", 64, "--moe"], "config.json); drop --d-model --moe"),
    (["--hf", "NO_TOKENIZER"], "has no tokenizer.json: fine-tuning reads --data through"),
    (["--hf", "BIG"], "the tokenizer has 500 tokens, more than the model's vocab_size 384"),
    (["--hf", "MISSING"], "not a directory (a Hugging Face checkpoint folder)"),
    (["--resume", "ft", "--hf", "FOLDER"], "only --steps may extend it); drop --hf"),
    (["--hf", "FOLDER", "--seq-len", 256], "seq_len 256 exceeds the model's max_seq_len 128"),
]


@pytest.mark.parametrize("flags, message", HF_BAD)
def test_hf_bad_combinations_are_one_line_errors(hf_folder, tmp_path, capsys, flags, message):
    folders = {"FOLDER": hf_folder, "MISSING": tmp_path / "missing"}
    folders.update({k.upper(): v for k, v in hf_bad_folders(hf_folder, tmp_path).items()})
    before = files_under(tmp_path)
    argv = [folders.get(flag, flag) if isinstance(flag, str) else flag for flag in flags]
    assert run_cli("torch", *argv, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(ERROR) and message in err[0], err
    assert files_under(tmp_path) == before  # nothing written
