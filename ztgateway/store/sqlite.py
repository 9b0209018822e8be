"""The embedded store: SQLite (WAL) behind an in-memory cache.

Reads on the request path never touch the disk: devices, posture, users and live sessions are
held in memory and kept in sync through a `changes` table that every writer appends to. A
process (this gateway, another worker, the CLI) polls it every `sync_interval` and reloads what
changed, so a revocation made anywhere on the host holds everywhere within that bound.
Frequent touches (last seen, last IP, session activity) are written behind in batches, and so
are the sessions' recent decisions (`session_history`, read only by `ztgateway sessions show`).
A browser session's OIDC ID token is kept apart too (`session_secrets`, read only by logout and
the step-up's rotation), never in memory.

Counters (rate buckets, failure windows) live in process memory: they are per-process by design
for the embedded store; the Redis store shares them between replicas. A failure window is one
float, or a sorted `array('d')`; it keeps only what the windows callers ask can still count, and
a key that went quiet is dropped by an incremental sweep (see `failures`).

Why one module of about a thousand lines: `SQLiteStore` is one class for the same reason as the
Redis store. The in-memory cache, the `changes` cursor, the write-behind batches and the failure
windows are consistent only together (a sync reloads what a batch may be about to write back);
split by entity, each piece would reach into the others' state. The JSON both backends keep is
codec.py's, the records and merge rules base.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import stat
from array import array
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeAlias

import aiosqlite

from ..clock import SYSTEM_CLOCK, Clock
from .base import (
    HISTORY_BACKLOG,
    MAX_FAILURES,
    MAX_WEBAUTHN_CREDENTIALS,
    SESSION_HISTORY,
    CachedReads,
    ChangeFeed,
    ChangeKind,
    ChangeListener,
    Device,
    DeviceState,
    PostureRecord,
    Session,
    SessionDecision,
    StoreUnavailable,
    UserRecord,
    WebAuthnCredential,
    latest_decisions,
    take_id_token,
)
from .codec import session_from_json, session_json, user_from_json, user_json

log = logging.getLogger("ztgateway.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, subject TEXT NOT NULL,
    owner TEXT, state TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    last_ip TEXT, spki TEXT);
CREATE TABLE IF NOT EXISTS posture (
    device_id TEXT PRIMARY KEY, report TEXT NOT NULL, received_at REAL NOT NULL,
    collected_at REAL, signed INTEGER NOT NULL, digest TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (user TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, user TEXT NOT NULL, expires_at REAL NOT NULL,
    data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions(user);
CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS revoked_certificates (key TEXT PRIMARY KEY, until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, key TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS session_history (
    id INTEGER PRIMARY KEY, session_id TEXT NOT NULL, at REAL NOT NULL, ip TEXT NOT NULL,
    route TEXT NOT NULL, verdict TEXT NOT NULL, reason TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS session_history_by_session ON session_history(session_id, at);
CREATE TABLE IF NOT EXISTS session_secrets (session_id TEXT PRIMARY KEY, id_token TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS backup_codes_used (
    user TEXT NOT NULL, code_hash TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (user, code_hash));
CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pending_logins (
    state TEXT PRIMARY KEY, source TEXT NOT NULL, expires REAL NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS pending_logins_by_source ON pending_logins(source);
CREATE TABLE IF NOT EXISTS webauthn_credentials (
    credential_id TEXT PRIMARY KEY, user TEXT NOT NULL, sign_count INTEGER NOT NULL,
    last_used_at REAL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS webauthn_credentials_by_user ON webauthn_credentials(user);
CREATE TRIGGER IF NOT EXISTS sessions_keep_id_token AFTER UPDATE OF data ON sessions
WHEN instr(OLD.data, '"id_token"') > 0
BEGIN
    INSERT OR IGNORE INTO session_secrets (session_id, id_token)
    SELECT OLD.session_id, t FROM (SELECT json_extract(OLD.data, '$.extra.id_token') AS t)
    WHERE typeof(t) = 'text' AND t <> '';
END;
"""
# The trigger: a row written before the ID token was kept apart has it in `data`, until a write
# (by any process, a touch included) replaces `data`, which moves the token aside first.
_SAVE_LOGOUT_HINT = (
    "INSERT INTO session_secrets (session_id, id_token) VALUES (?, ?) "
    "ON CONFLICT(session_id) DO UPDATE SET id_token = excluded.id_token"
)
# The last SESSION_HISTORY decisions of a session, by time (rows come from every process).
_TRIM_HISTORY = """
DELETE FROM session_history WHERE session_id = ?1 AND id NOT IN (
    SELECT id FROM session_history WHERE session_id = ?1 ORDER BY at DESC, id DESC LIMIT ?2)
"""
# A touch writes a user's history (what requests add) into the stored record and nothing else:
# a copy of the record this process holds may predate a lock, an enrolment or a used backup code
# written since by another process, and must not write those back.
_TOUCH_USER = (
    "INSERT INTO users (user, data) VALUES (?1, ?2) ON CONFLICT(user) DO UPDATE SET "
    "data = json_set(users.data, '$.known_devices', json(?3), '$.known_routes', json(?4), "
    "'$.last_location', json(?5))"
)
# The newest `per_source` attempts of a source stay (rowids grow with insertion).
_TRIM_LOGINS = (
    "DELETE FROM pending_logins WHERE source = ?1 AND rowid NOT IN "
    "(SELECT rowid FROM pending_logins WHERE source = ?1 ORDER BY rowid DESC LIMIT ?2)"
)
_CREDENTIALS = "SELECT data, sign_count, last_used_at FROM webauthn_credentials "
_CREDENTIALS_BY_USER = _CREDENTIALS + "WHERE user = ? ORDER BY rowid"
_CREDENTIAL_BY_ID = _CREDENTIALS + "WHERE credential_id = ?"
_SWEEP_BATCH = 2000  # failure keys checked per write-behind tick, at least
_SWEEP_SLICE = 1000  # ... between two yields to the event loop
_SWEEP_EVERY = 1.0  # seconds between the starts of two passes over the keys, at least
# Named, not *: a database migrated with ALTER TABLE could have its columns in another order.
# (The Device fields, in order; tests/unit/test_store_contract.py checks they agree.)
_SELECT_DEVICES = (
    "SELECT device_id, fingerprint, subject, owner, state, first_seen, last_seen, last_ip, spki "
    "FROM devices"
)
SAVE_SESSION = (
    "INSERT INTO sessions (session_id, user, expires_at, data) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(session_id) DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at "
    # SECURITY: a revocation is final. A save from a process whose copy predates it (it has
    # not synced yet) is dropped instead of writing the session back to life, as on Redis.
    "WHERE json_extract(sessions.data, '$.revoked_at') IS NULL "
    "OR json_extract(excluded.data, '$.revoked_at') IS NOT NULL"
)


