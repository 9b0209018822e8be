"""The decision log on real SQLite files: durability, the chain, faults, masking, search."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import hmac
import json
import os
import re
import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from ztgateway.audit import (
    GENESIS_HASH,
    PROBLEM_COLUMNS,
    PROBLEM_EDITED,
    PROBLEM_GAP,
    PROBLEM_LINK,
    SECRET_HEADERS,
    UNKEYED_MASK,
    AuditLog,
    AuditUnavailable,
    MaskKey,
    mask_headers,
    mask_query,
    search,
    tail,
    verify_db,
    verify_jsonl,
)
from ztgateway.audit.store import SCHEMA, insert_on_head, insert_statements
from ztgateway.audit.turn import WriterTurn

RFC3339_UTC_MICROS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def decision(
    n: int,
    *,
    user: str = "alice",
    reason: str = "policy-allowed",
    verdict: str = "allow",
    route: str = "wiki",
    timestamp: str | None = None,
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "decision_id": f"dec-{n}",
        "route": route,
        "input": {
            "user": user,
            "device": "laptop-7",
            "client_ip": "192.0.2.7",
            "method": "GET",
            "path": f"/page/{n}",
        },
        "result": {"verdict": verdict, "reason": reason, "findings": []},
        "policy_revision": "r1",
    }
    if timestamp is not None:
        event["timestamp"] = timestamp
    return event


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def rows(db: Path) -> list[dict[str, Any]]:
    with closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM audit_events ORDER BY seq")]


def execute(db: Path, sql: str, params: tuple[Any, ...] = ()) -> None:
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(sql, params)


def stored_event(db: Path, seq: int) -> dict[str, Any]:
    return json.loads(next(r["event"] for r in rows(db) if r["seq"] == seq))


def rewrite_event(db: Path, seq: int, event: dict[str, Any]) -> None:
    execute(db, "UPDATE audit_events SET event = ? WHERE seq = ?", (canonical(event), seq))


async def write_log(db: Path, count: int, *, jsonl: Path | None = None, start: int = 1) -> None:
    async with AuditLog(db, jsonl_path=jsonl, flush_interval=0.01) as log:
        for n in range(start, start + count):
            log.record(decision(n))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


# ----------------------------------------------------------------------------- durability


async def test_recorded_events_are_in_the_database_and_sink_after_close(
    db: Path, tmp_path: Path
) -> None:
    sink = tmp_path / "audit.jsonl"
    async with AuditLog(db, jsonl_path=sink) as log:
        for n in range(1, 4):
            log.record(decision(n, user=f"user-{n}", reason="group-required", verdict="deny"))

    stored = rows(db)
    assert [r["seq"] for r in stored] == [1, 2, 3]
    assert [r["decision_id"] for r in stored] == ["dec-1", "dec-2", "dec-3"]
    first = stored[0]
    assert (first["user"], first["device"], first["route"]) == ("user-1", "laptop-7", "wiki")
    assert (first["verdict"], first["reason"], first["client_ip"]) == (
        "deny",
        "group-required",
        "192.0.2.7",
    )
    events = [json.loads(r["event"]) for r in stored]
    assert all(e["type"] == "ztgw.decision" for e in events)
    assert all(RFC3339_UTC_MICROS.match(e["timestamp"]) for e in events)
    assert [r["ts"] for r in stored] == [e["timestamp"] for e in events]
    assert events[0]["prev_hash"] == GENESIS_HASH
    assert events[1]["prev_hash"] == events[0]["hash"] == first["hash"]

    lines = sink.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == events


async def test_record_only_enqueues_and_flush_writes_every_batch(db: Path) -> None:
    async with AuditLog(db, batch_size=500) as log:
        for n in range(2_000):
            log.record(decision(n))
        # No await happened: the writer cannot have run, so record() did no I/O.
        assert log.stats.queued == 2_000
        assert log.stats.written == 0
        assert rows(db) == []

        await log.flush()

        assert log.stats.queued == 0
        assert log.stats.written == 2_000
        assert len(rows(db)) == 2_000
    result = await verify_db(db)
    assert result.ok
    assert result.checked == 2_000


async def test_a_batch_of_uneven_size_is_stored_whole_in_order_by_multi_row_inserts(
    db: Path,
) -> None:
    """One batch of 250 events goes in as INSERTs of 100, 100 and 50 rows (insert_statements):
    every row lands once, in sequence, with its own columns, and the chain verifies."""
    statements = list(insert_statements([(n,) * 12 for n in range(250)]))
    assert [len(params) // 12 for _, params in statements] == [100, 100, 50]
    assert all(sql.count("(?, ") == len(params) // 12 for sql, params in statements)
    assert list(insert_statements([])) == []
    async with AuditLog(db, batch_size=250) as log:
        for n in range(250):
            log.record(decision(n, user=f"user-{n}"))
        await log.flush()
    stored = rows(db)
    assert [r["seq"] for r in stored] == list(range(1, 251))
    assert [r["user"] for r in stored] == [f"user-{n}" for n in range(250)]
    assert [r["decision_id"] for r in stored] == [f"dec-{n}" for n in range(250)]
    result = await verify_db(db)
    assert result.ok and result.checked == 250


def test_insert_on_head_inserts_all_rows_only_on_the_head_it_was_linked_to(db: Path) -> None:
    """The writer's one-statement append (store.insert_on_head): every row when the head is
    the one the rows were chained onto (events, else the last checkpoint, else genesis), none
    when another writer appended in between."""

    def row(seq: int, prev: str, link: str) -> tuple[Any, ...]:
        return (seq, f"dec-{seq}", "t", None, None, None, None, None, None, "{}", prev, link)

    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        for statement in SCHEMA:
            conn.execute(statement)
        sql, params = insert_on_head(
            [row(1, GENESIS_HASH, "h1"), row(2, "h1", "h2")], 0, GENESIS_HASH
        )
        assert conn.execute(sql, params).rowcount == 2
        stale, stale_params = insert_on_head([row(3, "h1", "h3")], 1, "h1")  # head is 2 now
        assert conn.execute(stale, stale_params).rowcount == 0
        sql, params = insert_on_head([row(3, "h2", "h3")], 2, "h2")
        assert conn.execute(sql, params).rowcount == 1
        # Everything archived: the head is the last checkpoint's.
        conn.execute("DELETE FROM audit_events")
        conn.execute("INSERT INTO audit_checkpoints VALUES (3, 'h3', 'a', 'x', 't')")
        assert conn.execute(*insert_on_head([row(4, "h2", "h4")], 2, "h2")).rowcount == 0
        assert conn.execute(*insert_on_head([row(4, "h3", "h4")], 3, "h3")).rowcount == 1
    assert [r["seq"] for r in rows(db)] == [4]
    with pytest.raises(ValueError):
        insert_on_head([], 0, GENESIS_HASH)


async def test_a_flush_does_not_cut_the_next_batchs_coalescing_window(db: Path) -> None:
    """A flush's kick was left set after the commit it asked for, so the next event was
    committed at once instead of after flush_interval (one commit per request)."""
    async with AuditLog(db, flush_interval=3600) as log:
        log.record(decision(1))
        await log.flush()
        log.record(decision(2))
        for _ in range(50):
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        assert log.stats.queued == 1
        assert [r["decision_id"] for r in rows(db)] == ["dec-1"]
    assert [r["decision_id"] for r in rows(db)] == ["dec-1", "dec-2"]


async def test_record_keeps_the_event_as_it_was_when_recorded(db: Path) -> None:
    event = decision(1)
    async with AuditLog(db) as log:
        log.record(event)
        event["input"]["user"] = "mallory"
        event["result"]["reason"] = "changed-later"
    [logged] = await tail(db)
    assert logged["input"]["user"] == "alice"
    assert logged["result"]["reason"] == "policy-allowed"
    assert "seq" not in event  # the caller's dict is not touched either


async def test_record_refuses_malformed_events(db: Path) -> None:
    async with AuditLog(db) as log:
        with pytest.raises(ValueError, match="decision_id"):
            log.record({"route": "wiki"})
        with pytest.raises(ValueError, match="decision_id"):
            log.record({"decision_id": ""})
        with pytest.raises(ValueError, match="hash"):
            log.record({**decision(1), "hash": "f" * 64})
        with pytest.raises(ValueError, match="UTC offset"):
            log.record(decision(1, timestamp="2024-05-01T10:00:00"))
        log.record(decision(1))
        with pytest.raises(ValueError, match="already queued"):
            log.record(decision(1))
        assert log.stats.queued == 1


async def test_record_refuses_before_start_and_after_close(db: Path) -> None:
    log = AuditLog(db)
    assert not log.healthy
    with pytest.raises(AuditUnavailable):
        log.record(decision(1))
    await log.start()
    assert log.healthy
    log.record(decision(1))
    await log.close()
    await log.close()  # idempotent
    assert not log.healthy
    with pytest.raises(AuditUnavailable):
        log.record(decision(2))
    assert len(rows(db)) == 1


async def test_enums_and_datetimes_are_logged_in_wire_form(db: Path) -> None:
    from ztgateway.decision import Reason, Verdict

    event = decision(1)
    event["timestamp"] = datetime(2024, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    event["result"] = {"verdict": Verdict.DENY.label, "reason": Reason.DEVICE_REVOKED}
    async with AuditLog(db) as log:
        log.record(event)
    [row] = rows(db)
    assert row["reason"] == "device-revoked"
    assert row["ts"] == "2024-05-01T10:00:00.000000Z"
    assert json.loads(row["event"])["timestamp"] == "2024-05-01T10:00:00.000000Z"
    assert (await verify_db(db)).ok


async def logged_with_a_follower(db: Path, event: dict[str, Any]) -> list[dict[str, Any]]:
    """Write `event` and one ordinary event after it; both must go through and verify."""
    async with AuditLog(db) as log:
        log.record(event)
        log.record(decision(2))
        await log.flush()
        assert log.healthy
    logged = await tail(db)
    assert [e["decision_id"] for e in logged] == [event["decision_id"], "dec-2"]
    result = await verify_db(db)
    assert result.ok, result.problem
    return logged


async def test_undecodable_header_bytes_do_not_jam_the_writer(db: Path) -> None:
    # aiohttp surrogate-escapes raw bytes; such a string cannot be stored as UTF-8 as it is.
    event = decision(1)
    event["input"]["headers"] = {"user-agent": "curl\udcff"}
    logged = await logged_with_a_follower(db, event)
    assert logged[0]["input"]["headers"]["user-agent"] == "curl\ufffd"


async def test_non_string_keys_are_stored_as_text_and_the_chain_verifies(db: Path) -> None:
    # Sorted as numbers they would hash as 2, 10; stored and re-read as text they sort 10, 2.
    event = decision(1)
    event["input"]["counts"] = {2: "two", 10: "ten", None: "none", True: "yes"}
    event["input"]["mixed"] = {1: "a", "b": "c"}  # unsortable as they came
    logged = await logged_with_a_follower(db, event)
    assert logged[0]["input"]["counts"] == {"2": "two", "10": "ten", "null": "none", "true": "yes"}
    assert logged[0]["input"]["mixed"] == {"1": "a", "b": "c"}


# ----------------------------------------------------------------------------- hash chain


async def test_chain_verifies_and_follows_the_documented_formula(db: Path) -> None:
    await write_log(db, 5)
    result = await verify_db(db)
    assert result.ok, result.problem
    assert (result.checked, result.first_bad_seq, result.problem) == (5, None, "")

    prev = GENESIS_HASH
    for row in rows(db):
        event = json.loads(row["event"])
        body = {k: v for k, v in event.items() if k not in {"seq", "prev_hash", "hash"}}
        expected = hashlib.sha256((prev + canonical(body)).encode()).hexdigest()
        assert (row["prev_hash"], row["hash"], event["hash"]) == (prev, expected, expected)
        assert row["event"] == canonical(event)
        prev = expected
    assert result.last_hash == prev


async def test_empty_log_verifies(db: Path) -> None:
    async with AuditLog(db):
        pass
    result = await verify_db(db)
    assert result.ok
    assert result.checked == 0


async def test_verifying_a_missing_database_fails_without_creating_it(db: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await verify_db(db)
    assert not db.exists()


async def test_edited_event_is_detected_with_its_seq(db: Path) -> None:
    await write_log(db, 5)
    event = stored_event(db, 3)
    event["result"]["verdict"] = "allow"
    event["input"]["user"] = "bob"
    rewrite_event(db, 3, event)

    result = await verify_db(db)
    assert not result.ok
    assert (result.first_bad_seq, result.first_bad_decision_id) == (3, "dec-3")
    assert result.problem == PROBLEM_EDITED
    assert result.checked == 2


async def test_edited_search_column_is_detected(db: Path) -> None:
    # Columns are outside the hash; hiding a user's events from search must still show up.
    await write_log(db, 4)
    execute(db, 'UPDATE audit_events SET "user" = ? WHERE seq = 2', ("someone-else",))

    result = await verify_db(db)
    assert not result.ok
    assert (result.first_bad_seq, result.problem) == (2, PROBLEM_COLUMNS)


async def test_deleted_row_is_detected(db: Path) -> None:
    await write_log(db, 5)
    execute(db, "DELETE FROM audit_events WHERE seq = 3")

    result = await verify_db(db)
    assert not result.ok
    assert (result.first_bad_seq, result.first_bad_decision_id) == (4, "dec-4")
    assert result.problem == PROBLEM_LINK


async def test_deleted_first_row_is_detected(db: Path) -> None:
    await write_log(db, 3)
    execute(db, "DELETE FROM audit_events WHERE seq = 1")

    result = await verify_db(db)
    assert not result.ok
    assert result.first_bad_seq == 2


async def test_inserted_row_with_a_valid_hash_is_detected(db: Path) -> None:
    await write_log(db, 4)
    # The forger renumbers seq 3.. up by one and slips a self-consistent event in at seq 3.
    for seq in (4, 3):
        event = stored_event(db, seq)
        event["seq"] = seq + 1
        execute(
            db,
            "UPDATE audit_events SET seq = ?, event = ? WHERE seq = ?",
            (seq + 1, canonical(event), seq),
        )
    prev = rows(db)[1]["hash"]
    forged = {**decision(99, user="mallory"), "type": "ztgw.decision"}
    forged["timestamp"] = stored_event(db, 2)["timestamp"]
    link = hashlib.sha256((prev + canonical(forged)).encode()).hexdigest()
    full = {**forged, "seq": 3, "prev_hash": prev, "hash": link}
    execute(
        db,
        "INSERT INTO audit_events VALUES (3, 'dec-99', ?, 'mallory', 'laptop-7', 'wiki', "
        "'allow', 'policy-allowed', '192.0.2.7', ?, ?, ?)",
        (forged["timestamp"], canonical(full), prev, link),
    )

    result = await verify_db(db)
    assert not result.ok
    assert (result.first_bad_seq, result.first_bad_decision_id) == (4, "dec-3")
    assert result.problem == PROBLEM_LINK


async def test_reordered_rows_are_detected(db: Path) -> None:
    await write_log(db, 4)
    two, three = rows(db)[1], rows(db)[2]
    # Swap every column but seq, keeping each event's own seq field consistent with its row.
    execute(db, "UPDATE audit_events SET decision_id = 'tmp' WHERE seq = 3")
    for target, source in ((2, three), (3, two)):
        event = json.loads(source["event"])
        event["seq"] = target
        moved = {**source, "event": canonical(event)}
        del moved["seq"]
        assignments = ", ".join(f'"{name}" = :{name}' for name in moved)
        with closing(sqlite3.connect(db)) as conn, conn:
            conn.execute(
                f"UPDATE audit_events SET {assignments} WHERE seq = :target",
                {**moved, "target": target},
            )

    result = await verify_db(db)
    assert not result.ok
    assert (result.first_bad_seq, result.first_bad_decision_id) == (2, "dec-3")
    assert result.problem == PROBLEM_LINK


async def test_renumbered_row_is_a_sequence_gap(db: Path) -> None:
    await write_log(db, 3)
    event = stored_event(db, 3)
    event["seq"] = 5
    execute(db, "UPDATE audit_events SET seq = 5, event = ? WHERE seq = 3", (canonical(event),))

    result = await verify_db(db)
    assert not result.ok
    assert (result.first_bad_seq, result.problem) == (5, PROBLEM_GAP)


async def test_chain_continues_across_close_and_reopen(db: Path, tmp_path: Path) -> None:
    sink = tmp_path / "audit.jsonl"
    await write_log(db, 3, jsonl=sink)
    last_hash = rows(db)[-1]["hash"]
    await write_log(db, 2, jsonl=sink, start=4)

    stored = rows(db)
    assert [r["seq"] for r in stored] == [1, 2, 3, 4, 5]
    assert stored[3]["prev_hash"] == last_hash
    assert json.loads(stored[3]["event"])["prev_hash"] == last_hash
    assert (await verify_db(db)).checked == 5
    jsonl = verify_jsonl(sink)
    assert jsonl.ok, jsonl.problem
    assert jsonl.checked == 5


async def test_two_writers_on_one_file_extend_one_chain(db: Path) -> None:
    # Writers take turns (turn.py), and the one whose turn it is chains onto the head the last
    # one left in the turn file: replicas sharing a file never fork, and never link twice.
    async with AuditLog(db) as first, AuditLog(db) as second:
        for n in range(10):
            (first if n % 2 else second).record(decision(n))
            await (first if n % 2 else second).flush()
        assert (first.on_head_misses, second.on_head_misses) == (0, 0)
    result = await verify_db(db)
    assert result.ok, result.problem
    assert result.checked == 10
    seq, last_hash = WriterTurn(db).path.read_bytes().rstrip(b"\0").split()
    assert (int(seq), last_hash.decode()) == (10, rows(db)[-1]["hash"])


@pytest.mark.parametrize(
    "hint",
    [
        b"3 " + b"0" * 64 + b"\n",  # behind (a crash between a commit and its hint)
        b"99 " + b"ab" * 32 + b"\n",  # ahead, and a head that does not exist
        b"not a head at all",
        b"",
    ],
)
async def test_a_wrong_head_hint_costs_one_locked_batch_never_a_fork(db: Path, hint: bytes) -> None:
    await write_log(db, 5)
    WriterTurn(db).path.write_bytes(hint)
    async with AuditLog(db) as log:
        log.record(decision(6))
        await log.flush()
        misses = log.on_head_misses
    # Only a hint that claims a newer head is followed; it misses and the locked path, which
    # reads the head from SQLite, chains the batch onto the real one.
    assert misses == (1 if hint.startswith(b"99") else 0)
    result = await verify_db(db)
    assert (result.ok, result.checked) == (True, 6), result.problem


async def test_a_writer_waits_for_its_turn_while_another_process_holds_it(db: Path) -> None:
    async with AuditLog(db) as log:
        fd = os.open(WriterTurn(db).path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another process's writer, mid-batch
            log.record(decision(1))
            flushing = asyncio.ensure_future(log.flush())
            await asyncio.sleep(0.3)
            assert not flushing.done()
            assert rows(db) == []
            fcntl.flock(fd, fcntl.LOCK_UN)
            await asyncio.wait_for(flushing, 5)
        finally:
            os.close(fd)
        assert log._turn is not None and log._turn.waits == 1
    assert [r["decision_id"] for r in rows(db)] == ["dec-1"]


async def test_a_turn_given_up_while_waiting_is_not_kept_when_it_comes(db: Path) -> None:
    holder, waiter = WriterTurn(db), WriterTurn(db)
    holder.open()
    waiter.open()
    try:
        await holder.acquire()
        waiting = asyncio.ensure_future(waiter.acquire())
        await asyncio.sleep(0.1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        holder.release()  # the waiting thread now gets the lock, and must hand it back
        probe = os.open(holder.path, os.O_RDWR)
        try:
            for _ in range(100):
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.02)
            else:
                pytest.fail("the cancelled waiter kept the writers' turn")
        finally:
            os.close(probe)
    finally:
        holder.close()
        waiter.close()


# ----------------------------------------------------------------------------- JSON lines


async def test_jsonl_verifies_alone_and_an_edited_line_is_detected(
    db: Path, tmp_path: Path
) -> None:
    sink = tmp_path / "audit.jsonl"
    await write_log(db, 4, jsonl=sink)
    assert verify_jsonl(sink).ok
    lines = sink.read_text(encoding="utf-8").splitlines(keepends=True)

    edited = json.loads(lines[1])
    edited["result"]["reason"] = "policy-allowed-but-edited"
    sink.write_text("".join([lines[0], canonical(edited) + "\n", *lines[2:]]), encoding="utf-8")
    result = verify_jsonl(sink)
    assert not result.ok
    assert (result.first_bad_seq, result.first_bad_decision_id) == (2, "dec-2")
    assert PROBLEM_EDITED in result.problem

    sink.write_text("".join([lines[0], *lines[2:]]), encoding="utf-8")
    result = verify_jsonl(sink)
    assert (result.ok, result.first_bad_seq) == (False, 3)
    assert PROBLEM_LINK in result.problem

    sink.write_text("".join(lines[:3]) + lines[3][:20], encoding="utf-8")
    result = verify_jsonl(sink)
    assert not result.ok
    assert "torn" in result.problem


async def test_jsonl_starting_mid_chain_needs_an_explicit_anchor(db: Path, tmp_path: Path) -> None:
    sink = tmp_path / "audit.jsonl"
    await write_log(db, 4, jsonl=sink)
    lines = sink.read_text(encoding="utf-8").splitlines(keepends=True)
    sink.write_text("".join(lines[2:]), encoding="utf-8")  # rotated, or head deleted

    strict = verify_jsonl(sink)
    assert not strict.ok
    assert strict.first_bad_seq == 3
    assert "seq 3" in strict.problem
    anchored = verify_jsonl(sink, require_genesis=False)
    assert anchored.ok
    assert anchored.checked == 2


async def test_sink_added_to_an_existing_log_starts_at_the_present(
    db: Path, tmp_path: Path
) -> None:
    sink = tmp_path / "audit.jsonl"
    await write_log(db, 3)
    await write_log(db, 2, jsonl=sink, start=4)
    assert [json.loads(line)["seq"] for line in sink.read_text().splitlines()] == [4, 5]
    assert verify_jsonl(sink, require_genesis=False).ok


async def test_sink_catches_up_after_a_crash_between_commit_and_append(
    db: Path, tmp_path: Path
) -> None:
    sink = tmp_path / "audit.jsonl"
    await write_log(db, 5, jsonl=sink)
    lines = sink.read_text(encoding="utf-8").splitlines(keepends=True)
    # The process died after committing 4 and 5 and while appending 4.
    sink.write_text("".join(lines[:3]) + lines[3][:25], encoding="utf-8")

    async with AuditLog(db, jsonl_path=sink) as log:
        await log.flush()
        assert sink.read_text(encoding="utf-8").splitlines(keepends=True) == lines
        log.record(decision(6))

    result = verify_jsonl(sink)
    assert result.ok, result.problem
    assert result.checked == 6
    assert [json.loads(line) for line in sink.read_text().splitlines()] == [
        json.loads(r["event"]) for r in rows(db)
    ]


async def test_two_writers_on_one_sink_mirror_every_event_once_in_order(
    db: Path, tmp_path: Path
) -> None:
    # Issue 19 D1: each writer continued the sink from what *it* had last mirrored, so with two
    # workers every event reached the file twice, out of order, and verify said TAMPERED.
    sink = tmp_path / "audit.jsonl"
    async with AuditLog(db, jsonl_path=sink) as w0, AuditLog(db, jsonl_path=sink) as w1:
        for n in range(10):
            w = w0 if n % 2 else w1
            w.record(decision(n))
            await w.flush()
    lines = sink.read_text().splitlines()
    assert len(lines) == 10
    assert [json.loads(line) for line in lines] == [json.loads(r["event"]) for r in rows(db)]
    result = verify_jsonl(sink)
    assert result.ok, result.problem


async def test_concurrent_writers_under_load_leave_one_verifiable_sink(
    db: Path, tmp_path: Path
) -> None:
    sink = tmp_path / "audit.jsonl"
    async with (
        AuditLog(db, jsonl_path=sink, flush_interval=0.002, batch_size=7) as w0,
        AuditLog(db, jsonl_path=sink, flush_interval=0.003, batch_size=11) as w1,
    ):

        async def load(w: AuditLog, offset: int) -> None:
            for n in range(offset, offset + 400):
                w.record(decision(n))
                if n % 13 == 0:
                    await asyncio.sleep(0.001)

        await asyncio.gather(load(w0, 0), load(w1, 10_000))
    ids = [json.loads(line)["decision_id"] for line in sink.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 800
    assert [json.loads(line)["seq"] for line in sink.read_text().splitlines()] == list(
        range(1, 801)
    )
    assert verify_jsonl(sink).ok
    assert (await verify_db(db)).checked == 800


async def test_rotated_sink_continues_where_the_moved_file_ended(db: Path, tmp_path: Path) -> None:
    sink = tmp_path / "audit.jsonl"
    async with AuditLog(db, jsonl_path=sink, flush_interval=0.001) as log:
        for n in range(5):
            log.record(decision(n))
        await log.flush()
        sink.rename(tmp_path / "audit.jsonl.1")  # logrotate, without copytruncate
        for n in range(5, 8):
            log.record(decision(n))
        await log.flush()
    old = [json.loads(x)["seq"] for x in (tmp_path / "audit.jsonl.1").read_text().splitlines()]
    new = [json.loads(x)["seq"] for x in sink.read_text().splitlines()]
    assert (old, new) == ([1, 2, 3, 4, 5], [6, 7, 8])
    assert verify_jsonl(tmp_path / "audit.jsonl.1").ok
    assert verify_jsonl(sink, require_genesis=False).ok


async def test_sink_of_another_chain_is_moved_aside_not_extended(db: Path, tmp_path: Path) -> None:
    sink = tmp_path / "audit.jsonl"
    other = tmp_path / "other.db"
    await write_log(other, 3, jsonl=sink)  # a file left by another database
    await write_log(db, 2, jsonl=sink, start=10)
    assert verify_jsonl(tmp_path / "audit.jsonl.foreign-3").checked == 3
    assert [json.loads(x)["decision_id"] for x in sink.read_text().splitlines()] == [
        "dec-10",
        "dec-11",
    ]
    assert verify_jsonl(sink).ok


# ----------------------------------------------------------------------------- faults


def lock_database(db: Path) -> sqlite3.Connection:
    """Another process holding the write lock: a fault that stops root as well as anyone."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=5)
    conn.execute("BEGIN EXCLUSIVE")
    return conn


