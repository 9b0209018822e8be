"""One contract for every store backend: SQLite (a temporary file) and Redis (a real server).

Every test that takes `backend` runs against both. Where the backends differ by design (rate
counters are per process in SQLite and shared in Redis) the test states the expected behaviour
for each backend explicitly instead of skipping one. Redis faults (paused, stopped, restarted)
only exist for Redis and are tested against the real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis as redis_sync

from ztgateway.store.base import (
    ID_TOKEN,
    MAX_FAILURES,
    MAX_WEBAUTHN_CREDENTIALS,
    SESSION_HISTORY,
    ChangeKind,
    Device,
    PostureRecord,
    Session,
    SessionDecision,
    StoreUnavailable,
    UserRecord,
    WebAuthnCredential,
)
from ztgateway.store.redis import RedisStore
from ztgateway.store.sqlite import SCHEMA, SQLiteStore

if TYPE_CHECKING:
    from tests.redis_server import RedisServer, RedisServerFactory

# The real-redis-server fixtures come from tests/conftest.py.

AnyStore = SQLiteStore | RedisStore


@dataclass
class Backend:
    """Opens store instances that share one backend (one SQLite file, or one redis-server)."""

    name: str
    new: Callable[..., AnyStore]
    server: RedisServer | None = None
    path: Path | None = None
    opened: list[AnyStore] = field(default_factory=list)

    async def open(self, **kw: Any) -> AnyStore:
        store = self.new(**kw)
        await store.open()
        self.opened.append(store)
        return store

    @property
    def shared_counters(self) -> bool:
        """Rate buckets and failure windows: per process in SQLite, shared in Redis."""
        return self.name == "redis"

    def raw_redis(self) -> redis_sync.Redis:
        assert self.server is not None
        return redis_sync.Redis(port=self.server.port, decode_responses=True)

    def raw_sqlite(self) -> sqlite3.Connection:
        assert self.path is not None
        return sqlite3.connect(self.path)


@pytest.fixture(params=["sqlite", "redis"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server_factory: RedisServerFactory
) -> AsyncIterator[Backend]:
    if request.param == "redis":
        server = redis_server_factory()
        b = Backend("redis", lambda **kw: RedisStore(server.url, **kw), server)
    else:
        path = tmp_path / "state.db"
        b = Backend("sqlite", lambda **kw: SQLiteStore(path, **kw), path=path)
    yield b
    for store in b.opened:
        await store.close()


@pytest.fixture
async def redis_backend(redis_server_factory: RedisServerFactory) -> AsyncIterator[Backend]:
    server = redis_server_factory()
    b = Backend("redis", lambda **kw: RedisStore(server.url, **kw), server)
    yield b
    for store in b.opened:
        await store.close()


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until `check()` holds; returns the seconds it took, fails after `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def raises_unavailable(call: Awaitable[Any]) -> float:
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await call
    return time.monotonic() - start


def device(device_id: str = "dev-1", now: float | None = None) -> Device:
    now = time.time() if now is None else now
    return Device(device_id, "ab" * 32, f"CN={device_id}", "alice", "pending", now, now, "10.0.0.1")


def session(sid: str, user: str = "alice", ttl: float = 3600.0, created: float = 0.0) -> Session:
    now = time.time()
    return Session(
        session_id=sid,
        kind="cookie",
        user=user,
        device_id="dev-1",
        start_ip="10.0.0.1",
        last_ip="10.0.0.1",
        user_agent="test",
        created=created or now,
        last_seen=now,
        expires_at=now + ttl,
        verified_ip="10.0.0.1",
        extra={"source": "oidc", "email": user, "groups": ["staff", "admins"]},
    )


# --- devices and posture -------------------------------------------------------------------------


async def test_devices_register_touch_state_owner(backend: Backend) -> None:
    a = await backend.open()
    first = device("dev-1")
    assert await a.register_device(first) == first
    # Registering again (say, on another replica) keeps what was stored first.
    other = dataclasses.replace(first, fingerprint="cd" * 32, state="approved")
    b = await backend.open()
    assert (await b.register_device(other)).fingerprint == first.fingerprint
    assert (await a.register_device(other)).state == "pending"

    approved = await a.set_device_state("dev-1", "approved")
    assert approved is not None and approved.state == "approved"
    owned = await a.set_device_owner("dev-1", "bob")
    assert owned is not None and owned.owner == "bob"
    assert (await a.set_device_owner("dev-1", None)).owner is None  # type: ignore[union-attr]
    assert await a.set_device_state("nope", "revoked") is None
    assert await a.set_device_owner("nope", "x") is None
    assert a.device("nope") is None

    a.touch_device("dev-1", first.last_seen + 60, "10.9.9.9")
    await a.flush()
    await a.register_device(device("dev-2", now=first.first_seen + 1))
    fresh = await backend.open()
    got = fresh.device("dev-1")
    assert got is not None
    assert (got.state, got.owner, got.last_ip) == ("approved", None, "10.9.9.9")
    assert got.last_seen == pytest.approx(first.last_seen + 60)
    assert [d.device_id for d in fresh.devices()] == ["dev-1", "dev-2"]


async def test_device_key_is_stored_bound_and_rebound(backend: Backend) -> None:
    """Security review L9: a device is pinned to its certificate's key; binding another key (an
    operator's rebind) is durable and seen by every process."""
    a = await backend.open()
    first = dataclasses.replace(device("dev-1"), spki="11" * 32)
    await a.register_device(first)
    b = await backend.open()
    assert b.device("dev-1").spki == "11" * 32  # type: ignore[union-attr]
    bound = await a.bind_device_key("dev-1", "22" * 32, "cd" * 32, "CN=dev-1,O=new")
    assert bound is not None
    assert (bound.spki, bound.fingerprint, bound.subject) == (
        "22" * 32,
        "cd" * 32,
        "CN=dev-1,O=new",
    )
    assert bound.state == first.state and bound.owner == first.owner
    await eventually(
        lambda: getattr(b.device("dev-1"), "spki", None) == "22" * 32, 5.0, "rebind seen"
    )
    assert await a.bind_device_key("nope", "33" * 32, "ef" * 32, "CN=nope") is None
    fresh = await backend.open()
    assert fresh.device("dev-1").spki == "22" * 32  # type: ignore[union-attr]


