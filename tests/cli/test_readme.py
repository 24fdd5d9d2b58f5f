"""README.md's commands and Python snippets, run as a reader pastes them.

Every ```python block runs as a script (`python -c`) and every ```bash block as a bash script
(`set -e`: every line must succeed), in README order, in one scratch copy of the working tree
(as a fresh clone would be). The convention for blocks too slow to run, written in README.md's
Markdown source right before the block:

    <!-- not run in tests: why -->
    <!-- test instead: a cheaper command -->      (any number of these, run in its place)

After each block, no file of the copy has changed: README's commands only add files (runs/,
block.safetensors, ...), they never overwrite a file of the repository. (A later command may
rewrite what an earlier one wrote, as resuming a run does.)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
LANGUAGES = {"python": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
NOT_RUN = re.compile(r"<!--\s*not run in tests:(.*?)-->")
INSTEAD = re.compile(r"<!--\s*test instead:(.*?)-->")
# what a fresh clone does not have: version control, environments, caches, run outputs
NOT_COPIED = {".git", ".venv", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "results"}
SECONDS = 900  # per block: the slowest runs JAX compiles on a loaded 2-core machine


@dataclass(frozen=True)
class Block:
    """One fenced code block of README.md and what the tests run for it."""

    line: int  # of the opening fence, 1-based
    language: str  # "python" or "bash"
    code: str
    not_run: str | None  # the reason given, when marked
    instead: tuple[str, ...]  # commands run in its place

    @property
    def name(self) -> str:
        return f"line{self.line}-{self.language}"


def readme_blocks(text: str) -> list[Block]:
    """The ```python and ```bash blocks of `text`, each with the markers right before it."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w+)\s*", lines[i])
        if fence is None or fence.group(1) not in LANGUAGES:
            i += 1 + _skip_plain_fence(lines, i)
            continue
        end = lines.index("```", i + 1)
        markers = _markers_before(lines, i)
        reasons = [m.group(1).strip() for line in markers if (m := NOT_RUN.search(line))]
        instead = tuple(m.group(1).strip() for line in markers if (m := INSTEAD.search(line)))
        code = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append(Block(i + 1, LANGUAGES[fence.group(1)], code, _one(reasons, i), instead))
        i = end + 1
    return blocks


def _skip_plain_fence(lines: list[str], i: int) -> int:
    """Lines to skip past a fenced block of another language (its content is not Markdown)."""
    if not lines[i].startswith("```"):
        return 0
    return lines.index("```", i + 1) - i


def _markers_before(lines: list[str], i: int) -> list[str]:
    """The HTML comment lines directly above line i (blank lines between them allowed)."""
    markers = []
    j = i - 1
    while j >= 0 and (lines[j].strip() == "" or lines[j].lstrip().startswith("<!--")):
        markers.insert(0, lines[j])
        j -= 1
    return markers


def _one(reasons: list[str], i: int) -> str | None:
    if len(reasons) > 1:
        raise ValueError(f"README.md line {i + 1}: one 'not run in tests' marker per block")
    return reasons[0] if reasons else None


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Clone:
    """A copy of the working tree, and the sha256 of each of its files when copied."""

    path: Path
    digests: dict[str, str]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Clone:
    """A copy of the working tree without what a fresh clone lacks."""
    target = tmp_path_factory.mktemp("readme") / "twin-block"
    shutil.copytree(
        ROOT,
        target,
        ignore=lambda _, names: [n for n in names if n in NOT_COPIED or n.endswith(".egg-info")],
    )
    return Clone(target, file_digests(target))


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in folder.rglob("*")
        if path.is_file()
    }


def run_in(folder: Path, language: str, code: str) -> subprocess.CompletedProcess:
    """Run a README block in `folder` with this interpreter's python (and its scripts) first
    on PATH, importing the packages of `folder`."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(folder)
    env.setdefault("MPLBACKEND", "Agg")
    argv = [sys.executable, "-c", code] if language == "python" else ["bash", "-e", "-c", code]
    return subprocess.run(
        argv, cwd=folder, env=env, capture_output=True, text=True, timeout=SECONDS
    )


def test_readme_has_the_blocks_and_markers_it_is_tested_by():
    languages = [block.language for block in BLOCKS]
    assert languages.count("python") >= 4 and languages.count("bash") >= 3
    for block in BLOCKS:
        assert block.not_run != "", f"{block.name}: 'not run in tests' needs a reason"
        assert block.not_run is not None or not block.instead, (
            f"{block.name}: 'test instead' without 'not run in tests'"
        )


# The blocks that run, as written or through their "test instead" commands (an outline marked
# "not run in tests" with no such command names its reason, checked above).
RUN_BLOCKS = [block for block in BLOCKS if block.not_run is None or block.instead]


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[block.name for block in RUN_BLOCKS])
def test_readme_block_runs_and_overwrites_no_file(clone, block):
    scripts = [block.code] if block.not_run is None else list(block.instead)
    language = block.language if block.not_run is None else "bash"
    for script in scripts:
        done = run_in(clone.path, language, script)
        assert done.returncode == 0, f"{script}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        assert "Traceback" not in done.stderr, done.stderr
    now = file_digests(clone.path)
    changed = sorted(name for name, digest in clone.digests.items() if now.get(name) != digest)
    assert changed == [], f"README's commands changed or removed files of the clone: {changed}"


def test_pytest_prints_its_closing_summary_line():
    """README's `pytest` ends with the "N passed in S s" line (pyproject's addopts)."""
    test_file = "tests/torch/test_torch_cache.py"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", test_file],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SECONDS,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"=+ \d+ passed in [\d.]+s(?: \(\d+:\d\d:\d\d\))? =+", last), last


@pytest.mark.parametrize("module", ["decode", "all"])
def test_benchmark_help_names_the_command_to_type(module):
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SECONDS,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m benchmarks.{module} ")


def test_readme_and_help_point_into_the_repository():
    """The design is docs/design.md; nothing points outside the repository."""
    assert (ROOT / "docs" / "design.md").is_file()
    packages = ("twin_core", "torch_block", "jax_block", "parity", "benchmarks", "tests")
    sources = [path for package in packages for path in (ROOT / package).rglob("*.py")]
    for path in [README, ROOT / "pyproject.toml", *ROOT.glob("docs/*.md"), *sources]:
        if path == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8")
        assert "../shared" not in text, path
        assert "DESIGN.md" not in text, path


def test_ci_sets_up_with_the_quick_start_line_on_public_indexes():
    """.ci/run evaluates the Quick start's set-up line (the same command it reads), and that line
    takes torch from PyTorch's CPU index, pinned to the CPU build."""
    quick_start = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    setup = [line for line in quick_start.splitlines() if line.startswith("python -m venv ")]
    assert len(setup) == 1, setup
    ci = (ROOT / ".ci" / "run").read_text()
    read_setup = "sed -n '/^## Quick start/,/^## /p' README.md | grep -m1 '^python -m venv '"
    done = subprocess.run(
        ["bash", "-c", read_setup],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SECONDS,
    )
    assert done.stdout.strip() == setup[0]
    assert read_setup in ci
    assert 'eval "$setup"' in ci
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in setup[0]
    assert "-c constraints-cpu.txt" in setup[0]
    pins = (ROOT / "constraints-cpu.txt").read_text().split()
    assert "torch==2.13.0+cpu" in pins