async def test_unwritable_database_fills_the_queue_then_refuses_and_loses_nothing(
    db: Path, tmp_path: Path
) -> None:
    failures: list[BaseException] = []
    failed = asyncio.Event()

    def on_failure(exc: BaseException) -> None:
        failures.append(exc)
        failed.set()

    sink = tmp_path / "audit.jsonl"
    log = AuditLog(
        db,
        jsonl_path=sink,
        max_queue=5,
        batch_size=2,
        flush_interval=0.01,
        busy_timeout=0.05,
        retry_max=0.2,
        on_write_failure=on_failure,
    )
    await log.start()
    try:
        log.record(decision(0))
        await log.flush()
        lock = lock_database(db)
        try:
            log.record(decision(1))
            await asyncio.wait_for(failed.wait(), 5)
            assert isinstance(failures[0], sqlite3.OperationalError)
            assert not log.healthy
            for n in range(2, 6):
                log.record(decision(n))  # still accepted while the fault lasts
            with pytest.raises(AuditUnavailable, match="full"):
                log.record(decision(6))
            assert log.stats.queued == 5
            assert log.stats.write_failures >= 1
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        await asyncio.wait_for(log.flush(), 10)
        assert log.healthy
        log.record(decision(6))  # accepted again once there is room
    finally:
        await log.close()

    assert log.stats.dropped == 0
    assert [r["decision_id"] for r in rows(db)] == [f"dec-{n}" for n in range(7)]
    assert (await verify_db(db)).ok
    assert verify_jsonl(sink).checked == 7


