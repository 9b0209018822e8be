"""config/gateway.example.toml says it lists every key: the loader itself is asked which keys it
reads, table by table, while it loads the example, and each must be in the example (set, or
shown commented out where only one of several alternatives can be set)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Certs
from ztgateway.config import load_config
from ztgateway.configreader import Table

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "gateway.example.toml"
# Tables whose keys are names the operator chooses (zones, weights, claims to match...): the
# example shows some, and the loader reads whatever is there.
OPEN_TABLES = {
    "oidc.<provider>.required_claims",
    "zones",
    "risk.weights",
    "posture.min_os_version",
    "routes[].policy.claims",
    "upstreams",
    "issuers",
}


def _normal(where: str) -> str:
    """Indices of [[routes]] and the names of [oidc.NAME] providers are the operator's."""
    return re.sub(r"^oidc\.[^.]+", "oidc.<provider>", re.sub(r"\[\d+\]", "[]", where))


def documented_keys(text: str) -> set[tuple[str, str]]:
    """(table path, key) for every key set or shown commented out (`# key = …`) in the file."""
    out: set[tuple[str, str]] = set()
    table = ""
    for line in text.splitlines():
        header = re.match(r"^\s*(\[\[?)([^\]]+)\]\]?", line)
        if header:
            name = header.group(2).strip()
            if header.group(1) == "[[":
                table = name + "[]"
            else:
                parent = name.split(".")[0]
                # [routes.policy] after [[routes]] belongs to that route.
                table = (parent + "[]" + name[len(parent) :]) if parent == "routes" else name
            # A table is a key of the tables around it: [a.b.c] documents a.b's "c", a's "b"...
            parts = table.split(".")
            for i in range(len(parts)):
                out.add((_normal(".".join(parts[:i])), parts[i].removesuffix("[]")))
            continue
        key = re.match(r"^\s*#?\s*([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
        if key:
            out.add((_normal(table), key.group(1)))
    return out


@pytest.fixture
def example(certs: Certs, tmp_path: Path) -> Path:
    """The example where its relative paths resolve: config/ beside certs/."""
    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "gateway.example.toml"
    shutil.copy(EXAMPLE, path)
    shutil.copytree(certs.dir, tmp_path / "certs")
    (tmp_path / "certs" / "oidc-client-secret").write_text("secret-from-a-file\n")
    (tmp_path / "certs" / "oidc-client-secret-partners").write_text("another-secret\n")
    shutil.copy(certs.ca, tmp_path / "certs" / "idp-ca.pem")
    return path


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, set[str], set[str]]]]:
    """Every table the loader finishes: its path, the keys it read, the keys it was given."""
    seen: list[tuple[str, set[str], set[str]]] = []
    done = Table.done

    def recording_done(self: Table) -> None:
        seen.append((_normal(self.where), set(self._read), set(self.data)))
        done(self)

    monkeypatch.setattr(Table, "done", recording_done)
    yield seen


def test_the_example_lists_every_key_the_loader_accepts(
    example: Path, reads: list[tuple[str, set[str], set[str]]]
) -> None:
    config = load_config(example)
    documented = documented_keys(EXAMPLE.read_text())
    missing = set()
    empty_tables = set()
    for where, read, given in reads:
        if where in OPEN_TABLES or (
            any(where.startswith(t + ".") for t in ("upstreams", "issuers"))
            and where.count(".") == 1
        ):
            continue
        if not given:
            empty_tables.add(where or "(top level)")
        for key in read:
            if (where, key) not in documented:
                missing.add(f"[{where}] {key}")
    assert missing == set(), "keys the loader reads that the example does not show"
    assert empty_tables == set(), "tables the loader reads that the example leaves out"
    assert config.oidc.names == ("corp-sso", "partners")
    assert config.routes[-1].policy.providers == ("corp-sso",) or any(
        r.policy.providers == ("corp-sso",) for r in config.routes
    )


def test_the_check_sees_a_missing_key(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace("login = ", "# (removed) login: ")
    documented = documented_keys(text)
    assert ("routes[].policy", "login") not in documented
    assert ("routes[].policy", "login") in documented_keys(EXAMPLE.read_text())
    assert ("oidc.<provider>.claims", "groups") in documented_keys(EXAMPLE.read_text())
    assert ("issuers.corp", "jwks_file") in documented_keys(EXAMPLE.read_text())
