"""The layers of burrow, checked on its source: sans-IO stays sans-IO, no module
imports another that imports it back, and imports point down the stack only.

The import graph is read with ``ast`` from every file under ``src/burrow``, so
it holds every import statement: at module level, under ``TYPE_CHECKING`` and
inside functions. An edge goes to the module an import names, never to the
packages above it: ``from burrow.sandbox.core import Sandbox`` in
``sandbox/__init__.py`` is an edge to ``burrow.sandbox.core`` only, and a
package that re-exports its submodules is no cycle unless a submodule imports
the package back.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# What sans-IO code must not touch: an event loop, a socket, TLS, a clock, a thread, a process.
IO_MODULES = frozenset({"asyncio", "socket", "ssl", "select", "time", "threading", "subprocess"})

WIRE_MODULES = (
    "burrow.wire.protocol",
    "burrow.wire.clienthello",
    "burrow.wire.names",
    "burrow.wire.allowlist",
    "burrow.wire.text",
)

# layer -> the parts of burrow it must not import (a part is a module or a package).
FORBIDDEN = {
    "burrow.wire": ("burrow.net", "burrow.relay", "burrow.agent", "burrow.sandbox",
                    "burrow.launch", "burrow.cli"),
    "burrow.net": ("burrow.relay", "burrow.agent", "burrow.sandbox", "burrow.launch",
                   "burrow.cli"),
    "burrow.agent": ("burrow.relay", "burrow.launch", "burrow.cli"),
    "burrow.relay": ("burrow.agent",),
}  # fmt: skip


def _package_dir() -> Path:
    spec = importlib.util.find_spec("burrow")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


PACKAGE = _package_dir()


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def in_part(module: str, part: str) -> bool:
    return module == part or module.startswith(part + ".")


@dataclass(frozen=True)
class Import:
    """One import of a burrow module: where it is written, and how."""

    source: str
    target: str
    line: int
    kind: str  # "module level", "TYPE_CHECKING" or "in a function"

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line}, {self.kind})"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement in ``tree`` with where it sits."""

    def walk(node: ast.AST, kind: str) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, kind
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from walk(child, "in a function")
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                inner = "TYPE_CHECKING" if kind == "module level" else kind
                for statement in child.body:
                    yield from walk(ast.Module(body=[statement], type_ignores=[]), inner)
                for statement in child.orelse:
                    yield from walk(ast.Module(body=[statement], type_ignores=[]), kind)
            else:
                yield from walk(child, kind)

    yield from walk(tree, "module level")


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name ``from ... import`` refers to (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@dataclass
class Graph:
    modules: dict[str, Path]
    imports: list[Import]
    # module -> the top-level names of everything it imports, burrow's or not.
    external: dict[str, list[tuple[str, int, str]]]

    def edges(self) -> dict[str, set[str]]:
        edges: dict[str, set[str]] = {module: set() for module in self.modules}
        for imp in self.imports:
            edges[imp.source].add(imp.target)
        return edges


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` if it is a burrow module, else the closest burrow module above it."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def build_graph(package: Path = PACKAGE) -> Graph:
    files = sorted(package.rglob("*.py"))
    modules = {module_name(path, package): path for path in files}
    imports: list[Import] = []
    external: dict[str, list[tuple[str, int, str]]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        targets: list[tuple[str, int, str]] = []
        for node, kind in _imports(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    targets.append((alias.name, node.lineno, kind))
                continue
            base = _absolute(module, is_package, node)
            for alias in node.names:
                # `from burrow.x import y`: y is a submodule, or a name in burrow.x.
                submodule = f"{base}.{alias.name}"
                name = submodule if alias.name != "*" and submodule in modules else base
                targets.append((name, node.lineno, kind))
        external[module] = targets
        for name, line, kind in targets:
            if not in_part(name, "burrow"):
                continue
            target = _known(name, modules)
            assert target is not None, f"{module} line {line} imports {name}, which is not in src"
            if target != module:
                imports.append(Import(module, target, line, kind))
    # `from m import a, b` is one import of m, not two.
    return Graph(modules, list(dict.fromkeys(imports)), external)


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components with a cycle in them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in edges.get(node, ()):
                        found.append(sorted(component))
    return found


def a_cycle(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One shortest cycle through the component's first module, by breadth-first search."""
    start = component[0]
    members = set(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {component}")


@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph()


# -- the helpers themselves -----------------------------------------------------------


def test_tarjan_finds_cycles_and_only_cycles() -> None:
    edges = {
        "a": {"b"},
        "b": {"c"},
        "c": {"a", "d"},
        "d": {"e"},
        "e": set(),
        "f": {"f"},
        "g": {"d"},
    }
    assert sorted(strongly_connected(edges)) == [["a", "b", "c"], ["f"]]
    assert a_cycle(["a", "b", "c"], edges) == ["a", "b", "c", "a"]


def test_the_graph_reads_every_kind_of_import(graph: Graph) -> None:
    """The reader sees the imports this test is about; were it blind, nothing could fail."""
    assert "burrow.wire.protocol" in graph.modules
    assert "burrow.sandbox" in graph.modules
    kinds = {imp.kind for imp in graph.imports}
    assert {"module level", "in a function"} <= kinds
    # sandbox/__init__.py re-exports from its core module: an edge to core, not to itself.
    assert "burrow.sandbox.core" in graph.edges()["burrow.sandbox"]
    # `from burrow.wire import protocol` names the submodule, not the package.
    assert "burrow.wire.protocol" in graph.edges()["burrow.net.channel"]
    assert "burrow.wire" not in graph.edges()["burrow.net.channel"]


def test_the_graph_resolves_relative_and_conditional_imports(tmp_path: Path) -> None:
    source = textwrap.dedent(
        """
        from typing import TYPE_CHECKING
        from . import sibling
        from .. import exception
        if TYPE_CHECKING:
            from burrow.relay.server import Relay
        def f():
            import time
        """
    )
    kinds = [(type(node).__name__, kind) for node, kind in _imports(ast.parse(source))]
    assert kinds == [
        ("ImportFrom", "module level"),
        ("ImportFrom", "module level"),
        ("ImportFrom", "module level"),
        ("ImportFrom", "TYPE_CHECKING"),
        ("Import", "in a function"),
    ]
    tree = ast.parse(source)
    relative = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.level]
    assert _absolute("burrow.relay.session", False, relative[0]) == "burrow.relay"
    assert _absolute("burrow.relay.session", False, relative[1]) == "burrow"
    assert _absolute("burrow.relay", True, relative[0]) == "burrow.relay"


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = root / "burrow" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root / "burrow"


def test_a_re_export_is_no_cycle_and_importing_the_package_back_is(tmp_path: Path) -> None:
    files = {
        "__init__.py": "",
        "sub/__init__.py": "from burrow.sub.core import X\n",
        "sub/core.py": "X = 1\n",
        # Imports the package, which re-exports core: a path, not a cycle.
        "sub/cli.py": "from burrow.sub import X\nfrom burrow import sub\n",
    }
    graph = build_graph(_write_package(tmp_path / "clean", files))
    assert graph.edges()["burrow.sub"] == {"burrow.sub.core"}
    assert graph.edges()["burrow.sub.cli"] == {"burrow.sub"}
    assert strongly_connected(graph.edges()) == []

    # core itself reaching for the package that re-exports it: a real cycle.
    files["sub/core.py"] = "X = 1\ndef f():\n    from burrow.sub import X\n"
    graph = build_graph(_write_package(tmp_path / "cycle", files))
    assert strongly_connected(graph.edges()) == [["burrow.sub", "burrow.sub.core"]]


# -- (a) sans-IO ------------------------------------------------------------------------


def test_wire_imports_no_io_in_its_source(graph: Graph) -> None:
    """No module under burrow.wire names an I/O module, anywhere in its source."""
    wire = [module for module in graph.modules if in_part(module, "burrow.wire")]
    assert set(WIRE_MODULES) <= set(wire)
    offences = [
        f"{module} imports {name} (line {line}, {kind})"
        for module in wire
        for name, line, kind in graph.external[module]
        if name.split(".")[0] in IO_MODULES
    ]
    assert not offences, "\n".join(offences)


# Run with -I -S: nothing but the standard library and burrow's own source. The
# root package is stood in for by an empty one so that its __init__, which
# starts the client (asyncio and all), does not run: what is measured is what
# burrow.wire and the modules it imports pull in.
WIRE_IMPORT_PROBE = """
import sys, traceback, types

BLOCKED = frozenset({blocked!r})
attempts = []

class Block:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name + "\\n" + "".join(traceback.format_stack(limit=12)))
            raise ImportError(f"{{name}} is blocked: burrow.wire is sans-IO")
        return None

# Some are imported while Python starts (time, for one): forget them.
for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
        del sys.modules[name]
sys.meta_path.insert(0, Block)
package = types.ModuleType("burrow")
package.__path__ = [{package!r}]
sys.modules["burrow"] = package

try:
    import {modules}
finally:
    # An ImportError swallowed by a try/except still counts.
    for attempt in attempts:
        print("blocked import of", attempt)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
assert not attempts
print("ok")
"""


def test_wire_imports_no_io_when_imported() -> None:
    """Imported in a fresh interpreter with the I/O modules blocked, burrow.wire loads."""
    probe = WIRE_IMPORT_PROBE.format(
        blocked=sorted(IO_MODULES), package=str(PACKAGE), modules=", ".join(WIRE_MODULES)
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        result.stdout + result.stderr
    )


def test_the_probe_catches_an_io_import(tmp_path: Path) -> None:
    """The same probe fails on a package that imports time from a function's module."""
    fake = tmp_path / "burrow"
    (fake / "wire").mkdir(parents=True)
    (fake / "wire" / "__init__.py").write_text("")
    (fake / "wire" / "sneaky.py").write_text(
        "try:\n    import time\nexcept ImportError:\n    time = None\n"
    )
    probe = WIRE_IMPORT_PROBE.format(
        blocked=sorted(IO_MODULES), package=str(fake), modules="burrow.wire.sneaky"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "blocked import of time" in result.stdout


# -- (b) no cycles ----------------------------------------------------------------------


def test_no_import_cycles(graph: Graph) -> None:
    edges = graph.edges()
    reports = []
    for component in strongly_connected(edges):
        members = set(component)
        cycle = a_cycle(component, edges)
        inside = sorted(
            str(imp) for imp in graph.imports if imp.source in members and imp.target in members
        )
        reports.append("cycle: " + " -> ".join(cycle) + "\n  " + "\n  ".join(inside))
    assert not reports, "import cycles among burrow's modules:\n" + "\n".join(reports)


# -- (c) layer direction ----------------------------------------------------------------


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_point_down_the_layers(graph: Graph, layer: str) -> None:
    assert any(in_part(module, layer) for module in graph.modules), layer
    offences = [
        str(imp)
        for imp in graph.imports
        if in_part(imp.source, layer)
        and any(in_part(imp.target, part) for part in FORBIDDEN[layer])
    ]
    assert not offences, f"{layer} imports from a layer above it:\n" + "\n".join(offences)