async def test_broken_sink_directory_keeps_events_in_the_database_until_it_is_back(
    db: Path, tmp_path: Path
) -> None:
    failures: list[BaseException] = []
    sink_dir = tmp_path / "siem"
    sink_dir.mkdir()
    sink = sink_dir / "audit.jsonl"
    log = AuditLog(
        db, jsonl_path=sink, flush_interval=0.01, retry_max=0.1, on_write_failure=failures.append
    )
    await log.start()
    try:
        log.record(decision(1))
        await log.flush()
        # A path component that is a file fails with ENOTDIR, even for root.
        sink_dir.rename(tmp_path / "siem-away")
        sink_dir.write_text("not a directory")
        log.record(decision(2))
        log.record(decision(3))
        for _ in range(200):
            if failures and len(rows(db)) == 3:
                break
            await asyncio.sleep(0.01)
        assert isinstance(failures[0], NotADirectoryError)
        assert not log.healthy
        assert log.stats.written == 3  # durable in SQLite already
        log.record(decision(4))

        sink_dir.unlink()
        (tmp_path / "siem-away").rename(sink_dir)
        await asyncio.wait_for(log.flush(), 10)
        assert log.healthy
    finally:
        await log.close()

    result = verify_jsonl(sink)
    assert result.ok, result.problem
    assert result.checked == 4


