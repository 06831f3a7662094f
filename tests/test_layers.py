"""The layers: trainables -> models -> search -> ensemble, and nothing imports upward."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LAYERS = ("trainables", "models", "search", "ensemble")  # bottom to top


def _imports(path: Path) -> set[str]:
    """The project modules a file imports (at any depth: lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.split(".")[0] in LAYERS}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for layer in LAYERS:
        for path in sorted((REPO / layer).glob("*.py")):
            name = f"{layer}.{path.stem}" if path.stem != "__init__" else layer
            graph[name] = {m if m in LAYERS or m.count(".") == 1 else ".".join(m.split(".")[:2])
                           for m in _imports(path)}
    return graph


def test_nothing_imports_upward():
    upward = []
    for module, deps in _graph().items():
        own = LAYERS.index(module.split(".")[0])
        upward += [f"{module} -> {d}" for d in deps if LAYERS.index(d.split(".")[0]) > own]
    assert upward == []


def test_no_import_cycles_between_modules():
    graph = _graph()
    top_level = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    seen, on_path, cycles = set(), [], []

    def visit(m: str) -> None:
        if m in on_path:
            cycles.append(on_path[on_path.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        on_path.append(m)
        for d in sorted(top_level[m]):
            visit(d)
        on_path.pop()

    for m in sorted(top_level):
        visit(m)
    # a package's __init__ re-exporting its own modules is not a cycle worth reporting
    cycles = [c for c in cycles if len({x.split(".")[0] for x in c}) > 1 or
              not any(x in LAYERS for x in c)]
    assert cycles == []


def test_the_search_config_imports_no_torch():
    """Reading options (--help, a config file's mistakes) must not pay for torch's import."""
    code = ("import sys, search.config; "
            "print(sorted(m for m in ('torch', 'ray', 'timm', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"
