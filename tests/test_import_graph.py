"""The dependency rules of docs/architecture.md, checked from the source with `ast`.

Every `import` statement counts: module level, inside functions (lazy imports) and under
`if TYPE_CHECKING:`. A circle hidden behind a lazy import is still a circle for a reader,
and it is the kind that turns into an ImportError when someone moves the import up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"decoding": "mtpserve.decoding", "server": "mtpserve.server",
            "loadtest": "mtpserve.loadtest"}
# Inside decoding/: a layer may import only the layers listed for it (and itself).
LAYERS = {
    "config": set(),
    "model": {"config"},
    "spec": {"config", "model"},
    "engine": {"config", "model", "spec"},
    "training": {"config", "model", "spec", "engine", "tools"},
    "tools": {"config", "model", "spec", "engine", "training"},
}


def module_name(path: Path) -> str:
    top = path.relative_to(REPO).parts[0]
    rel = path.relative_to(REPO / top).with_suffix("").parts
    parts = PACKAGES[top].split(".") + list(rel)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    mods = {}
    for top in PACKAGES:
        for path in (REPO / top).rglob("*.py"):
            mods[module_name(path)] = path
    return mods


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports (`from .x import y` counts y when y is a module)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if target in known and target != name:
                found.add(target)
            elif target.startswith("mtpserve.") and target not in known:
                # `import mtpserve.decoding.x.y` also imports the packages above it
                parent = target.rpartition(".")[0]
                if parent in known and parent != name:
                    found.add(parent)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = all_modules()
    known = set(mods)
    return {name: imported_modules(name, path, known) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of 2+ modules (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] != ["mtpserve", "decoding"] or len(parts) < 3:
        return None
    return parts[2]


def test_no_import_circles() -> None:
    # Package __init__ files are docstrings only, so a package never imports its children
    # and a circle is always between modules that a reader has to untangle.
    assert cycles(import_graph()) == []


def test_decoding_layers_import_downwards_only() -> None:
    wrong = []
    for mod, deps in import_graph().items():
        layer = layer_of(mod)
        if layer is None or layer not in LAYERS:
            continue
        for dep in deps:
            dep_layer = layer_of(dep)
            if dep_layer is None:
                wrong.append(f"{mod} -> {dep}")  # decoding/ imports server/ or loadtest/
            elif dep_layer != layer and dep_layer in LAYERS and dep_layer not in LAYERS[layer]:
                wrong.append(f"{mod} -> {dep}")
    assert wrong == []


def test_loadtest_imports_neither_engine_nor_server() -> None:
    wrong = [f"{m} -> {d}" for m, deps in import_graph().items()
             if m.startswith("mtpserve.loadtest") for d in deps
             if not d.startswith("mtpserve.loadtest")]
    assert wrong == []


def test_every_decoding_layer_is_known() -> None:
    """A new subpackage must be placed in LAYERS (and in docs/architecture.md)."""
    layers = {layer_of(m) for m in import_graph()} - {None, ""}
    assert layers <= set(LAYERS), layers - set(LAYERS)


@pytest.mark.parametrize("graph,expected", [
    ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_cycle_finder_on_hand_built_graphs(graph: dict[str, set[str]],
                                           expected: list[list[str]]) -> None:
    assert cycles(graph) == expected


def test_graph_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    """The walker must see imports inside functions and under TYPE_CHECKING."""
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\n"
                   "if TYPE_CHECKING:\n    from .kv import KV\n"
                   "def f():\n    from ..model.trunk import CausalLM\n")
    known = {"mtpserve.decoding.spec.kv", "mtpserve.decoding.model.trunk"}
    assert imported_modules("mtpserve.decoding.spec.m", src, known) == known
