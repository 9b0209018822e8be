"""A real store for the stage tests: a SQLite file per test, read through the gateway's own
cache, on a clock that stands at `factories.NOW`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests import factories
from ztgateway.clock import ManualClock
from ztgateway.store.sqlite import SQLiteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    """An empty store."""
    s = SQLiteStore(tmp_path / "state.db", clock=ManualClock(factories.NOW))
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def alice(store: SQLiteStore) -> SQLiteStore:
    """The store as it is once alice has used the gateway: her laptop approved, her account
    knowing it, her browser session live."""
    await store.register_device(factories.device())
    await store.save_user(factories.user())
    await store.save_session(factories.session())
    return store