def _posture_from_row(row: Any) -> PostureRecord:
    return PostureRecord(row[0], json.loads(row[1]), row[2], row[3], bool(row[4]), row[5])


def _by_session(
    pending: Iterable[tuple[str, SessionDecision]],
) -> dict[str, list[SessionDecision]]:
    """Pending decisions grouped by session, only the ones the store would keep."""
    out: dict[str, list[SessionDecision]] = {}
    for sid, d in pending:
        out.setdefault(sid, []).append(d)
    return {sid: latest_decisions(ds) for sid, ds in out.items()}


# A failure window: one event as a float (most keys), more as a sorted array of floats.
Events: TypeAlias = "float | array[float]"


_GONE = float("-inf")
"""A key whose events all aged out: kept (one shared float) until its next event or the sweep,
so that a session's counter does not leave and re-enter the dictionary between its requests."""


async def _wal_mode(db: aiosqlite.Connection, patience: float) -> None:
    """`PRAGMA journal_mode=WAL`, retried while another process holds the file.

    Two workers creating the database at the same moment: switching the journal mode needs
    an exclusive lock, and SQLite may answer "database is locked" at once instead of waiting
    in its busy handler. A worker then died at start-up (seen in CI: `workers = 2`, a new
    state file, one worker never came up).
    """
    deadline = asyncio.get_running_loop().time() + patience
    while True:
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or asyncio.get_running_loop().time() >= deadline:
                raise
            await asyncio.sleep(0.02)


_UNCHANGED: Any = object()


def _count_down(counts: dict[tuple[ChangeKind, str], int], ref: tuple[ChangeKind, str]) -> int:
    """One fewer under way for `ref`; the entry goes at zero (these stay as small as the work
    in flight). Returns how many are left."""
    left = counts[ref] - 1
    if left:
        counts[ref] = left
    else:
        del counts[ref]
    return left


def _newest(events: Events) -> float:
    return events if isinstance(events, float) else events[-1]


