"""The package graph of servematrix: no import cycle between packages, base modules below every
stage, and each stage importing only the stages before it.

A package is a first-level part of servematrix: a subpackage (config, checkpoint, serve, ...) or a
top-level module (paths, versions, record, ...). Every import counts, wherever it is written: at
module level, inside a function (the lazy imports that keep a command light), under
`if TYPE_CHECKING:`, relative (`from . import x`, `from ..config import y`) or absolute. An import
hidden in a function is still a dependency: the module cannot work without the other package.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = "servematrix"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / ROOT

# The base layer: top-level modules every stage may use. They import each other only, never a
# stage (a base module that needed a stage would make that stage a base too).
BASE = {"errors", "redact", "paths", "files", "versions", "stats", "gpus", "record", "record_gsm8k"}

# The stages, first to last: a stage imports only the base and the stages before it. This is the
# code's order, written down as data (README "Layout", docs/design.md). report comes before run:
# run's session appends the history row and writes the reports through report/, while report only
# reads summaries and never starts anything. sweep generates entries from mirror's twins and runs
# them through run/, so it sits after both; the CLI is last.
STAGES = ["config", "checkpoint", "mirror", "serve", "check", "report", "run", "sweep", "cli"]


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    """Dotted name of a source file under `root`'s parent, and whether it is a package's __init__."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The absolute dotted names an import statement names (for `from X import a, b`: X.a and X.b,
    since a and b may be submodules)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        # relative: level 1 is this module's package (a package's __init__ is its own package)
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module or ""
    return [origin] + [f"{origin}.{alias.name}" for alias in node.names if alias.name != "*"]


def package_edges(root: Path) -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> the file:line of every import making that edge."""
    name = root.name
    first_level = {p.stem if p.is_file() else p.name for p in root.iterdir()
                   if (p.is_file() and p.suffix == ".py" and p.stem != "__init__")
                   or (p.is_dir() and (p / "__init__.py").is_file())}
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        module, is_package = _module_name(path, root)
        parts = module.split(".")
        source = parts[1] if len(parts) > 1 else name
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = {t.split(".")[1] for t in _imported(node, module, is_package)
                       if t.split(".")[0] == name and len(t.split(".")) > 1 and t.split(".")[1] in first_level}
            for target in sorted(targets - {source}):
                edges[(source, target)].append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return edges


def cycles(edges: dict[tuple[str, str], list[str]]) -> list[list[str]]:
    """The strongly connected components of more than one package (Tarjan), each sorted."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
        graph[b]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _describe(component: list[str], edges: dict[tuple[str, str], list[str]]) -> str:
    inside = [(a, b) for (a, b) in sorted(edges) if a in component and b in component]
    return "{" + ", ".join(component) + "}: " + "; ".join(f"{a} -> {b} ({', '.join(edges[(a, b)])})"
                                                         for a, b in inside)


@pytest.fixture(scope="module")
def edges():
    return package_edges(PACKAGE_DIR)


def test_the_package_graph_has_no_cycle(edges):
    found = cycles(edges)
    assert not found, "package cycles:\n" + "\n".join(_describe(c, edges) for c in found)


def test_base_modules_import_no_stage(edges):
    wrong = {k: v for k, v in edges.items() if k[0] in BASE and k[1] not in BASE}
    assert not wrong, "base modules importing a stage: " + "; ".join(
        f"{a} -> {b} ({', '.join(locs)})" for (a, b), locs in sorted(wrong.items()))


def test_config_is_a_leaf_stage(edges):
    wrong = {k: v for k, v in edges.items() if k[0] == "config" and k[1] not in BASE}
    assert not wrong, "config imports another stage: " + "; ".join(
        f"{b} ({', '.join(locs)})" for (_, b), locs in sorted(wrong.items()))


def test_each_stage_imports_only_the_base_and_the_stages_before_it(edges):
    rank = {stage: i for i, stage in enumerate(STAGES)}
    wrong = {(a, b): locs for (a, b), locs in edges.items()
             if a in rank and b not in BASE and (b not in rank or rank[b] >= rank[a])}
    assert not wrong, "imports against the stage order " + " < ".join(STAGES) + ": " + "; ".join(
        f"{a} -> {b} ({', '.join(locs)})" for (a, b), locs in sorted(wrong.items()))


def test_every_package_is_placed_in_the_base_or_the_stage_order():
    """A new package must be given its place, or the order test would not look at it."""
    packages = {p.stem if p.is_file() else p.name for p in PACKAGE_DIR.iterdir()
                if (p.is_file() and p.suffix == ".py" and p.stem != "__init__")
                or (p.is_dir() and (p / "__init__.py").is_file())}
    assert packages - BASE - set(STAGES) == set()


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_cycle_through_a_lazy_relative_import_is_found(tmp_path):
    """The analysis itself: a cycle closed only by an import inside a function, written relative,
    is reported with the file and line of each import."""
    pkg = tmp_path / "pkg"
    _write(pkg, {
        "__init__.py": "",
        "a/__init__.py": "",
        "a/one.py": "from pkg.b.two import f\n",
        "b/__init__.py": "",
        "b/two.py": "def f():\n    from ..a import one\n    return one\n",
        "c.py": "import pkg.a.one\n",
    })
    edges = package_edges(pkg)
    assert edges[("b", "a")] == ["pkg/b/two.py:2"]
    assert cycles(edges) == [["a", "b"]]
    assert "b -> a (pkg/b/two.py:2)" in _describe(["a", "b"], edges)


def test_an_acyclic_graph_with_a_type_checking_import_has_no_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    _write(pkg, {
        "__init__.py": "",
        "base.py": "import os\n",
        "a/__init__.py": "from pkg import base\n",
        "b/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import x\n",
    })
    edges = package_edges(pkg)
    assert set(edges) == {("a", "base"), ("b", "a")}
    assert cycles(edges) == []
