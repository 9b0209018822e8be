"""The package as someone outside the repository gets it: a wheel that installs and runs.

Also holds the lock files to their promise: every pin carries hashes, and the locks agree with
each other and with pyproject.toml.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from ztgateway import __version__

REPO = Path(__file__).resolve().parents[2]
LOCKS = REPO / "requirements"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


def _pins(lock: Path) -> dict[str, str]:
    return {
        name.lower().replace("_", "-"): version for name, version in _PIN.findall(lock.read_text())
    }


def test_a_wheel_builds_installs_and_reports_its_version(tmp_path: Path) -> None:
    # Built from a copy, so setuptools' build/ and egg-info never land in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(
        REPO / "ztgateway", src / "ztgateway", ignore=shutil.ignore_patterns("__pycache__")
    )
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("ztgateway-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(f"ztgateway-{__version__}.dist-info/METADATA").decode()
    assert f"ztgateway-{__version__}.dist-info/licenses/LICENSE" in names
    assert "ztgateway/py.typed" in names
    # The portal's templates, stylesheet and script are package data: every one in the
    # checkout ships.
    portal = Path(__file__).resolve().parents[2] / "ztgateway" / "portal"
    shipped = [
        f"ztgateway/portal/{p.relative_to(portal).as_posix()}"
        for p in [
            *portal.glob("templates/*.html"),
            *portal.glob("static/*"),
            portal / "webauthn.js",
        ]
    ]
    assert len(shipped) > 10 and not [n for n in shipped if n not in names]
    # Every module ships: a folder without __init__.py is not a package setuptools finds.
    package = portal.parent
    modules = [f"ztgateway/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")]
    assert not [n for n in modules if n not in names]
    assert "License-Expression: Apache-2.0" in metadata
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]

    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    # The installed copy, not the checkout, answers: its dependencies come from this venv.
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [str(target / "bin" / "ztgateway"), "--version"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"ztgateway {__version__}"
    # The device agent's own command (what deploy/systemd/ztgateway-agent.service runs) reads
    # this machine from the installed copy.
    agent = subprocess.run(
        [str(target / "bin" / "ztgateway-agent"), "report", "--dry-run", "--config", "/dev/null"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(agent.stdout)
    assert report["platform"] == "linux" and report["agent_version"] == __version__
    entry_points = (
        zipfile.ZipFile(wheel).read(f"ztgateway-{__version__}.dist-info/entry_points.txt").decode()
    )
    assert "ztgateway-agent = ztgateway.agent.cli:main" in entry_points
    where = subprocess.run(
        [sys.executable, "-c", "import ztgateway; print(ztgateway.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert where.stdout.strip().startswith(str(target))
    # The installed copy renders a page from its own templates (a refusal page, with the
    # stylesheet it names served from its own package data).
    page = subprocess.run(
        [
            sys.executable,
            "-c",
            "from ztgateway.portal.branding import PortalConfig\n"
            "from ztgateway.portal.render import render, static_asset, stylesheet_path\n"
            "look = PortalConfig(name='Acme')\n"
            "print(render('signed_out.html', look, title='Signed out', decision_id='d1'))\n"
            "print(len(static_asset(stylesheet_path(look), look)[0]))\n",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert "<title>Signed out – Acme</title>" in page.stdout
    assert int(page.stdout.strip().splitlines()[-1]) > 1000


def test_every_pin_in_the_locks_has_a_hash() -> None:
    for lock in (LOCKS / "runtime.txt", LOCKS / "dev.txt"):
        text = lock.read_text()
        blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n\n", 1)[-1])
        pinned = [b for b in blocks if _PIN.match(b)]
        assert pinned, lock
        unhashed = [b.split()[0] for b in pinned if "--hash=sha256:" not in b]
        assert unhashed == [], f"{lock.name}: pins without a hash"
        assert not re.search(r"^-e |^--index-url|^--find-links|^file:", text, re.MULTILINE)


def test_the_dev_lock_runs_the_same_gateway_as_the_runtime_lock() -> None:
    runtime, dev = _pins(LOCKS / "runtime.txt"), _pins(LOCKS / "dev.txt")
    assert {name: dev.get(name) for name in runtime} == runtime


def test_the_runtime_lock_covers_every_dependency_and_nothing_for_tests() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = _pins(LOCKS / "runtime.txt")
    wanted = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert wanted <= set(runtime)
    tools = {
        re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower()
        for d in project["optional-dependencies"]["dev"]
    }
    assert not tools & set(runtime), "test and lint tools belong in the dev lock only"
