"""The package's layout: every module imports, no import circle among torchsage's modules, and no
module of one subpackage reaching into another subpackage's private (underscore) modules or names.

The import graph is read from the source with :mod:`ast`, imports inside functions included (a
lazy import that closes a circle is still a circle in the design). An edge goes from a module to
the module it names (``from a.b import c`` -> ``a.b.c`` when that is a module, else ``a.b``);
the implicit import of parent packages is not an edge, so ``torchsage/__init__.py`` re-exporting
its subpackages does not count as a circle with each of them.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import torchsage

SRC = Path(torchsage.__file__).parent

# Modules that need an optional dependency at import time: imported only when it is installed.
OPTIONAL = {"torchsage.integrations.lightning": "lightning", "torchsage.integrations.hf": "transformers"}


def _module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = ("torchsage", *path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


MODULES = _module_names()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) for every torchsage import in module ``name``."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, None, node.lineno) if sub in MODULES else (base, alias.name, node.lineno))
    return [(m, n, line) for m, n, line in found if m == "torchsage" or m.startswith("torchsage.")]


def _graph() -> dict[str, set[str]]:
    return {name: {m for m, _, _ in _imports(name) if m in MODULES and m != name} for name in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _unit(name: str) -> str:
    """The subpackage (or top-level module) a module belongs to: ``torchsage.dg.train`` -> ``dg``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


# ``__main__`` modules run their command when imported: their imports are in the graph only.
@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.endswith(".__main__")))
def test_every_module_imports(name):
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name])
    importlib.import_module(name)


def test_cycle_finder_finds_a_circle():
    # the checker itself, on a graph with and without a circle
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_private_imports_across_subpackages():
    crossings = []
    for name in MODULES:
        for module, imported, line in _imports(name):
            if module not in MODULES or _unit(module) == _unit(name):
                continue
            private_module = any(p.startswith("_") for p in module.split(".")[1:])
            private_name = imported is not None and imported.startswith("_") and not imported.endswith("__")
            if private_module or private_name:
                what = module + (f".{imported}" if imported else "")
                crossings.append(f"{MODULES[name].relative_to(SRC.parent)}:{line} imports {what}")
    assert not crossings, "\n".join(crossings)
