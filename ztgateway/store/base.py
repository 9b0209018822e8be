"""The state the gateway keeps between requests: devices, posture, users, sessions, counters.

The hot path reads from process memory (synchronous methods); durable changes are written to
the backing store and awaited; frequent touches (last seen, last IP) are written behind in
batches. Every durable change is also recorded as a change event, so other processes (the CLI,
other workers or replicas) see it within the store's sync interval — the staleness bound.
"""

from __future__ import annotations

import enum
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

log = logging.getLogger("ztgateway.store")

DeviceState = Literal["pending", "approved", "revoked"]
DEVICE_STATES: tuple[DeviceState, ...] = ("pending", "approved", "revoked")

SESSION_HISTORY = 20
"""Decisions kept per session for `ztgateway sessions show` (in the store, not in memory)."""
MAX_FAILURES = 1000
"""Events kept per failure/request counter key, on every backend."""
HISTORY_BACKLOG = 100_000
"""Decisions waiting for the next write-behind flush; the oldest are dropped beyond this."""


class ChangeKind(enum.StrEnum):
    DEVICE = "device"
    POSTURE = "posture"
    USER = "user"
    SESSION = "session"


class StoreUnavailable(Exception):
    """The backing store cannot be reached; requests needing it fail closed (503)."""


@dataclass(slots=True)
class Device:
    device_id: str
    fingerprint: str
    subject: str
    owner: str | None
    state: DeviceState
    first_seen: float
    last_seen: float
    last_ip: str | None = None
    spki: str | None = None
    """SHA-256 of the public key the device registered with: another certificate under the same
    device id is refused unless it carries that key (security review L9). None: a row from
    before pinning (pinned at the next contact with the certificate it registered with);
    REBIND_NEXT: an operator re-bound it to whatever certificate comes next."""

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "fingerprint_sha256": self.fingerprint,
            "key_sha256": self.spki,
            "subject": self.subject,
            "owner": self.owner,
            "state": self.state,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "last_ip": self.last_ip,
        }


REBIND_NEXT = "*"
"""`Device.spki` after `devices rebind DEVICE` without a certificate."""


@dataclass(frozen=True, slots=True)
class PostureRecord:
    device_id: str
    report: dict[str, Any]
    received_at: float
    collected_at: float | None
    signed: bool
    digest: str


@dataclass(slots=True)
class UserRecord:
    user: str
    timezone: str | None = None
    working_hours: str | None = None
    locked_until: float | None = None
    lock_reason: str | None = None
    mfa_secret: str | None = None  # sealed with the MFA key, never the plain secret
    mfa_enrolled_at: float | None = None
    backup_codes: tuple[str, ...] = ()  # hashes
    mfa_last_step: int | None = None
    mfa_locked_until: float | None = None
    mfa_pending_secret: str | None = None  # sealed; an enrolment waiting for its confirming code
    mfa_pending_at: float | None = None
    known_devices: tuple[str, ...] = ()
    known_routes: tuple[str, ...] = ()
    last_location: tuple[float, float, float] | None = None  # lat, lon, time
    step_up_after: float | None = None
    """A signal from the identity provider (CAEP credential-change, assurance-level-change)
    asked for a second factor: sessions whose last one is older than this must step up
    (ztgateway/signals/, docs/signals.md)."""
    step_up_reason: str | None = None

    def locked(self, now: float) -> bool:
        return self.locked_until is not None and self.locked_until > now


MAX_WEBAUTHN_CREDENTIALS = 20
"""Security keys and passkeys one user may register (a bound on what a sign-in can add)."""