async def test_sqlite_devices_table_of_an_older_version_gains_the_key_column(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE devices (device_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, "
            "subject TEXT NOT NULL, owner TEXT, state TEXT NOT NULL, first_seen REAL NOT NULL, "
            "last_seen REAL NOT NULL, last_ip TEXT)"
        )
        db.execute(
            "INSERT INTO devices VALUES ('dev-1', ?, 'CN=dev-1', 'alice', 'approved', 1, 2, NULL)",
            ("ab" * 32,),
        )
    store = SQLiteStore(path)
    await store.open()
    try:
        old = store.device("dev-1")
        assert old is not None and old.spki is None and old.state == "approved"
        bound = await store.bind_device_key("dev-1", "44" * 32, "ab" * 32, "CN=dev-1")
        assert bound is not None and bound.spki == "44" * 32
        await store.register_device(dataclasses.replace(device("dev-2"), spki="55" * 32))
        assert store.device("dev-2").spki == "55" * 32  # type: ignore[union-attr]
    finally:
        await store.close()


async def test_posture_put_get(backend: Backend) -> None:
    a = await backend.open()
    assert a.posture("dev-1") is None
    report = {"os": {"name": "debian", "patched": True}, "disk": {"encrypted": True}, "n": [1, 2]}
    rec = PostureRecord("dev-1", report, 100.5, 99.0, True, "d" * 64)
    await a.put_posture(rec)
    assert a.posture("dev-1") == rec
    newer = dataclasses.replace(rec, report={"os": {"patched": False}}, collected_at=None)
    await a.put_posture(newer)
    fresh = await backend.open()
    assert fresh.posture("dev-1") == newer


# --- users ---------------------------------------------------------------------------------------


async def test_users_save_lock_and_history(backend: Backend) -> None:
    a = await backend.open()
    now = time.time()
    u = UserRecord(
        user="alice",
        timezone="Europe/Paris",
        working_hours="08:00-18:00",
        locked_until=now + 600,
        lock_reason="session terminated: impossible travel",
        mfa_secret="sealed-secret",
        mfa_enrolled_at=now - 10,
        backup_codes=("h1", "h2"),
        mfa_last_step=123,
        mfa_locked_until=None,
        known_devices=("dev-1",),
        known_routes=("admin",),
        last_location=(48.85, 2.35, now - 5),
    )
    await a.save_user(u)
    await a.save_user(UserRecord(user="bob"))
    assert a.user("alice") == u
    fresh = await backend.open()
    got = fresh.user("alice")
    assert got == u
    assert got is not None and got.locked(now) and not got.locked(now + 601)
    assert [x.user for x in fresh.users()] == ["alice", "bob"]

    # Unlock, then a request's history is written behind.
    await a.save_user(dataclasses.replace(u, locked_until=None, lock_reason=None))
    a.touch_user(dataclasses.replace(a.user("alice"), known_devices=("dev-1", "dev-2")))  # type: ignore[arg-type]
    await a.flush()
    again = (await backend.open()).user("alice")
    assert again is not None
    assert again.locked_until is None and again.known_devices == ("dev-1", "dev-2")


# --- sessions ------------------------------------------------------------------------------------


async def test_sessions_save_revoke_list_expire(backend: Backend) -> None:
    a = await backend.open()
    t = time.time()
    s1, s2 = session("s1", created=t), session("s2", created=t + 1)
    s3 = session("s3", user="bob", created=t + 2)
    short = session("short", ttl=0.5, created=t + 3)
    for s in (s1, s2, s3, short):
        await a.save_session(s)
    assert a.session("s1") == s1
    assert [s.session_id for s in a.sessions("alice")] == ["s1", "s2", "short"]
    assert [s.session_id for s in a.sessions()] == ["s1", "s2", "s3", "short"]

    assert await a.revoke_session("s2", "terminated by admin", t + 5) is True
    assert await a.revoke_session("s2", "again", t + 6) is False
    assert await a.revoke_session("unknown", "x", t) is False
    got = a.session("s2")
    assert got is not None and got.revoked
    assert (got.revoked_at, got.revoked_reason) == (t + 5, "terminated by admin")

    await a.save_session(session("dead", ttl=-1.0))
    await asyncio.sleep(max(0.0, short.expires_at - time.time()) + 0.05)
    cached = {k for k in ("short", "dead") if a.session(k) is not None}
    if backend.name == "sqlite":
        # SQLite keeps expired sessions cached until expire_sessions(); Redis drops one as soon
        # as it reloads it (the pipeline checks expires_at either way).
        assert cached == {"short", "dead"}
    assert await a.expire_sessions(time.time()) == len(cached)
    assert a.session("short") is None and a.session("dead") is None
    assert a.session("s1") is not None

    fresh = await backend.open()
    # A new instance loads live sessions only.
    assert {s.session_id for s in fresh.sessions()} == {"s1", "s2", "s3"}
    stored = fresh.session("s1")
    assert stored == s1 and stored.extra == s1.extra
    assert fresh.session("s2").revoked_reason == "terminated by admin"  # type: ignore[union-attr]


async def revoked_on_a_stale_on_b(backend: Backend) -> tuple[AnyStore, Session]:
    """s1 revoked through one instance, and a second instance's copy that has not heard of it
    yet (its own, returned, for it to write back)."""
    a, b = await backend.open(), await backend.open()
    await a.save_session(session("s1"))
    await eventually(lambda: b.session("s1") is not None, 2.0, "session on b")
    assert await a.revoke_session("s1", "terminated", time.time()) is True
    stale = dataclasses.replace(b.session("s1"), revoked_at=None, revoked_reason=None)  # type: ignore[type-var]
    b._sessions["s1"] = stale
    return b, stale


async def test_a_reload_racing_a_revocation_keeps_it_revoked(backend: Backend) -> None:
    """A reload (the change feed, or a find) reads the row, then awaits; a revocation made in
    this process meanwhile must not be replaced by that older copy: the revoked cookie would be
    let in until the next sync (seen in Chromium: a terminated session served once more)."""
    a = await backend.open()
    await a.save_session(session("s1"))
    reload = asyncio.ensure_future(a._reload(ChangeKind.SESSION, "s1"))
    await asyncio.sleep(0)  # the reload's read is on its way, before the revocation's write
    assert await a.revoke_session("s1", "terminated", time.time()) is True
    await reload
    got = a.session("s1")
    assert got is not None and got.revoked and got.revoked_reason == "terminated"
    got = await (await backend.open()).find_session("s1")
    assert got is not None and got.revoked


async def test_a_reload_racing_an_account_lock_keeps_it_locked(backend: Backend) -> None:
    """The same race for a user record: an operator's lock (or MFA reset) is put in the cache
    and written while the change feed's read of the older row is on its way; that older row
    must not unlock the account here until the next sync (seen in CI under load: a step-up
    completed for a locked account, an MFA reset that did not hold)."""
    a = await backend.open()
    await a.save_user(UserRecord("alice"))
    reload = asyncio.ensure_future(a._reload(ChangeKind.USER, "alice"))
    await asyncio.sleep(0)  # the reload's read is on its way, before the lock's write
    await a.save_user(UserRecord("alice", locked_until=time.time() + 600, lock_reason="test"))
    await reload
    got = a.user("alice")
    assert got is not None and got.lock_reason == "test"
    fresh = await (await backend.open()).find_user("alice")
    assert fresh is not None and fresh.lock_reason == "test"


async def test_a_reload_keeps_the_history_written_behind(backend: Backend) -> None:
    """Another process changes a user (a lock) while this one holds history it has not
    flushed (a device it just saw): the reload takes the lock and keeps the history, or the
    next request from that device would count as a new device again."""
    a, b = await backend.open(), await backend.open()
    await a.save_user(UserRecord("alice"))
    await eventually(lambda: b.user("alice") is not None, 2.0, "user on b")
    a.touch_user(UserRecord("alice", known_devices=("alice-laptop",)))
    await b.save_user(UserRecord("alice", locked_until=time.time() + 600, lock_reason="test"))
    await a._reload(ChangeKind.USER, "alice")
    got = a.user("alice")
    assert got is not None and got.lock_reason == "test"
    assert got.known_devices == ("alice-laptop",)


async def test_touch_never_unrevokes(backend: Backend) -> None:
    b, stale = await revoked_on_a_stale_on_b(backend)
    stale.requests = 42  # its activity, written behind
    b.touch_session(stale)
    await b.flush()
    fresh = await backend.open()
    got = fresh.session("s1")
    assert got is not None and got.revoked and got.revoked_reason == "terminated"


async def test_a_stale_save_never_unrevokes(backend: Backend) -> None:
    b, stale = await revoked_on_a_stale_on_b(backend)
    stale.expires_at += 60  # its whole copy saved (a step-up, a new expiry)
    await b.save_session(stale)
    assert b.session("s1").revoked  # type: ignore[union-attr]
    got = (await backend.open()).session("s1")
    assert got is not None and got.revoked and got.revoked_reason == "terminated"
    assert got.expires_at == stale.expires_at - 60  # the stale save was dropped whole


# Rows as the code before 0008 wrote them: the last decisions and the verified address in `extra`.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, user TEXT NOT NULL, expires_at REAL NOT NULL,
    data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions(user);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, key TEXT NOT NULL, at REAL NOT NULL);
