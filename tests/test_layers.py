"""The layers of the project point down only: twin_core (standard library and NumPy) <
torch_block, jax_block (never each other) < parity's library (convert < hf < report) <
parity.cli; and no module imports, even lazily, a module that imports it back.

Imports are read from the source with `ast` (those inside functions included), then every
module is imported once to show that the reading covers what exists.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("twin_core", "torch_block", "jax_block", "parity")
TORCH = ("torch",)
JAX = ("jax", "flax", "optax", "orbax")
FORBIDDEN = {  # module prefix -> what it must not import
    "twin_core": ("torch_block", "jax_block", "parity", *TORCH, *JAX),
    "torch_block": ("jax_block", "parity", *JAX),
    "jax_block": ("torch_block", "parity", *TORCH),
    "parity.convert": ("parity.hf", "parity.report", "parity.cli"),
    "parity.hf": ("parity.report", "parity.cli"),
    "parity.report": ("parity.cli",),
    "parity.dtypes": ("parity.convert", "parity.hf", "parity.report", "parity.cli"),
    "parity.errors": ("parity.convert", "parity.hf", "parity.report", "parity.cli"),
}


def module_files() -> dict[str, Path]:
    """Every module of the project's packages: dotted name -> source file."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


MODULES = module_files()


def imports_of(name: str, path: Path) -> set[str]:
    """The modules `name` imports anywhere in its source: project modules by their own name
    (a package's, or the module's when `from package import module`), others as written."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in MODULES else source)
    return found


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_every_module_is_read_and_imports():
    assert {"twin_core.files", "parity.cli.train", "parity.report.cases.lm"} <= set(MODULES)
    for name in MODULES:
        if name != "parity.__main__":  # runs the command line
            importlib.import_module(name)
    listed = {
        info.name
        for package in PACKAGES
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}.")
    }
    assert listed <= set(MODULES)


@pytest.mark.parametrize("layer", FORBIDDEN)
def test_no_upward_import(layer):
    wrong = sorted(
        f"{name} imports {imported}"
        for name, imported_names in GRAPH.items()
        if within(name, layer)
        for imported in imported_names
        for forbidden in FORBIDDEN[layer]
        if within(imported, forbidden)
    )
    assert wrong == []


def test_no_import_circle_between_project_modules():
    edges = {name: {m for m in GRAPH[name] if m in MODULES and m != name} for name in MODULES}
    circles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for imported in sorted(edges[name]):
            if state.get(imported) == 1:
                circles.append(path[path.index(imported) :] + [imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[name] = 2

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [name])
    assert circles == []
