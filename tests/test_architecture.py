"""The package's shape, checked: the core imports no model library, adapters import the core and never
each other, and no module imports another that (directly or not) imports it back, counting imports
inside functions too (only ``if TYPE_CHECKING:`` blocks, which never run, are left out)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "saeuron_plugin"
ADAPTERS = ("diffusion", "vlm", "comfyui")


def subpackage(name: str) -> str:
    """``saeuron_plugin.<this>.…`` ("" for the package itself)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """Package modules ``name`` imports anywhere in its body (functions included, TYPE_CHECKING not)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def target(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package.split(".")
        base = base[: len(base) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                where = target(node)
                found.update(
                    f"{where}.{a.name}" if f"{where}.{a.name}" in MODULES else where for a in node.names
                )
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    visit([child])

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_core_imports_no_model_library():
    core = sorted(n for n in MODULES if n.startswith("saeuron_plugin.sae"))
    libraries = ("diffusers", "transformers", "comfy")
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in core)
        + f"print(sorted(m for m in sys.modules if m.split('.')[0] in {libraries!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
    for name in core:  # and no import of an adapter, even a lazy one
        assert not {
            m
            for m in GRAPH[name]
            if subpackage(m) in (*ADAPTERS, "shapescanvas", "benchmark", "tuning", "attacks", "cli")
        }, name


def test_adapters_import_the_core_never_each_other():
    for name, deps in GRAPH.items():
        if subpackage(name) in ADAPTERS:
            others = {d for d in deps if subpackage(d) in ADAPTERS and subpackage(d) != subpackage(name)}
            assert not others, f"{name} imports {sorted(others)}"


def test_no_import_cycle():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            strongconnect(v)
    assert not cycles, cycles


def test_the_cycle_check_sees_a_cycle():
    """The checker itself: a lazy import back is a cycle."""
    saved = dict(GRAPH)
    try:
        GRAPH["saeuron_plugin.sae.config"] = GRAPH["saeuron_plugin.sae.config"] | {"saeuron_plugin.sae.model"}
        try:
            test_no_import_cycle()
        except AssertionError as err:
            assert "saeuron_plugin.sae.model" in str(err)
        else:
            raise AssertionError("a config -> model -> config cycle went unnoticed")
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff_is_clean(command):
    """The house style holds in CI too (``make lint`` / the pre-commit hooks run the same two commands)."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff is not None, "ruff is a dev dependency: pip install -e '.[dev]'"
    done = subprocess.run([ruff, *command], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
