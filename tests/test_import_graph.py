"""Imports point down: every module of src/diffdissect stands on a floor, and may import only modules on its own
floor or below, with no cycles. Every import counts, the lazy ones inside functions included (read with `ast`,
nothing is run). docs/architecture.md draws the same floors.

A new module or package needs a line in FLOORS (the test says so); an analysis must never import the world.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "diffdissect"

# Longest matching prefix wins. Ground floor first; the package face and the CLI stand on top.
FLOORS: dict[str, int] = {
    "diffdissect.errors": 0,
    "diffdissect.runtime": 1,
    "diffdissect.atomic": 1,
    "diffdissect.stats": 1,
    "diffdissect.distributed": 1,
    "diffdissect.optim_state": 1,
    "diffdissect.options": 1,
    "diffdissect.result": 1,
    "diffdissect.devices": 1,
    "diffdissect.lock": 1,
    "diffdissect.paths": 1,
    "diffdissect.models": 2,
    "diffdissect.data": 2,
    "diffdissect.report": 2,
    "diffdissect.store": 3,
    "diffdissect.capture": 4,
    "diffdissect.probe": 5,
    "diffdissect.sae": 5,
    "diffdissect.directions": 5,
    "diffdissect.invert": 5,
    "diffdissect.intervene": 6,
    "diffdissect.world": 6,
    "diffdissect.world.demo": 7,
    "diffdissect.bench": 7,
    "diffdissect.cli": 8,
    "diffdissect.__main__": 9,
    "diffdissect": 9,  # the package face re-exports from every floor
}


def module_files(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under src/package (a package's __init__ is the package)."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: set[str], package: str) -> set[str]:
    """The package's modules that `name` imports, anywhere in the file (function bodies included)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            bases = [alias.name for alias in node.names]
            names: list[str] = []
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            bases = [base]
            names = [alias.name for alias in node.names]
        else:
            continue
        for base in bases:
            if base != package and not base.startswith(package + "."):
                continue
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            if submodules:  # `from pkg import submodule`: the submodule (and the package face) is imported
                found.update(submodules)
            if not submodules or len(submodules) < len(names):
                target = base
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                found.add(target)
    found.discard(name)
    return found


def floor_of(name: str, floors: dict[str, int]) -> int:
    best = max((prefix for prefix in floors if name == prefix or name.startswith(prefix + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{name} has no floor: add it (or its package) to FLOORS in tests/test_import_graph.py")
    return floors[best]


def check(src: Path, package: str, floors: dict[str, int]) -> tuple[list[str], list[list[str]]]:
    """(upward imports as 'a (floor) -> b (floor)', cycles as module lists)."""
    files = module_files(src, package)
    graph = {name: imports_of(name, path, set(files), package) for name, path in files.items()}
    upward = [
        f"{a} ({floor_of(a, floors)}) -> {b} ({floor_of(b, floors)})"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        if floor_of(b, floors) > floor_of(a, floors)
    ]
    # A package's face importing its own submodules is how packages work; a submodule importing its own
    # package's face is the cycle we want to see. Cycles are searched on the module graph (Tarjan).
    return upward, strongly_connected(graph)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_imports_point_down_and_have_no_cycles():
    upward, cycles = check(SRC, PACKAGE, FLOORS)
    assert not upward, "upward imports (a lower floor importing a higher one):\n" + "\n".join(upward)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_analyses_never_import_the_world():
    files = module_files(SRC, PACKAGE)
    for name, path in files.items():
        if name.split(".")[1:2] and name.split(".")[1] in {"probe", "sae", "directions", "invert"}:
            bad = {m for m in imports_of(name, path, set(files), PACKAGE) if m.startswith("diffdissect.world")}
            assert not bad, f"{name} imports the shapes world: {bad}"


def test_the_check_can_fail(tmp_path):
    """A made-up package with an upward import (lazy, inside a function) and a cycle is caught."""
    pkg = tmp_path / "pkg"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("def f():\n    from pkg.high import g\n    return g\n")
    (pkg / "low" / "b.py").write_text("from . import c\n")
    (pkg / "low" / "c.py").write_text("import pkg.low.b\n")
    (pkg / "high.py").write_text("from pkg.low.a import f\n\ndef g():\n    return f\n")
    floors = {"pkg": 9, "pkg.low": 1, "pkg.high": 2}
    upward, cycles = check(tmp_path, "pkg", floors)
    assert upward == ["pkg.low.a (1) -> pkg.high (2)"]
    assert sorted(map(tuple, cycles)) == [("pkg.high", "pkg.low.a"), ("pkg.low.b", "pkg.low.c")]
    with pytest.raises(AssertionError, match="no floor"):
        floor_of("pkg2.x", floors)