async def test_start_fails_when_the_database_cannot_be_created(tmp_path: Path) -> None:
    parent = tmp_path / "state"
    parent.write_text("a file where a directory should be")
    log = AuditLog(parent / "audit.db")
    with pytest.raises(AuditUnavailable):
        await log.start()
    with pytest.raises(AuditUnavailable):
        log.record(decision(1))


async def test_close_cut_short_counts_what_it_could_not_write(db: Path) -> None:
    log = AuditLog(db, flush_interval=0.01, busy_timeout=0.05, retry_max=0.1)
    await log.start()
    lock = lock_database(db)
    try:
        for n in range(3):
            log.record(decision(n))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await log.close()
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert log.stats.dropped == 3
    assert log.stats.queued == 0
    await log.close()
    with pytest.raises(AuditUnavailable):
        log.record(decision(9))
    assert rows(db) == []


# ----------------------------------------------------------------------------- masking


KEY = MaskKey.from_secret(b"a deployment's 32-byte mask key!")


def short_sha(value: str) -> str:
    """The keyed mask: HMAC-SHA256 under KEY, named by the key's id."""
    mac = hmac.new(KEY.secret, value.encode(), hashlib.sha256).hexdigest()[:16]
    return f"<masked:{KEY.key_id}:{mac}>"


