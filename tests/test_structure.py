"""The house's rules, checked from the code: no import loop inside the package, the product never
imports the benchmark harness, every module imports on its own in a fresh interpreter."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "napari_register"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports (at any depth of the file: lazy imports count too)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                prefix = base[: len(base) - node.level + 1]
                mod = ".".join(prefix + ([mod] if mod else []))
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if t.split(".")[0] == "benchmarks":
                found.add(t)
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_product_module_imports_the_benchmarks():
    offenders = {m: sorted(i for i in deps if i.split(".")[0] == "benchmarks") for m, deps in _graph().items()}
    assert not {m: d for m, d in offenders.items() if d}


def test_no_import_loop_between_modules():
    # A package's __init__ importing its own sub-modules is not a loop; any other cycle is.
    graph = {m: {d for d in deps if d.split(".")[0] == "napari_register" and d not in _parents(m)}
             for m, deps in _graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import loop: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_every_module_imports_alone_in_a_fresh_interpreter():
    # each in its own interpreter, so no module leans on another having been imported first
    # the napari layer needs Qt (the napari tests cover it); __main__ modules run a command
    names = [m for m in _modules() if "._napari" not in m and not m.endswith("__main__")]
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    for k in [k for k in sys.modules if k.startswith('napari_register')]: del sys.modules[k]\n"
            "    importlib.import_module(name)\n")
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_importing_the_package_and_the_cli_help_stay_free_of_torch():
    code = ("import sys, napari_register, napari_register.cli as c\n"
            "c.build_parser()\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('napari_register'))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
