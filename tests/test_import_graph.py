"""The package's import graph has no cycle.

Every ``import`` statement of every module counts, at module level and inside functions, relative
and absolute; ``from . import x`` names the submodule ``x`` where one exists. Importing ``a.b.c``
runs the ``__init__`` of ``a.b`` first, so that is an edge too, unless the importer lives inside
``a.b`` (then that ``__init__`` is already running).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "atrc_exp"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _modules() -> dict[str, Path]:
    """Dotted name -> source file of every module of the package (packages by their ``__init__``)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that importing ``name`` (or calling any of its functions) imports."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    edges = set()
    own = set(_ancestors(name)) | {name}
    for target in targets:
        for module in [*_ancestors(target), target]:
            if module in modules and module not in own:
                edges.add(module)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_sees_every_kind_of_import():
    """Function-level, relative, ``from . import submodule`` and ``__init__`` edges are all found."""
    graph = import_graph()
    assert len(graph) > 40
    assert "atrc_exp.config" in graph["atrc_exp"]  # package __init__, relative
    assert "atrc_exp.models.model" in graph["atrc_exp.models"]
    # an import inside a function: atrc_exp.build_model imports models
    assert "atrc_exp.models" in graph["atrc_exp"]


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