def test_secret_headers_are_masked_and_listed() -> None:
    headers, masked = mask_headers(
        [
            ("Authorization", "Bearer eyJ.secret.sig"),
            ("Cookie", "sid=abc"),
            ("Cookie", "theme=dark"),
            ("X-Request-Id", "req-1"),
            ("Accept", "text/html"),
            ("Accept", "application/json"),
            ("X-ZTGW-MFA", "123456"),
            ("X-Refresh-Token", "rt-1"),
        ],
        key=KEY,
    )
    assert headers == {
        "authorization": short_sha("Bearer eyJ.secret.sig"),
        "cookie": f"{short_sha('sid=abc')}, {short_sha('theme=dark')}",
        "x-request-id": "req-1",
        "accept": "text/html, application/json",
        "x-ztgw-mfa": short_sha("123456"),
        "x-refresh-token": short_sha("rt-1"),
    }
    assert masked == [
        "input.headers.authorization",
        "input.headers.cookie",
        "input.headers.x-refresh-token",
        "input.headers.x-ztgw-mfa",
    ]
    assert "Bearer" not in json.dumps(headers)


def test_same_secret_masks_the_same_so_events_correlate() -> None:
    first, _ = mask_headers([("Authorization", "Bearer t1")], key=KEY)
    again, _ = mask_headers([("authorization", "Bearer t1")], key=KEY)
    other, _ = mask_headers([("Authorization", "Bearer t2")], key=KEY)
    assert first == again != other


