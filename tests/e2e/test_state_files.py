"""The state database holds sessions, ID tokens, devices and backup-code hashes: owner-only,
as the audit log is (issue 18, L5)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import GatewayFactory
from tests.support import Certs
from ztgateway.store.base import Session


@pytest.fixture
def usual_umask() -> Iterator[None]:
    old = os.umask(0o022)  # what most services start with: files 0644, directories 0755
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_state_database_and_its_directory_are_private(
    gateway_factory: GatewayFactory, certs: Certs, tmp_path: Path, usual_umask: None
) -> None:
    state = tmp_path / "var"
    gw = await gateway_factory({"store": {"url": f"sqlite:///{state}/state.db"}})
    now = gw.clock.time()
    await gw.store.save_session(
        Session("ck:x", "cookie", "alice", "alice-laptop", "127.0.0.1", "127.0.0.1", "ua",
                now, now, now + 60, extra={"id_token": "eyJ.secret.token"})
    )  # fmt: skip
    await gw.store.flush()
    db = state / "state.db"
    files = [db, db.with_name("state.db-wal"), db.with_name("state.db-shm")]
    assert all(f.exists() for f in files)
    assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
    assert mode(state) == 0o700


async def test_a_state_database_made_readable_before_is_tightened(
    gateway_factory: GatewayFactory, certs: Certs, tmp_path: Path, usual_umask: None
) -> None:
    state = tmp_path / "old-var"
    state.mkdir(mode=0o755)
    db = state / "state.db"
    db.touch(mode=0o644)
    await gateway_factory({"store": {"url": f"sqlite:///{db}"}})
    assert mode(db) == 0o600
    assert mode(state) & 0o007 == 0
