"""The decision log: one event per gateway decision, hash-chained, written off the request path.

The shape follows OPA's decision log (`decision_id`, `timestamp`, `input`, `result`) so the
tooling people already point at OPA reads ours. The request path only calls `AuditLog.record()`,
which snapshots the event and enqueues it; a single writer task batches the queue into SQLite
and then mirrors the committed rows to an optional JSON-lines file for a SIEM.

Integrity is a hash chain: every stored event carries `seq`, `prev_hash` and `hash`, where

    hash = sha256(prev_hash + canonical_json(event minus {"seq", "prev_hash", "hash"}))

and the first event's `prev_hash` is 64 zeros. Leaving `seq` out of the hashed body costs
nothing: order is protected by the links, and a renumbered row still breaks its neighbour's
`prev_hash`. A chain without a key detects editing, deleting, inserting and reordering, but not
someone who truncates the newest rows or re-hashes everything after an edit; anchor the last
hash elsewhere (`VerifyResult.last_hash`) if that matters.

Durability contract: an event `record()` accepted is written, or `close()` says loudly that it
was not (`AuditUnavailable`, `AuditStats.dropped`). On a write fault the writer keeps the
events, reports the fault and retries; `record()` refuses only when the queue is full, so a
gateway that cannot audit fails closed instead of forgetting.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import hmac
import itertools
import json
import logging
import os
import re
import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import unquote_plus

import aiosqlite
import orjson

from .clock import SYSTEM_CLOCK, Clock

logger = logging.getLogger(__name__)

GENESIS_HASH: Final = "0" * 64
EVENT_TYPE: Final = "ztgw.decision"
CHAIN_FIELDS: Final = frozenset({"seq", "prev_hash", "hash"})
SCHEMA_VERSION: Final = 1

PROBLEM_EDITED: Final = "hash mismatch (event edited)"
PROBLEM_LINK: Final = "prev_hash does not match previous event (deleted, inserted or reordered)"
PROBLEM_GAP: Final = "sequence gap"
PROBLEM_COLUMNS: Final = "indexed columns do not match the event (row edited)"
PROBLEM_MALFORMED: Final = "event is not a JSON object with valid chain fields"

_SELECT_ROWS: Final = (
    'SELECT seq, decision_id, ts, "user", device, route, verdict, reason, client_ip, event, '
    "prev_hash, hash FROM audit_events ORDER BY seq"
)

_RETRY_BASE: Final = 0.05
_LINK_CHUNK: Final = 128
"""Events chained per turn of the event loop (well under a millisecond): requests run between
chunks, so a large batch does not stall them."""
_LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")

_SCHEMA: Final = (
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

_INSERT: Final = (
    'INSERT INTO audit_events (seq, decision_id, ts, "user", device, route, verdict, reason, '
    "client_ip, event, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class AuditUnavailable(Exception):
    """Raised by record() when the queue is full or the writer has failed.

    The caller fails closed (503): a decision that cannot be audited is not served.
    """


@dataclass(frozen=True, slots=True)
class AuditStats:
    queued: int
    written: int
    write_failures: int
    dropped: int
    """Only non-zero when close() was cut short (or the writer died) with events still queued."""


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    first_bad_seq: int | None
    first_bad_decision_id: str | None
    problem: str
    last_hash: str | None = None
    """Head of the verified chain: keep it elsewhere to detect truncation of the newest events."""


# --------------------------------------------------------------------------- canonical form


def _json_default(value: Any) -> Any:
    # The pipeline hands us enums and datetimes; turning them into their wire form here keeps
    # one bad field from costing a request its audit event.
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return _format_ts(value) if value.tzinfo is not None else value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    raise TypeError(f"audit events hold JSON values; got {type(value).__name__}")


# Datetimes and dataclasses go through _json_default, exactly as with the standard library.
_ORJSON_OPTIONS: Final = (
    orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
)


def canonical_json(value: Any) -> str:
    """The byte-exact form hashed by the chain; any verifier must reproduce it exactly.

    orjson (sorted keys, compact, UTF-8) is the form, for its speed: this runs for every
    decision. What orjson refuses (integers beyond 64 bits, lone surrogates) falls back to the
    standard library's equivalent; the choice depends only on the value, so a verifier that
    re-encodes the stored event takes the same path and gets the same bytes.
    """
    try:
        return orjson.dumps(value, option=_ORJSON_OPTIONS, default=_json_default).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(
            _string_keys(value),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
            default=_json_default,
        )


def _string_keys(value: Any) -> Any:
    """Keys as the stored JSON will hold them, before they are sorted: sorting `{2: .., 10: ..}`
    by number and the stored `{"10": .., "2": ..}` by text would give two encodings of one
    event, and a chain its verifier cannot reproduce."""
    if isinstance(value, dict):
        return {_json_key(k): _string_keys(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_string_keys(v) for v in value]
    return value


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool | int | float):
        return json.dumps(key)  # as the json module writes a key: 1, 1.5, true, null
    raise TypeError(f"audit event keys are strings or numbers; got {type(key).__name__}")


def _scrub(value: Any) -> Any:
    # aiohttp decodes raw header bytes with surrogateescape, so a client can put lone
    # surrogates into the event; they cannot be stored as UTF-8 and would jam the writer.
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _link_hash(prev_hash: str, body: str) -> str:
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def _format_ts(moment: datetime) -> str:
    # Fixed width (isoformat pads the year, strftime does not) so string order is time order
    # and `search(since=, until=)` can compare the ts column as text. In UTC isoformat ends
    # with "+00:00", which becomes the "Z".
    return moment.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


_clock_second: list[tuple[int, str]] = [(-1, "")]
"""[(Unix second, "YYYY-MM-DDTHH:MM:SS.")], the pair swapped whole so threads never mix it."""


def _now_ts(now_ns: int) -> str:
    """`_format_ts` of the clock's `time_ns()`, formatting the date and time once per second.

    Floors to microseconds, as `datetime.fromtimestamp` would.
    """
    second, micros = divmod(now_ns // 1000, 1_000_000)
    cached = _clock_second[0]
    if cached[0] != second:
        text = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")
        cached = _clock_second[0] = (second, text[:-6] + ".")
    return "%s%06dZ" % (cached[1], micros)  # noqa: UP031 (faster than the f-string)


def _normalize_ts(value: Any) -> str:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        moment = datetime.fromisoformat(value)
    else:
        raise ValueError(f"timestamp must be an RFC 3339 string, got {type(value).__name__}")
    if moment.tzinfo is None:
        raise ValueError("timestamp must carry a UTC offset")
    return _format_ts(moment)


def _column(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return canonical_json(value)


def _index_columns(event: dict[str, Any]) -> tuple[str | None, ...]:
    """user, device, route, verdict, reason, client_ip: what search() filters on."""
    raw_input = event.get("input")
    inp: dict[str, Any] = raw_input if isinstance(raw_input, dict) else {}
    raw_result = event.get("result")
    result: dict[str, Any] = raw_result if isinstance(raw_result, dict) else {}
    return (
        _column(inp.get("user")),
        _column(inp.get("device")),
        _column(event.get("route")),
        _column(result.get("verdict")),
        _column(result.get("reason")),
        _column(inp.get("client_ip")),
    )


# A queued event is (decision_id, _Entry). The entry holds what the writer needs, computed once
# by record() from the dict it has: the ts column, the index columns, and the event encoded
# with placeholders for the chain fields plus where they are (see _encode). The writer then
# only cuts, hashes and splices; it never parses an event back. An entry without cuts took the
# slow path: it holds the canonical body and the event as parsed from it.
_Entry = tuple[
    str,  # ts column
    tuple[str | None, ...],  # user, device, route, verdict, reason, client_ip columns
    bytes,  # with cuts: the encoding with placeholders; without: the canonical body
    tuple[int, int, int] | None,  # cuts: offsets of the hash, prev_hash and seq placeholders
    dict[str, Any] | None,  # without cuts: the event as the stored line holds it
]

_PLACEHOLDER: Final = "\x7f"
"""Value the chain fields get in the encoding made by record(). Only a string holding DEL puts
a 0x7f byte into orjson's output (it is neither escaped nor part of any other UTF-8 sequence),
so exactly three of them are exactly the three placeholders; any other count takes the slow
path."""
_PLACEHOLDERS: Final = {"hash": _PLACEHOLDER, "prev_hash": _PLACEHOLDER, "seq": _PLACEHOLDER}
_DEL: Final = b"\x7f"
_HASH_CUT: Final = len(b',"hash":"')
_PREV_CUT: Final = len(b',"prev_hash":"')
_SEQ_CUT: Final = len(b',"seq":"')
# The stored line: the canonical body with the chain fields spliced in where sorting puts them.
_LINE: Final = b'%b,"hash":"%b"%b,"prev_hash":%b%b,"seq":%d%b'
_HEX64: Final = re.compile(r"[0-9a-f]{64}")


def _as_parsed(value: Any) -> Any:
    """`value` as the stored event holds it, i.e. after a round trip through canonical JSON."""
    if value is None or type(value) is str or type(value) is dict:
        return value
    return json.loads(canonical_json(value))


def _fast_columns(body: dict[str, Any]) -> tuple[str | None, ...]:
    """`_index_columns(json.loads(canonical_json(body)))` without the round trip.

    Only for a body that orjson encodes: the round trip then changes nothing but the types
    that are not str, dict or None, and those few values are round-tripped on their own.
    """
    inp = body.get("input")
    if type(inp) is not dict:
        inp = _as_parsed(inp)
        if not isinstance(inp, dict):
            inp = {}
    result = body.get("result")
    if type(result) is not dict:
        result = _as_parsed(result)
        if not isinstance(result, dict):
            result = {}
    columns = (
        inp.get("user"),
        inp.get("device"),
        body.get("route"),
        result.get("verdict"),
        result.get("reason"),
        inp.get("client_ip"),
    )
    for value in columns:
        if value is not None and type(value) is not str:
            return tuple(_column(_as_parsed(v)) for v in columns)
    return columns


def _encode(body: dict[str, Any], ts: str) -> _Entry:
    """The queue entry for `body` (a private copy holding the chain placeholders)."""
    try:
        raw = orjson.dumps(body, option=_ORJSON_OPTIONS, default=_json_default)
    except (TypeError, orjson.JSONEncodeError):
        pass
    else:
        # The first three DEL bytes, and no fourth (memchr scans; count() is byte by byte).
        h = raw.find(_DEL)
        p = raw.find(_DEL, h + 1)
        s = raw.find(_DEL, p + 1)
        if 0 <= h < p < s and raw.find(_DEL, s + 1) < 0:
            # So these are the three placeholders, each written as `"key":"\x7f"`. Keys are
            # sorted and "decision_id" < "hash" < "prev_hash" < "seq" < "timestamp" are all
            # there, so each is a member between two others, after a comma (_link_rows cuts
            # out exactly `,"hash":"\x7f"` and so on).
            return ts, _fast_columns(body), raw, (h, p, s), None
    # Slow path (values orjson refuses, lone surrogates, a DEL in the event): the writer builds
    # the stored line from the parsed event, exactly as it always has.
    for name in CHAIN_FIELDS:
        del body[name]
    canonical = canonical_json(body)
    try:
        encoded = canonical.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (only the fallback encoder lets them through): replace them.
        canonical = canonical_json(_scrub(json.loads(canonical)))
        encoded = canonical.encode("utf-8")
    parsed = json.loads(canonical)
    return _normalize_ts(parsed["timestamp"]), _index_columns(parsed), encoded, None, parsed


# --------------------------------------------------------------------------- writer


def _create_private(path: Path) -> None:
    # Decision logs name people and devices: create the file owner-only before SQLite does
    # (its -wal and -shm files copy the database file's mode).
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _append_lines(path: Path, data: bytes) -> None:
    """Append whole lines or nothing: a failed write is cut back so a retry leaves no torn line.

    Opened per batch so that a rotated (moved) file is followed by a fresh one and a broken
    directory is noticed instead of writing into an unlinked inode.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        start = os.fstat(fd).st_size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def _read_sink_tail(path: Path) -> tuple[int, str] | None:
    """(seq, hash) of the file's last complete line, dropping a line torn by a crash.

    The torn line's event is in the database (the file is only written after the commit), so
    the writer re-exports it; keeping the fragment would make the file unverifiable forever.
    """
    try:
        f = path.open("r+b")
    except FileNotFoundError:
        return None
    with f:
        size = f.seek(0, os.SEEK_END)
        pos, tail = size, b""
        while pos > 0 and tail.count(b"\n") < 2:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
        if tail and not tail.endswith(b"\n"):
            cut = tail.rfind(b"\n") + 1
            logger.warning("audit sink %s ends with a torn line; truncating it", path)
            f.truncate(pos + cut)
            tail = tail[:cut]
        if not tail:
            return None
        last = tail[:-1].rsplit(b"\n", 1)[-1]
    try:
        event = json.loads(last)
        seq, link = event["seq"], event["hash"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(seq, int) or not isinstance(link, str):
        return None
    return seq, link


class AuditLog:
    """Queue in memory, one writer task, SQLite as the record and JSON lines as its mirror.

    `record()` must be called from the event loop's thread; it never awaits or touches disk.
    """

    def __init__(
        self,
        db_path: Path,
        *,
        jsonl_path: Path | None = None,
        max_queue: int = 100_000,
        batch_size: int = 500,
        flush_interval: float = 0.05,
        on_write_failure: Callable[[BaseException], None] | None = None,
        busy_timeout: float = 5.0,
        retry_max: float = 5.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if max_queue < 1 or batch_size < 1:
            raise ValueError("max_queue and batch_size must be positive")
        if flush_interval < 0 or busy_timeout < 0 or retry_max <= 0:
            raise ValueError("flush_interval and busy_timeout must be >= 0, retry_max > 0")
        self._db_path = db_path
        self._jsonl_path = jsonl_path
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._on_write_failure = on_write_failure
        self._busy_timeout = busy_timeout
        self._retry_max = retry_max
        self._clock = clock

        self._pending: deque[tuple[str, _Entry]] = deque()  # (decision_id, what to write)
        self._pending_ids: set[str] = set()
        self._accepted = 0
        self._written = 0
        self._write_failures = 0
        self._failures_in_row = 0
        self._dropped = 0
        self._last_seq = 0
        self._last_hash = GENESIS_HASH
        self._sink_seq = 0

        self._db: aiosqlite.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._fatal: BaseException | None = None
        self._stopping = False
        self._close_done = asyncio.Event()
        self._wake = asyncio.Event()
        self._kick = asyncio.Event()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    async def __aenter__(self) -> AuditLog:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open or create the log; AuditUnavailable here keeps a gateway that cannot audit down.

        The head loaded here is what the writer expects to extend; each batch re-reads it under
        the write lock, so a second process on the same file extends one chain, not a fork.
        """
        if self._db is not None or self._stopping:
            raise RuntimeError("AuditLog.start() may be called once")
        try:
            await asyncio.to_thread(_create_private, self._db_path)
            db = await aiosqlite.connect(
                self._db_path, isolation_level=None, timeout=self._busy_timeout
            )
        except (sqlite3.Error, OSError) as exc:
            raise AuditUnavailable(f"cannot open audit database {self._db_path}: {exc}") from exc
        try:
            await self._prepare(db)
            self._last_seq, self._last_hash = await _head(db)
            if self._jsonl_path is not None:
                await asyncio.to_thread(_append_lines, self._jsonl_path, b"")
                self._sink_seq = await self._sink_position(db, self._jsonl_path)
        except (sqlite3.Error, OSError) as exc:
            await db.close()
            raise AuditUnavailable(f"cannot prepare audit log: {exc}") from exc
        except BaseException:
            await db.close()
            raise
        self._db = db
        self._task = asyncio.create_task(self._run(), name="ztgw-audit-writer")

    async def _prepare(self, db: aiosqlite.Connection) -> None:
        async with db.execute("PRAGMA journal_mode=WAL") as cur:
            row = await cur.fetchone()
        if row is None or str(row[0]).lower() != "wal":
            logger.warning("audit database %s is not in WAL mode: %s", self._db_path, row)
        await db.execute("PRAGMA synchronous=NORMAL")
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise AuditUnavailable(
                f"audit database schema {version} is newer than this gateway ({SCHEMA_VERSION})"
            )
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            await db.execute("COMMIT")
        except BaseException:
            await _rollback(db)
            raise

    async def _sink_position(self, db: aiosqlite.Connection, path: Path) -> int:
        """Where the JSON-lines mirror stands in the chain, so a crash gap is re-exported."""
        tail = await asyncio.to_thread(_read_sink_tail, path)
        if tail is not None:
            seq, link = tail
            async with db.execute("SELECT hash FROM audit_events WHERE seq = ?", (seq,)) as cur:
                row = await cur.fetchone()
            if row is not None and row[0] == link:
                return seq
            logger.warning(
                "audit sink %s ends at seq %d, which is not in %s; continuing from seq %d",
                path,
                seq,
                self._db_path,
                self._last_seq + 1,
            )
        # A new (or rotated) file starts at the present, anchored on the current head.
        return self._last_seq

    async def flush(self) -> None:
        """Return once every event recorded before the call is in SQLite and the sink."""
        if self._fatal is not None:
            raise AuditUnavailable("audit writer has failed") from self._fatal
        target = self._accepted
        if self._task is None or self._is_flushed(target):
            return
        if self._task.done():
            raise AuditUnavailable("audit writer is not running")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (target, waiter)
        self._waiters.append(entry)
        self._wake.set()
        self._kick.set()
        try:
            await waiter
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    async def close(self) -> None:
        """Flush, stop the writer and close the database; idempotent.

        This waits as long as a write fault lasts, because returning would lose acknowledged
        events. To bound shutdown, wrap it in `asyncio.timeout()`: on cancellation whatever is
        still queued is counted in `stats.dropped` and logged as an error, never dropped quietly.
        """
        if self._stopping:
            await self._close_done.wait()
            return
        self._stopping = True
        task = self._task
        try:
            if task is not None:
                self._wake.set()
                self._kick.set()
                await asyncio.wait({task})
        finally:
            # Also reached when close() is cancelled: never leave the writer running against a
            # closed connection.
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            lost = len(self._pending)
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.close()
            if lost:
                logger.error("audit log closed with %d acknowledged events not written", lost)
            self._dropped += lost
            self._pending.clear()
            self._pending_ids.clear()
            self._fail_waiters(AuditUnavailable("audit log closed before the events were written"))
            self._close_done.set()
        if lost:
            raise AuditUnavailable(f"audit log closed with {lost} events not written")

    # ------------------------------------------------------------------ request path

    def record(self, event: dict[str, Any]) -> None:
        """Snapshot and enqueue one decision event; never blocks.

        Raises AuditUnavailable when the event cannot be promised to the log (not started,
        closed, writer failed, queue full) and ValueError/TypeError for a malformed event.
        """
        if self._fatal is not None:
            raise AuditUnavailable("audit writer has failed") from self._fatal
        if self._task is None or self._stopping:
            raise AuditUnavailable("audit log is not running")
        if len(self._pending) >= self._max_queue:
            raise AuditUnavailable(f"audit queue is full ({self._max_queue} events)")
        decision_id = event.get("decision_id")
        if not isinstance(decision_id, str) or not decision_id:
            raise ValueError("audit event needs a non-empty string decision_id")
        if decision_id in self._pending_ids:
            raise ValueError(f"decision {decision_id} is already queued")
        body = {**event, **_PLACEHOLDERS}
        if len(body) != len(event) + len(_PLACEHOLDERS):
            reserved = sorted(CHAIN_FIELDS.intersection(event))
            raise ValueError(f"audit event may not set {reserved}; the chain sets them")
        if "type" not in body:
            body["type"] = EVENT_TYPE
        if "timestamp" in body:
            ts = _normalize_ts(body["timestamp"])
        else:
            ts = body["timestamp"] = _now_ts(self._clock.time_ns())
        self._pending.append((decision_id, _encode(body, ts)))
        self._pending_ids.add(decision_id)
        self._accepted += 1
        self._wake.set()
        if len(self._pending) == self._batch_size:
            self._kick.set()

    @property
    def stats(self) -> AuditStats:
        return AuditStats(
            queued=len(self._pending),
            written=self._written,
            write_failures=self._write_failures,
            dropped=self._dropped,
        )

    @property
    def healthy(self) -> bool:
        """False while writes are failing, so /readyz can drain traffic before the queue fills."""
        return (
            self._task is not None
            and not self._task.done()
            and not self._stopping
            and self._fatal is None
            and self._failures_in_row == 0
        )

    # ------------------------------------------------------------------ writer task

    def _sink_behind(self) -> bool:
        return self._jsonl_path is not None and self._sink_seq < self._last_seq

    def _is_flushed(self, target: int) -> bool:
        return self._written >= target and not self._sink_behind()

    def _settle_waiters(self) -> None:
        for target, waiter in self._waiters:
            if not waiter.done() and self._is_flushed(target):
                waiter.set_result(None)

    def _fail_waiters(self, exc: BaseException) -> None:
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(exc)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but let flush()/close() (and a full batch) cut it short."""
        if seconds > 0 and not self._kick.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._kick.wait()
        self._kick.clear()

    def _report_failure(self, exc: BaseException) -> None:
        self._write_failures += 1
        self._failures_in_row += 1
        logger.warning(
            "audit write failed (%d in a row, %d queued): %s",
            self._failures_in_row,
            len(self._pending),
            exc,
        )
        if self._on_write_failure is not None:
            try:
                self._on_write_failure(exc)
            except Exception:
                logger.exception("audit on_write_failure callback raised")

    async def _run(self) -> None:
        try:
            while True:
                self._settle_waiters()
                if not self._pending and not self._sink_behind():
                    if self._stopping:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                urgent = self._stopping or bool(self._waiters)
                if self._pending and not urgent and len(self._pending) < self._batch_size:
                    # Coalesce: one commit per flush_interval instead of one per request.
                    await self._pause(self._flush_interval)
                try:
                    if self._pending:
                        first_seq, lines = await self._commit_batch()
                        await self._mirror(first_seq, lines)
                    else:
                        await self._catch_up_sink()
                except (sqlite3.Error, OSError) as exc:
                    self._report_failure(exc)
                    exponent = min(self._failures_in_row - 1, 16)
                    await self._pause(min(_RETRY_BASE * 2**exponent, self._retry_max))
                else:
                    self._failures_in_row = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug, not a disk fault: retrying would spin, so stop and make record() refuse.
            logger.exception("audit writer stopped")
            self._fatal = exc
            self._report_failure(exc)
            self._fail_waiters(AuditUnavailable("audit writer has failed"))

    async def _commit_batch(self) -> tuple[int, list[bytes]]:
        db = self._db
        assert db is not None
        batch = list(itertools.islice(self._pending, self._batch_size))
        # BEGIN IMMEDIATE takes the write lock before reading the head, so another process
        # appending to the same file cannot fork the chain between our read and our insert.
        await db.execute("BEGIN IMMEDIATE")
        try:
            seq, prev = await _head(db)
            if seq < self._last_seq or (seq == self._last_seq and prev != self._last_hash):
                # Not a reason to stop auditing, but the operator must hear that the newest
                # rows were deleted or replaced behind the writer's back.
                logger.error(
                    "audit chain head in %s moved from seq %d (%s) to seq %d (%s)",
                    self._db_path,
                    self._last_seq,
                    self._last_hash,
                    seq,
                    prev,
                )
            first_seq = seq + 1
            rows: list[tuple[Any, ...]] = []
            lines: list[bytes] = []
            for start in range(0, len(batch), _LINK_CHUNK):
                if start:
                    await asyncio.sleep(0)  # requests run between chunks, not after the batch
                chunk = batch[start : start + _LINK_CHUNK]
                seq, prev = _link_rows(chunk, seq, prev, rows, lines)
            await db.executemany(_INSERT, rows)
            await db.execute("COMMIT")
        except BaseException:
            await _rollback(db)
            raise
        for _ in batch:
            decision_id, _entry = self._pending.popleft()
            self._pending_ids.discard(decision_id)
        self._written += len(batch)
        self._last_seq, self._last_hash = seq, prev
        return first_seq, lines

    async def _mirror(self, first_seq: int, lines: list[bytes]) -> None:
        """Append a just-committed batch to the sink when it directly follows what the sink has."""
        if self._jsonl_path is None or self._sink_seq != first_seq - 1:
            return  # behind (earlier fault or another writer): _catch_up_sink reads the DB
        data = b"\n".join(lines) + b"\n" if lines else b""
        await asyncio.to_thread(_append_lines, self._jsonl_path, data)
        self._sink_seq = first_seq + len(lines) - 1

    async def _catch_up_sink(self) -> None:
        db = self._db
        assert db is not None and self._jsonl_path is not None
        async with db.execute(
            "SELECT seq, event FROM audit_events WHERE seq > ? ORDER BY seq LIMIT ?",
            (self._sink_seq, self._batch_size),
        ) as cur:
            rows = list(await cur.fetchall())
        if not rows:
            logger.warning(
                "audit rows %d..%d vanished from %s before reaching the sink",
                self._sink_seq + 1,
                self._last_seq,
                self._db_path,
            )
            self._sink_seq = self._last_seq
            return
        await asyncio.to_thread(_append_lines, self._jsonl_path, _join_lines(r[1] for r in rows))
        self._sink_seq = int(rows[-1][0])


def _link_rows(
    batch: list[tuple[str, _Entry]],
    seq: int,
    prev: str,
    rows: list[tuple[Any, ...]],
    lines: list[bytes],
) -> tuple[int, str]:
    """Chain `batch` onto (seq, prev): append its rows and sink lines; return the new head."""
    sha256 = hashlib.sha256
    prev_raw = prev.encode("utf-8")
    # prev_hash as JSON; only a head edited behind the writer's back needs more than quotes.
    prev_json = b'"' + prev_raw + b'"' if _HEX64.fullmatch(prev) else orjson.dumps(prev)
    for decision_id, (ts, columns, raw, cuts, parsed) in batch:
        seq += 1
        if cuts is not None:
            h, p, s = cuts
            head = raw[: h - _HASH_CUT]
            before_prev = raw[h + 2 : p - _PREV_CUT]
            before_seq = raw[p + 2 : s - _SEQ_CUT]
            rest = raw[s + 2 :]
            link = sha256(b"".join((prev_raw, head, before_prev, before_seq, rest))).hexdigest()
            link_raw = link.encode()
            line = _LINE % (head, link_raw, before_prev, prev_json, before_seq, seq, rest)
            stored = line.decode()
        else:
            assert parsed is not None
            link = sha256(prev_raw + raw).hexdigest()
            link_raw = link.encode()
            stored = canonical_json({**parsed, "seq": seq, "prev_hash": prev, "hash": link})
            line = stored.encode("utf-8")
        rows.append((seq, decision_id, ts, *columns, stored, prev, link))
        lines.append(line)
        prev, prev_raw, prev_json = link, link_raw, b'"' + link_raw + b'"'
    return seq, prev


def _join_lines(lines: Iterable[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


async def _head(db: aiosqlite.Connection) -> tuple[int, str]:
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


async def _rollback(db: aiosqlite.Connection) -> None:
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            await db.execute("ROLLBACK")


# --------------------------------------------------------------------------- readers


@contextlib.asynccontextmanager
async def _read_only(db_path: Path) -> AsyncIterator[aiosqlite.Connection]:
    # Checked first because connecting would silently create an empty database to "verify".
    if not await asyncio.to_thread(db_path.is_file):
        raise FileNotFoundError(f"no audit database at {db_path}")
    db = await aiosqlite.connect(db_path)
    try:
        await db.execute("PRAGMA query_only = ON")
        yield db
    finally:
        await db.close()


class _ChainChecker:
    """Walks events in order; the same rules for the database and the JSON-lines file."""

    def __init__(self, *, require_genesis: bool) -> None:
        self.require_genesis = require_genesis
        self.prev_seq: int | None = None
        self.prev_hash: str | None = None
        self.checked = 0

    def check(
        self,
        event: Any,
        *,
        row_check: Callable[[dict[str, Any]], str | None] | None = None,
    ) -> str | None:
        if not isinstance(event, dict):
            return PROBLEM_MALFORMED
        seq, prev, link = event.get("seq"), event.get("prev_hash"), event.get("hash")
        if (
            not isinstance(seq, int)
            or isinstance(seq, bool)
            or not isinstance(prev, str)
            or not isinstance(link, str)
        ):
            return PROBLEM_MALFORMED
        body = {k: v for k, v in event.items() if k not in CHAIN_FIELDS}
        if _link_hash(prev, canonical_json(body)) != link:
            return PROBLEM_EDITED
        if row_check is not None:
            problem = row_check(event)
            if problem is not None:
                return problem
        if self.prev_hash is None:
            if seq == 1 and prev != GENESIS_HASH:
                return PROBLEM_LINK
            if seq != 1 and self.require_genesis:
                return (
                    f"chain starts at seq {seq}, not 1: earlier events are missing "
                    "or the file was rotated"
                )
        else:
            assert self.prev_seq is not None
            if prev != self.prev_hash:
                return PROBLEM_LINK
            if seq != self.prev_seq + 1:
                return PROBLEM_GAP
        self.prev_seq, self.prev_hash = seq, link
        self.checked += 1
        return None

    def result(
        self, problem: str | None = None, seq: int | None = None, decision_id: str | None = None
    ) -> VerifyResult:
        if problem is None:
            return VerifyResult(True, self.checked, None, None, "", self.prev_hash)
        return VerifyResult(False, self.checked, seq, decision_id, problem, self.prev_hash)


def _row_problem(row: sqlite3.Row | tuple[Any, ...], event: dict[str, Any]) -> str | None:
    """Columns are outside the hash; tie them to the hashed event so search cannot be steered."""
    seq, decision_id, ts, *indexed, _text, prev, link = row
    try:
        expected_ts = _normalize_ts(event.get("timestamp"))
    except ValueError:
        return PROBLEM_COLUMNS
    if (
        seq != event.get("seq")
        or prev != event.get("prev_hash")
        or link != event.get("hash")
        or decision_id != event.get("decision_id")
        or ts != expected_ts
        or tuple(indexed) != _index_columns(event)
    ):
        return PROBLEM_COLUMNS
    return None


async def verify_db(db_path: Path, *, archives: bool = True) -> VerifyResult:
    """Check the whole chain in one read transaction (safe while the gateway is writing).

    After a rotation the database starts mid-chain; it must then continue exactly from the
    newest checkpoint, and (with `archives`) every archive file must still be there, unchanged
    (its SHA-256 was recorded), and chain from genesis through each checkpoint.
    """
    checker = _ChainChecker(require_genesis=True)
    async with _read_only(db_path) as db:
        try:
            async with db.execute(
                "SELECT through_seq, last_hash, archive, archive_sha256 FROM audit_checkpoints "
                "ORDER BY through_seq"
            ) as cur:
                checkpoints = [tuple(r) for r in await cur.fetchall()]
        except sqlite3.OperationalError:
            checkpoints = []
        for through_seq, last_hash, archive, digest in checkpoints:
            if archives:
                path = Path(archive)
                if not await asyncio.to_thread(path.is_file):
                    return checker.result(f"archive {archive} is missing", int(through_seq))
                actual = await asyncio.to_thread(_file_sha256, path)
                if actual != digest:
                    return checker.result(f"archive {archive} was modified", int(through_seq))
                problem = await asyncio.to_thread(_check_archive, checker, path)
                if problem is not None:
                    return checker.result(f"{archive}: {problem}")
            else:
                checker.prev_seq, checker.prev_hash = int(through_seq), str(last_hash)
            if checker.prev_seq != int(through_seq) or checker.prev_hash != last_hash:
                return checker.result(
                    f"checkpoint at seq {through_seq} does not match its archive", int(through_seq)
                )
        cur = await db.execute(_SELECT_ROWS)
        async for row in cur:
            seq, decision_id, text = row[0], row[1], row[9]
            try:
                event = json.loads(text)
            except (ValueError, TypeError):
                return checker.result(PROBLEM_MALFORMED, seq, decision_id)
            problem = checker.check(event, row_check=functools.partial(_row_problem, tuple(row)))
            if problem is not None:
                await cur.close()
                return checker.result(problem, seq, decision_id)
        await cur.close()
    return checker.result()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_archive(checker: _ChainChecker, path: Path) -> str | None:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                event = json.loads(raw)
            except ValueError:
                return f"line {number} is not valid JSON"
            problem = checker.check(event)
            if problem is not None:
                return f"line {number}: {problem}"
    return None


@dataclass(frozen=True, slots=True)
class RotateResult:
    archived: int
    archive: Path | None
    through_seq: int | None


async def rotate(
    db_path: Path, archive_dir: Path, *, before: datetime, clock: Clock = SYSTEM_CLOCK
) -> RotateResult:
    """Move events older than `before` into an archive file; the chain stays verifiable.

    The oldest events (a prefix of the chain) are written to
    `archive_dir/audit-<first>-<last>.jsonl`, synced, hashed, and recorded as a checkpoint
    (last seq, last hash, file, SHA-256) in the same transaction that deletes them, so a crash
    leaves either the old state or the new one. Run it while the gateway runs (SQLite
    serialises it with the writer), e.g. daily from cron: `ztgateway audit rotate --days 90`.
    """
    cutoff = _query_ts(before)
    await asyncio.to_thread(archive_dir.mkdir, parents=True, exist_ok=True)
    db = await aiosqlite.connect(db_path, timeout=30.0)
    try:
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
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
            data = _join_lines(str(r[1]) for r in rows)
            await asyncio.to_thread(_write_synced, path, data)
            await db.execute(
                "INSERT INTO audit_checkpoints VALUES (?, ?, ?, ?, ?)",
                (
                    last,
                    last_hash,
                    str(path),
                    hashlib.sha256(data).hexdigest(),
                    _format_ts(clock.now()),
                ),
            )
            await db.execute("DELETE FROM audit_events WHERE seq <= ?", (last,))
            await db.execute("COMMIT")
        except BaseException:
            await _rollback(db)
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


def verify_jsonl(path: Path, *, require_genesis: bool = True) -> VerifyResult:
    """Verify a JSON-lines mirror on its own, without the database.

    A file that begins mid-chain (rotated, or a sink added to an existing log) cannot prove
    its first link; pass require_genesis=False to accept its first prev_hash as the anchor.
    """
    checker = _ChainChecker(require_genesis=require_genesis)
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                return checker.result(f"line {number} is incomplete (torn write)")
            try:
                event = json.loads(raw)
            except ValueError:
                return checker.result(f"line {number} is not valid JSON")
            problem = checker.check(event)
            if problem is not None:
                seq = event.get("seq") if isinstance(event, dict) else None
                did = event.get("decision_id") if isinstance(event, dict) else None
                return checker.result(
                    f"line {number}: {problem}",
                    seq if isinstance(seq, int) else None,
                    did if isinstance(did, str) else None,
                )
    return checker.result()


async def tail(db_path: Path, n: int = 20) -> list[dict[str, Any]]:
    """The newest n events, oldest first, as a terminal reads a log."""
    if n <= 0:
        return []
    async with (
        _read_only(db_path) as db,
        db.execute("SELECT event FROM audit_events ORDER BY seq DESC LIMIT ?", (n,)) as cur,
    ):
        rows = await cur.fetchall()
    return [json.loads(row[0]) for row in reversed(list(rows))]


def _query_ts(moment: datetime) -> str:
    # Naive times are taken as UTC, the zone every stored timestamp is in.
    return _format_ts(moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC))


async def search(
    db_path: Path,
    *,
    user: str | None = None,
    device: str | None = None,
    route: str | None = None,
    reason: str | None = None,
    decision_id: str | None = None,
    session: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The newest `limit` events matching every given filter, oldest first.

    `since` is inclusive and `until` exclusive, so consecutive windows never count an event twice.
    `session` has no index of its own (it is read from the event, so logs written before it was
    recorded need no migration): give `user` or `since` with it on a large log.
    """
    if limit <= 0:
        return []
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (
        ('"user"', user),
        ("device", device),
        ("route", route),
        ("reason", reason),
        ("decision_id", decision_id),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if session is not None:
        clauses.append("json_extract(event, '$.input.session') = ?")
        params.append(session)
    if since is not None:
        clauses.append("ts >= ?")
        params.append(_query_ts(since))
    if until is not None:
        clauses.append("ts < ?")
        params.append(_query_ts(until))
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    params.append(limit)
    # Only the column names above are interpolated; every value is a bound parameter.
    sql = f"SELECT event FROM audit_events {where} ORDER BY seq DESC LIMIT ?"  # noqa: S608
    async with _read_only(db_path) as db, db.execute(sql, params) as cur:
        rows = await cur.fetchall()
    return [json.loads(row[0]) for row in reversed(list(rows))]


# --------------------------------------------------------------------------- masking

SECRET_HEADERS: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "x-ztgw-mfa",
        "x-auth-token",
        "x-access-token",
        "x-csrf-token",
        "x-xsrf-token",
        "x-amz-security-token",
        "x-goog-iap-jwt-assertion",
        "cf-access-jwt-assertion",
    }
)
"""Always masked; names that merely look secret (see _SECRET_WORDS) are masked as well."""

SECRET_QUERY_PARAMS: Final = frozenset(
    {"code", "state", "ticket", "sig", "samlresponse", "samlrequest", "relaystate"}
)
"""OAuth/OIDC and SAML parameters that grant or bind a login; masked with the _SECRET_WORDS."""

_SECRET_WORDS: Final = frozenset(
    {
        "token",
        "secret",
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "apikey",
        "key",
        "signature",
        "credential",
        "credentials",
        "session",
        "sessionid",
        "jwt",
        "assertion",
        "otp",
        "mfa",
        "auth",
        "authorization",
        "cookie",
    }
)
_SECRET_SUFFIXES: Final = ("token", "secret", "password", "apikey", "signature")
_WORD_SPLIT: Final = re.compile(r"[^a-z0-9]+")


_CACHED_NAME_MAX: Final = 64
"""Names up to this long have their verdict cached (clients reuse a few dozen header and
parameter names); longer ones are judged every time, so the cache stays small."""


@functools.lru_cache(maxsize=2048)
def _is_secret_lowered(lowered: str, always: frozenset[str]) -> bool:
    if lowered in always:
        return True
    if any(word in _SECRET_WORDS for word in _WORD_SPLIT.split(lowered)):
        return True
    # camelCase names (refreshToken, clientSecret) have no separator to split on.
    return lowered.endswith(_SECRET_SUFFIXES)


def _is_secret_name(name: str, always: frozenset[str]) -> bool:
    lowered = name.lower()
    if len(lowered) > _CACHED_NAME_MAX:
        return bool(_is_secret_lowered.__wrapped__(lowered, always))
    return _is_secret_lowered(lowered, always)


@functools.lru_cache(maxsize=1024)
def _query_name(raw_name: str) -> tuple[str, bool]:
    """A query parameter's decoded name and whether its value is a secret."""
    name = unquote_plus(raw_name)
    return name, _is_secret_name(name, SECRET_QUERY_PARAMS)


def _mask(value: str, key: bytes | None) -> str:
    # Eight hex chars correlate two events carrying the same secret without revealing it.
    # Unkeyed, a low-entropy secret (a password, a 6-digit code) can be brute-forced against
    # the prefix; a deployment key turns it into an HMAC that cannot.
    data = value.encode("utf-8", "surrogatepass")
    digest = (
        hmac.new(key, data, hashlib.sha256).hexdigest()
        if key is not None
        else hashlib.sha256(data).hexdigest()
    )
    return f"<masked:{digest[:8]}>"


def mask_headers(
    headers: Iterable[tuple[str, str]],
    *,
    key: bytes | None = None,
    prefix: str = "input.headers",
) -> tuple[dict[str, str], list[str]]:
    """Headers for the event input with secrets replaced, and the paths that were masked.

    Each value of a repeated header is masked on its own so one shared cookie still correlates.
    """
    out: dict[str, str] = {}
    repeated: dict[str, list[str]] = {}
    masked: list[str] = []
    for name, raw in headers:
        lowered = name.lower()
        value = raw
        if _is_secret_name(lowered, SECRET_HEADERS):
            value = _mask(raw, key)
            if lowered not in out:
                masked.append(f"{prefix}.{lowered}")
        if lowered in out:
            repeated.setdefault(lowered, [out[lowered]]).append(value)
        else:
            out[lowered] = value
    # A repeated header is one entry, its values joined in order.
    for lowered, values in repeated.items():
        out[lowered] = ", ".join(values)
    masked.sort()
    return out, masked


def mask_query(
    query: str, *, key: bytes | None = None, prefix: str = "input.query"
) -> tuple[str, list[str]]:
    """The query string (without '?') with secret parameter values masked, and their paths.

    Names keep their original encoding and order, so the logged query still shows what the
    client sent; empty values are left alone since they reveal nothing.
    """
    if not query:
        return query, []
    parts: list[str] = []
    masked: set[str] = set()
    for part in query.split("&"):
        raw_name, sep, raw_value = part.partition("=")
        name, secret = (
            _query_name(raw_name)
            if len(raw_name) <= _CACHED_NAME_MAX
            else _query_name.__wrapped__(raw_name)
        )
        if sep and raw_value and secret:
            parts.append(f"{raw_name}={_mask(unquote_plus(raw_value), key)}")
            masked.add(f"{prefix}.{name}")
        else:
            parts.append(part)
    return "&".join(parts), sorted(masked)
