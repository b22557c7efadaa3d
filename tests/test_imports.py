"""
txlb's modules import each other without a circle.

A circle means two modules cannot be read, tested or replaced apart, and
one of them only works because the other happened to be imported first.
Imports inside functions count as much as those at the top: they are the
usual way a circle is hidden.  Imports under C{if TYPE_CHECKING:} do not,
since they never run.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import txlb

PACKAGE = Path(txlb.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _typeCheckingOnly(tree: ast.AST) -> set[int]:
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden.update(id(inner) for inner in ast.walk(node))
    return hidden


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The txlb modules that C{name} imports, each reduced to a known module."""
    tree = ast.parse(path.read_text())
    hidden = _typeCheckingOnly(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            # A package's own submodules importing it (for its re-exports) is
            # not a circle in the sense that matters here.
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def importGraph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def test_graphSeesImports():
    """The graph is real: the service imports the pool, the pool not the service."""
    graph = importGraph()
    assert "txlb.balance.pool" in graph["txlb.service.tree"]
    assert "txlb.service" not in graph["txlb.balance.pool"]


def test_noImportCircle():
    try:
        tuple(graphlib.TopologicalSorter(importGraph()).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import circle: {' -> '.join(e.args[1])}") from None


#: txlb's layers, lowest first (docs/architecture.md).  A module may import
#: its own layer and those below, never one above: what sits lower can be
#: read, tested and reused without what is built on it.
LAYERS = [
    {"txlb", "txlb.interfaces"},
    {"txlb.net"},
    {"txlb.balance"},
    {"txlb.observe"},
    {"txlb.health"},
    {"txlb.policy", "txlb.http", "txlb.cache", "txlb.tcp", "txlb.udp"},
    {"txlb.config"},
    {"txlb.control", "txlb.demo"},
    {"txlb.service", "txlb.tap", "txlb.testing", "txlb.health.testing"},
]


def layerOf(module: str) -> int:
    """The layer of C{module}: that of the longest package path that names one."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        for rank, members in enumerate(LAYERS):
            if prefix in members:
                return rank
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def test_layersKnowEveryModule():
    for module in importGraph():
        layerOf(module)


def test_layerOf():
    assert layerOf("txlb.net.splice") == 1
    assert layerOf("txlb.health._checks") == 4
    assert layerOf("txlb.health.testing") == len(LAYERS) - 1


def test_noImportUpwards():
    upwards = sorted(
        f"{module} -> {imported}"
        for module, imports in importGraph().items()
        for imported in imports
        if layerOf(imported) > layerOf(module)
    )
    assert upwards == []