def test_without_a_key_a_secret_leaves_no_digest_at_all() -> None:
    # Issue 18 M5: the unkeyed mask was sha256(value)[:8], which a dictionary reverses.
    headers, masked = mask_headers([("X-ZTGW-MFA", "123456"), ("Cookie", "sid=abc")])
    assert headers == {"x-ztgw-mfa": UNKEYED_MASK, "cookie": UNKEYED_MASK}
    assert masked == ["input.headers.cookie", "input.headers.x-ztgw-mfa"]
    query, _ = mask_query("user=alice&password=hunter2&otp=123456")
    assert query == f"user=alice&password={UNKEYED_MASK}&otp={UNKEYED_MASK}"


def test_a_rotated_key_masks_differently_and_says_so() -> None:
    other = MaskKey.from_secret(b"the next 32-byte deployment key!")
    before, _ = mask_headers([("X-ZTGW-MFA", "123456")], key=KEY)
    after, _ = mask_headers([("X-ZTGW-MFA", "123456")], key=other)
    assert before != after
    assert KEY.key_id in before["x-ztgw-mfa"]
    assert other.key_id in after["x-ztgw-mfa"]


def test_secret_header_names_include_the_documented_ones() -> None:
    assert {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "x-ztgw-mfa",
    } <= SECRET_HEADERS


