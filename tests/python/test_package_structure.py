"""The package's names and module graph: one public class per name, old names as deprecated
aliases, and no import cycle between turboquant's own modules."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import turboquant as tq
from turboquant.kv_cache import CompressedKVCache


def test_old_builder_cache_name_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match=r"use turboquant\.CompressedKVCache"):
        old = tq.TurboQuantKVCache
    assert old is CompressedKVCache
    assert isinstance(tq.KVCacheBuilder().with_head_dim(64).build(), old)


def test_old_name_by_from_import_warns_too():
    with pytest.warns(DeprecationWarning, match="CompressedKVCache"):
        from turboquant import TurboQuantKVCache  # noqa: F401


def test_new_name_and_other_attributes_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tq.CompressedKVCache is CompressedKVCache
        assert "CompressedKVCache" in tq.__all__ and "TurboQuantKVCache" not in tq.__all__
    with pytest.raises(AttributeError, match="no_such_name"):
        tq.no_such_name  # noqa: B018


def test_importing_the_package_does_not_warn():
    code = "import warnings; warnings.simplefilter('error'); import turboquant, turboquant.builder"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- static checks over python/turboquant/**/*.py (ast: nothing is imported) ---------------

PKG = Path(__file__).resolve().parents[2] / "python" / "turboquant"
# Submodules that are not .py files (the compiled core): importing them is no edge.
EXTENSIONS = {"turboquant._core"}
# Cycles that exist today: none (the first-use self-test, which runs the store built on the
# kernels, lives above both in turboquant.gpu_path). A new cycle fails.
KNOWN_CYCLES: list[list[str]] = []


def _module_name(path: Path) -> str:
    parts = ("turboquant",) + path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _public_classes(modules: dict[str, Path]) -> dict[str, list[str]]:
    """Class name -> the modules that define it (top-level classes not starting with _)."""
    found: dict[str, list[str]] = {}
    for name, path in modules.items():
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                found.setdefault(node.name, []).append(name)
    return found


def _imports(name: str, path: Path, modules) -> set[str]:
    """The package's own modules that ``name`` imports anywhere in its file (function-level
    imports included): ``from turboquant import x`` names module turboquant.x when there is
    one, else the package itself."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in {*modules, *EXTENSIONS}
                       else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    modules = _modules() if modules is None else modules
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
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
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_two_public_classes_share_a_name():
    shared = {c: m for c, m in _public_classes(_modules()).items() if len(m) > 1}
    assert not shared, f"public classes defined in more than one module: {shared}"


def test_the_package_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    assert "turboquant.calibrate_base" in graph["turboquant.calibrate_heads"]
    assert "turboquant" not in graph["turboquant.kv_cache"]  # `from turboquant import _core`
    cycles = import_cycles(graph)
    new = [c for c in cycles if c not in KNOWN_CYCLES]
    assert not new, f"import cycles between turboquant's modules: {new}"
    gone = [c for c in KNOWN_CYCLES if c not in cycles]
    assert not gone, f"these cycles are gone: remove them from KNOWN_CYCLES: {gone}"
    assert not [c for c in cycles if "turboquant.calibrate" in c]


def test_the_structure_checks_can_fail(tmp_path):
    """The checks above on a small package that breaks both rules."""
    pkg = tmp_path / "turboquant"
    (pkg / "sub").mkdir(parents=True)
    files = {"__init__.py": "from turboquant.a import A\n",
             "a.py": "class A:\n    def f(self):\n        from turboquant import b\n",
             "b.py": "from . import c\nclass A:\n    pass\n",
             "c.py": "import turboquant.sub.d\n",
             "sub/__init__.py": "",
             "sub/d.py": "from ..a import A\n"}
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    modules = {".".join(("turboquant",) + p.relative_to(pkg).with_suffix("").parts)
               .removesuffix(".__init__"): p for p in sorted(pkg.rglob("*.py"))}
    assert _public_classes(modules)["A"] == ["turboquant.a", "turboquant.b"]
    graph = import_graph(modules)
    assert graph["turboquant.a"] == {"turboquant.b"}  # the function-level import counts
    assert graph["turboquant.sub.d"] == {"turboquant.a"}  # relative, two levels up
    assert import_cycles(graph) == [["turboquant.a", "turboquant.b", "turboquant.c",
                                     "turboquant.sub.d"]]
