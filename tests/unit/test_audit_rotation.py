"""Retention: archiving old audit events keeps the whole chain verifiable."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ztgateway.audit import AuditLog, rotate, verify_db

OLD = datetime.now(UTC) - timedelta(days=100)


async def write(db: Path, start: int, count: int, *, when: datetime | None = None) -> None:
    log = AuditLog(db)
    await log.start()
    for i in range(start, start + count):
        event = {
            "decision_id": f"d{i}",
            "route": "app",
            "result": {"verdict": "allow", "reason": "policy-allowed"},
        }
        if when is not None:
            event["timestamp"] = (when + timedelta(seconds=i)).isoformat().replace("+00:00", "Z")
        log.record(event)
    await log.close()


async def test_rotation_archives_old_events_and_the_chain_still_verifies(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    await write(db, 0, 5, when=OLD)
    await write(db, 5, 3)
    result = await rotate(db, tmp_path / "archive", before=datetime.now(UTC) - timedelta(days=30))
    assert (result.archived, result.through_seq) == (5, 5)
    assert result.archive is not None and result.archive.exists()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT MIN(seq), COUNT(*) FROM audit_events").fetchone() == (6, 3)
    verdict = await verify_db(db)
    assert verdict.ok, verdict.problem
    assert verdict.checked == 8
    assert (await verify_db(db, archives=False)).ok


async def test_writing_continues_the_chain_after_everything_was_archived(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    await write(db, 0, 4, when=OLD)
    await rotate(db, tmp_path / "archive", before=datetime.now(UTC))
    await write(db, 4, 2)
    with sqlite3.connect(db) as conn:
        assert [r[0] for r in conn.execute("SELECT seq FROM audit_events ORDER BY seq")] == [5, 6]
    assert (await verify_db(db)).ok


async def test_an_edited_or_missing_archive_is_detected(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    await write(db, 0, 4, when=OLD)
    await write(db, 4, 1)
    result = await rotate(db, tmp_path / "archive", before=datetime.now(UTC) - timedelta(days=1))
    assert result.archive is not None
    text = result.archive.read_text()
    result.archive.write_text(text.replace('"d1"', '"dX"'))
    verdict = await verify_db(db)
    assert not verdict.ok and "modified" in verdict.problem
    result.archive.unlink()
    verdict = await verify_db(db)
    assert not verdict.ok and "missing" in verdict.problem


async def test_deleting_rows_behind_a_forged_checkpoint_is_detected(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    await write(db, 0, 6)
    with sqlite3.connect(db) as conn:
        last_hash = conn.execute("SELECT hash FROM audit_events WHERE seq = 3").fetchone()[0]
        conn.execute("DELETE FROM audit_events WHERE seq <= 3")
        conn.execute(
            "INSERT INTO audit_checkpoints VALUES (3, ?, ?, ?, ?)",
            (last_hash, str(tmp_path / "never-written.jsonl"), "0" * 64, "2026-01-01T00:00:00Z"),
        )
    verdict = await verify_db(db)
    assert not verdict.ok and "missing" in verdict.problem


async def test_nothing_to_rotate(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    await write(db, 0, 2)
    result = await rotate(db, tmp_path / "archive", before=datetime.now(UTC) - timedelta(days=1))
    assert result.archived == 0
    assert (await verify_db(db)).ok
