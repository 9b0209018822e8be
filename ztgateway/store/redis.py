"""The shared store: Redis behind an in-memory cache, for many replicas.

Reads on the request path never leave the process: devices, posture, users and live sessions
are held in memory, as in the SQLite store. Every durable write goes to Redis in one Lua
script that also PUBLISHes the change (kind and key) on `<prefix>changes`, so a write that
Redis acknowledged has been announced, atomically. Every replica (this one included) reloads
the announced entity; a version field (`ver`, incremented by each durable write) keeps a slow
reload from replacing a newer value with an older one.

Staleness bound. The subscriber PINGs on its pub/sub connection every `sync_interval`; Redis
answers in order with the messages, so a PONG received at time T proves every change published
before the PING has been read. `healthy` turns False as soon as no PONG has arrived for
`sync_interval + timeout` (0.75 s by default): at any instant either `healthy` is False or every
change acknowledged more than that long ago is in this cache. A broken or silent pub/sub
connection is replaced and the whole cache is reloaded (subscribe first, then read, so nothing
falls between) before `healthy` is True again; messages lost with the old connection do not
matter because the reload reads the state itself.

Counters are SHARED and atomic, which is the point of this backend: token buckets and the TOTP
replay guard are Lua scripts, failure windows are sorted sets, one-time claims are SET NX PX.
Because they need a round trip they are async only (`take_token_async`, `record_failure_async`,
`failures_async`, `reset_failures_async`): there is deliberately no synchronous `take_token`
here, since a per-process approximation would let N replicas grant N times the limit. The
SQLite store offers the same async names, so callers await them on either backend.

Faults. Every Redis call has a socket timeout (`timeout`, 0.5 s) and an overall deadline of
twice that, and redis-py's own retries are off: a write against a dead or frozen Redis raises
`StoreUnavailable` within about a second and was not acknowledged (it may or may not have been
applied; if it was, its announcement reaches every cache). A failure marks the store unhealthy;
a background task reconnects with backoff and reloads everything before trusting its cache.

Touches (last seen, last IP, session activity, user history) are written behind in batches and
are not announced, as in SQLite. They can never undo a durable change: a session touch is
dropped if the stored session is revoked, a device touch writes only `last_seen`/`last_ip`, and
a user touch writes only the history fields (never a lock). The sessions' recent decisions are
written behind too, each session's in a sorted set (`<prefix>history:<id>`, scored by time,
trimmed to the last SESSION_HISTORY, expiring with the session), read only by
`ztgateway sessions show`. A browser session's OIDC ID token is the `id_token` field of the
session's hash: written by a save, never by a touch, never loaded into the cache (reloads read
only the fields they need), read only by logout and the step-up's rotation, and gone with the
hash.

Why one module of about a thousand lines: `RedisStore` is one class because its parts keep one
invariant together. The cache, the `ver` fields and the subscription are consistent only as a
whole (a write, a reload and a resynchronisation each read and write all three), and mixins
split by entity would each reach into the others' state. What stands apart does: the Lua scripts
(redis_scripts.py), the JSON shared with the SQLite store (codec.py), the records and the merge
rules both backends follow (base.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import fields
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from ..clock import SYSTEM_CLOCK, Clock
from ..edge.inline import in_task
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
from .codec import (
    posture_from_json,
    posture_json,
    session_from_json,
    session_json,
    user_from_json,
    user_parts,
)
from .redis_scripts import SCRIPTS

log = logging.getLogger("ztgateway.store")

T = TypeVar("T")

_DEVICE_FIELDS = tuple(f.name for f in fields(Device))
# What a reload reads of a session's hash: everything but the ID token (`id_token`).
_SESSION_HASH_FIELDS = ("data", "revoked", "revocation", "ver")
_FAULTS = (RedisError, OSError, TimeoutError)
_HEARTBEAT = "ztgw-heartbeat"


def _pairs(mapping: dict[str, str]) -> list[str]:
    return [x for kv in mapping.items() for x in kv]


async def _close(pubsub: PubSub) -> None:
    with contextlib.suppress(Exception):
        await pubsub.aclose()


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel background tasks and wait until they have ended.

    Asks again until they do: on Python 3.11, `asyncio.wait_for` (which redis-py uses to send)
    swallows a cancellation that arrives as its inner operation completes.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    for t in tasks:
        if not t.cancelled() and t.exception() is not None:
            log.error("store background task failed", exc_info=t.exception())


def _hash(flat: list[Any]) -> dict[str, str]:
    """HGETALL's flat [field, value, ...] reply (from Lua) as a dict."""
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