def test_secret_query_parameters_are_masked_and_order_is_kept() -> None:
    query = (
        "page=2&access_token=at1&code=c0de&state=xyz&redirect_uri=%2Fhome"
        "&password=hunter2&client_secret=s&refreshToken=r&id%5Ftoken=it&key=k&token=&flag"
    )
    masked_query, masked = mask_query(query, key=KEY)
    assert masked_query == (
        f"page=2&access_token={short_sha('at1')}&code={short_sha('c0de')}"
        f"&state={short_sha('xyz')}&redirect_uri=%2Fhome&password={short_sha('hunter2')}"
        f"&client_secret={short_sha('s')}&refreshToken={short_sha('r')}"
        f"&id%5Ftoken={short_sha('it')}&key={short_sha('k')}&token=&flag"
    )
    assert masked == [
        "input.query.access_token",
        "input.query.client_secret",
        "input.query.code",
        "input.query.id_token",
        "input.query.key",
        "input.query.password",
        "input.query.refreshToken",
        "input.query.state",
    ]
    assert "hunter2" not in masked_query


def test_query_without_secrets_is_unchanged() -> None:
    assert mask_query("") == ("", [])
    assert mask_query("q=zero+trust&page=1") == ("q=zero+trust&page=1", [])


# ----------------------------------------------------------------------------- reading


