"""The SQLite layout of the decision log, shared by the writer and the readers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final

import aiosqlite

from .chain import GENESIS_HASH, PROBLEM_COLUMNS, index_columns, normalize_ts

SCHEMA_VERSION: Final = 1

SELECT_ROWS: Final = (
    'SELECT seq, decision_id, ts, "user", device, route, verdict, reason, client_ip, event, '
    "prev_hash, hash FROM audit_events ORDER BY seq"
)

SCHEMA: Final = (
    """
    CREATE TABLE IF NOT EXISTS audit_events (
        seq INTEGER PRIMARY KEY,
        decision_id TEXT NOT NULL UNIQUE,
        ts TEXT NOT NULL,
        "user" TEXT,
        device TEXT,
        route TEXT,
        verdict TEXT,
        reason TEXT,
        client_ip TEXT,
        event TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    )
    """,
    # decision_id is indexed by its UNIQUE constraint; a second index would only cost writes.
    'CREATE INDEX IF NOT EXISTS audit_events_user ON audit_events ("user")',
    "CREATE INDEX IF NOT EXISTS audit_events_device ON audit_events (device)",
    "CREATE INDEX IF NOT EXISTS audit_events_route ON audit_events (route)",
    "CREATE INDEX IF NOT EXISTS audit_events_reason ON audit_events (reason)",
    "CREATE INDEX IF NOT EXISTS audit_events_ts ON audit_events (ts)",
    # Retention: events moved to archive files leave a checkpoint, the anchor from which the
    # chain in the database continues (see rotate()).
    """
    CREATE TABLE IF NOT EXISTS audit_checkpoints (
        through_seq INTEGER PRIMARY KEY,
        last_hash TEXT NOT NULL,
        archive TEXT NOT NULL,
        archive_sha256 TEXT NOT NULL,
        archived_at TEXT NOT NULL
    )
    """,
)

INSERT: Final = (
    'INSERT INTO audit_events (seq, decision_id, ts, "user", device, route, verdict, reason, '
    "client_ip, event, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

ROWS_PER_INSERT: Final = 100
"""Rows per multi-row INSERT (12 parameters each; SQLite allows 32,766 since 3.32)."""
_ROW: Final = INSERT[INSERT.index("(?") :]
_HEAD: Final = INSERT[: INSERT.index("(?")]
_INTO: Final = INSERT[: INSERT.index("VALUES")]


_HEAD_SEQ: Final = (
    "coalesce((SELECT seq FROM audit_events ORDER BY seq DESC LIMIT 1),"
    " (SELECT through_seq FROM audit_checkpoints ORDER BY through_seq DESC LIMIT 1), 0)"
)
_HEAD_HASH: Final = (
    "coalesce((SELECT hash FROM audit_events ORDER BY seq DESC LIMIT 1),"
    " (SELECT last_hash FROM audit_checkpoints ORDER BY through_seq DESC LIMIT 1), ?)"
)
_HEAD_CONDITION: Final = _HEAD_SEQ + " = ? AND " + _HEAD_HASH + " = ?"
ROWS_ON_HEAD: Final = 2_000
"""Most rows `insert_on_head` takes in one statement (12 parameters each, and SQLite allows
32,766)."""


def insert_on_head(rows: list[tuple[Any, ...]], seq: int, last_hash: str) -> tuple[str, list[Any]]:
    """One INSERT of every row that inserts them only if the chain's head is still (seq,
    last_hash), as `chain_head` reads it; `rowcount` then tells which happened.

    Why: a single statement is its own transaction, so appending a batch takes one trip to
    the SQLite thread instead of about a dozen (BEGIN IMMEDIATE, reading the head, the inserts,
    COMMIT). Each trip costs the writer task two turns of a busy event loop, and at saturation
    the writer fell thousands of events behind. The head condition keeps what BEGIN IMMEDIATE
    gave: another process appending to the same file in between makes this insert nothing,
    and the writer then takes the locked path."""
    if not 0 < len(rows) <= ROWS_ON_HEAD:
        raise ValueError(f"insert_on_head takes 1 to {ROWS_ON_HEAD} rows, not {len(rows)}")
    values = ", ".join([_ROW] * len(rows))
    # Only constants and placeholders are joined: every value is a bound parameter.
    sql = _INTO + "SELECT * FROM (VALUES " + values + ") WHERE " + _HEAD_CONDITION  # noqa: S608
    return sql, [*(value for row in rows for value in row), seq, GENESIS_HASH, last_hash]


def insert_statements(rows: list[tuple[Any, ...]]) -> Iterator[tuple[str, list[Any]]]:
    """`rows` as multi-row INSERTs of up to ROWS_PER_INSERT rows: (SQL, flat parameters).

    Why not executemany: it binds and steps one row at a time, and the sqlite3 module releases
    and takes back the GIL around every step. With the event loop running in the other thread,
    every row then became a GIL handoff between the two (measured under `bench.ablate ztgw_cert
    insert`: 334 µs of CPU per request with executemany, 302 with these). One statement per
    hundred rows hands the GIL over once per hundred."""
    for start in range(0, len(rows), ROWS_PER_INSERT):
        chunk = rows[start : start + ROWS_PER_INSERT]
        sql = _HEAD + ", ".join([_ROW] * len(chunk))
        yield sql, [value for row in chunk for value in row]


def create_private(path: Path) -> None:
    # Decision logs name people and devices: create the file owner-only before SQLite does
    # (its -wal and -shm files copy the database file's mode).
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


async def chain_head(db: aiosqlite.Connection) -> tuple[int, str]:
    async with db.execute("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1") as cur:
        row = await cur.fetchone()
    if row is not None:
        return int(row[0]), str(row[1])
    # Everything may have been archived: continue from the last checkpoint, not from genesis.
    async with db.execute(
        "SELECT through_seq, last_hash FROM audit_checkpoints ORDER BY through_seq DESC LIMIT 1"
    ) as cur:
        row = await cur.fetchone()
    return (0, GENESIS_HASH) if row is None else (int(row[0]), str(row[1]))


async def rollback(db: aiosqlite.Connection) -> None:
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            await db.execute("ROLLBACK")


# --------------------------------------------------------------------------- readers


@contextlib.asynccontextmanager
async def read_only(db_path: Path) -> AsyncIterator[aiosqlite.Connection]:
    # Checked first because connecting would silently create an empty database to "verify".
    if not await asyncio.to_thread(db_path.is_file):
        raise FileNotFoundError(f"no audit database at {db_path}")
    db = await aiosqlite.connect(db_path)
    try:
        await db.execute("PRAGMA query_only = ON")
        yield db
    finally:
        await db.close()


def row_problem(row: sqlite3.Row | tuple[Any, ...], event: dict[str, Any]) -> str | None:
    """Columns are outside the hash; tie them to the hashed event so search cannot be steered."""
    seq, decision_id, ts, *indexed, _text, prev, link = row
    try:
        expected_ts = normalize_ts(event.get("timestamp"))
    except ValueError:
        return PROBLEM_COLUMNS
    if (
        seq != event.get("seq")
        or prev != event.get("prev_hash")
        or link != event.get("hash")
        or decision_id != event.get("decision_id")
        or ts != expected_ts
        or tuple(indexed) != index_columns(event)
    ):
        return PROBLEM_COLUMNS
    return None
