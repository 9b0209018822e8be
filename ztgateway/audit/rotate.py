"""Retention: old events move to hashed archive files; the chain stays verifiable."""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from ..clock import SYSTEM_CLOCK, Clock
from .chain import format_ts, join_lines, link_rows, now_ts, prepare_entry
from .checkpoint import CheckpointSigner
from .query import query_ts
from .store import INSERT, SCHEMA, chain_head, rollback


@dataclass(frozen=True, slots=True)
class RotateResult:
    archived: int
    archive: Path | None
    through_seq: int | None


async def rotate(
    db_path: Path,
    archive_dir: Path,
    *,
    before: datetime,
    clock: Clock = SYSTEM_CLOCK,
    signer: CheckpointSigner | None = None,
) -> RotateResult:
    """Move events older than `before` into an archive file; the chain stays verifiable.

    The oldest events (a prefix of the chain) are written to
    `archive_dir/audit-<first>-<last>.jsonl`, synced, hashed, and recorded as a checkpoint
    (last seq, last hash, file, SHA-256) in the same transaction that deletes them, so a crash
    leaves either the old state or the new one. Run it while the gateway runs (SQLite
    serialises it with the writer), e.g. daily from cron: `ztgateway audit rotate --days 90`.
    With a `signer`, the same transaction ends the chain with a signed checkpoint ("rotation"),
    so the archive and what stays in the database are vouched for at the moment they part.
    """
    cutoff = query_ts(before)
    await asyncio.to_thread(archive_dir.mkdir, parents=True, exist_ok=True)
    db = await aiosqlite.connect(db_path, timeout=30.0)
    try:
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA:
                await db.execute(statement)
            async with db.execute(
                "SELECT seq, event, hash FROM audit_events WHERE seq <= "
                "(SELECT COALESCE(MAX(seq), -1) FROM audit_events WHERE ts < ?) ORDER BY seq",
                (cutoff,),
            ) as cur:
                rows = list(await cur.fetchall())
            if not rows:
                await db.execute("ROLLBACK")
                return RotateResult(0, None, None)
            first, last, last_hash = int(rows[0][0]), int(rows[-1][0]), str(rows[-1][2])
            path = (archive_dir / f"audit-{first:012d}-{last:012d}.jsonl").resolve()
            data = join_lines(str(r[1]) for r in rows)
            await asyncio.to_thread(_write_synced, path, data)
            await db.execute(
                "INSERT INTO audit_checkpoints VALUES (?, ?, ?, ?, ?)",
                (
                    last,
                    last_hash,
                    str(path),
                    hashlib.sha256(data).hexdigest(),
                    format_ts(clock.now()),
                ),
            )
            await db.execute("DELETE FROM audit_events WHERE seq <= ?", (last,))
            if signer is not None:
                seq, prev = await chain_head(db)
                event = signer.event(
                    seq, prev, reason="rotation", timestamp=now_ts(clock.time_ns())
                )
                inserted: list[tuple[Any, ...]] = []
                link_rows([prepare_entry(event, clock.time_ns())], seq, prev, inserted, [])
                await db.executemany(INSERT, inserted)
            await db.execute("COMMIT")
        except BaseException:
            await rollback(db)
            raise
    finally:
        await db.close()
    return RotateResult(len(rows), path, last)


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