"""


def old_session_row(sid: str) -> dict[str, Any]:
    now = time.time()
    row = dataclasses.asdict(session(sid, created=now))
    del row["verified_ip"]
    row["last_ip"] = "10.0.0.9"
    row["extra"] = {
        "verified_ip": "10.0.0.9",
        "mfa_method": "totp",
        "history": [
            [now - 20 + i, "10.0.0.9", "app", "allow", "policy-allowed"] for i in range(20)
        ],
    }
    return row


def write_old_session(backend: Backend, row: dict[str, Any]) -> None:
    """Behind the stores' backs, in the format the code before 0008 wrote."""
    data = json.dumps(row)
    if backend.name == "sqlite":
        with contextlib.closing(backend.raw_sqlite()) as db, db:
            db.executescript(OLD_SCHEMA)
            db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?)",
                (row["session_id"], row["user"], row["expires_at"], data),
            )
    else:
        with contextlib.closing(backend.raw_redis()) as raw:
            key = f"ztgw:session:{row['session_id']}"
            raw.hset(key, mapping={"data": data, "revoked": "0", "ver": "1"})
            raw.zadd("ztgw:sessions", {row["session_id"]: row["expires_at"]})


def stored_session_json(backend: Backend, sid: str) -> dict[str, Any]:
    if backend.name == "sqlite":
        with contextlib.closing(backend.raw_sqlite()) as db:
            (data,) = db.execute(
                "SELECT data FROM sessions WHERE session_id = ?", (sid,)
            ).fetchone()
    else:
        with contextlib.closing(backend.raw_redis()) as raw:
            data = raw.hget(f"ztgw:session:{sid}", "data")
    return dict(json.loads(data))


def stored_history_size(backend: Backend, sid: str) -> int:
    if backend.name == "sqlite":
        with contextlib.closing(backend.raw_sqlite()) as db:
            sql = "SELECT COUNT(*) FROM session_history WHERE session_id = ?"
            return int(db.execute(sql, (sid,)).fetchone()[0])
    with contextlib.closing(backend.raw_redis()) as raw:
        return int(raw.zcard(f"ztgw:history:{sid}"))


async def test_sessions_written_before_0008_load_without_their_history(backend: Backend) -> None:
    row = old_session_row("old")
    write_old_session(backend, row)
    a = await backend.open()
    got = a.session("old")
    assert got is not None
    # The old history is dropped on load (not kept in memory, not carried over); the verified
    # address moves to its field; everything else is as stored.
    assert got.extra == {"mfa_method": "totp"}
    assert got.verified_ip == "10.0.0.9" and got.last_ip is got.verified_ip
    assert (got.user, got.start_ip, got.expires_at) == (row["user"], "10.0.0.1", row["expires_at"])
    assert await a.session_history("old") == []
    # Its next write-behind stores it in the new form.
    got.requests += 1
    a.touch_session(got)
    a.record_decision("old", SessionDecision(time.time(), "10.0.0.9", "app", "allow", "ok"))
    await a.flush()
    stored = stored_session_json(backend, "old")
    assert stored["extra"] == {"mfa_method": "totp"} and stored["verified_ip"] == "10.0.0.9"
    fresh = await backend.open()
    assert fresh.session("old") == got
    assert [d.reason for d in await fresh.session_history("old")] == ["ok"]


async def test_a_verified_ip_written_into_extra_moves_to_its_field(backend: Backend) -> None:
    """As the step-up endpoint records it: the session stage must see the new address."""
    a = await backend.open()
    s = session("s1")
    s.extra["anomaly_since"] = 1.0
    await a.save_session(s)
    cached = a.session("s1")
    assert cached is not None and cached.verified_ip == "10.0.0.1"
    cached.extra["verified_ip"] = "10.0.0.7"
    cached.extra["mfa_method"] = "totp"
    cached.extra.pop("anomaly_since", None)
    await a.save_session(cached)
    for store in (a, await backend.open()):
        got = store.session("s1")
        assert got is not None and got.verified_ip == "10.0.0.7"
        assert got.extra == {**session("s1").extra, "mfa_method": "totp"}