@dataclass(frozen=True, slots=True)
class WebAuthnCredential:
    """A registered WebAuthn public-key credential (W3C WebAuthn Level 2 §6.1 and §7.1).

    Kept apart from the user's record, like the marks of used backup codes: the sign counter
    changes on every use and is advanced by compare-and-set in the store, so a stale copy of a
    user record written by another process can never move it back.
    """

    credential_id: str  # base64url, as the browser names it
    user: str
    public_key: str  # base64url COSE_Key (RFC 9052 §7), as the attestation carried it
    sign_count: int
    name: str
    created_at: float
    last_used_at: float | None = None
    transports: tuple[str, ...] = ()
    aaguid: str = ""
    user_verified: bool = False  # UV at registration
    backup_eligible: bool = False  # a synced passkey (flags BE, §6.1)

    def to_json(self) -> dict[str, Any]:
        return {
            "credential_id": self.credential_id,
            "user": self.user,
            "public_key": self.public_key,
            "sign_count": self.sign_count,
            "name": self.name,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "transports": list(self.transports),
            "aaguid": self.aaguid,
            "user_verified": self.user_verified,
            "backup_eligible": self.backup_eligible,
        }

    def summary(self) -> dict[str, Any]:
        """What the CLI and the admin API show: no public key."""
        data = self.to_json()
        del data["public_key"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WebAuthnCredential:
        return cls(
            credential_id=str(data["credential_id"]),
            user=str(data["user"]),
            public_key=str(data["public_key"]),
            sign_count=int(data["sign_count"]),
            name=str(data.get("name", "")),
            created_at=float(data["created_at"]),
            last_used_at=None if data.get("last_used_at") is None else float(data["last_used_at"]),
            transports=tuple(str(t) for t in data.get("transports") or ()),
            aaguid=str(data.get("aaguid", "")),
            user_verified=bool(data.get("user_verified", False)),
            backup_eligible=bool(data.get("backup_eligible", False)),
        )


class SessionDecision(NamedTuple):
    """One decision on a session, as `ztgateway sessions show` lists it."""

    at: float
    ip: str
    route: str
    verdict: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.at,
            "ip": self.ip,
            "route": self.route,
            "verdict": self.verdict,
            "reason": self.reason,
        }


def latest_decisions(decisions: Iterable[SessionDecision]) -> list[SessionDecision]:
    """The last SESSION_HISTORY decisions, oldest first."""
    return sorted(decisions, key=lambda d: d.at)[-SESSION_HISTORY:]


_MOVED = frozenset({"history", "verified_ip"})  # `extra` keys before 0008
ID_TOKEN = "id_token"  # noqa: S105 - the name of a key, not a secret
"""The `extra` key a writer puts a session's OIDC ID token under (the sign-in, the step-up's
rotation). Stores keep it apart from the session and never in memory; logout reads it back with
`Store.session_id_token` (docs/decisions/0008-session-history.md)."""
_APART = _MOVED | {ID_TOKEN}  # `extra` keys that `compact()` does not keep
_SHORT = 64  # `extra` strings up to this length are shared between sessions (sys.intern)


def _shared(value: Any) -> Any:
    """Recurring small values of `extra` (provider, source, group names) as one object."""
    if type(value) is str and len(value) <= _SHORT:
        return sys.intern(value)
    if type(value) is list:
        return [_shared(v) for v in value]
    return value


@dataclass(slots=True)
class Session:
    session_id: str
    kind: Literal["cookie", "token"]
    user: str
    device_id: str | None
    start_ip: str
    last_ip: str
    user_agent: str
    created: float
    last_seen: float
    expires_at: float
    mfa_at: float | None = None
    anomaly: float = 0.0
    anomaly_at: float = 0.0
    revoked_at: float | None = None
    revoked_reason: str | None = None
    requests: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    verified_ip: str | None = None
    """The address the session was last verified from (start, sign-in, step-up); None: start_ip.

    Before 0008 it was `extra["verified_ip"]`: `compact()` moves it here (old rows, and writers
    that still set it there)."""

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def compact(self) -> Session:
        """Normalise in place for a long stay in memory; returns the session.

        Every store calls it on what it loads and what it is given to save, so a session costs
        the same however it arrived (docs/decisions/0008-session-history.md):
        - `extra["history"]` (the decisions sessions kept before 0008) is dropped: the store
          keeps a session's recent decisions out of memory (`record_decision`);
        - `extra["verified_ip"]` moves to `verified_ip`;
        - `extra["id_token"]` is dropped: a store keeps it apart (take it first with
          `take_id_token`), and rows written before keep it in the store until their next write;
        - equal addresses and times share one object; the kind, the user agent, and the keys
          and short strings of `extra` are interned (the same few values in every session);
        - `extra` is rebuilt at its size (an emptied dict keeps its table).
        """
        extra = self.extra
        if extra:
            ip = extra.get("verified_ip")
            if isinstance(ip, str):
                self.verified_ip = ip
            user = self.user
            self.extra = {
                sys.intern(k): user if k == "email" and v == user else _shared(v)
                for k, v in extra.items()
                if k not in _APART
            }
        self.kind = sys.intern(self.kind)  # type: ignore[assignment]
        self.user_agent = sys.intern(self.user_agent)
        start = self.start_ip
        if self.last_ip == start:
            self.last_ip = start
        verified = self.verified_ip
        if verified is not None:
            if verified == start:
                self.verified_ip = start
            elif verified == self.last_ip:
                self.verified_ip = self.last_ip
        if self.last_seen == self.created:
            self.last_seen = self.created
        if self.anomaly_at == self.last_seen:
            self.anomaly_at = self.last_seen
        if self.anomaly == 0.0:
            self.anomaly = 0.0
        if self.anomaly_at == 0.0:
            self.anomaly_at = 0.0
        if self.revoked_reason is not None:
            self.revoked_reason = sys.intern(self.revoked_reason)
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id[:12] + "…",
            "kind": self.kind,
            "user": self.user,
            "device_id": self.device_id,
            "start_ip": self.start_ip,
            "last_ip": self.last_ip,
            "user_agent": self.user_agent,
            "created": self.created,
            "last_seen": self.last_seen,
            "expires_at": self.expires_at,
            "mfa_at": self.mfa_at,
            "anomaly": round(self.anomaly, 4),
            "revoked_at": self.revoked_at,
            "revoked_reason": self.revoked_reason,
            "requests": self.requests,
        }


