"""The gateway's own endpoints (`portal/`, `ops/`, `signals/endpoints.py`) see it only through
`services.Services`.

Read from the source, every import counted (in functions and under TYPE_CHECKING too): an
endpoint that imports `app.py` or names `Gateway` would tie the endpoints and the gateway into
one import circle again (issue 15), and reach past the protocol into the gateway's lifecycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ztgateway"
ENDPOINT_FOLDERS = ("portal", "ops")


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path, module: str) -> set[str]:
    """Every module `path` (module `module`) imports, resolved to absolute names (a name
    imported from a package counts as that package's submodule, as `from . import x` means)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module.split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


def _names(path: Path) -> set[str]:
    """Every identifier the module uses, annotations in strings included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.alias):
            found.add(node.asname or node.name.rpartition(".")[2])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                found |= {n.id for n in ast.walk(ast.parse(node.value, mode="eval"))
                          if isinstance(n, ast.Name)}  # fmt: skip
            except SyntaxError:
                pass
    return found


ENDPOINT_MODULES = sorted(
    [
        *(p for folder in ENDPOINT_FOLDERS for p in (PACKAGE / folder).rglob("*.py")),
        PACKAGE / "signals" / "endpoints.py",  # the identity provider's, under /.ztgw/ too
    ]
)


def test_the_endpoint_folders_hold_the_endpoints() -> None:
    names = {_module(p) for p in ENDPOINT_MODULES}
    for expected in (
        "ztgateway.portal.signin",
        "ztgateway.portal.mfa",
        "ztgateway.portal.webauthn",
        "ztgateway.portal.device",
        "ztgateway.portal.forms",
        "ztgateway.ops.app",
        "ztgateway.ops.admin",
        "ztgateway.ops.decide",
        "ztgateway.ops.forward_auth",
    ):
        assert expected in names


@pytest.mark.parametrize("path", ENDPOINT_MODULES, ids=_module)
def test_an_endpoint_module_never_imports_the_gateway(path: Path) -> None:
    imported = _imported(path, _module(path))
    assert not {m for m in imported if m == "ztgateway.app" or m.startswith("ztgateway.app.")}
    assert "Gateway" not in _names(path)


def test_the_check_sees_an_import_of_the_gateway(tmp_path: Path) -> None:
    """The readers above find what they look for, wherever it hides (else the test could not
    fail)."""
    probe = tmp_path / "probe.py"
    for source in (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..app import Gateway\n",
        "def f() -> None:\n    from .. import app\n",
        "import ztgateway.app\n",
    ):
        probe.write_text(source)
        assert "ztgateway.app" in _imported(probe, "ztgateway.portal.probe"), source
    probe.write_text("def f(gw: 'Gateway') -> None: ...\n")
    assert "Gateway" in _names(probe)
    probe.write_text("from ..services import Services\ndef f(gw: Services) -> None: ...\n")
    assert "ztgateway.app" not in _imported(probe, "ztgateway.portal.probe")
    assert "Gateway" not in _names(probe)