async def test_session_history_keeps_the_last_decisions_in_time_order(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    t = time.time()
    await a.save_session(session("s1"))
    for i in range(SESSION_HISTORY + 5):
        a.record_decision("s1", SessionDecision(t + i, "10.0.0.1", "app", "allow", "ok"))
    a.record_decision("s2", SessionDecision(t, "10.0.0.2", "app", "deny", "denied"))
    a.record_decision("s2", SessionDecision(t, "10.0.0.2", "app", "deny", "denied"))
    await a.flush()
    # Another process (worker, replica) writes the same session's decisions too: the newest by
    # time are kept, whichever process wrote them.
    b.record_decision("s1", SessionDecision(t + 100, "10.0.0.3", "admin", "terminate", "ip-drift"))
    b.record_decision("s1", SessionDecision(t + 1.5, "10.0.0.3", "app", "allow", "too old"))
    await b.flush()
    # Written behind: what is not flushed yet is only seen by the process that recorded it.
    a.record_decision("s3", SessionDecision(t, "10.0.0.4", "app", "allow", "pending"))

    fresh = await backend.open()
    got = await fresh.session_history("s1")
    assert len(got) == SESSION_HISTORY
    assert [d.at for d in got] == [t + i for i in range(6, SESSION_HISTORY + 5)] + [t + 100]
    assert got[-1] == SessionDecision(t + 100, "10.0.0.3", "admin", "terminate", "ip-drift")
    assert await a.session_history("s1") == got
    assert [d.ip for d in await fresh.session_history("s2")] == ["10.0.0.2", "10.0.0.2"]
    assert [d.reason for d in await a.session_history("s3")] == ["pending"]
    assert await fresh.session_history("s3") == []
    assert await fresh.session_history("unknown") == []
    assert stored_history_size(backend, "s1") == SESSION_HISTORY

    # It goes with its session.
    await a.expire_sessions(time.time() + 3600 + 86400 + 60)
    assert await fresh.session_history("s1") == []
    assert stored_history_size(backend, "s1") == 0


async def test_session_history_survives_a_failed_write_behind(backend: Backend) -> None:
    a = await backend.open()
    t = time.time()
    a.record_decision("s1", SessionDecision(t, "10.0.0.1", "app", "allow", "first"))
    if backend.name == "sqlite":
        assert isinstance(a, SQLiteStore)
        await a.db.execute("DROP TABLE session_history")
    else:
        assert backend.server is not None
        backend.server.pause()
    try:
        with pytest.raises(Exception):  # SQLite: OperationalError; Redis: StoreUnavailable
            await a.flush()
        a.record_decision("s1", SessionDecision(t + 1, "10.0.0.1", "app", "allow", "second"))
    finally:
        if backend.name == "sqlite":
            assert isinstance(a, SQLiteStore)
            await a.db.executescript(SCHEMA)
        else:
            assert backend.server is not None
            backend.server.resume()
    await eventually(lambda: a.healthy, 5.0, "store healthy again")
    await a.flush()
    got = await (await backend.open()).session_history("s1")
    assert [d.reason for d in got] == ["first", "second"]


# --- a browser session's ID token: kept apart, never in memory -----------------------------------

ID_TOKEN_1 = "eyJhbGciOiJFUzI1NiJ9." + "a" * 600 + ".sig1"
ID_TOKEN_2 = "eyJhbGciOiJFUzI1NiJ9." + "b" * 600 + ".sig2"


def browser_session(sid: str, id_token: str | None = ID_TOKEN_1, ttl: float = 3600.0) -> Session:
    """As the OIDC sign-in creates it: the ID token in `extra`, for the store to keep apart."""
    s = session(sid, ttl=ttl)
    if id_token is not None:
        s.extra[ID_TOKEN] = id_token
    return s


def stored_id_tokens(backend: Backend) -> dict[str, str]:
    """What the backend keeps apart, read behind the stores' backs."""
    if backend.name == "sqlite":
        with contextlib.closing(backend.raw_sqlite()) as db:
            return dict(db.execute("SELECT session_id, id_token FROM session_secrets"))
    with contextlib.closing(backend.raw_redis()) as raw:
        out = {}
        for key in raw.scan_iter("ztgw:session:*"):
            token = raw.hget(key, "id_token")
            if token is not None:
                out[key.removeprefix("ztgw:session:")] = token
        return out


def holds_no_id_token(store: AnyStore) -> bool:
    return all(ID_TOKEN not in s.extra for s in store.sessions())


async def test_an_id_token_is_stored_apart_and_read_back_by_every_instance(
    backend: Backend,
) -> None:
    a, b = await backend.open(), await backend.open()
    s = browser_session("s1")
    await a.save_session(s)
    await a.save_session(browser_session("plain", id_token=None))
    # Not in memory (the session saved was compacted in place), nor in the session's JSON.
    assert ID_TOKEN not in s.extra and a.session("s1") == s
    assert "id_token" not in json.dumps(stored_session_json(backend, "s1"))
    assert stored_id_tokens(backend) == {"s1": ID_TOKEN_1}
    await eventually(lambda: b.session("s1") is not None, 2.0, "session on b")
    for store in (a, b):
        assert holds_no_id_token(store)
        assert await store.session_id_token("s1") == ID_TOKEN_1
        assert await store.session_id_token("plain") is None
        assert await store.session_id_token("unknown") is None

    # Touches (activity written behind, by any instance) never drop it.
    for store in (a, b):
        got = store.session("s1")
        assert got is not None
        got.requests += 5
        store.touch_session(got)
        await store.flush()
    # A save without one (a step-up on the same session) keeps it; a save with one replaces it.
    cached = b.session("s1")
    assert cached is not None
    cached.extra["mfa_method"] = "totp"
    await b.save_session(cached)
    assert await a.session_id_token("s1") == ID_TOKEN_1
    replaced = dataclasses.replace(cached, extra={**cached.extra, ID_TOKEN: ID_TOKEN_2})
    await b.save_session(replaced)
    assert await a.session_id_token("s1") == ID_TOKEN_2
    # A revoked session keeps it until it expires: signing out of a session that an admin or
    # the risk engine ended still ends the provider's session too.
    assert await b.revoke_session("s1", "terminated by admin", time.time()) is True
    assert await a.session_id_token("s1") == ID_TOKEN_2

    fresh = await backend.open()
    got = fresh.session("s1")
    assert got is not None and got.revoked and got.extra.get("mfa_method") == "totp"
    assert holds_no_id_token(fresh)
    assert await fresh.session_id_token("s1") == ID_TOKEN_2
    if isinstance(fresh, RedisStore):
        # A reload never even reads it from Redis.
        (h,) = await fresh._fetch([(ChangeKind.SESSION, "s1")])
        assert "id_token" not in h and "data" in h


async def test_a_rotated_session_keeps_the_id_token(backend: Backend) -> None:
    """The step-up's cookie rotation: a new session with what the sign-in established."""
    a, b = await backend.open(), await backend.open()
    await a.save_session(browser_session("old"))
    old = a.session("old")
    assert old is not None
    token = await a.session_id_token("old")
    assert token == ID_TOKEN_1
    new = dataclasses.replace(old, session_id="new", extra={**old.extra, ID_TOKEN: token})
    assert await a.revoke_session("old", "rotated after step-up", time.time()) is True
    await a.save_session(new)
    await eventually(lambda: b.session("new") is not None, 2.0, "rotated session on b")
    for store in (a, b):
        assert holds_no_id_token(store)
        assert await store.session_id_token("new") == ID_TOKEN_1
        assert await store.session_id_token("old") == ID_TOKEN_1  # until it expires
    assert stored_id_tokens(backend) == {"old": ID_TOKEN_1, "new": ID_TOKEN_1}


async def test_an_id_token_goes_with_its_session(backend: Backend) -> None:
    a = await backend.open()
    # Already expired (so that no reload of its announcement can bring it back into the cache).
    await a.save_session(browser_session("short", ttl=-1.0))
    await a.save_session(browser_session("long", id_token=ID_TOKEN_2, ttl=3 * 86400))
    # Expired sessions are deleted from the store a day after they expire, with their token.
    await a.expire_sessions(time.time())
    assert a.session("short") is None
    assert await a.session_id_token("short") == ID_TOKEN_1
    await a.expire_sessions(time.time() + 86400 + 60)
    assert a.session("short") is None
    assert await a.session_id_token("short") is None
    assert await a.session_id_token("long") == ID_TOKEN_2
    assert stored_id_tokens(backend) == {"long": ID_TOKEN_2}
    assert await (await backend.open()).session_id_token("short") is None


async def test_rows_written_with_the_id_token_in_their_json_keep_it_reachable(
    backend: Backend,
) -> None:
    """Sessions stored before the ID token was kept apart (0008 and older): it is in the JSON."""
    rows = {sid: old_session_row(sid) for sid in ("idle", "touched", "revoked", "plain")}
    for sid, row in rows.items():
        if sid != "plain":
            row["extra"][ID_TOKEN] = f"{ID_TOKEN_1}-{sid}"
        write_old_session(backend, row)
    a, b = await backend.open(), await backend.open()
    for store in (a, b):
        assert len(store.sessions()) == 4 and holds_no_id_token(store)
        got = store.session("touched")
        assert got is not None and got.extra == {"mfa_method": "totp"}
    # Read from the row while it is as it was written.
    assert await a.session_id_token("idle") == f"{ID_TOKEN_1}-idle"
    # Any write that replaces the row (a touch from any instance, a revocation) moves it aside.
    touched = b.session("touched")
    assert touched is not None
    touched.requests += 1
    b.touch_session(touched)
    await b.flush()
    assert await a.revoke_session("revoked", "terminated by admin", time.time()) is True
    if backend.name == "sqlite":  # SQLite's revocation rewrites the row; Redis' does not
        assert "id_token" not in json.dumps(stored_session_json(backend, "revoked"))
    assert "id_token" not in json.dumps(stored_session_json(backend, "touched"))
    assert stored_session_json(backend, "touched")["requests"] == touched.requests
    fresh = await backend.open()
    for sid in ("idle", "touched", "revoked"):
        assert await fresh.session_id_token(sid) == f"{ID_TOKEN_1}-{sid}", sid
    assert await fresh.session_id_token("plain") is None
    assert "touched" in stored_id_tokens(backend)
    # A save of the old row with a new token replaces the one it carried.
    idle = fresh.session("idle")
    assert idle is not None
    await fresh.save_session(dataclasses.replace(idle, extra={ID_TOKEN: ID_TOKEN_2}))
    assert await a.session_id_token("idle") == ID_TOKEN_2
    # And they go with their session.
    await a.expire_sessions(time.time() + 3600 + 86400 + 60)
    assert stored_id_tokens(backend) == {}
    assert await fresh.session_id_token("touched") is None


# --- counters ------------------------------------------------------------------------------------


async def test_take_token_burst_refill_wait(backend: Backend) -> None:
    a = await backend.open()
    t = time.time()
    assert [await a.take_token_async("k", 1.0, 3, t) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert await a.take_token_async("k", 1.0, 3, t) == pytest.approx(1.0)
    assert await a.take_token_async("k", 1.0, 3, t + 0.5) == pytest.approx(0.5)
    assert await a.take_token_async("k", 1.0, 3, t + 1.0) == 0.0
    assert await a.take_token_async("k", 1.0, 3, t + 1.0) == pytest.approx(1.0)
    # Refill is capped at the burst, and other keys have their own bucket.
    assert [await a.take_token_async("k", 1.0, 3, t + 100) for _ in range(4)][3] > 0
    assert await a.take_token_async("other", 1.0, 3, t) == 0.0
    assert await a.take_token_async("fast", 10.0, 1, t) == 0.0
    assert await a.take_token_async("fast", 10.0, 1, t) == pytest.approx(0.1)


async def test_failures_window(backend: Backend) -> None:
    a = await backend.open()
    t = time.time()
    for dt in (0.0, 1.0, 2.0, 2.0):
        await a.record_failure_async("user:alice", t + dt)
    assert await a.failures_async("user:alice", t + 2, 5.0) == 4
    assert await a.failures_async("user:alice", t + 6.5, 5.0) == 2
    assert await a.failures_async("user:alice", t + 100, 5.0) == 0
    assert await a.failures_async("user:bob", t, 5.0) == 0
    await a.record_failure_async("user:bob", t)
    await a.reset_failures_async("user:bob")
    assert await a.failures_async("user:bob", t, 5.0) == 0


async def test_failures_are_exact_for_every_window_asked(backend: Backend) -> None:
    """A short window asked of a key never loses events a longer one counts.

    (The SQLite store once dropped, on every query, the events outside that query's window.)
    SQLite keeps a key's events for the longest window asked for keys of its family (here
    `user`): exact for every window up to that one, as callers ask with configured windows.
    """
    a = await backend.open()
    t = time.time()
    for i in range(10):
        await a.record_failure_async("user:carol", t + i)
    assert await a.failures_async("user:carol", t + 9, 60.0) == 10
    assert await a.failures_async("user:carol", t + 9, 2.0) == 3
    assert await a.failures_async("user:carol", t + 9, 5.0) == 6
    assert await a.failures_async("user:carol", t + 9, 2.0) == 3
    assert await a.failures_async("user:carol", t + 9, 60.0) == 10
    assert await a.failures_async("user:dave", t + 9, 60.0) == 0
    # Out of order (concurrent requests finish in any order): counted by time, not arrival.
    await a.record_failure_async("user:carol", t + 4.5)
    assert await a.failures_async("user:carol", t + 9, 5.0) == 7
    assert await a.failures_async("user:carol", t + 65, 60.0) == 5  # t + 5 to t + 9
    # At most MAX_FAILURES per key, the newest, on both backends.
    for i in range(MAX_FAILURES + 5):
        await a.record_failure_async("ip:10.9.9.9", t + i / 1000)
    assert await a.failures_async("ip:10.9.9.9", t + 2, 60.0) == MAX_FAILURES


async def test_quiet_counters_are_dropped(backend: Backend) -> None:
    """A counter whose newest event can no longer be counted goes: no leak per session.

    SQLite drops a key once the longest window asked of the store (0.2 s here) cannot count its
    newest event (`failure_ttl` while none was asked); Redis expires it `failure_ttl` after its
    last event.
    """
    a = await backend.open(failure_ttl=1.0, flush_interval=0.05)
    t = time.time()
    await a.record_failure_async("req:tok:quiet", t)
    await a.record_failure_async("req:tok:busy", t)
    await a.record_failure_async("mfa:never-asked", t)
    assert await a.failures_async("req:tok:quiet", t, 0.2) == 1

    def present(key: str) -> bool:
        if isinstance(a, SQLiteStore):
            return key in a._failures
        with contextlib.closing(backend.raw_redis()) as raw:
            return bool(raw.exists(f"ztgw:fail:{key}"))

    assert present("req:tok:quiet") and present("mfa:never-asked")
    # A busy key stays, with only what its windows can still count.
    while time.time() - t < 1.5:
        await a.record_failure_async("req:tok:busy", time.time())
        assert await a.failures_async("req:tok:busy", time.time(), 0.2) >= 1
        await asyncio.sleep(0.05)
    await eventually(
        lambda: not present("req:tok:quiet") and not present("mfa:never-asked"), 3.0, "dropped"
    )
    assert present("req:tok:busy")
    if isinstance(a, SQLiteStore):
        events = a._failures["req:tok:busy"]
        assert isinstance(events, float) or len(events) <= 6  # 0.2 s of events, 20 a second
    assert await a.failures_async("req:tok:quiet", time.time(), 0.2) == 0
    assert await a.failures_async("mfa:never-asked", time.time(), 60.0) == 0


async def test_counters_are_kept_for_failure_ttl_until_a_window_is_asked(backend: Backend) -> None:
    a = await backend.open(failure_ttl=1.0, flush_interval=0.05)
    t = time.time()
    await a.record_failure_async("user:erin", t)

    def present() -> bool:
        if isinstance(a, SQLiteStore):
            return "user:erin" in a._failures
        with contextlib.closing(backend.raw_redis()) as raw:
            return bool(raw.exists("ztgw:fail:user:erin"))

    await asyncio.sleep(0.6)
    assert present()
    await eventually(lambda: not present(), 2.0, "dropped after failure_ttl")


async def test_claim_once(backend: Backend) -> None:
    a = await backend.open()
    t = time.time()
    assert await a.claim_once("totp:alice:1", 30.0, t) is True
    assert await a.claim_once("totp:alice:1", 30.0, t + 1) is False
    assert await a.claim_once("totp:alice:2", 30.0, t) is True
    assert await a.claim_once("short", 0.2, t) is True
    await asyncio.sleep(0.3)
    assert await a.claim_once("short", 0.2, t + 0.3) is True


async def test_advance_is_compare_and_set(backend: Backend) -> None:
    a = await backend.open()
    assert await a.advance("totp-step:alice", 5) is True
    assert await a.advance("totp-step:alice", 5) is False
    assert await a.advance("totp-step:alice", 4) is False
    assert await a.advance("totp-step:alice", 6) is True
    await a.reset_counter("totp-step:alice")
    assert await a.advance("totp-step:alice", 1) is True


async def test_advance_concurrent_callers_exactly_one_wins(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    for step in range(57_000_000, 57_000_005):
        results = await asyncio.gather(
            *[(a if i % 2 else b).advance("totp-step:carol", step) for i in range(10)]
        )
        assert sum(results) == 1, (step, results)


async def test_a_backup_code_is_consumed_once_across_instances(backend: Backend) -> None:
    """Issue 18 (M7): of many concurrent uses of one backup code, on any number of processes or
    replicas, exactly one gets it; and a later save of a stale user record (which still lists
    the code) does not bring it back."""
    a, b = await backend.open(), await backend.open()
    u = UserRecord(user="alice", mfa_secret="sealed", backup_codes=("h1", "h2"))
    await a.save_user(u)
    for code in ("h1", "h2"):
        results = await asyncio.gather(
            *[(a if i % 2 else b).consume_backup_code("alice", code) for i in range(10)]
        )
        assert sum(results) == 1, (code, results)
    await b.save_user(u)  # stale: still lists h1 and h2
    assert await a.consume_backup_code("alice", "h1") is False
    assert await b.consume_backup_code("bob", "h1") is True, "marks are per user"


async def test_a_session_made_elsewhere_is_found_before_the_next_sync(backend: Backend) -> None:
    """A sign-in finished by another worker or replica a moment ago: the browser's very next
    request, wherever it lands, finds the session (not yet in this instance's memory)."""
    a, b = await backend.open(sync_interval=60.0), await backend.open(sync_interval=60.0)
    await a.save_session(session("fresh"))
    assert b.session("fresh") is None
    found = await b.find_session("fresh")
    assert found is not None and found.user == "alice"
    assert b.session("fresh") is not None
    assert await b.find_session("never-issued") is None and b.session("never-issued") is None


async def test_find_user_reads_what_another_process_just_wrote(backend: Backend) -> None:
    """An enrolment made by `ztgateway users mfa enroll` counts on the very next code, before
    the change feed reaches the gateway (the README's quick start pastes them back to back)."""
    a, b = await backend.open(sync_interval=60.0), await backend.open(sync_interval=60.0)
    await a.save_user(UserRecord(user="alice", mfa_secret="sealed"))
    assert b.user("alice") is None
    found = await b.find_user("alice")
    assert found is not None and found.mfa_secret == "sealed"
    assert b.user("alice") is not None
    assert await b.find_user("nobody") is None


async def test_the_first_shared_secret_wins_everywhere(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    results = await asyncio.gather(
        *[(a if i % 2 else b).shared_secret("root", f"candidate-{i}") for i in range(8)]
    )
    assert len(set(results)) == 1 and results[0].startswith("candidate-")
    assert await (await backend.open()).shared_secret("root", "late") == results[0]
    assert await a.shared_secret("other", "x") == "x"


async def test_pending_logins_are_single_use_bound_to_their_source_and_bounded(
    backend: Backend,
) -> None:
    a, b = await backend.open(), await backend.open()
    t = time.time()
    await a.put_pending_login("s1", "dev-1", "one", t + 600, 3)
    # Taken by another source: not found, and not burnt for its own.
    assert await b.take_pending_login("s1", "dev-2", t) is None
    results = await asyncio.gather(
        *[(a if i % 2 else b).take_pending_login("s1", "dev-1", t) for i in range(6)]
    )
    assert results.count("one") == 1 and results.count(None) == 5
    # A source keeps its newest `per_source`; another source's attempts are untouched.
    await b.put_pending_login("other", "dev-2", "theirs", t + 600, 3)
    for i in range(10):
        await (a if i % 2 else b).put_pending_login(f"f{i}", "dev-1", f"flood {i}", t + 600, 3)
    assert await a.take_pending_login("f6", "dev-1", t) is None
    assert await a.take_pending_login("f7", "dev-1", t) == "flood 7"
    assert await b.take_pending_login("f9", "dev-1", t) == "flood 9"
    assert await a.take_pending_login("other", "dev-2", t) == "theirs"
    # Past its expiry an attempt is gone.
    await a.put_pending_login("old", "dev-3", "stale", t + 600, 3)
    assert await a.take_pending_login("old", "dev-3", t + 601) is None


def _credential(
    cid: str, user: str = "alice", count: int = 0, at: float = 1000.0
) -> WebAuthnCredential:
    return WebAuthnCredential(
        credential_id=cid,
        user=user,
        public_key="pQECAyYgASFYIA",
        sign_count=count,
        name=f"key {cid}",
        created_at=at,
        transports=("usb", "nfc"),
        aaguid="00000000-0000-0000-0000-000000000000",
        user_verified=True,
    )


async def test_webauthn_credentials_are_kept_per_user_and_seen_by_every_instance(
    backend: Backend,
) -> None:
    a, b = await backend.open(), await backend.open()
    assert await a.webauthn_credentials("alice") == []
    assert await a.add_webauthn_credential(_credential("c1", at=1000.0))
    assert await b.add_webauthn_credential(_credential("c2", at=1001.0))
    assert await a.add_webauthn_credential(_credential("c3", user="bob"))
    # One id is one credential, whoever registers it again.
    assert not await b.add_webauthn_credential(_credential("c1", user="bob"))
    alice = await b.webauthn_credentials("alice")
    assert [c.credential_id for c in alice] == ["c1", "c2"]
    assert alice[0] == _credential("c1", at=1000.0)
    assert "public_key" not in alice[0].summary()
    assert [c.credential_id for c in await a.webauthn_credentials("bob")] == ["c3"]
    assert await a.webauthn_credential("c3") == _credential("c3", user="bob")
    assert await a.webauthn_credential("nope") is None
    # Removal is per user: bob cannot remove alice's key.
    assert not await a.remove_webauthn_credential("bob", "c1")
    assert await b.remove_webauthn_credential("alice", "c1")
    assert not await a.remove_webauthn_credential("alice", "c1")
    assert [c.credential_id for c in await a.webauthn_credentials("alice")] == ["c2"]
    assert await a.webauthn_credential("c1") is None


async def test_webauthn_credentials_per_user_are_bounded(backend: Backend) -> None:
    a = await backend.open()
    for i in range(MAX_WEBAUTHN_CREDENTIALS):
        assert await a.add_webauthn_credential(_credential(f"k{i}", at=1000.0 + i))
    assert not await a.add_webauthn_credential(_credential("one-too-many"))
    assert await a.add_webauthn_credential(_credential("other-user", user="bob"))


async def test_a_webauthn_sign_counter_only_moves_forward_once_across_instances(
    backend: Backend,
) -> None:
    """WebAuthn Level 2 §7.2 step 21: a counter that does not grow is a cloned authenticator
    (or a replay); of concurrent uses with one counter value exactly one passes."""
    a, b = await backend.open(), await backend.open()
    await a.add_webauthn_credential(_credential("c1", count=5))
    results = await asyncio.gather(
        *[(a if i % 2 else b).use_webauthn_credential("c1", 6, 2000.0) for i in range(8)]
    )
    assert results.count(True) == 1
    stored = await b.webauthn_credential("c1")
    assert stored is not None and stored.sign_count == 6 and stored.last_used_at == 2000.0
    assert not await a.use_webauthn_credential("c1", 6, 2001.0), "the same value again"
    assert not await b.use_webauthn_credential("c1", 3, 2002.0), "a counter going back"
    assert await a.use_webauthn_credential("c1", 9, 2003.0)
    assert (await b.webauthn_credentials("alice"))[0].sign_count == 9
    assert not await a.use_webauthn_credential("unknown", 1, 2004.0)
    # An authenticator without a counter reports 0 every time (§6.1.1): that is not a clone,
    # but once a counter was seen, 0 is a counter going back.
    await a.add_webauthn_credential(_credential("zero", count=0))
    assert await a.use_webauthn_credential("zero", 0, 2005.0)
    assert await b.use_webauthn_credential("zero", 0, 2006.0)
    assert not await a.use_webauthn_credential("c1", 0, 2007.0)


async def test_a_touch_never_rewrites_a_lock_an_enrolment_or_backup_codes(
    backend: Backend,
) -> None:
    """A process's copy of a user record may predate a lock, an enrolment or a used backup
    code written elsewhere; its write-behind history must not write those back."""
    a, b = await backend.open(), await backend.open()
    await a.save_user(UserRecord(user="alice"))
    await eventually(lambda: b.user("alice") is not None, 2.0, "user on b")
    stale = b.user("alice")
    assert stale is not None
    now = time.time()
    locked = UserRecord(
        user="alice",
        locked_until=now + 600,
        lock_reason="operator",
        mfa_secret="sealed",
        backup_codes=("h2",),
    )
    await a.save_user(locked)
    b._users["alice"] = dataclasses.replace(stale, known_devices=("dev-9",))  # not synced yet
    b.touch_user(b._users["alice"])
    await b.flush()
    got = (await backend.open()).user("alice")
    assert got is not None and got.known_devices == ("dev-9",)
    assert (got.locked_until, got.mfa_secret, got.backup_codes) == (now + 600, "sealed", ("h2",))


# --- across instances ----------------------------------------------------------------------------


async def test_changes_reach_a_second_instance_within_a_second(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    heard: list[tuple[ChangeKind, str]] = []
    b.subscribe(lambda kind, key: heard.append((kind, key)))
    await a.register_device(device("dev-1"))
    await a.save_user(UserRecord(user="alice"))
    worst = 0.0
    for i in range(5):
        sid = f"s{i}"
        await a.save_session(session(sid))
        await eventually(lambda sid=sid: b.session(sid) is not None, 1.0, "new session on b")
        assert await a.revoke_session(sid, "terminated", time.time()) is True
        took = await eventually(
            lambda sid=sid: b.session(sid) is not None and b.session(sid).revoked,  # type: ignore[union-attr]
            1.0,
            "revocation on b",
        )
        worst = max(worst, took)
        assert (ChangeKind.SESSION, sid) in heard
    assert worst < 1.0

    await eventually(lambda: b.device("dev-1") is not None, 1.0, "device on b")
    await a.set_device_state("dev-1", "revoked")
    await eventually(lambda: b.device("dev-1").state == "revoked", 1.0, "device revocation on b")  # type: ignore[union-attr]
    await a.save_user(UserRecord(user="alice", locked_until=time.time() + 60, lock_reason="x"))
    await eventually(
        lambda: b.user("alice") is not None and b.user("alice").locked(time.time()),  # type: ignore[union-attr]
        1.0,
        "account lock on b",
    )
    assert (ChangeKind.DEVICE, "dev-1") in heard and (ChangeKind.USER, "alice") in heard


async def test_rate_limit_and_failures_across_instances(backend: Backend) -> None:
    """Backend-specific by design: Redis shares counters between replicas, SQLite does not."""
    a, b = await backend.open(), await backend.open()
    t = time.time()
    assert await a.take_token_async("rl:app:user:alice", 1.0, 3, t) == 0.0
    assert await a.take_token_async("rl:app:user:alice", 1.0, 3, t) == 0.0
    assert await b.take_token_async("rl:app:user:alice", 1.0, 3, t) == 0.0
    fourth = await b.take_token_async("rl:app:user:alice", 1.0, 3, t)
    await a.record_failure_async("ip:10.0.0.1", t)
    counted = await b.failures_async("ip:10.0.0.1", t, 60.0)
    if backend.shared_counters:
        assert fourth == pytest.approx(1.0)  # the burst of 3 holds across both instances
        assert counted == 1
    else:
        assert fourth == 0.0  # each process has its own bucket
        assert counted == 0


# --- Redis only ----------------------------------------------------------------------------------


async def test_redis_revocation_race_has_one_winner(redis_backend: Backend) -> None:
    a, b = await redis_backend.open(), await redis_backend.open()
    await a.save_session(session("s1"))
    await eventually(lambda: b.session("s1") is not None, 1.0, "session on b")
    results = await asyncio.gather(
        a.revoke_session("s1", "by a", time.time()), b.revoke_session("s1", "by b", time.time())
    )
    assert sorted(results) == [False, True]
    # Saving a stale, unrevoked copy does not bring it back.
    stale = dataclasses.replace(a.session("s1"), revoked_at=None, revoked_reason=None)  # type: ignore[type-var]
    await a.save_session(stale)
    assert a.session("s1").revoked  # type: ignore[union-attr]
    assert (await redis_backend.open()).session("s1").revoked  # type: ignore[union-attr]


async def test_redis_stays_healthy_while_idle(redis_backend: Backend) -> None:
    """The heartbeat keeps an idle replica healthy: no spurious reconnects or reloads."""
    a = await redis_backend.open()
    start = time.monotonic()
    while time.monotonic() - start < 2.5 * a.stale_after:
        assert a.healthy
        await asyncio.sleep(0.05)
    assert a.resyncs == 0


async def test_redis_paused_fails_closed_then_recovers(redis_backend: Backend) -> None:
    server = redis_backend.server
    assert server is not None
    a = await redis_backend.open()
    b = await redis_backend.open()
    await a.save_session(session("s1"))
    assert a.healthy and b.healthy
    server.pause()
    try:
        assert await raises_unavailable(a.save_user(UserRecord(user="ghost"))) < 1.5
        assert await raises_unavailable(a.take_token_async("k", 1.0, 1, time.time())) < 1.5
        assert await raises_unavailable(b.revoke_session("s1", "x", time.time())) < 1.5
        assert not a.healthy
        await eventually(lambda: not b.healthy, 1.0, "b notices the frozen redis")
    finally:
        server.resume()
    await eventually(lambda: a.healthy and b.healthy, 5.0, "recovery after resume")
    assert await b.revoke_session("s1", "after resume", time.time()) is True
    await eventually(lambda: a.session("s1").revoked, 1.0, "revocation after recovery")  # type: ignore[union-attr]


async def test_redis_stopped_then_restarted_resyncs(redis_backend: Backend) -> None:
    server = redis_backend.server
    assert server is not None
    a = await redis_backend.open()
    b = await redis_backend.open()
    await a.save_session(session("s1"))
    await a.save_session(session("s2"))
    await a.save_user(UserRecord(user="alice"))
    # Behind both replicas' backs (no announcement), as if they had missed a message.
    raw = redis_sync.Redis(port=server.port, decode_responses=True)
    revocation = json.dumps([time.time(), "while you were away"])
    raw.hset("ztgw:session:s2", mapping={"revoked": "1", "revocation": revocation})
    raw.hincrby("ztgw:session:s2", "ver", 1)
    raw.close()
    assert not a.session("s2").revoked  # type: ignore[union-attr]

    server.stop(save=True)
    assert await raises_unavailable(a.save_user(UserRecord(user="ghost"))) < 1.0
    assert await raises_unavailable(b.advance("totp-step:alice", 7)) < 1.0
    await eventually(lambda: not a.healthy and not b.healthy, 1.0, "unhealthy while down")
    await asyncio.sleep(0.3)
    server.start()

    await eventually(lambda: a.healthy and b.healthy, 5.0, "healthy after restart")
    for store in (a, b):
        assert store.resyncs >= 1
        got = store.session("s2")
        assert got is not None and got.revoked_reason == "while you were away"
        assert store.session("s1") is not None and not store.session("s1").revoked  # type: ignore[union-attr]
        assert store.user("alice") is not None and store.user("ghost") is None
    # Scripts were flushed with the restart: writes and write-behind still work.
    assert await a.advance("totp-step:alice", 7) is True
    s1 = a.session("s1")
    assert s1 is not None
    s1.requests = 9
    a.touch_session(s1)
    await a.flush()
    assert await b.revoke_session("s1", "after restart", time.time()) is True
    await eventually(lambda: a.session("s1").revoked, 1.0, "revocation after restart")  # type: ignore[union-attr]
    assert (await redis_backend.open()).session("s1").requests == 9  # type: ignore[union-attr]


async def test_redis_open_fails_fast_when_down(tmp_path: Path) -> None:
    store = RedisStore("redis://127.0.0.1:1/0")
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.open()
    assert time.monotonic() - start < 1.5
    assert not store.healthy


# --- SQLite shared by processes (workers = N) ----------------------------------------------------


async def test_sqlite_write_behind_rides_out_a_held_lock_and_fails_closed_past_its_grace(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    store = SQLiteStore(path, flush_interval=0.05, busy_timeout=0.05, flush_grace=0.6)
    await store.open()
    try:
        await store.save_session(session("s1"))
        held = sqlite3.connect(path, isolation_level=None)
        held.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        try:
            s1 = store.session("s1")
            assert s1 is not None
            s1.requests = 7
            store.touch_session(s1)
            await eventually(lambda: store._flush_failing_since is not None, 2.0, "a failed flush")
            # Retried with nothing lost, and the cache is still current: keep serving...
            assert store.healthy
            # ...but not for ever: a write-behind failing past its grace fails closed.
            await eventually(lambda: not store.healthy, 3.0, "unhealthy past the grace")
        finally:
            held.execute("ROLLBACK")
            held.close()
        await eventually(lambda: store.healthy, 3.0, "healthy once the backlog is written")
        fresh = SQLiteStore(path)
        await fresh.open()
        try:
            assert fresh.session("s1").requests == 7  # type: ignore[union-attr]
        finally:
            await fresh.close()
    finally:
        await store.close()


async def test_sqlite_reads_never_make_a_write_fail_under_another_process_writes(
    tmp_path: Path,
) -> None:
    # A read left open across an await kept a snapshot on the shared connection; a write made
    # meanwhile failed at once with "database is locked" when the other process had committed
    # since (the benchmark's two workers saw it as a burst of 503s).
    path = tmp_path / "state.db"
    a, b = SQLiteStore(path, sync_interval=0.002), SQLiteStore(path, sync_interval=0.002)
    await a.open()
    await b.open()
    failures: list[BaseException] = []
    stop = time.monotonic() + 1.5

    async def writer(store: SQLiteStore, prefix: str) -> None:
        i = 0
        while time.monotonic() < stop:
            i += 1
            try:
                await store.save_session(session(f"{prefix}{i}"))
                s = store.session(f"{prefix}{i}")
                assert s is not None
                store.touch_session(s)
                await store.flush()
            except Exception as exc:
                failures.append(exc)

    async def reader(store: SQLiteStore, prefix: str) -> None:
        while time.monotonic() < stop:
            await store.session_history(f"{prefix}1")
            await store.session_id_token(f"{prefix}1")

    try:
        await asyncio.gather(writer(a, "a"), writer(b, "b"), reader(a, "b"), reader(b, "a"))
    finally:
        await a.close()
        await b.close()
    assert failures == []


async def test_caught_up_sees_what_another_instance_just_wrote(backend: Backend) -> None:
    """A signal about alice must see the session another worker or replica started a moment
    ago: `caught_up()` returns only once every change made before it is in this cache."""
    # SQLite: a long poll interval, so only catching up can have read it.
    slow = {"sync_interval": 5.0} if backend.name == "sqlite" else {}
    a, b = await backend.open(), await backend.open(**slow)
    for i in range(3):
        await a.save_session(session(f"fresh-{i}"))
        user = dataclasses.replace(UserRecord(user="alice"), step_up_after=float(i))
        await a.save_user(user)
        await b.caught_up()
        assert b.session(f"fresh-{i}") is not None
        assert b.user("alice").step_up_after == float(i)  # type: ignore[union-attr]


async def test_a_revoked_certificate_is_seen_by_every_instance_until_it_expires(
    backend: Backend,
) -> None:
    a, b = await backend.open(), await backend.open()
    t = 1_000_000.0
    assert await b.revoked_certificates(t) == {}
    await a.revoke_certificate("issuer1:1f", t + 100, t)
    await a.revoke_certificate("issuer1:2a", t + 10, t)
    # Recording it again with an earlier expiry never shortens it.
    await b.revoke_certificate("issuer1:1f", t + 50, t)
    assert await b.revoked_certificates(t) == {"issuer1:1f": t + 100, "issuer1:2a": t + 10}
    assert await a.revoked_certificates(t + 20) == {"issuer1:1f": t + 100}
    assert await b.revoked_certificates(t + 100) == {}
