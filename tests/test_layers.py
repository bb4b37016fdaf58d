"""The layer contract in pyproject.toml: it holds, it names every module, and no module of
the project imports (at any depth, inside a function too) a module that imports it back."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fastmbv1", "pipelines")
# The one place where project modules are imported inside functions: the command line's
# dispatch, so that `fastmbv1 COMMAND` loads only what COMMAND needs.
LAZY_DISPATCH = {"fastmbv1/cli.py"}


def contract(kind: str) -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (found,) = (c for c in config["contracts"] if c["type"] == kind)
    return found


def modules() -> set[str]:
    """Every module of the project, packages' ``__init__`` by their package's name."""
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def test_lint_imports_keeps_every_contract():
    done = subprocess.run(
        [Path(sys.executable).with_name("lint-imports"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_every_module_is_in_a_layer():
    named = {m.strip() for layer in contract("layers")["layers"] for m in layer.split(":")}
    # The root package holds only the public API (fastmbv1.load), above every layer.
    unplaced = {
        m
        for m in modules() - {"fastmbv1"}
        if not any(m == n or m.startswith(n + ".") for n in named)
    }
    assert not unplaced, f"name these in pyproject.toml's layers contract: {sorted(unplaced)}"


def test_no_module_imports_a_module_that_imports_it_back():
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    circles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                circles.append(" -> ".join((importer, *back)))
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_project_modules_are_imported_at_the_top_but_in_the_cli_dispatch():
    inside_functions = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = str(path.relative_to(ROOT))
            if name in LAZY_DISPATCH:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for inner in ast.walk(node):
                    targets = (
                        [inner.module or ""]
                        if isinstance(inner, ast.ImportFrom)
                        else [a.name for a in inner.names]
                        if isinstance(inner, ast.Import)
                        else []
                    )
                    if any(t.split(".")[0] in PACKAGES for t in targets):
                        inside_functions.append(f"{name}:{inner.lineno}")
    assert not inside_functions, f"import these at the top: {inside_functions}"
