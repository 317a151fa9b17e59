"""The import graph of the project's own modules: no cycles, and kernels/ stands alone.

The graph is built statically from the source (``ast``), so it sees every import a module can
run: module-level ones and those inside functions (which hide cycles from a plain
``import``), plus ``importlib.import_module("<constant>")``. Imports under
``if TYPE_CHECKING:`` are left out, as they never run. An edge goes to the most specific
project module named (``from cs336 import ops`` is an edge to ``cs336.ops``); the implicit
import of a parent package is not an edge, as Python has it initialised before the child.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cs336", "kernels")


def module_names(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Every module of ``packages`` under ``root``: dotted name -> file."""
    names = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The most specific project module that the dotted ``name`` names (None if none)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> dict[str, int]:
    """The project modules that ``module`` imports: imported module -> first line number."""
    is_package = path.name == "__init__.py"
    found: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        target = _resolve(name, known)
        if target is not None and target != module:
            found.setdefault(target, line)

    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                add(f"{base}.{alias.name}" if base else alias.name, node.lineno)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            add(node.args[0].value, node.lineno)
    return found


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, dict[str, int]]:
    known = module_names(root, packages)
    return {name: imports_of(name, path, known) for name, path in known.items()}


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle path (first module repeated at the end) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm; the graph has ~100 nodes
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, {})):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)

    cycles = []
    for component in sorted(components):
        members = set(component)
        start = component[0]
        # Shortest way back to `start` inside the component (breadth first).
        parent: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in parent:
            following = []
            for node in frontier:
                for succ in sorted(graph[node]):
                    if succ in members and succ not in parent:
                        parent[succ] = node
                        following.append(succ)
            frontier = following
        path = [start]
        while path[-1] != start or len(path) == 1:
            path.append(parent[path[-1]])
        cycles.append(path[::-1])
    return cycles


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:], strict=False)]
    return "\n    ".join(steps)


def test_graph_sees_module_and_function_level_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n")
    (pkg / "sub" / "c.py").write_text("import importlib\nx = importlib.import_module('pkg.a')\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.b": 1}
    assert graph["pkg.b"] == {"pkg.sub.c": 2}
    assert graph["pkg.sub.c"] == {"pkg.a": 2}
    assert graph["pkg.d"] == {}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]


def test_graph_covers_the_project():
    graph = import_graph()
    # Known edges, one module-level and one inside a function: the walk reaches both kinds.
    assert "cs336.ops" in graph["cs336.layers"]
    assert any(target.startswith("kernels.") or target == "kernels" for target in graph["cs336.ops"])


def test_no_import_cycles():
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, f"{len(cycles)} import cycle(s) among cs336/kernels modules:\n    " + "\n  and\n    ".join(
        _describe(cycle, graph) for cycle in cycles
    )


def test_kernels_import_nothing_of_cs336():
    graph = import_graph()
    offending = [
        f"{module} (line {line}) imports {target}"
        for module, targets in sorted(graph.items())
        if module == "kernels" or module.startswith("kernels.")
        for target, line in sorted(targets.items())
        if target == "cs336" or target.startswith("cs336.")
    ]
    assert not offending, "kernels/ must stay Triton only (shapes come from its caller):\n    " + "\n    ".join(
        offending
    )
