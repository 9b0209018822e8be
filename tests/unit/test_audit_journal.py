"""The write-ahead journal (issue 19 D2): what `record()` accepted survives a SIGKILL.

Each test that needs a crash runs a real writer in a child process, waits until it has recorded
its events, and SIGKILLs it: nothing is flushed, nothing is closed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path

import pytest

from ztgateway.audit import AuditLog, verify_db, verify_jsonl
from ztgateway.audit.journal import Journal, pending_lines
from ztgateway.audit.writer import default_journal_dir

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from ztgateway.audit import AuditLog

    async def main() -> None:
        db, first, count, flushed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
        sink = Path(sys.argv[5]) if len(sys.argv) > 5 else None
        # A batch window far longer than the test: without the journal, all would be lost.
        log = AuditLog(db, jsonl_path=sink, flush_interval=3600, batch_size=100_000)
        await log.start()
        for n in range(first, first + count):
            log.record({"decision_id": f"dec-{n}", "result": {"verdict": "allow"}})
            if n - first + 1 == flushed:
                await log.flush()
        print("recorded", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def killed_writer(
    db: Path, first: int, count: int, *, flushed: int = 0, sink: Path | None = None
) -> None:
    """A writer in another process records `count` events (the first `flushed` of them
    committed), answers "recorded", and is SIGKILLed."""
    args = [sys.executable, "-c", CHILD, str(db), str(first), str(count), str(flushed)]
    if sink is not None:
        args.append(str(sink))
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "recorded"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def ids(db: Path) -> list[str]:
    with closing(sqlite3.connect(db)) as conn:
        return [r[0] for r in conn.execute("SELECT decision_id FROM audit_events ORDER BY seq")]


async def test_events_of_a_killed_process_are_recovered_by_the_next_writer(
    tmp_path: Path,
) -> None:
    db = tmp_path / "audit.db"
    killed_writer(db, 1, 50)
    assert ids(db) == []  # nothing reached the database before the kill
    assert pending_lines(default_journal_dir(db)) == 50

    async with AuditLog(db) as log:
        assert log.stats.recovered == 50
        log.record({"decision_id": "after", "result": {"verdict": "deny"}})
    assert ids(db) == [f"dec-{n}" for n in range(1, 51)] + ["after"]
    assert (await verify_db(db)).ok
    assert list(default_journal_dir(db).iterdir()) == []  # recovered, then removed


async def test_a_running_writer_recovers_a_dead_peers_journal_without_a_restart(
    tmp_path: Path,
) -> None:
    db, sink = tmp_path / "audit.db", tmp_path / "audit.jsonl"
    async with AuditLog(db, jsonl_path=sink, recover_interval=0.05) as survivor:
        survivor.record({"decision_id": "mine-1", "result": {"verdict": "allow"}})
        await survivor.flush()
        killed_writer(db, 1, 20, sink=sink)
        for _ in range(200):
            if survivor.stats.recovered == 20:
                break
            await asyncio.sleep(0.02)
        assert survivor.stats.recovered == 20
        await survivor.flush()
    assert sorted(ids(db)) == sorted(["mine-1", *(f"dec-{n}" for n in range(1, 21))])
    assert (await verify_db(db)).ok
    lines = [json.loads(x)["decision_id"] for x in sink.read_text().splitlines()]
    assert lines == ids(db)  # the mirror got them too, once each
    assert verify_jsonl(sink).ok


async def test_events_already_committed_before_the_kill_are_not_written_twice(
    tmp_path: Path,
) -> None:
    db = tmp_path / "audit.db"
    killed_writer(db, 1, 30, flushed=10)
    assert ids(db) == [f"dec-{n}" for n in range(1, 11)]
    async with AuditLog(db) as log:
        assert log.stats.recovered == 20
    assert ids(db) == [f"dec-{n}" for n in range(1, 31)]
    assert (await verify_db(db)).ok


async def test_a_line_torn_by_the_crash_is_dropped_and_the_rest_recovered(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    killed_writer(db, 1, 5)
    (segment,) = default_journal_dir(db).glob("*.jsonl")
    with segment.open("ab") as f:
        f.write(b'{"decision_id":"torn","resu')  # a write(2) that never returned
    async with AuditLog(db) as log:
        assert log.stats.recovered == 5
    assert ids(db) == [f"dec-{n}" for n in range(1, 6)]


async def test_a_live_writers_journal_is_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    async with AuditLog(db, flush_interval=3600) as first:
        first.record({"decision_id": "first-1", "result": {"verdict": "allow"}})
        async with AuditLog(db) as second:
            assert second.stats.recovered == 0  # first holds its lock: alive
        assert ids(db) == []
    assert ids(db) == ["first-1"]


async def test_segments_are_deleted_once_their_events_are_written(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    journal_dir = default_journal_dir(db)
    log = AuditLog(db, flush_interval=0.001, batch_size=20)
    await log.start()
    assert log._journal is not None
    log._journal.segment_bytes = 2_000  # a few events per segment
    try:
        for n in range(200):
            log.record({"decision_id": f"dec-{n}", "result": {"verdict": "allow"}})
            if n % 10 == 0:
                await log.flush()
        await log.flush()
        log.record({"decision_id": "last", "result": {"verdict": "allow"}})
        await log.flush()
        segments = list(journal_dir.glob("*.jsonl"))
        assert len(segments) <= 2, segments  # the current one, and one closing at most
    finally:
        await log.close()
    assert list(journal_dir.iterdir()) == []
    assert len(ids(db)) == 201


async def test_fsync_mode_shares_one_fdatasync_among_waiting_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    db = tmp_path / "audit.db"
    async with AuditLog(db, durability="fsync") as log:

        async def request(n: int) -> None:
            log.record({"decision_id": f"dec-{n}", "result": {"verdict": "allow"}})
            assert log.needs_sync
            await log.sync()
            assert log._journal is not None and log._journal._synced >= 1

        await asyncio.gather(*(request(n) for n in range(100)))
        assert not log.needs_sync
        assert 1 <= len(synced) < 100
        with closing(sqlite3.connect(db)) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert len(ids(db)) == 100


async def test_journal_mode_needs_no_sync_and_memory_mode_has_no_journal(tmp_path: Path) -> None:
    async with AuditLog(tmp_path / "a.db") as log:
        log.record({"decision_id": "a", "result": {}})
        assert not log.needs_sync
        assert list(default_journal_dir(tmp_path / "a.db").glob("*.jsonl"))
    async with AuditLog(tmp_path / "b.db", durability="memory") as log:
        log.record({"decision_id": "b", "result": {}})
        assert not default_journal_dir(tmp_path / "b.db").exists()


FULL_DISK = textwrap.dedent(
    """
    import asyncio, os, resource, sys
    from pathlib import Path
    from ztgateway.audit import AuditLog, AuditUnavailable

    async def main() -> None:
        log = AuditLog(Path(sys.argv[1]), flush_interval=3600, batch_size=100_000)
        await log.start()
        # Every file this process writes may now grow to 32 KiB (EFBIG past it: Python ignores
        # SIGXFSZ), the journal segment included: a disk that is full for this writer.
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, resource.RLIM_INFINITY))
        accepted = 0
        try:
            for n in range(10_000):
                log.record({"decision_id": f"dec-{n}", "result": {"verdict": "allow"}, "pad": "x" * 200})
                accepted += 1
        except AuditUnavailable as exc:
            print(accepted, exc, flush=True)
        os._exit(0)  # the writer (never closed) would keep the process alive

    asyncio.run(main())
    """
)


def test_a_journal_write_that_fails_refuses_the_event(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    out = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(db)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    accepted, _, message = out.partition(" ")
    assert 0 < int(accepted) < 10_000
    assert "journal write failed" in message
    # Every line in the journal is whole: exactly the accepted events, recoverable.
    (segment,) = default_journal_dir(db).glob("*.jsonl")
    data = segment.read_bytes()
    assert data.endswith(b"\n")
    assert data.count(b"\n") == int(accepted)


def test_journal_lock_is_taken_before_its_name_appears(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.open()
    try:
        (lock,) = (tmp_path / "j").glob("*.lock")
        assert lock.name == f"{journal.owner}.lock"
        assert not list((tmp_path / "j").glob("*.claim"))
        assert pending_lines(tmp_path / "j") == 0  # held: not an orphan
        assert lock.exists()
    finally:
        journal.close(everything_written=True)
    assert list((tmp_path / "j").iterdir()) == []
    with pytest.raises(OSError, match="closed"):
        journal.append(b"{}")