async def test_search_filters_by_user_reason_and_time(db: Path) -> None:
    base = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    async with AuditLog(db) as log:
        for n in range(6):
            log.record(
                decision(
                    n,
                    user="alice" if n % 2 == 0 else "bob",
                    reason="policy-allowed" if n < 3 else "device-revoked",
                    timestamp=(base + timedelta(minutes=n)).isoformat(),
                )
            )
        # Same instant as n=3 written with another offset: stored and compared in UTC.
        log.record(decision(6, user="carol", timestamp="2024-05-01T14:03:00+02:00", route="mail"))

    def ids(events: list[dict[str, Any]]) -> list[str]:
        return [e["decision_id"] for e in events]

    assert ids(await search(db, user="alice")) == ["dec-0", "dec-2", "dec-4"]
    assert ids(await search(db, reason="device-revoked")) == ["dec-3", "dec-4", "dec-5"]
    assert ids(await search(db, user="bob", reason="device-revoked")) == ["dec-3", "dec-5"]
    assert ids(await search(db, route="mail")) == ["dec-6"]
    assert ids(await search(db, device="laptop-7", limit=2)) == ["dec-5", "dec-6"]
    assert ids(await search(db, decision_id="dec-4")) == ["dec-4"]
    window = await search(db, since=base + timedelta(minutes=2), until=base + timedelta(minutes=4))
    assert ids(window) == ["dec-2", "dec-3", "dec-6"]
    naive = await search(db, since=datetime(2024, 5, 1, 12, 5))
    assert ids(naive) == ["dec-5"]
    assert await search(db, user="nobody") == []


async def test_tail_returns_the_newest_events_oldest_first(db: Path) -> None:
    await write_log(db, 10)
    assert [e["seq"] for e in await tail(db, 3)] == [8, 9, 10]
    assert len(await tail(db)) == 10
    assert await tail(db, 0) == []
