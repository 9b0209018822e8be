"""What the wheel ships is what the package reads: pyproject's package-data names every data
file under ztgateway/ and nothing that is not there (a folder moved without its glob would
install a gateway with no templates, or ship a promise of files that do not exist)."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ztgateway"


def globs() -> list[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    patterns: list[str] = data["tool"]["setuptools"]["package-data"]["ztgateway"]
    return patterns


def data_files() -> list[str]:
    return sorted(
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    )


def test_every_data_file_is_shipped() -> None:
    unshipped = [f for f in data_files() if not any(fnmatch.fnmatch(f, g) for g in globs())]
    assert unshipped == []


def test_every_package_data_glob_names_files_that_exist() -> None:
    files = data_files()
    assert [g for g in globs() if not fnmatch.filter(files, g)] == []
