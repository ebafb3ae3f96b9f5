"""The shape of core/: no import cycles, between modules or between its parts (subpackages and
top-level modules), and no imports of the service or its frameworks.

Imports inside functions count too (grimp sees them): one that closes a cycle only hides it.
"""

from __future__ import annotations

import grimp
import pytest

SERVICE = ("api", "worker", "domain", "fastapi", "sqlalchemy", "celery")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("core", include_external_packages=True, cache_dir=None)


def _cycle(nodes: set[str], edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, as the list of nodes along it (first == last), or None."""
    state: dict[str, str] = {}  # node -> "open" while on the DFS path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(nodes):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def _core_modules(graph: grimp.ImportGraph) -> set[str]:
    return {m for m in graph.modules if m == "core" or m.startswith("core.")}


def test_no_module_imports_itself_through_others(graph: grimp.ImportGraph) -> None:
    modules = _core_modules(graph)
    edges = {m: graph.find_modules_directly_imported_by(m) & modules for m in modules}
    cycle = _cycle(modules, edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_cycle_between_the_parts_of_core(graph: grimp.ImportGraph) -> None:
    """Each subpackage (intake, graph, importance, surgery, ...) and each top-level module is one
    part; the parts form layers, so that each can be read knowing only those below it."""

    def part(module: str) -> str:
        return ".".join(module.split(".")[:2])

    modules = _core_modules(graph) - {"core"}  # the package's own __init__ is the public API, above all parts
    edges: dict[str, set[str]] = {}
    for module in modules:
        for imported in graph.find_modules_directly_imported_by(module) & modules:
            if part(imported) != part(module):
                edges.setdefault(part(module), set()).add(part(imported))
    cycle = _cycle({part(m) for m in modules}, edges)
    assert cycle is None, "cycle between parts of core: " + " -> ".join(cycle or [])


def test_core_imports_nothing_of_the_service(graph: grimp.ImportGraph) -> None:
    imported = {
        name for module in _core_modules(graph) for name in graph.find_modules_directly_imported_by(module)
    }
    assert not {name for name in imported if name.split(".")[0] in SERVICE}
