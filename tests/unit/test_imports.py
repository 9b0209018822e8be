"""The package's import graph: every module imports on its own, and no two modules import
each other, directly or round a circle (aiohttp's test_circular_imports.py, done statically).

A cycle held together by an in-function import still ties the modules in it: neither can be
read, tested or moved without the other, and the in-function import hides it from a reader and
from the linter. So the static test counts every runtime import, at module level or inside a
function; only `if TYPE_CHECKING:` blocks are left out (they never run).
"""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ztgateway"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package under its own name)."""
    out: dict[str, Path] = {}
    for f in sorted(root.rglob("*.py")):
        parts = f.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _type_checking_only(tree: ast.Module) -> set[int]:
    """The ids of the nodes inside `if TYPE_CHECKING:` bodies (`else:` branches do run)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).split(".")[-1] == "TYPE_CHECKING":
            for stmt in node.body:
                skipped.update(id(n) for n in ast.walk(stmt))
    return skipped


def _absolute(module: str | None, level: int, current: str, is_package: bool) -> str:
    if level == 0:
        return module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules `name` imports when it runs (an imported name that is itself a
    module counts as that module; anything else, as the module it comes from)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skipped = _type_checking_only(tree)
    is_package = path.name == "__init__.py"
    targets: list[str] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, name, is_package)
            targets.append(base)
            targets.extend(f"{base}.{alias.name}" for alias in node.names)
    out: set[str] = set()
    for dotted in targets:
        target = dotted
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = module_files(root)
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


@functools.cache
def package_graph() -> dict[str, set[str]]:
    return import_graph()


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            advanced = False
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def test_the_cycle_finder_finds_a_circle_through_an_in_function_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("from . import a\n")
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import x\n"
    )
    (pkg / "e.py").write_text("from .d import y\n")
    assert cycles(import_graph(pkg)) == [frozenset({"pkg.a", "pkg.sub.b", "pkg.c"})]


def test_the_package_has_no_import_cycle() -> None:
    found = set(cycles(package_graph()))
    circles = sorted(sorted(c) for c in found)
    assert not circles, f"import cycles (runtime imports, in-function ones included): {circles}"


# Each module is imported in a child forked from one interpreter that has loaded the package's
# third-party dependencies but none of its own modules: every child starts the package from
# nothing, as a fresh interpreter would, without paying for aiohttp and cryptography each time.
_DRIVER = textwrap.dedent(
    """
    import importlib, os, sys, traceback
    for dep in sys.argv[2].split(","):
        try:
            importlib.import_module(dep)
        except Exception:
            pass
    assert not [m for m in sys.modules if m == "ztgateway" or m.startswith("ztgateway.")]
    failed = 0
    for name in sys.argv[1].split(","):
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                sys.stderr.write(f"--- {name}\\n{traceback.format_exc()}")
                sys.stderr.flush()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            failed += 1
    sys.exit(1 if failed else 0)
    """
)


def _third_party(files: dict[str, Path]) -> list[str]:
    names: set[str] = set()
    for path in files.values():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return sorted(n for n in names if n != "ztgateway" and n not in sys.stdlib_module_names)


def test_every_module_imports_on_its_own() -> None:
    files = module_files()
    # `python -m ztgateway` runs the command line when imported.
    names = [n for n in files if not n.endswith(".__main__")]
    assert len(names) > 50
    deps = ",".join(_third_party(files))
    batches = [names[i::2] for i in range(2)]
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DRIVER, ",".join(batch), deps],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for batch in batches
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [0] * len(procs), "".join(errors)


@pytest.mark.parametrize("stage", ["request", "identity", "device", "risk", "session", "policy"])
def test_a_stage_imports_no_other_stage(stage: str) -> None:
    """Stages import only downward (context, decision, store, config...), never each other:
    what two stages share lives below them."""
    graph = package_graph()
    others = {
        f"ztgateway.stages.{s}"
        for s in ("request", "identity", "device", "risk", "session", "policy")
    }
    name = f"ztgateway.stages.{stage}"
    assert not graph[name] & (others - {name})
    assert not any(n.startswith("ztgateway.stages.") and n != name for n in graph[name] - others)
