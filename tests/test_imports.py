"""The import graph of ``common/``, ``services/`` and ``bench/``: no cycles, and ``bench/`` never uses ``tests/``.

Every import statement counts, wherever it stands: inside a function (a lazy import
still ties the two modules together) and under ``TYPE_CHECKING`` (a type-only edge
is a design dependency all the same).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "services", "bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, module: str, modules: frozenset[str] = frozenset()) -> set[str]:
    """Every module an import statement of ``path`` names.  ``from a import b`` names ``a.b`` when that is
    one of ``modules``, else ``a`` (``b`` is then an attribute of ``a``)."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join([*package, base] if base else package)
            names.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the three packages it imports (edges to anything else are dropped)."""
    paths = {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}
    modules = frozenset(paths)
    return {module: imported_names(path, module, modules) & modules - {module} for module, path in paths.items()}


def tangles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle from the component's first module back to itself, inside the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def test_cycles_are_found_and_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert tangles(graph) == [{"a", "b", "c"}]
    assert cycle_through(graph, {"a", "b", "c"}) == ["a", "b", "c", "a"]
    assert tangles({"a": {"b"}, "b": set()}) == []


def test_relative_and_lazy_imports_are_edges(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("from . import sibling, CONSTANT\ndef f():\n    from .other import thing\n")
    assert imported_names(source, "pkg.mod", frozenset({"pkg", "pkg.sibling", "pkg.other"})) == {
        "pkg", "pkg.sibling", "pkg.other"}


def test_no_import_cycles():
    graph = import_graph()
    found = [f"{' -> '.join(cycle_through(graph, t))} (modules in the tangle: {', '.join(sorted(t))})"
             for t in tangles(graph)]
    assert not found, "import cycles:\n" + "\n".join(found)


def named_tests_modules(path: Path) -> set[str]:
    """The ``tests`` modules ``path`` imports, or names in a string such as ``python -m tests.x``'s argument."""
    imported = imported_names(path, module_name(path))
    strings = {node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
               if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    return {name for name in imported | strings if re.fullmatch(r"tests(\.\w+)*", name)}


def test_bench_does_not_use_tests():
    offenders = {module_name(p): sorted(named_tests_modules(p)) for p in sorted((REPO / "bench").rglob("*.py"))}
    offenders = {module: names for module, names in offenders.items() if names}
    assert not offenders, f"bench modules using tests: {offenders}"
