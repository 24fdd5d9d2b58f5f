"""Fixtures and settings shared by the test modules."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# XLA compilations of the session on disk, shared by every JAX function the tests build: a new
# jax.jit of a computation already compiled, in this process or in a command-line subprocess
# the tests start (they inherit the environment), loads it instead of compiling it again.
CACHE_FOLDER = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """A compilation cache for the session: the caller's (`.ci/run` shares one with `python -m
    parity`), or a fresh folder removed at the end."""
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        folder = config.stash[CACHE_FOLDER] = tempfile.mkdtemp(prefix="jax-compilation-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = folder


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per core, at most 8 (each holds torch, JAX and compiled code)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, 8))


def pytest_unconfigure(config: pytest.Config) -> None:
    """The session's compilation cache removed."""
    folder = config.stash.get(CACHE_FOLDER, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one intra-op thread (no spinning threads on a busy CPU).
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch  # here, not at the top: the JAX-only tests never import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
