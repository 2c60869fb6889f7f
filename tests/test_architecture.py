"""The package's layers (docs/ARCHITECTURE.md): imports run one way, no module imports itself back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "onnx_dc"
LAYERS = ["codec", "graph", "calibration", "api"]  # bottom to top
MAX_MODULE_LINES = 650


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """onnx_dc modules ``path`` imports (``from onnx_dc.x import y`` counts as x.y when y is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    known = modules()
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onnx_dc"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("onnx_dc"))
    return out


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


@pytest.mark.parametrize("module", sorted(m for m in modules() if layer_of(m) is not None))
def test_a_layer_imports_only_the_layers_below_it(module):
    own = layer_of(module)
    for imported in imports(modules()[module], top_level_only=False):
        other = layer_of(imported)
        assert imported in ("onnx_dc", "onnx_dc.errors", "onnx_dc.progress") or other is not None, f"{module} imports {imported}"
        assert other is None or other <= own, f"{module} ({LAYERS[own]}) imports {imported} ({LAYERS[other]})"


def test_no_import_circle():
    graph = {name: {i for i in imports(path, top_level_only=True) if i != name} for name, path in modules().items()}
    # a package's __init__ importing its own submodules is not a circle of code
    for name in graph:
        graph[name] = {i for i in graph[name] if not (i.startswith(name + ".") and modules()[name].name == "__init__.py")}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("module", sorted(modules()))
def test_modules_stay_short(module):
    lines = len(modules()[module].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{module}: {lines} lines; split it by what it does"


def test_codec_knows_nothing_of_onnx():
    for name, path in modules().items():
        if layer_of(name) == 0:
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                assert not any(n == "onnx" or n.startswith(("onnx.", "onnxruntime")) for n in names), name
