"""The state the gateway keeps between requests: devices, posture, users, sessions, counters.

The hot path reads from process memory (synchronous methods); durable changes are written to
the backing store and awaited; frequent touches (last seen, last IP) are written behind in
batches. Every durable change is also recorded as a change event, so other processes (the CLI,
other workers or replicas) see it within the store's sync interval — the staleness bound.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

DeviceState = Literal["pending", "approved", "revoked"]
DEVICE_STATES: tuple[DeviceState, ...] = ("pending", "approved", "revoked")


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

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "fingerprint_sha256": self.fingerprint,
            "subject": self.subject,
            "owner": self.owner,
            "state": self.state,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "last_ip": self.last_ip,
        }


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
    known_devices: tuple[str, ...] = ()
    known_routes: tuple[str, ...] = ()
    last_location: tuple[float, float, float] | None = None  # lat, lon, time

    def locked(self, now: float) -> bool:
        return self.locked_until is not None and self.locked_until > now


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

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

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


ChangeListener = Callable[[ChangeKind, str], None]


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
    def posture(self, device_id: str) -> PostureRecord | None: ...
    async def put_posture(self, record: PostureRecord) -> None: ...

    # users
    def user(self, user: str) -> UserRecord | None: ...
    async def save_user(self, record: UserRecord) -> None: ...
    def users(self) -> list[UserRecord]: ...

    # sessions
    def session(self, session_id: str) -> Session | None: ...
    def sessions(self, user: str | None = None) -> list[Session]: ...
    async def save_session(self, session: Session) -> None: ...
    def touch_session(self, session: Session) -> None: ...
    async def revoke_session(self, session_id: str, reason: str, now: float) -> bool: ...

    def touch_user(self, record: UserRecord) -> None: ...
    async def expire_sessions(self, now: float) -> int: ...
    async def flush(self) -> None: ...
    async def sync(self) -> int: ...

    # counters and one-time claims: async, because with many replicas they live in Redis
    async def take_token_async(self, key: str, rate: float, burst: int, now: float) -> float: ...
    async def record_failure_async(self, key: str, now: float) -> None: ...
    async def failures_async(self, key: str, now: float, window: float) -> int: ...
    async def reset_failures_async(self, key: str) -> None: ...
    async def claim_once(self, key: str, ttl: float, now: float) -> bool: ...
    async def advance(self, key: str, value: int) -> bool: ...
    async def reset_counter(self, key: str) -> None: ...

    observe: Callable[[str, float, bool], None] | None
