"""The package's import graph: imports only go down the layers, and there is no cycle.

Layers, bottom to top (docs/architecture.md explains each)::

    utilities -> masks -> schedule/stepping -> distributed -> layers -> surgery
    -> uncertainty -> integrations -> public API (gyrodrop/__init__) -> experiments
    -> python -m gyrodrop

Function-level imports count too: a lazy import is still a dependency, and there are no
module-level ``__getattr__`` aliases to excuse one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gyrodrop"

# (prefix of a dotted module name, layer). The longest matching prefix wins.
LAYERS: dict[str, int] = {
    "gyrodrop._validation": 0,
    "gyrodrop._modules": 0,
    "gyrodrop._guards": 0,  # what layers refuse (inputs, export, bad counters); torch only
    "gyrodrop.config": 0,  # one frozen, checked config per method (no torch)
    "gyrodrop.masks": 1,
    "gyrodrop.spatial_masks": 1,  # DropBlock's block masks over 2-d and 3-d maps
    "gyrodrop.schedule": 2,
    "gyrodrop.stepping": 2,
    "gyrodrop.distributed": 3,
    "gyrodrop.scheduled": 4,  # the base of the scheduled layers (needs distributed)
    "gyrodrop.gyro": 4,
    "gyrodrop.blockwise": 4,
    "gyrodrop.stochastic_depth": 4,
    "gyrodrop.dropblock": 4,
    "gyrodrop.surgery": 5,
    "gyrodrop.uncertainty": 6,
    "gyrodrop.integrations": 7,
    "gyrodrop": 8,  # __init__: the public API, which the harness builds on
    "gyrodrop.experiments": 9,
    "gyrodrop.__main__": 10,
}


def _layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every gyrodrop module that ``path`` imports, at any depth of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gyrodrop"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("gyrodrop"):
                continue
            # `from gyrodrop import masks` imports the submodule gyrodrop.masks.
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if _is_module(sub) else target)
    found.discard(me)
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (SRC.parent / rel).with_suffix(".py").exists() or (SRC.parent / rel).is_dir()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def test_imports_only_go_down_the_layers() -> None:
    upward = [
        f"{src} (layer {_layer(src)}) imports {dst} (layer {_layer(dst)})"
        for src, deps in _graph().items()
        for dst in sorted(deps)
        if _layer(dst) > _layer(src)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_import_graph_has_no_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)


def test_core_never_imports_the_experiment_harness() -> None:
    core = {m: d for m, d in _graph().items() if _layer(m) < LAYERS["gyrodrop.experiments"]}
    offenders = [
        m for m, deps in core.items() if any(d.startswith("gyrodrop.experiments") for d in deps)
    ]
    assert not offenders, f"core modules importing gyrodrop.experiments: {offenders}"


def test_core_docstrings_never_import_the_experiment_harness() -> None:
    """Doctests run as code too: a core example must not need the harness."""
    core = [
        p
        for p in sorted(SRC.rglob("*.py"))
        if _layer(_module_name(p)) < LAYERS["gyrodrop.experiments"]
    ]
    offenders = [str(p.relative_to(SRC)) for p in core if "gyrodrop.experiments" in p.read_text()]
    assert not offenders, f"core files naming gyrodrop.experiments: {offenders}"