class RedisStore(CachedReads, ChangeFeed):
    """Store for many replicas; see the module docstring for the consistency guarantees."""

    def __init__(
        self,
        url: str,
        *,
        sync_interval: float = 0.25,
        flush_interval: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
        key_prefix: str = "ztgw:",
        timeout: float = 0.5,
        session_grace: float = 86400.0,
        failure_ttl: float = 86400.0,
        max_backoff: float = 2.0,
    ) -> None:
        self.observe: Callable[[str, float, bool], None] | None = None
        self.url = url
        self.sync_interval = sync_interval
        self.flush_interval = flush_interval
        self.prefix = key_prefix
        self.timeout = timeout
        self.session_grace = session_grace
        self.failure_ttl = failure_ttl
        self.max_backoff = max_backoff
        self._clock = clock
        self._channel = key_prefix + "changes"
        self._origin = secrets.token_hex(8)
        self._redis: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._devices: dict[str, Device] = {}
        self._posture: dict[str, PostureRecord] = {}
        self._users: dict[str, UserRecord] = {}
        self._sessions: dict[str, Session] = {}
        self._versions: dict[tuple[ChangeKind, str], int] = {}
        self._dirty_devices: set[str] = set()
        self._dirty_sessions: set[str] = set()
        self._dirty_users: set[str] = set()
        # (session id, decision, number): the number makes the decision's member unique and
        # the same if a failed write-behind is retried.
        self._history: deque[tuple[str, SessionDecision, int]] = deque(maxlen=HISTORY_BACKLOG)
        self._history_seq = itertools.count()
        self._listeners: list[ChangeListener] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._synced = False  # subscribed and reloaded since the last (re)connect
        self._failed = False  # the last call to Redis failed; cleared by the next success
        self._last_pong = 0.0
        # Heartbeats sent and answered on the current subscription (answers come in order):
        # caught_up() waits for the answer to the first one sent after its call.
        self._pings = 0
        self._pongs = 0
        self._pong_seen = asyncio.Event()  # set (and replaced) at each of them
        self._closing = False
        self.resyncs = 0  # full reloads after the first: reconnects (for metrics and tests)

    # --- keys ------------------------------------------------------------------------------
    def _key(self, kind: str, key: str) -> str:
        return f"{self.prefix}{kind}:{key}"

    def _index(self, kind: ChangeKind) -> str:
        return f"{self.prefix}{kind.value}s"

    def _entity_key(self, kind: ChangeKind, key: str) -> str:
        return self._key(kind.value, key)

    def _message(self, kind: ChangeKind, key: str) -> str:
        return json.dumps({"o": self._origin, "k": kind.value, "id": key})

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def stale_after(self) -> float:
        """Seconds without a PONG after which the cache is no longer trusted."""
        return self.sync_interval + self.timeout

    async def caught_up(self) -> None:
        """Redis answers a PING on the subscription after every message published before it:
        once the PING sent after the call is answered, every change published before the call
        is applied (within one heartbeat interval, `sync_interval`)."""
        target = self._pings + 1

        async def answered() -> None:
            while self._pongs < target:
                await self._pong_seen.wait()

        try:
            await asyncio.wait_for(answered(), 2 * self.stale_after)
        except TimeoutError as exc:
            raise StoreUnavailable("redis: no heartbeat to catch up with") from exc

    async def open(self) -> None:
        client = Redis.from_url(
            self.url,
            decode_responses=True,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),  # we bound and report failures ourselves
            health_check_interval=0,
            # RESP2: a PING on a subscribed connection comes back in order with the messages
            # as ["pong", data], which the heartbeat relies on (redis-py mis-parses the RESP3
            # reply to it).
            protocol=2,
            client_name="ztgateway",
        )
        self._redis = client
        self._closing = False
        self._scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()}
        try:
            pubsub = await self._connect()
        except StoreUnavailable:
            self._redis = None
            with contextlib.suppress(Exception):
                await client.aclose()
            raise
        self._tasks = [
            asyncio.ensure_future(self._supervise(pubsub)),
            asyncio.ensure_future(self._flush_loop()),
        ]

    async def close(self) -> None:
        self._closing = True
        await _cancel_all(self._tasks)
        self._tasks = []
        client = self._redis
        if client is not None:
            with contextlib.suppress(Exception):
                await self._flush()
            self._redis = None
            with contextlib.suppress(Exception):
                await client.aclose()
        self._synced = False

    @property
    def healthy(self) -> bool:
        return (
            self._redis is not None
            and self._synced
            and not self._failed
            and self._clock.monotonic() - self._last_pong < self.stale_after
        )

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            raise StoreUnavailable("store is not open")
        return self._redis

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """One bounded call to Redis: StoreUnavailable instead of a hang or a library error."""
        self.redis  # noqa: B018 - raises StoreUnavailable when closed
        await in_task()
        try:
            async with asyncio.timeout(2 * self.timeout):
                result = await op()
        except _FAULTS as exc:
            self._failed = True
            raise StoreUnavailable(f"redis {what}: {exc or type(exc).__name__}") from exc
        self._failed = False
        return result

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts[name]
        return await self._call(name, lambda: script(keys, args))

    async def _upsert(self, kind: ChangeKind, prefix: str, key: str, *fields: str) -> int:
        """Write a hash's fields, add the key to its index and announce it; the new version."""
        return int(
            await self._script(
                "upsert",
                [self._key(prefix, key), self._index(kind)],
                [self._channel, self._message(kind, key), key, *fields],
            )
        )

    # --- subscription and resynchronisation ------------------------------------------------
    async def _connect(self) -> PubSub:
        """Subscribe, wait until Redis confirms it, then reload everything.

        In that order: a change published after the confirmation is delivered to us; one
        published before it is already in what we read.
        """
        pubsub = self.redis.pubsub()
        await in_task()
        try:
            async with asyncio.timeout(2 * self.timeout):
                await pubsub.subscribe(self._channel)
                while True:
                    msg = await pubsub.get_message(timeout=self.timeout)
                    if msg is not None and msg["type"] == "subscribe":
                        break
            await self.sync()
        except (*_FAULTS, StoreUnavailable) as exc:
            await _close(pubsub)
            self._synced = False
            if isinstance(exc, StoreUnavailable):
                raise
            raise StoreUnavailable(f"redis subscribe: {exc or type(exc).__name__}") from exc
        self._last_pong = self._clock.monotonic()
        self._synced = True
        self._failed = False
        return pubsub

    async def _supervise(self, pubsub: PubSub | None) -> None:
        """Listen for changes; on any fault, reconnect with backoff and resynchronise."""
        delay = 0.05
        while not self._closing:
            if pubsub is None:
                try:
                    pubsub = await self._connect()
                except Exception as exc:  # keep trying: until then the store fails closed
                    if isinstance(exc, StoreUnavailable):
                        log.debug("store reconnect failed: %s", exc)
                    else:
                        log.exception("store resynchronisation failed")
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.max_backoff)
                    continue
                self.resyncs += 1
                log.warning("store reconnected to redis and resynchronised")
                delay = 0.05
            try:
                await self._listen(pubsub)
            except asyncio.CancelledError:
                await _close(pubsub)
                raise
            except (*_FAULTS, StoreUnavailable) as exc:
                self._synced = False
                log.warning("store lost redis, fail closed until resynchronised: %s", exc)
            except Exception:
                self._synced = False
                log.exception("store subscription failed, resynchronising")
            await _close(pubsub)
            pubsub = None
        if pubsub is not None:
            await _close(pubsub)

    async def _listen(self, pubsub: PubSub) -> None:
        next_ping = 0.0
        # A new subscription (after a full reload): nothing is in flight on it yet.
        self._pongs = self._pings
        while not self._closing:
            conn: Any = pubsub.connection  # typed as always set; it is None once closed
            if conn is None or not conn.is_connected:
                # redis-py would reconnect and resubscribe silently, losing what was published
                # in between: we start over with a fresh connection and a full reload instead.
                raise StoreUnavailable("pub/sub connection closed")
            now = self._clock.monotonic()
            if now - self._last_pong >= self.stale_after:
                raise StoreUnavailable(f"no answer from redis for {self.stale_after:.2f}s")
            if now >= next_ping:
                await pubsub.ping(_HEARTBEAT)
                self._pings += 1
                next_ping = now + self.sync_interval
                if self._failed:  # a call failed but pub/sub lives: healthy again once Redis is
                    with contextlib.suppress(StoreUnavailable):
                        await self._call("ping", self.redis.ping)
            msg = await pubsub.get_message(timeout=min(self.sync_interval, self.timeout))
            batch: list[str] = []
            pong = 0
            while msg is not None:
                if msg["type"] == "message":
                    batch.append(str(msg["data"]))
                elif msg["type"] == "pong":
                    pong += 1
                if len(batch) >= 500:
                    break
                msg = await pubsub.get_message(timeout=0)
            if batch:
                await self._apply_messages(batch)
            if pong:  # only now: every change published before our PING is applied
                self._last_pong = self._clock.monotonic()
                self._pongs += pong
                seen, self._pong_seen = self._pong_seen, asyncio.Event()
                seen.set()

    async def _apply_messages(self, raw: list[str]) -> None:
        wanted: dict[tuple[ChangeKind, str], bool] = {}
        for data in raw:
            try:
                m = json.loads(data)
                ref = (ChangeKind(m["k"]), str(m["id"]))
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring malformed store change message %r", data[:200])
                continue
            wanted[ref] = wanted.get(ref, False) or m.get("o") != self._origin
        hashes = await self._fetch(list(wanted))
        for (kind, key), h in zip(wanted, hashes, strict=True):
            changed = self._apply(kind, key, h)
            if changed or wanted[(kind, key)]:
                self._notify(kind, key)

    async def _fetch(self, refs: list[tuple[ChangeKind, str]]) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for i in range(0, len(refs), 1000):
            chunk = refs[i : i + 1000]

            async def run(chunk: list[tuple[ChangeKind, str]] = chunk) -> list[Any]:
                pipe = self.redis.pipeline(transaction=False)
                for kind, key in chunk:
                    if kind is ChangeKind.SESSION:
                        pipe.hmget(self._entity_key(kind, key), _SESSION_HASH_FIELDS)
                    else:
                        pipe.hgetall(self._entity_key(kind, key))
                replies = await pipe.execute()
                return [
                    {
                        f: str(v)
                        for f, v in zip(_SESSION_HASH_FIELDS, r, strict=True)
                        if v is not None
                    }
                    if kind is ChangeKind.SESSION
                    else r
                    for (kind, _), r in zip(chunk, replies, strict=True)
                ]

            out.extend(await self._call("reload", run))
        return out

    async def _reload(self, kind: ChangeKind, key: str) -> None:
        (h,) = await self._fetch([(kind, key)])
        self._apply(kind, key, h)

    def _decode(self, kind: ChangeKind, key: str, h: dict[str, str]) -> Any:
        """The cached object for a stored hash (None: gone, or a session that has expired)."""
        if not h or (kind is not ChangeKind.USER and "ver" not in h):
            return None
        if kind is ChangeKind.DEVICE:
            # A field added later (spki) is absent from hashes written before it.
            return Device(**{f: json.loads(h[f]) for f in _DEVICE_FIELDS if f in h})
        if kind is ChangeKind.POSTURE:
            return posture_from_json(json.loads(h["data"]))
        if kind is ChangeKind.USER:
            if "record" not in h:
                return None
            data = json.loads(h["record"]) | json.loads(h.get("history") or "{}")
            return user_from_json(data)
        s = session_from_json(json.loads(h["data"]))
        if h.get("revoked") == "1" and "revocation" in h:
            s.revoked_at, s.revoked_reason = json.loads(h["revocation"])
        else:
            s.revoked_at = s.revoked_reason = None
        return s if s.expires_at > self._clock.time() else None

    def _apply(self, kind: ChangeKind, key: str, h: dict[str, str]) -> bool:
        """Put a fetched hash in the cache unless we already hold a newer version."""
        ref = (kind, key)
        ver = int(h.get("ver", 0)) if h else -1
        if h and ver < self._versions.get(ref, 0):
            return False  # a reload that raced with a newer write: keep the newer value
        cache = self._cache(kind)
        mine = cache.get(key)
        fresh = self._decode(kind, key, h)
        if fresh is None:
            self._versions.pop(ref, None)
            return cache.pop(key, None) is not None
        fresh = self._merge_local(kind, key, fresh, mine)
        self._versions[ref] = ver
        cache[key] = fresh
        return bool(fresh != mine)

    def _set(self, kind: ChangeKind, key: str, value: Any, ver: int) -> None:
        """After our own durable write: cache what Redis now holds (version `ver`)."""
        ref = (kind, key)
        if ver >= self._versions.get(ref, 0):
            self._versions[ref] = ver
            self._cache(kind)[key] = value

    async def sync(self) -> int:
        """Reload everything from Redis now; returns how many cached entities changed.

        Runs on open and after every reconnect; listeners hear about each changed entity.
        """
        now = self._clock.time()
        client = self.redis

        async def ids() -> tuple[list[str], ...]:
            pipe = client.pipeline(transaction=False)
            pipe.smembers(self._index(ChangeKind.DEVICE))
            pipe.smembers(self._index(ChangeKind.POSTURE))
            pipe.smembers(self._index(ChangeKind.USER))
            pipe.zrangebyscore(self._index(ChangeKind.SESSION), f"({now!r}", "+inf")
            return tuple(sorted(x) for x in await pipe.execute())

        devices, postures, users, sessions = await self._call("resync", ids)
        refs = (
            [(ChangeKind.DEVICE, k) for k in devices]
            + [(ChangeKind.POSTURE, k) for k in postures]
            + [(ChangeKind.USER, k) for k in users]
            + [(ChangeKind.SESSION, k) for k in sessions]
        )
        hashes = await self._fetch(refs)
        fresh: dict[ChangeKind, dict[str, Any]] = {kind: {} for kind in ChangeKind}
        versions: dict[tuple[ChangeKind, str], int] = {}
        for (kind, key), h in zip(refs, hashes, strict=True):
            value = self._decode(kind, key, h)
            if value is not None:
                fresh[kind][key] = self._merge_local(kind, key, value, self._cache(kind).get(key))
                versions[(kind, key)] = int(h.get("ver", 0))
        changed: list[tuple[ChangeKind, str]] = []
        for kind in ChangeKind:
            old, new = self._cache(kind), fresh[kind]
            changed += [(kind, k) for k in old.keys() | new.keys() if old.get(k) != new.get(k)]
        # Swap the contents (not the dicts): a version is only ever read with its value.
        for kind in ChangeKind:
            cache = self._cache(kind)
            cache.clear()
            cache.update(fresh[kind])
        self._versions = versions
        for kind, key in changed:
            self._notify(kind, key)
        return len(changed)

    # --- write-behind ----------------------------------------------------------------------
    async def _flush_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.flush_interval)
            try:
                await self._flush()
            except Exception as exc:
                log.warning("store write-behind failed, will retry: %s", exc)

    def _history_ttl_ms(self, session_id: str, now: float) -> int:
        """A session's history lives as long as its key (a day after it expires)."""
        s = self._sessions.get(session_id)
        end = s.expires_at if s is not None else now
        return max(1, int((end - now + self.session_grace) * 1000))

    async def _flush(self) -> None:
        if not (self._dirty_devices or self._dirty_sessions or self._dirty_users or self._history):
            return
        devices, self._dirty_devices = self._dirty_devices, set()
        sessions, self._dirty_sessions = self._dirty_sessions, set()
        users, self._dirty_users = self._dirty_users, set()
        pending = list(self._history)
        self._history.clear()
        history: dict[str, list[tuple[SessionDecision, int]]] = {}
        for sid, decision, n in pending:
            history.setdefault(sid, []).append((decision, n))
        now = self._clock.time()

        async def run() -> None:
            pipe = self.redis.pipeline(transaction=False)
            for d in (self._devices.get(k) for k in devices):
                if d is not None:
                    await self._scripts["touch_device"](
                        [self._key("device", d.device_id)],
                        [json.dumps(d.last_seen), json.dumps(d.last_ip)],
                        client=pipe,
                    )
            for s in (self._sessions.get(k) for k in sessions):
                if s is not None:
                    await self._scripts["touch_session"](
                        [self._key("session", s.session_id)], [session_json(s)], client=pipe
                    )
            for u in (self._users.get(k) for k in users):
                if u is not None:
                    record, history_fields = user_parts(u)
                    await self._scripts["touch_user"](
                        [self._key("user", u.user), self._index(ChangeKind.USER)],
                        [u.user, history_fields, record],
                        client=pipe,
                    )
            for sid, numbered in history.items():
                key = self._key("history", sid)
                latest = sorted(numbered, key=lambda x: x[0].at)[-SESSION_HISTORY:]
                # The member ends with a tag of its own: equal decisions stay apart.
                members = {json.dumps([*d, f"{self._origin}.{n}"]): d.at for d, n in latest}
                pipe.zadd(key, members)
                pipe.zremrangebyrank(key, 0, -SESSION_HISTORY - 1)
                pipe.pexpire(key, self._history_ttl_ms(sid, now))
            await pipe.execute()

        try:
            await self._call("write-behind", run)
        except StoreUnavailable:
            self._dirty_devices |= devices
            self._dirty_sessions |= sessions
            self._dirty_users |= users
            self._history = deque([*pending, *self._history], maxlen=HISTORY_BACKLOG)
            raise

    async def flush(self) -> None:
        await self._flush()

    # --- devices -----------------------------------------------------------------------------
    async def register_device(self, device: Device) -> Device:
        existing = self._devices.get(device.device_id)
        if existing is not None:
            return existing
        key = device.device_id
        values = {f: json.dumps(getattr(device, f)) for f in _DEVICE_FIELDS}
        created, flat = await self._script(
            "create",
            [self._key("device", key), self._index(ChangeKind.DEVICE)],
            [self._channel, self._message(ChangeKind.DEVICE, key), key, *_pairs(values)],
        )
        self._apply(ChangeKind.DEVICE, key, _hash(flat))
        if created:
            self._notify(ChangeKind.DEVICE, key)
        return self._devices[key]

    def touch_device(self, device_id: str, now: float, ip: str) -> None:
        d = self._devices.get(device_id)
        if d is not None and (now - d.last_seen > 1.0 or d.last_ip != ip):
            d.last_seen, d.last_ip = now, ip
            self._dirty_devices.add(device_id)

    async def _update_device(self, device_id: str, **values: Any) -> Device | None:
        pairs = [x for k, v in values.items() for x in (k, json.dumps(v))]
        flat = await self._script(
            "update",
            [self._key("device", device_id)],
            [self._channel, self._message(ChangeKind.DEVICE, device_id), *pairs],
        )
        self._apply(ChangeKind.DEVICE, device_id, _hash(flat))
        if flat:
            self._notify(ChangeKind.DEVICE, device_id)
        return self._devices.get(device_id)

    async def set_device_state(self, device_id: str, state: DeviceState) -> Device | None:
        return await self._update_device(device_id, state=state)

    async def set_device_owner(self, device_id: str, owner: str | None) -> Device | None:
        return await self._update_device(device_id, owner=owner)

    async def bind_device_key(
        self, device_id: str, spki: str, fingerprint: str, subject: str
    ) -> Device | None:
        return await self._update_device(
            device_id, spki=spki, fingerprint=fingerprint, subject=subject
        )

    async def put_posture(self, record: PostureRecord) -> None:
        key = record.device_id
        ver = await self._upsert(ChangeKind.POSTURE, "posture", key, "data", posture_json(record))
        self._set(ChangeKind.POSTURE, key, record, ver)
        self._notify(ChangeKind.POSTURE, key)

    # --- users ---------------------------------------------------------------------------------
    async def save_user(self, record: UserRecord) -> None:
        key = record.user
        data, history = user_parts(record)
        ver = await self._upsert(ChangeKind.USER, "user", key, "record", data, "history", history)
        self._dirty_users.discard(key)
        self._set(ChangeKind.USER, key, record, ver)
        self._notify(ChangeKind.USER, key)

    def touch_user(self, record: UserRecord) -> None:
        """History a request adds (known devices, routes, location): written behind."""
        self._users[record.user] = record
        self._dirty_users.add(record.user)

    # --- sessions ------------------------------------------------------------------------------
    async def save_session(self, session: Session) -> None:
        """Write a session. SECURITY: a revoked session stays revoked, whoever saves it later."""
        id_token = take_id_token(session)  # before compact() drops it from `extra`
        session.compact()
        key = session.session_id
        ttl_ms = max(1, int((session.expires_at - self._clock.time() + self.session_grace) * 1000))
        ver = await self._script(
            "save_session",
            [self._key("session", key), self._index(ChangeKind.SESSION)],
            [
                self._channel,
                self._message(ChangeKind.SESSION, key),
                key,
                session_json(session),
                json.dumps([session.revoked_at, session.revoked_reason]) if session.revoked else "",
                repr(session.expires_at),
                ttl_ms,
                id_token or "",
            ],
        )
        self._dirty_sessions.discard(key)
        if int(ver) == 0:
            # Revoked meanwhile (perhaps on another replica): take the revocation.
            await self._reload(ChangeKind.SESSION, key)
        else:
            self._set(ChangeKind.SESSION, key, session, int(ver))
        self._notify(ChangeKind.SESSION, key)

    def touch_session(self, session: Session) -> None:
        self._dirty_sessions.add(session.session_id)

    async def session_id_token(self, session_id: str) -> str | None:
        key = self._key("session", session_id)
        token, data = await self._call(
            "id token", lambda: self.redis.hmget(key, ["id_token", "data"])
        )
        if token:
            return str(token)
        if data and '"id_token"' in data:
            # Written before, not rewritten since: the token is still in `data`.
            with contextlib.suppress(ValueError, TypeError, KeyError):
                old = json.loads(data)["extra"]["id_token"]
                if isinstance(old, str) and old:
                    return old
        return None

    def record_decision(self, session_id: str, decision: SessionDecision) -> None:
        self._history.append((session_id, decision, next(self._history_seq)))

    async def session_history(self, session_id: str) -> list[SessionDecision]:
        key = self._key("history", session_id)
        raw = await self._call("history", lambda: self.redis.zrange(key, -SESSION_HISTORY, -1))
        stored = [SessionDecision(*json.loads(str(m))[:5]) for m in raw]
        # With what this replica has not written yet.
        return latest_decisions([*stored, *(d for sid, d, _ in self._history if sid == session_id)])

    async def revoke_session(self, session_id: str, reason: str, now: float) -> bool:
        """Revoke; True only for the one caller (on any replica) that actually revoked it."""
        s = self._sessions.get(session_id)
        if s is None:
            await self._reload(ChangeKind.SESSION, session_id)
            s = self._sessions.get(session_id)
        if s is None or s.revoked:
            return False
        ver = await self._script(
            "revoke_session",
            [self._key("session", session_id)],
            [
                self._channel,
                self._message(ChangeKind.SESSION, session_id),
                json.dumps([now, reason]),
            ],
        )
        if int(ver) == 0:
            await self._reload(ChangeKind.SESSION, session_id)
            return False
        s.revoked_at, s.revoked_reason = now, reason
        self._set(ChangeKind.SESSION, session_id, s, int(ver))
        self._notify(ChangeKind.SESSION, session_id)
        return True

    async def expire_sessions(self, now: float, idle_timeout: float | None = None) -> int:
        """Drop expired sessions from the cache; delete them from Redis a grace period later."""
        gone = self._dead_in_memory(now, idle_timeout)
        for k in gone:
            self._sessions.pop(k, None)
            self._versions.pop((ChangeKind.SESSION, k), None)
        index = self._index(ChangeKind.SESSION)
        cutoff = repr(now - self.session_grace)

        async def run() -> None:
            old = [str(k) for k in await self.redis.zrangebyscore(index, "-inf", cutoff)]
            if old:
                pipe = self.redis.pipeline(transaction=False)
                pipe.delete(*(self._key("session", k) for k in old))
                pipe.delete(*(self._key("history", k) for k in old))
                pipe.zrem(index, *old)
                await pipe.execute()

        await self._call("expire", run)
        return len(gone)

    # --- counters (shared by every replica) ------------------------------------------------------
    async def take_token_async(self, key: str, rate: float, burst: int, now: float) -> float:
        """Token bucket shared by all replicas: 0.0 if a token was taken, else seconds to wait."""
        wait = await self._script(
            "bucket", [self._key("bucket", key)], [repr(float(rate)), burst, repr(now)]
        )
        return float(wait)

    async def record_failure_async(self, key: str, now: float) -> None:
        k = self._key("fail", key)

        async def run() -> None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.zadd(k, {f"{now!r}:{secrets.token_hex(6)}": now})
            pipe.zremrangebyscore(k, "-inf", f"({now - self.failure_ttl!r}")
            pipe.zremrangebyrank(k, 0, -MAX_FAILURES - 1)
            pipe.expire(k, max(1, int(self.failure_ttl)))
            await pipe.execute()

        await self._call("record failure", run)

    async def failures_async(self, key: str, now: float, window: float) -> int:
        """How many failures were recorded for `key` at or after `now - window` (any replica)."""
        k = self._key("fail", key)
        return int(await self._call("failures", lambda: self.redis.zcount(k, now - window, "+inf")))

    async def reset_failures_async(self, key: str) -> None:
        k = self._key("fail", key)
        await self._call("reset failures", lambda: self.redis.delete(k))

    async def advance(self, key: str, value: int) -> bool:
        """Atomic compare-and-set: store `value` only if greater (the TOTP replay guard).

        One Lua script, so across replicas exactly one caller wins for a given step.
        """
        stored = await self._script("advance", [self._key("counter", key)], [str(int(value))])
        return bool(int(stored) == 1)

    async def reset_counter(self, key: str) -> None:
        k = self._key("counter", key)
        await self._call("reset counter", lambda: self.redis.delete(k))

    async def claim_once(self, key: str, ttl: float, now: float) -> bool:
        """Atomically claim `key` for `ttl` seconds (Redis' clock): False if already claimed."""
        k = self._key("claim", key)
        ms = max(1, int(ttl * 1000))
        return bool(await self._call("claim", lambda: self.redis.set(k, "1", nx=True, px=ms)))

    async def revoke_certificate(self, key: str, until: float, now: float) -> None:
        """One sorted set scored by the certificate's expiry: every replica reads it."""
        k = self._key("revoked-certs", "all")

        async def run() -> None:
            await self.redis.zremrangebyscore(k, "-inf", now)
            # GT: a later expiry wins, and new members are still added.
            await self.redis.zadd(k, {key: until}, gt=True)

        await self._call("revoke certificate", run)

    async def revoked_certificates(self, now: float) -> dict[str, float]:
        k = self._key("revoked-certs", "all")
        rows = await self._call(
            "revoked certificates",
            lambda: self.redis.zrangebyscore(k, f"({now}", "+inf", withscores=True),
        )
        return {str(row[0]): float(row[1]) for row in rows}

    async def consume_backup_code(self, user: str, code_hash: str) -> bool:
        """SADD answers 1 to exactly one caller on any replica (issue 18, M7). The set is kept
        apart from the user's record, so no later save of a stale record brings a code back."""
        k = self._key("backup-used", user)
        added = await self._call("backup code", lambda: self.redis.sadd(k, code_hash))
        return bool(int(added) == 1)

    # --- WebAuthn credentials ----------------------------------------------------------------
    def _credential_keys(self, credential_id: str, user: str) -> list[str]:
        return [self._key("webauthn", credential_id), self._key("webauthn-user", user)]

    async def add_webauthn_credential(self, credential: WebAuthnCredential) -> bool:
        added = await self._script(
            "add_credential",
            self._credential_keys(credential.credential_id, credential.user),
            [
                credential.credential_id,
                credential.user,
                json.dumps(credential.to_json()),
                credential.sign_count,
                repr(credential.created_at),
                MAX_WEBAUTHN_CREDENTIALS,
            ],
        )
        return bool(int(added) == 1)

    async def webauthn_credential(self, credential_id: str) -> WebAuthnCredential | None:
        k = self._key("webauthn", credential_id)
        h = await self._call("credential", lambda: self.redis.hgetall(k))
        if not h or "data" not in h:
            return None
        record = json.loads(h["data"])
        record["sign_count"] = int(h["sign_count"])
        used = h.get("last_used_at")
        record["last_used_at"] = float(used) if used else None
        return WebAuthnCredential.from_json(record)

    async def webauthn_credentials(self, user: str) -> list[WebAuthnCredential]:
        k = self._key("webauthn-user", user)
        ids = await self._call("credentials", lambda: self.redis.zrange(k, 0, -1))
        found = [await self.webauthn_credential(str(i)) for i in ids]
        return [c for c in found if c is not None and c.user == user]

    async def use_webauthn_credential(
        self, credential_id: str, sign_count: int, now: float
    ) -> bool:
        used = await self._script(
            "use_credential", [self._key("webauthn", credential_id)], [int(sign_count), repr(now)]
        )
        return bool(int(used) == 1)

    async def remove_webauthn_credential(self, user: str, credential_id: str) -> bool:
        removed = await self._script(
            "remove_credential", self._credential_keys(credential_id, user), [credential_id, user]
        )
        return bool(int(removed) == 1)

    # --- the gateway's own secrets and sign-ins in flight -----------------------------------------
    async def shared_secret(self, name: str, candidate: str) -> str:
        value = await self._script("set_once", [self._key("secret", name)], [candidate])
        return str(value)

    async def put_pending_login(
        self, state: str, source: str, data: str, expires: float, per_source: int
    ) -> None:
        now = self._clock.time()
        ttl_ms = max(1, int((expires - now) * 1000))
        await self._script(
            "put_login",
            [self._key("logins", source), self._key("logins-order", source)],
            # Arrival by this replica's clock: attempts of one source started on two replicas
            # are ordered as well as the replicas' clocks agree.
            [state, f"{expires!r}\n{data}", ttl_ms, per_source, repr(now)],
        )

    async def take_pending_login(self, state: str, source: str, now: float) -> str | None:
        value = await self._script(
            "take_login",
            [self._key("logins", source), self._key("logins-order", source)],
            [state],
        )
        if not value:
            return None
        expires, _, data = str(value).partition("\n")
        return data if float(expires) > now else None