class SQLiteStore(CachedReads, ChangeFeed):
    def __init__(
        self,
        path: Path,
        *,
        sync_interval: float = 0.25,
        flush_interval: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
        failure_ttl: float = 86400.0,
        busy_timeout: float = 5.0,
        flush_grace: float = 5.0,
    ) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.flush_grace = flush_grace
        """Seconds the write-behind may keep failing before the store reports unhealthy."""
        self._flush_failing_since: float | None = None
        self.observe: Callable[[str, float, bool], None] | None = None
        """Durable-write latency and result, for metrics (operation, seconds, ok)."""
        self.sync_interval = sync_interval
        self.flush_interval = flush_interval
        self._clock = clock
        self._db: aiosqlite.Connection | None = None
        self._devices: dict[str, Device] = {}
        self._posture: dict[str, PostureRecord] = {}
        self._users: dict[str, UserRecord] = {}
        self._sessions: dict[str, Session] = {}
        self._dirty_devices: set[str] = set()
        self._dirty_sessions: set[str] = set()
        self._dirty_users: set[str] = set()
        self._buckets: dict[str, tuple[float, float]] = {}
        self.failure_ttl = failure_ttl
        self._failures: dict[str, Events] = {}
        self._horizons: dict[str, float] = {}  # per key family: the longest window asked
        self._longest = -1.0  # the longest window asked of any key (-1: none yet)
        self._sweep_todo: list[str] = []
        self._sweep_next = 0.0
        self._history: deque[tuple[str, SessionDecision]] = deque(maxlen=HISTORY_BACKLOG)
        self._listeners: list[ChangeListener] = []
        self._last_seq = 0
        self._writing: dict[tuple[ChangeKind, str], int] = {}
        """Per entity: durable writes this process began and has not committed yet."""
        self._reloading: dict[tuple[ChangeKind, str], int] = {}
        """Per entity: reloads whose read is on its way."""
        self._raced: set[tuple[ChangeKind, str]] = set()
        """Entities a write began on while a reload of them was reading (see `_reload`)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._healthy = False
        self._write_lock = asyncio.Lock()

    # --- lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        try:
            await asyncio.to_thread(_private_database, self.path)
            db = await aiosqlite.connect(self.path, timeout=self.busy_timeout)
        except Exception as exc:
            raise StoreUnavailable(f"{self.path}: {exc}") from exc
        self._db = db
        await _wal_mode(db, self.busy_timeout)
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.executescript(SCHEMA)
        columns = {row[1] for row in await self._rows("PRAGMA table_info(devices)")}
        if "spki" not in columns:
            # Databases from before device keys were pinned (security review L9).
            await db.execute("ALTER TABLE devices ADD COLUMN spki TEXT")
        await db.commit()
        [(last_seq,)] = await self._rows("SELECT COALESCE(MAX(seq), 0) FROM changes")
        self._last_seq = int(last_seq)
        await self._load_all()
        self._healthy = True
        self._tasks = [
            asyncio.ensure_future(self._sync_loop()),
            asyncio.ensure_future(self._flush_loop()),
        ]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._db is not None:
            with contextlib.suppress(Exception):
                await self._flush()
            await self._db.close()
            self._db = None
        self._healthy = False

    @property
    def healthy(self) -> bool:
        # A write-behind that fails once (another process held the lock past the busy timeout)
        # is retried with nothing lost, and the cache is still current (sync reads on): only
        # one failing for longer than `flush_grace` makes requests fail closed.
        failing = self._flush_failing_since
        return (
            self._healthy
            and self._db is not None
            and (failing is None or self._clock.monotonic() - failing < self.flush_grace)
        )

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreUnavailable("store is not open")
        return self._db

    async def _load_all(self) -> None:
        # Streamed, not fetched whole (100,000 sessions' rows at once would double the memory
        # the store starts with): open() runs this before the store's tasks start, so no other
        # coroutine can write on the connection while these reads are open (see _rows).
        db = self.db
        async with db.execute(_SELECT_DEVICES) as cur:
            async for row in cur:
                self._devices[row[0]] = Device(*row)
        async with db.execute("SELECT * FROM posture") as cur:
            async for row in cur:
                self._posture[row[0]] = _posture_from_row(row)
        async with db.execute("SELECT data FROM users") as cur:
            async for row in cur:
                u = user_from_json(json.loads(row[0]))
                self._users[u.user] = u
        now = self._clock.time()
        async with db.execute("SELECT data FROM sessions WHERE expires_at > ?", (now,)) as cur:
            async for row in cur:
                s = session_from_json(json.loads(row[0]))
                self._sessions[s.session_id] = s

    async def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """Every row of a read, in one step. A read left open across an await holds a snapshot
        on this shared connection, and a write made meanwhile by another coroutine then fails at
        once with "database is locked" if another process has committed since (WAL cannot
        upgrade a stale snapshot, and the busy timeout does not apply): a lock error under load
        with `workers = 2`, each one a moment of 503s."""
        return list(await self.db.execute_fetchall(sql, args))

    # --- change propagation ----------------------------------------------------------------
    async def _write(
        self,
        sql: str,
        args: tuple[Any, ...],
        kind: ChangeKind,
        key: str,
        also: tuple[tuple[str, tuple[Any, ...]], ...] = (),
    ) -> None:
        """One durable change (and `also`, in the same transaction), announced to every process.

        Counted per entity from the first line on, in the same turn of the loop as the cache
        update a caller made before calling (`save_user`): see `_reload`."""
        started = self._clock.monotonic()
        ref = (kind, key)
        self._writing[ref] = self._writing.get(ref, 0) + 1
        if ref in self._reloading:
            self._raced.add(ref)
        try:
            async with self._write_lock:
                db = self.db
                try:
                    await db.execute(sql, args)
                    for more, more_args in also:
                        await db.execute(more, more_args)
                    await db.execute(
                        "INSERT INTO changes (kind, key, at) VALUES (?, ?, ?)",
                        (kind.value, key, self._clock.time()),
                    )
                    await db.commit()
                except Exception as exc:
                    self._healthy = False
                    if self.observe is not None:
                        elapsed = self._clock.monotonic() - started
                        self.observe(f"write_{kind.value}", elapsed, False)
                    raise StoreUnavailable(str(exc)) from exc
                self._healthy = True
        finally:
            _count_down(self._writing, ref)
        if self.observe is not None:
            self.observe(f"write_{kind.value}", self._clock.monotonic() - started, True)
        self._notify(kind, key)

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sync_interval)
            try:
                await self.sync()
            except Exception as exc:
                self._healthy = False
                log.warning("store sync failed: %s", exc)

    async def sync(self) -> int:
        """Apply changes made by other processes; returns how many were applied."""
        rows = await self._rows(
            "SELECT seq, kind, key FROM changes WHERE seq > ? ORDER BY seq", (self._last_seq,)
        )
        for seq, kind, key in rows:
            self._last_seq = max(self._last_seq, int(seq))
            await self._reload(ChangeKind(kind), key)
            self._notify(ChangeKind(kind), key)
        self._healthy = True
        return len(rows)

    async def caught_up(self) -> None:
        """Every committed change is in the change log: reading it now is catching up."""
        await self.sync()

    async def _one(self, sql: str, args: tuple[Any, ...]) -> Any:
        rows = await self._rows(sql, args)
        return rows[0] if rows else None

    async def _reload(self, kind: ChangeKind, key: str, *, force: bool = False) -> None:
        """The entity as the database holds it now, unless this process wrote it meanwhile
        (`force`: a device read right after this process's own write, or one not cached).

        SECURITY: the read is one await long. A write this process began before it committed
        (an account lock, an MFA reset, a revoked session, put in the cache first) or during it
        would otherwise be overwritten in the cache by the older row, and for up to a sync
        interval the lock or reset would not hold here. Such a write's own change entry
        reloads the entity once it is committed.
        """
        ref = (kind, key)
        if ref in self._writing and not force:
            return
        self._reloading[ref] = self._reloading.get(ref, 0) + 1
        try:
            fresh = await self._read_entity(kind, key)
        finally:
            raced = ref in self._raced
            if not _count_down(self._reloading, ref):
                self._raced.discard(ref)
        if fresh is _UNCHANGED or (not force and (raced or ref in self._writing)):
            return
        cache = self._cache(kind)
        if fresh is None:
            cache.pop(key, None)
        else:
            cache[key] = self._merge_local(kind, key, fresh, cache.get(key))

    async def _read_entity(self, kind: ChangeKind, key: str) -> Any:
        """The entity as its row holds it; None: gone; _UNCHANGED: nothing to apply."""
        if kind is ChangeKind.DEVICE:
            row = await self._one(_SELECT_DEVICES + " WHERE device_id = ?", (key,))
            return None if row is None else Device(*row)
        if kind is ChangeKind.POSTURE:
            row = await self._one("SELECT * FROM posture WHERE device_id = ?", (key,))
            # Posture reports are replaced, never deleted.
            return _UNCHANGED if row is None else _posture_from_row(row)
        if kind is ChangeKind.USER:
            row = await self._one("SELECT data FROM users WHERE user = ?", (key,))
            return None if row is None else user_from_json(json.loads(row[0]))
        row = await self._one("SELECT data FROM sessions WHERE session_id = ?", (key,))
        return None if row is None else session_from_json(json.loads(row[0]))

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            await self._sweep()
            try:
                await self._flush()
            except Exception as exc:
                log.warning("store write-behind failed, will retry: %s", exc)

    async def _flush(self) -> None:
        if not (self._dirty_devices or self._dirty_sessions or self._dirty_users or self._history):
            self._flush_failing_since = None
            return
        devices, self._dirty_devices = self._dirty_devices, set()
        sessions, self._dirty_sessions = self._dirty_sessions, set()
        users, self._dirty_users = self._dirty_users, set()
        pending = list(self._history)
        self._history.clear()
        history = _by_session(pending)
        async with self._write_lock:
            db = self.db
            try:
                for d in (self._devices.get(k) for k in devices):
                    if d is not None:
                        await db.execute(
                            "UPDATE devices SET last_seen = ?, last_ip = ? WHERE device_id = ?",
                            (d.last_seen, d.last_ip, d.device_id),
                        )
                for s in (self._sessions.get(k) for k in sessions):
                    if s is not None:
                        # Touches never un-revoke: a revocation written elsewhere wins.
                        await db.execute(
                            "UPDATE sessions SET data = ? WHERE session_id = ? "
                            "AND json_extract(data, '$.revoked_at') IS NULL",
                            (session_json(s), s.session_id),
                        )
                for u in (self._users.get(k) for k in users):
                    if u is not None:
                        await db.execute(
                            _TOUCH_USER,
                            (
                                u.user,
                                user_json(u),
                                json.dumps(list(u.known_devices)),
                                json.dumps(list(u.known_routes)),
                                json.dumps(u.last_location),
                            ),
                        )
                if history:
                    await db.executemany(
                        "INSERT INTO session_history "
                        "(session_id, at, ip, route, verdict, reason) VALUES (?, ?, ?, ?, ?, ?)",
                        [(sid, *d) for sid, ds in history.items() for d in ds],
                    )
                    await db.executemany(_TRIM_HISTORY, [(sid, SESSION_HISTORY) for sid in history])
                await db.commit()
            except Exception:
                self._dirty_devices |= devices
                self._dirty_sessions |= sessions
                self._dirty_users |= users
                # Kept for the next attempt, before what arrived meanwhile (the oldest go first
                # if the backlog is full).
                self._history = deque([*pending, *self._history], maxlen=HISTORY_BACKLOG)
                with contextlib.suppress(Exception):
                    await db.rollback()
                if self._flush_failing_since is None:
                    self._flush_failing_since = self._clock.monotonic()
                raise
            self._flush_failing_since = None

    async def flush(self) -> None:
        await self._flush()

    # --- devices -----------------------------------------------------------------------------
    async def register_device(self, device: Device) -> Device:
        existing = self._devices.get(device.device_id)
        if existing is not None:
            return existing
        await self._write(
            "INSERT OR IGNORE INTO devices (device_id, fingerprint, subject, owner, state, "
            "first_seen, last_seen, last_ip, spki) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                device.device_id,
                device.fingerprint,
                device.subject,
                device.owner,
                device.state,
                device.first_seen,
                device.last_seen,
                device.last_ip,
                device.spki,
            ),
            ChangeKind.DEVICE,
            device.device_id,
        )
        await self._reload(ChangeKind.DEVICE, device.device_id, force=True)
        return self._devices[device.device_id]

    def touch_device(self, device_id: str, now: float, ip: str) -> None:
        d = self._devices.get(device_id)
        if d is not None and (now - d.last_seen > 1.0 or d.last_ip != ip):
            d.last_seen, d.last_ip = now, ip
            self._dirty_devices.add(device_id)

    async def set_device_state(self, device_id: str, state: DeviceState) -> Device | None:
        return await self._update_device(device_id, "state = ?", (state,))

    async def set_device_owner(self, device_id: str, owner: str | None) -> Device | None:
        return await self._update_device(device_id, "owner = ?", (owner,))

    async def bind_device_key(
        self, device_id: str, spki: str, fingerprint: str, subject: str
    ) -> Device | None:
        return await self._update_device(
            device_id, "spki = ?, fingerprint = ?, subject = ?", (spki, fingerprint, subject)
        )

    async def _update_device(
        self, device_id: str, assignments: str, values: tuple[Any, ...]
    ) -> Device | None:
        """Change a known device's columns (`assignments` is one of the constant SET lists
        above, never input) and return it as stored; None for an unknown device."""
        if device_id not in self._devices:
            await self._reload(ChangeKind.DEVICE, device_id, force=True)
            if device_id not in self._devices:
                return None
        await self._write(
            f"UPDATE devices SET {assignments} WHERE device_id = ?",  # noqa: S608 - constants
            (*values, device_id),
            ChangeKind.DEVICE,
            device_id,
        )
        await self._reload(ChangeKind.DEVICE, device_id, force=True)
        return self._devices.get(device_id)

    async def put_posture(self, record: PostureRecord) -> None:
        await self._write(
            "INSERT INTO posture VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
            "report = excluded.report, received_at = excluded.received_at, "
            "collected_at = excluded.collected_at, signed = excluded.signed, digest = excluded.digest",
            (
                record.device_id,
                json.dumps(record.report),
                record.received_at,
                record.collected_at,
                int(record.signed),
                record.digest,
            ),
            ChangeKind.POSTURE,
            record.device_id,
        )
        self._posture[record.device_id] = record

    # --- users ---------------------------------------------------------------------------------
    async def save_user(self, record: UserRecord) -> None:
        self._users[record.user] = record
        self._dirty_users.discard(record.user)
        await self._write(
            "INSERT INTO users (user, data) VALUES (?, ?) "
            "ON CONFLICT(user) DO UPDATE SET data = excluded.data",
            (record.user, user_json(record)),
            ChangeKind.USER,
            record.user,
        )

    def touch_user(self, record: UserRecord) -> None:
        """History a request adds (known devices, routes, location): written behind."""
        self._users[record.user] = record
        self._dirty_users.add(record.user)

    # --- sessions ------------------------------------------------------------------------------
    async def save_session(self, session: Session) -> None:
        id_token = take_id_token(session)  # before compact() drops it from `extra`
        session.compact()
        self._sessions[session.session_id] = session
        self._dirty_sessions.discard(session.session_id)
        await self._write(
            SAVE_SESSION,
            (session.session_id, session.user, session.expires_at, session_json(session)),
            ChangeKind.SESSION,
            session.session_id,
            also=((_SAVE_LOGOUT_HINT, (session.session_id, id_token)),) if id_token else (),
        )
        if not session.revoked:
            # Another process may have revoked it since this copy was read; then the row was
            # left as it was (SAVE_SESSION), and the copy this process goes on using is revoked.
            row = await self._one(
                "SELECT json_extract(data, '$.revoked_at'), json_extract(data, '$.revoked_reason') "
                "FROM sessions WHERE session_id = ?",
                (session.session_id,),
            )
            if row is not None and row[0] is not None:
                session.revoked_at, session.revoked_reason = row[0], row[1]

    async def session_id_token(self, session_id: str) -> str | None:
        try:
            rows = await self._rows(
                "SELECT 0, id_token FROM session_secrets WHERE session_id = ?1 UNION ALL "
                # A row written before, not rewritten since: the token is still in its JSON.
                "SELECT 1, json_extract(data, '$.extra.id_token') FROM sessions "
                "WHERE session_id = ?1 ORDER BY 1",
                (session_id,),
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(exc)) from exc
        return next((t for _, t in rows if isinstance(t, str) and t), None)

    def touch_session(self, session: Session) -> None:
        self._dirty_sessions.add(session.session_id)

    def record_decision(self, session_id: str, decision: SessionDecision) -> None:
        self._history.append((session_id, decision))

    async def session_history(self, session_id: str) -> list[SessionDecision]:
        rows = await self._rows(
            "SELECT at, ip, route, verdict, reason FROM session_history WHERE session_id = ? "
            "ORDER BY at DESC, id DESC LIMIT ?",
            (session_id, SESSION_HISTORY),
        )
        stored = [SessionDecision(*row) for row in rows]
        # With what this process has not written yet.
        return latest_decisions([*stored, *(d for sid, d in self._history if sid == session_id)])

    async def revoke_session(self, session_id: str, reason: str, now: float) -> bool:
        s = self._sessions.get(session_id)
        if s is None:
            await self._reload(ChangeKind.SESSION, session_id)
            s = self._sessions.get(session_id)
        if s is None or s.revoked:
            return False
        s.revoked_at, s.revoked_reason = now, reason
        await self.save_session(s)
        return True

    async def expire_sessions(self, now: float, idle_timeout: float | None = None) -> int:
        gone = self._dead_in_memory(now, idle_timeout)
        for k in gone:
            self._sessions.pop(k, None)
        async with self._write_lock:
            # What is kept apart goes with its session.
            await self.db.execute(
                "DELETE FROM session_history WHERE session_id IN "
                "(SELECT session_id FROM sessions WHERE expires_at <= ?)",
                (now - 86400,),
            )
            await self.db.execute(
                "DELETE FROM session_secrets WHERE session_id IN "
                "(SELECT session_id FROM sessions WHERE expires_at <= ?)",
                (now - 86400,),
            )
            await self.db.execute("DELETE FROM sessions WHERE expires_at <= ?", (now - 86400,))
            await self.db.execute("DELETE FROM claims WHERE expires <= ?", (now,))
            await self.db.execute("DELETE FROM pending_logins WHERE expires <= ?", (now,))
            await self.db.commit()
        return len(gone)

    # --- counters ------------------------------------------------------------------------------
    def take_token(self, key: str, rate: float, burst: int, now: float) -> float:
        """Token bucket: 0.0 if a token was taken, else seconds until one is available."""
        tokens, stamp = self._buckets.get(key, (float(burst), now))
        tokens = min(float(burst), tokens + (now - stamp) * rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > 200_000:
            self._prune_buckets(now, rate, burst)
        return (1.0 - tokens) / rate if rate > 0 else 3600.0

    def _prune_buckets(self, now: float, rate: float, burst: int) -> None:
        full_after = burst / rate if rate > 0 else 3600.0
        for k in [k for k, (_, t) in self._buckets.items() if now - t > full_after]:
            del self._buckets[k]

    def _prune(self, key: str, events: array[float], cutoff: float) -> None:
        """Drop the events before `cutoff`; one left is kept as a float, none as _GONE."""
        gone = bisect_left(events, cutoff)
        if gone:
            del events[:gone]
            if len(events) == 1:
                self._failures[key] = events[0]
            elif not events:
                self._failures[key] = _GONE

    def record_failure(self, key: str, now: float) -> None:
        now = float(now)
        failures = self._failures
        events = failures.get(key)
        if events is None or events is _GONE:
            failures[key] = now
        else:
            if isinstance(events, float):
                pair = (events, now) if events <= now else (now, events)
                events = failures[key] = array("d", pair)
            elif now >= events[-1]:
                events.append(now)
            else:
                insort(events, now)  # concurrent requests finish in any order
            if len(events) > MAX_FAILURES:
                del events[: len(events) - MAX_FAILURES]

    def failures(self, key: str, now: float, window: float) -> int:
        """Events recorded for `key` at or after `now - window`.

        Retention follows the windows asked. A key keeps the events the longest window asked
        of its family (`req`, `refused`, `user`, …: the text before the first colon) can count,
        a quiet key goes once the longest window asked of the store cannot count its newest
        event, and nothing older than `failure_ttl` (the Redis store's retention) is promised.
        So the count is exact unless the same key was asked before with a window shorter than
        this one by more than the time since, which callers (fixed, configured windows; the
        TOTP window only grows with time) never do.
        """
        if window > self._longest:  # noqa: PLR1730 - on every request: no call
            self._longest = window
        events = self._failures.get(key)
        if events is None:
            return 0
        since = now - window
        if events is _GONE:
            return 0
        if isinstance(events, float) and events >= since:
            return 1
        i = key.find(":")
        family = key[:i] if i > 0 else ""
        asked = self._horizons.get(family)
        if asked is None or window > asked:
            self._horizons[family] = asked = window
        ttl = self.failure_ttl
        cutoff = now - (asked if asked < ttl else ttl)
        if isinstance(events, float):
            if events < cutoff:
                self._failures[key] = _GONE  # its slot, for the next event (or the sweep)
            return 0
        if events[0] < cutoff:
            self._prune(key, events, cutoff)
            events = self._failures[key]
            if isinstance(events, float):
                return 1 if events >= since else 0
        return len(events) - bisect_left(events, since)

    def reset_failures(self, key: str) -> None:
        self._failures.pop(key, None)

    def _sweep_failures(self, now: float, budget: int) -> int:
        """Check up to `budget` keys of the current pass over a snapshot of the keys, and drop
        the quiet ones (newest event older than the longest window asked, or `failure_ttl`);
        how many were checked. A pass starts at most every _SWEEP_EVERY seconds."""
        todo = self._sweep_todo
        if not todo:
            if now < self._sweep_next or not self._failures:
                return 0
            todo = self._sweep_todo = list(self._failures)
            self._sweep_next = now + _SWEEP_EVERY
        failures = self._failures
        longest, ttl = self._longest, self.failure_ttl
        cutoff = now - (longest if 0.0 <= longest < ttl else ttl)
        checked = min(budget, len(todo))
        for _ in range(checked):
            key = todo.pop()
            events = failures.get(key)
            if events is not None and _newest(events) < cutoff:
                del failures[key]
        return checked

    async def _sweep(self) -> None:
        """One write-behind tick's share of the sweep: a tenth of the keys at least, so a pass
        takes at most ten ticks, in slices that let requests through in between."""
        budget = max(_SWEEP_BATCH, len(self._failures) // 10)
        while budget > 0:
            checked = self._sweep_failures(self._clock.time(), min(budget, _SWEEP_SLICE))
            if not checked:
                return
            budget -= checked
            await asyncio.sleep(0)

    # The same counters under the names the Redis store uses: there they are a round trip, so
    # callers await them; here they answer from memory at once (per process, by design).
    async def take_token_async(self, key: str, rate: float, burst: int, now: float) -> float:
        return self.take_token(key, rate, burst, now)

    async def record_failure_async(self, key: str, now: float) -> None:
        self.record_failure(key, now)

    async def failures_async(self, key: str, now: float, window: float) -> int:
        return self.failures(key, now, window)

    async def reset_failures_async(self, key: str) -> None:
        self.reset_failures(key)

    async def advance(self, key: str, value: int) -> bool:
        """Atomic compare-and-set: store `value` only if it is greater than the stored one.

        The TOTP replay guard (RFC 6238 §5.2): one used time step per user, so the same code,
        or an older one, can never be accepted twice — across processes too, since SQLite
        serialises writers.
        """
        async with self._write_lock:
            db = self.db
            cur = await db.execute(
                "INSERT INTO counters (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
                "SET value = excluded.value WHERE counters.value < excluded.value",
                (key, value),
            )
            await db.commit()
            return bool(cur.rowcount == 1)

    async def reset_counter(self, key: str) -> None:
        async with self._write_lock:
            await self.db.execute("DELETE FROM counters WHERE key = ?", (key,))
            await self.db.commit()

    async def claim_once(self, key: str, ttl: float, now: float) -> bool:
        """Atomically claim `key` (a used TOTP step): False if it was claimed before."""
        async with self._write_lock:
            db = self.db
            await db.execute("DELETE FROM claims WHERE key = ? AND expires <= ?", (key, now))
            cur = await db.execute(
                "INSERT OR IGNORE INTO claims (key, expires) VALUES (?, ?)", (key, now + ttl)
            )
            await db.commit()
            return bool(cur.rowcount == 1)

    async def revoke_certificate(self, key: str, until: float, now: float) -> None:
        """Remember a client certificate's revocation (learned by OCSP or a CRL) for every
        process sharing this file, until the certificate would have expired anyway."""
        async with self._write_lock:
            db = self.db
            await db.execute("DELETE FROM revoked_certificates WHERE until <= ?", (now,))
            await db.execute(
                "INSERT INTO revoked_certificates (key, until) VALUES (?, ?) ON CONFLICT(key) "
                "DO UPDATE SET until = max(until, excluded.until)",
                (key, until),
            )
            await db.commit()

    async def revoked_certificates(self, now: float) -> dict[str, float]:
        async with self.db.execute(
            "SELECT key, until FROM revoked_certificates WHERE until > ?", (now,)
        ) as cur:
            return {str(k): float(u) async for k, u in cur}

    async def consume_backup_code(self, user: str, code_hash: str) -> bool:
        """One INSERT against a primary key: SQLite serialises writers across processes, so
        exactly one caller inserts the mark (issue 18, M7)."""
        async with self._write_lock:
            db = self.db
            try:
                cur = await db.execute(
                    "INSERT OR IGNORE INTO backup_codes_used (user, code_hash, at) VALUES (?, ?, ?)",
                    (user, code_hash, self._clock.time()),
                )
                await db.commit()
            except sqlite3.Error as exc:
                raise StoreUnavailable(str(exc)) from exc
            return bool(cur.rowcount == 1)

    # --- WebAuthn credentials ----------------------------------------------------------------
    # The counter and last use are columns of their own: `use_webauthn_credential` advances
    # them with one conditional UPDATE (SQLite serialises writers across processes), and
    # `data` (written once, at registration) never carries them back.
    async def _changed_one(self, sql: str, args: tuple[Any, ...]) -> bool:
        """One statement in its own transaction: True if it changed exactly one row."""
        async with self._write_lock:
            db = self.db
            try:
                cur = await db.execute(sql, args)
                await db.commit()
            except sqlite3.Error as exc:
                with contextlib.suppress(Exception):
                    await db.rollback()
                raise StoreUnavailable(str(exc)) from exc
            return bool(cur.rowcount == 1)

    async def add_webauthn_credential(self, credential: WebAuthnCredential) -> bool:
        return await self._changed_one(
            "INSERT OR IGNORE INTO webauthn_credentials "
            "(credential_id, user, sign_count, last_used_at, data) "
            "SELECT ?1, ?2, ?3, NULL, ?4 "
            "WHERE (SELECT count(*) FROM webauthn_credentials WHERE user = ?2) < ?5",
            (
                credential.credential_id,
                credential.user,
                credential.sign_count,
                json.dumps(credential.to_json()),
                MAX_WEBAUTHN_CREDENTIALS,
            ),
        )

    async def _credentials(self, by_user: bool, arg: str) -> list[WebAuthnCredential]:
        sql = _CREDENTIALS_BY_USER if by_user else _CREDENTIAL_BY_ID
        try:
            rows = await self._rows(sql, (arg,))
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(exc)) from exc
        out = []
        for data, count, used in rows:
            record = json.loads(data)
            record["sign_count"], record["last_used_at"] = count, used
            out.append(WebAuthnCredential.from_json(record))
        return out

    async def webauthn_credentials(self, user: str) -> list[WebAuthnCredential]:
        return await self._credentials(True, user)

    async def webauthn_credential(self, credential_id: str) -> WebAuthnCredential | None:
        found = await self._credentials(False, credential_id)
        return found[0] if found else None

    async def use_webauthn_credential(
        self, credential_id: str, sign_count: int, now: float
    ) -> bool:
        return await self._changed_one(
            "UPDATE webauthn_credentials SET sign_count = ?1, last_used_at = ?2 "
            "WHERE credential_id = ?3 AND (sign_count < ?1 OR (sign_count = 0 AND ?1 = 0))",
            (sign_count, now, credential_id),
        )

    async def remove_webauthn_credential(self, user: str, credential_id: str) -> bool:
        return await self._changed_one(
            "DELETE FROM webauthn_credentials WHERE user = ? AND credential_id = ?",
            (user, credential_id),
        )

    # --- the gateway's own secrets and sign-ins in flight -----------------------------------------
    async def shared_secret(self, name: str, candidate: str) -> str:
        async with self._write_lock:
            db = self.db
            try:
                await db.execute(
                    "INSERT OR IGNORE INTO secrets (name, value) VALUES (?, ?)", (name, candidate)
                )
                await db.commit()
            except sqlite3.Error as exc:
                raise StoreUnavailable(str(exc)) from exc
        row = await self._one("SELECT value FROM secrets WHERE name = ?", (name,))
        if row is None:
            raise StoreUnavailable(f"secret {name} vanished")
        return str(row[0])

    async def put_pending_login(
        self, state: str, source: str, data: str, expires: float, per_source: int
    ) -> None:
        async with self._write_lock:
            db = self.db
            try:
                await db.execute(
                    "INSERT OR REPLACE INTO pending_logins (state, source, expires, data) "
                    "VALUES (?, ?, ?, ?)",
                    (state, source, expires, data),
                )
                await db.execute(_TRIM_LOGINS, (source, per_source))
                await db.commit()
            except sqlite3.Error as exc:
                with contextlib.suppress(Exception):
                    await db.rollback()
                raise StoreUnavailable(str(exc)) from exc

    async def take_pending_login(self, state: str, source: str, now: float) -> str | None:
        async with self._write_lock:
            db = self.db
            try:
                rows = list(
                    await db.execute_fetchall(
                        "DELETE FROM pending_logins WHERE state = ? AND source = ? "
                        "RETURNING data, expires",
                        (state, source),
                    )
                )
                await db.commit()
            except sqlite3.Error as exc:
                with contextlib.suppress(Exception):
                    await db.rollback()
                raise StoreUnavailable(str(exc)) from exc
        if not rows or float(rows[0][1]) <= now:
            return None
        return str(rows[0][0])


def _private_database(path: Path) -> None:
    """The state database holds sessions (addresses, user agents), ID tokens, devices and
    backup-code hashes: owner-only, like the audit log (issue 18, L5). Created 0600 before
    SQLite opens it (its -wal and -shm files take the database file's mode); an existing file
    or side file readable by others is tightened; a directory created here is 0700, and an
    existing one of ours loses its access for others (not a shared, sticky one such as /tmp)."""
    directory = path.parent
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)
    else:
        info = directory.stat()
        if info.st_uid == os.getuid() and info.st_mode & 0o007 and not info.st_mode & stat.S_ISVTX:
            directory.chmod(stat.S_IMODE(info.st_mode) & ~0o007)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            mode = stat.S_IMODE(file.stat().st_mode)
            if mode & 0o077:
                file.chmod(mode & 0o600)
