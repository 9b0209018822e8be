"""Development tooling stays aside: nothing the gateway runs imports `ztgateway.dev`.

The dev package holds an unencrypted CA key layout, a published PKCS#12 password, a token issuer
that mints any identity and an OpenID Provider without lockout. Only the command line may reach it
(`ztgateway certs`, `token issue`, `dev-idp`, `dev-ssf`, `policy test` with token claims); a
gateway module that imported it would ship that code on the request path.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ztgateway"
# The command line wires the dev commands; the dev package may import itself.
MAY_IMPORT_DEV = ("dev", "commands", "cli.py")


def _imports(source: str, package: list[str]) -> set[str]:
    """Absolute names of every module `source` (in `package`) imports, in functions too."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def _package_of(path: Path) -> list[str]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return parts[:-1]


def _reaches_dev(names: set[str]) -> set[str]:
    return {n for n in names if n == "ztgateway.dev" or n.startswith("ztgateway.dev.")}


def test_no_gateway_module_imports_the_dev_package() -> None:
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] in MAY_IMPORT_DEV:
            continue
        if dev := _reaches_dev(_imports(path.read_text(), _package_of(path))):
            offenders[str(path.relative_to(PACKAGE.parent))] = sorted(dev)
    assert offenders == {}


def test_the_check_sees_relative_absolute_and_in_function_imports() -> None:
    source = (
        "import ztgateway.dev.ssf\n"
        "from ztgateway.clock import ManualClock\n"
        "def f():\n"
        "    from ..dev import pki\n"
        "    from ..dev.tokens import issue_token\n"
    )
    assert _reaches_dev(_imports(source, ["ztgateway", "stages"])) == {
        "ztgateway.dev",
        "ztgateway.dev.pki",
        "ztgateway.dev.ssf",
        "ztgateway.dev.tokens",
        "ztgateway.dev.tokens.issue_token",
    }


def test_running_the_gateway_loads_no_dev_module() -> None:
    probe = (
        "import sys, ztgateway.app, ztgateway.process.workers\n"
        "print(sorted(m for m in sys.modules if m.startswith('ztgateway.dev')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
