"""Gateway state: `store_from_url(url)` picks the backend (sqlite:///path is the embedded default)."""

from __future__ import annotations

from pathlib import Path

from ..clock import SYSTEM_CLOCK, Clock
from .base import Device, PostureRecord, Session, Store, StoreUnavailable, UserRecord
from .sqlite import SQLiteStore

__all__ = [
    "Device",
    "PostureRecord",
    "SQLiteStore",
    "Session",
    "Store",
    "StoreUnavailable",
    "UserRecord",
    "store_from_url",
]


def store_from_url(url: str, *, base: Path, clock: Clock = SYSTEM_CLOCK) -> Store:
    """`sqlite:///relative/or/absolute.db` (relative to the config file's folder), or
    `redis://`, `rediss://`, `unix://` for state shared by many replicas."""
    if url.startswith("sqlite:///"):
        raw = url[len("sqlite:///") :]
        path = Path(raw) if raw.startswith("/") else (base / raw)
        return SQLiteStore(path.resolve(), clock=clock)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisStore

        return RedisStore(url, clock=clock)
    raise ValueError(
        f"unsupported store URL {url!r} (expected sqlite:///PATH or redis://HOST:PORT)"
    )