def merge_reloaded_session(fresh: Session, mine: Session | None) -> Session:
    """The copy a reload puts in memory, from the backend's `fresh` row and this process's copy.

    SECURITY: a revocation is final in memory as it is in the backend (SAVE_SESSION, the Redis
    save script). A reload reads the row, then awaits; a revocation made in between lands on
    `mine` and would be replaced by the older, unrevoked row, letting the cookie in until the
    next sync. So a revoked copy stays revoked. Otherwise the durable fields come from the row
    and this process's activity counters (written behind, maybe not flushed yet) are kept."""
    if mine is None:
        return fresh
    if mine.revoked_at is not None and fresh.revoked_at is None:
        fresh.revoked_at, fresh.revoked_reason = mine.revoked_at, mine.revoked_reason
    if fresh.revoked_at is None:
        fresh.last_seen = max(fresh.last_seen, mine.last_seen)
        fresh.requests = max(fresh.requests, mine.requests)
        fresh.anomaly, fresh.anomaly_at = mine.anomaly, mine.anomaly_at
    return fresh


def take_id_token(session: Session) -> str | None:
    """The ID token a writer put in the session's `extra`, for the store to keep apart."""
    token = session.extra.get(ID_TOKEN)
    return token if isinstance(token, str) and token else None


ChangeListener = Callable[[ChangeKind, str], None]


