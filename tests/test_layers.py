"""The package's layers: models are plain nn.Modules that import nothing of training, and
no two modules import each other at load time."""

from __future__ import annotations

import ast
from pathlib import Path

import herd

PACKAGE = Path(herd.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _herd_imports(path: Path, top_level_only: bool) -> set[str]:
    """herd modules `path` imports (anywhere, or at load time only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("herd"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("herd")}
    return found


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_models_import_nothing_of_training_data_or_entry_points():
    allowed = ("herd.models", "herd.errors")
    offenders = {
        name: sorted(i for i in _herd_imports(path, False) if not i.startswith(allowed))
        for name, path in MODULES.items()
        if name.startswith("herd.models")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_no_import_cycles_at_load_time():
    graph = {
        name: {i for i in _herd_imports(path, True) if i in MODULES and i != name}
        for name, path in MODULES.items()
    }
    # a package's __init__ re-exports its modules: an edge into a package is one into its init
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
