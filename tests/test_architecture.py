"""The layout's rules (docs/architecture.md), checked on the source: every module imports, the packages' imports
run one way (no cycles), only ``vlprompt.cli`` builds parsers, nothing below it imports it, and the datasets know
nothing of models.

The graph is read with ``ast`` from every ``import``/``from`` of ``vlprompt.*`` anywhere in a module, including
imports inside functions (the library imports heavy modules late, so a cycle may only show there). A node of the
package graph is a top-level subpackage or module of ``vlprompt`` (``vlprompt.engine``, ``vlprompt.weights``);
imports inside one node are not edges.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import vlprompt

PACKAGE_ROOT = Path(vlprompt.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def imported_modules(name: str, path: Path) -> set[str]:
    """Every module name ``name`` imports, at any depth of the file (absolute names; relative ones resolved)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # ``from vlprompt.x import y`` may import the submodule ``vlprompt.x.y``
            found.update(f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in MODULES)
    return found


def node_of(module: str) -> str | None:
    """The top-level part of ``vlprompt`` a module belongs to (``vlprompt.engine.config`` -> ``engine``); None for
    the package root and modules outside vlprompt."""
    parts = module.split(".")
    if parts[0] != "vlprompt" or len(parts) < 2:
        return None
    return parts[1]


def package_graph(modules: dict[str, Path]) -> dict[str, dict[str, list[str]]]:
    """node -> {imported node: [the importing modules, as 'module -> imported module']}."""
    graph: dict[str, dict[str, list[str]]] = {}
    for name, path in modules.items():
        source = node_of(name)
        if source is None:
            continue
        graph.setdefault(source, {})
        for imported in imported_modules(name, path):
            target = node_of(imported)
            if target is not None and target != source:
                graph[source].setdefault(target, []).append(f"{name} -> {imported}")
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of the graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, {})):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if state.get(target) is None:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def explain_cycle(graph: dict[str, dict[str, list[str]]], cycle: list[str]) -> str:
    return "; ".join(f"{a} -> {b} ({graph[a][b][0]})" for a, b in zip(cycle, cycle[1:]))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    if name.endswith("__main__"):
        pytest.skip("an entry point: importing it runs nothing, but it is only ever run")
    importlib.import_module(name)


def test_packages_import_one_way():
    graph = package_graph(MODULES)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between packages: " + explain_cycle(graph, cycle)


def test_the_cycle_check_finds_a_cycle():
    """The check above can fail: a sweep that imports the command line, as sweep.py once did, is a cycle."""
    graph = package_graph(MODULES)
    graph.setdefault("experiments", {}).setdefault("cli", []).append("vlprompt.experiments.sweep -> vlprompt.cli.train")
    cycle = find_cycle(graph)
    assert cycle is not None and "cli" in cycle and "experiments" in cycle


def test_nothing_outside_cli_imports_cli():
    offenders = [f"{name} -> {imported}" for name, path in MODULES.items() if node_of(name) != "cli"
                 for imported in imported_modules(name, path) if node_of(imported) == "cli"]
    assert offenders == []


def test_only_cli_builds_parsers():
    offenders = [name for name, path in MODULES.items() if node_of(name) != "cli"
                 and any(module == "argparse" or module.startswith("argparse.")
                         for module in imported_modules(name, path))]
    assert offenders == []


def test_data_knows_nothing_of_models():
    models = {"methods", "engine", "backbone", "weights", "prompts", "ot", "experiments", "inference", "cli"}
    offenders = [f"{name} -> {imported}" for name, path in MODULES.items() if node_of(name) == "data"
                 for imported in imported_modules(name, path) if node_of(imported) in models]
    assert offenders == []