class ChangeFeed:
    """The in-process listeners both backends tell about every change they apply (their own
    writes and, for redis, other replicas' ones): one failing listener must not stop the rest
    nor the write that caused it."""

    _listeners: list[ChangeListener]

    def subscribe(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def _notify(self, kind: ChangeKind, key: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(kind, key)
            except Exception:
                log.exception("store change listener failed")


class CachedReads:
    """The hot-path reads every backend answers from its in-memory cache (no I/O).

    A backend fills these four dictionaries at open and keeps them current from its change
    feed; the request path only ever looks things up here.
    """

    _devices: dict[str, Device]
    _posture: dict[str, PostureRecord]
    _users: dict[str, UserRecord]
    _sessions: dict[str, Session]

    def device(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    def devices(self) -> list[Device]:
        return sorted(self._devices.values(), key=lambda d: d.first_seen)

    def posture(self, device_id: str) -> PostureRecord | None:
        return self._posture.get(device_id)

    def user(self, user: str) -> UserRecord | None:
        return self._users.get(user)

    def users(self) -> list[UserRecord]:
        return sorted(self._users.values(), key=lambda u: u.user)

    def session(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def sessions(self, user: str | None = None) -> list[Session]:
        out = [s for s in self._sessions.values() if user is None or s.user == user]
        return sorted(out, key=lambda s: s.created)

    _dirty_devices: set[str]
    _dirty_users: set[str]

    def _cache(self, kind: ChangeKind) -> dict[str, Any]:
        caches: dict[ChangeKind, dict[str, Any]] = {
            ChangeKind.DEVICE: self._devices,
            ChangeKind.POSTURE: self._posture,
            ChangeKind.USER: self._users,
            ChangeKind.SESSION: self._sessions,
        }
        return caches[kind]

    def _merge_local(self, kind: ChangeKind, key: str, fresh: Any, mine: Any) -> Any:
        """A reloaded entity with what this process wrote behind and has not flushed yet (a
        device's last sighting; a user's known devices, routes, location; session counters)."""
        if kind is ChangeKind.SESSION:
            return merge_reloaded_session(fresh, mine)
        if kind is ChangeKind.USER and mine is not None and key in self._dirty_users:
            fresh.known_devices = mine.known_devices
            fresh.known_routes = mine.known_routes
            fresh.last_location = mine.last_location
        elif kind is ChangeKind.DEVICE and mine is not None and key in self._dirty_devices:
            fresh.last_seen, fresh.last_ip = mine.last_seen, mine.last_ip
        return fresh

    async def _reload(self, kind: ChangeKind, key: str) -> None: ...

    async def find_user(self, user: str) -> UserRecord | None:
        """The user read afresh from the backend: a change another process made a moment ago
        (an enrolment by `ztgateway users mfa enroll`) counts before the change feed brings it."""
        await self._reload(ChangeKind.USER, user)
        return self._users.get(user)

    async def find_session(self, session_id: str) -> Session | None:
        """The session from memory, or, when this process has not heard of it yet, from the
        backend: a sign-in that another worker or replica finished a moment ago (within the
        sync interval) is found on the browser's very next request (issue 18, I3)."""
        session = self._sessions.get(session_id)
        if session is None:
            await self._reload(ChangeKind.SESSION, session_id)
            session = self._sessions.get(session_id)
        return session

    def _dead_in_memory(self, now: float, idle_timeout: float | None) -> list[str]:
        """Sessions nothing can use any more: past their absolute expiry, and browser sessions
        that were revoked or idled out (their cookie is refused as unknown once they are gone,
        exactly as it was refused as revoked or expired). A revoked *token* session stays until
        it expires: forgetting it would let the same token start a new one."""
        dead = []
        for key, s in self._sessions.items():
            if s.expires_at <= now or (
                idle_timeout is not None
                and s.kind == "cookie"
                and (s.revoked_at is not None or now - s.last_seen > idle_timeout)
            ):
                dead.append(key)
        return dead


class Store(Protocol):
    """What every backend provides (SQLite embedded; Redis for many replicas)."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    @property
    def healthy(self) -> bool: ...
    def subscribe(self, listener: ChangeListener) -> None: ...

    # devices
    def device(self, device_id: str) -> Device | None: ...
    def devices(self) -> list[Device]: ...
    async def register_device(self, device: Device) -> Device: ...
    def touch_device(self, device_id: str, now: float, ip: str) -> None: ...
    async def set_device_state(self, device_id: str, state: DeviceState) -> Device | None: ...
    async def set_device_owner(self, device_id: str, owner: str | None) -> Device | None: ...
    async def bind_device_key(
        self, device_id: str, spki: str, fingerprint: str, subject: str
    ) -> Device | None:
        """Pin the device to a key (and record the certificate that carries it)."""
        ...

    def posture(self, device_id: str) -> PostureRecord | None: ...
    async def put_posture(self, record: PostureRecord) -> None: ...

    # users
    def user(self, user: str) -> UserRecord | None: ...
    async def find_user(self, user: str) -> UserRecord | None:
        """The user from memory, or from the backend when another process changed it a moment
        ago."""
        ...

    async def save_user(self, record: UserRecord) -> None: ...
    def users(self) -> list[UserRecord]: ...

    # sessions
    def session(self, session_id: str) -> Session | None: ...
    async def find_session(self, session_id: str) -> Session | None:
        """`session()`, or read from the backend when this process has not heard of it yet."""
        ...

    def sessions(self, user: str | None = None) -> list[Session]: ...
    async def save_session(self, session: Session) -> None:
        """Write a session durably. An ID token in `extra["id_token"]` is stored apart (and
        replaces the one stored); a session saved without one keeps the one stored."""
        ...

    def touch_session(self, session: Session) -> None: ...
    async def revoke_session(self, session_id: str, reason: str, now: float) -> bool: ...
    def record_decision(self, session_id: str, decision: SessionDecision) -> None:
        """Written behind (every flush), capped at SESSION_HISTORY per session."""
        ...

    async def session_history(self, session_id: str) -> list[SessionDecision]:
        """The session's last SESSION_HISTORY decisions, oldest first (read by the CLI)."""
        ...

    async def session_id_token(self, session_id: str) -> str | None:
        """The session's OIDC ID token, kept apart from it (read by logout, for the provider's
        `id_token_hint`, and by the step-up's rotation); None if it has none. Deleted with the
        session by `expire_sessions`."""
        ...

    def touch_user(self, record: UserRecord) -> None:
        """Write behind the history a request adds (known devices, routes, location) and only
        that: a touch never writes a lock, an enrolment or backup codes."""
        ...

    async def expire_sessions(self, now: float, idle_timeout: float | None = None) -> int:
        """Forget sessions past their absolute expiry (deleted from the backend a day later)
        and, when `idle_timeout` is given, browser sessions revoked or idle longer than that,
        from memory only (`sessions show` still finds them until they expire)."""
        ...

    async def flush(self) -> None: ...
    async def sync(self) -> int: ...
    async def caught_up(self) -> None:
        """Return once every change other processes made durable before the call is in this
        process's cache (StoreUnavailable if that cannot be known in time): what a signal
        that names a user waits for, so a session started elsewhere a moment ago is seen."""
        ...

    # counters and one-time claims: async, because with many replicas they live in Redis
    async def take_token_async(self, key: str, rate: float, burst: int, now: float) -> float: ...
    async def record_failure_async(self, key: str, now: float) -> None: ...
    async def failures_async(self, key: str, now: float, window: float) -> int: ...
    async def reset_failures_async(self, key: str) -> None: ...
    async def claim_once(self, key: str, ttl: float, now: float) -> bool: ...
    async def revoke_certificate(self, key: str, until: float, now: float) -> None:
        """A client certificate found revoked, shared with every replica until `until`."""
        ...

    async def revoked_certificates(self, now: float) -> dict[str, float]:
        """Every shared certificate revocation still in force: key -> until."""
        ...

    async def advance(self, key: str, value: int) -> bool: ...
    async def reset_counter(self, key: str) -> None: ...

    async def consume_backup_code(self, user: str, code_hash: str) -> bool:
        """Mark one of `user`'s backup codes (by its stored hash) used: True for exactly one
        caller, in every process and replica, and never undone by a later save of the user
        record (the marks live apart from it)."""
        ...

    # the gateway's own secrets and sign-ins in flight, shared by every worker and replica
    async def shared_secret(self, name: str, candidate: str) -> str:
        """The value stored under `name`; `candidate` is stored first if there is none (the
        first process to ask wins, every other one reads the winner's)."""
        ...

    async def put_pending_login(
        self, state: str, source: str, data: str, expires: float, per_source: int
    ) -> None:
        """Keep a sign-in attempt (or a WebAuthn challenge: credentials/webauthn.py) until `expires`; at
        most `per_source` per source, the source's oldest dropped first."""
        ...

    async def take_pending_login(self, state: str, source: str, now: float) -> str | None:
        """The attempt's data, removed (single use: one caller gets it); None if it is
        unknown, taken, expired or was started by another source."""
        ...

    # WebAuthn credentials (read when a ceremony needs them, never on the request path)
    async def add_webauthn_credential(self, credential: WebAuthnCredential) -> bool:
        """Register a credential: False if its id is registered already (to anyone), or the
        user has MAX_WEBAUTHN_CREDENTIALS."""
        ...

    async def webauthn_credentials(self, user: str) -> list[WebAuthnCredential]:
        """The user's credentials, oldest first."""
        ...

    async def webauthn_credential(self, credential_id: str) -> WebAuthnCredential | None: ...

    async def use_webauthn_credential(
        self, credential_id: str, sign_count: int, now: float
    ) -> bool:
        """Record a use: True only if `sign_count` advances the stored counter (WebAuthn Level 2
        §7.2 step 21: greater than it; or 0 over 0, an authenticator without a counter),
        atomically on every process and replica, so of two uses with one counter value (a
        replay, or a clone used in parallel) exactly one passes."""
        ...

    async def remove_webauthn_credential(self, user: str, credential_id: str) -> bool: ...

    observe: Callable[[str, float, bool], None] | None
