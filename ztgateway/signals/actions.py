"""What an accepted signal does to the gateway's state, on every worker and replica.

Each action is a durable store write, and the store carries it to every process within its sync
interval (SQLite's change log, Redis pub/sub: 0.25 s by default, docs/scaling.md); there each
open WebSocket of the subject is woken, re-decided and closed with 1008 (forward/websocket.py):
- terminate: `revoke_session` for each matching session, exactly as `sessions revoke` does;
- step-up: the user's record says "a second factor after T", which the session stage asks of
  every session from before T (`Reason.SIGNAL_STEP_UP`);
- device posture: the transmitter's verdict stored beside the agent's report (compliance.py).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ..store.base import Device, PostureRecord, Session, Store, UserRecord
from .compliance import record_key

log = logging.getLogger("ztgateway.signals")
LOCK_SECONDS: Final = 10 * 365 * 86400.0
"""An account the provider disabled stays locked until it says `account-enabled`."""


@dataclass(slots=True)
class Effect:
    """What one event did, for the audit event and the metrics."""

    sessions_ended: list[str] = field(default_factory=list)
    users_stepped_up: list[str] = field(default_factory=list)
    devices_updated: list[str] = field(default_factory=list)
    users_locked: list[str] = field(default_factory=list)
    users_unlocked: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            # Stored session ids are hashes (never a cookie or token): what `sessions show`
            # and `audit search --session` take.
            "sessions_ended": self.sessions_ended,
            "users_stepped_up": self.users_stepped_up,
            "devices_updated": self.devices_updated,
            "users_locked": self.users_locked,
            "users_unlocked": self.users_unlocked,
        }


class Enforcer:
    """Applies signals to the store; the one place they change state."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def terminate(self, sessions: Sequence[Session], reason: str, now: float) -> list[str]:
        ended = []
        for s in sessions:
            if await self.store.revoke_session(s.session_id, reason, now):
                ended.append(s.session_id)
        return ended

    async def require_step_up(
        self, sessions: Sequence[Session], reason: str, since: float
    ) -> list[str]:
        """Every user with a matching session must give a second factor after `since`."""
        users = sorted({s.user for s in sessions})
        done = []
        for user in users:
            record = self.store.user(user) or UserRecord(user=user)
            if record.step_up_after is not None and record.step_up_after >= since:
                continue  # an equal or later request stands already (an event seen twice)
            record.step_up_after = since
            record.step_up_reason = reason
            await self.store.save_user(record)
            done.append(user)
        return done

    async def lock(self, users: Sequence[str], reason: str, now: float) -> list[str]:
        """Lock until `account-enabled` (or `ztgateway users unlock`): the session stage refuses
        every request of a locked user, a new token's included."""
        done = []
        for user in sorted(set(users)):
            record = self.store.user(user) or UserRecord(user=user)
            record.locked_until = now + LOCK_SECONDS
            record.lock_reason = reason
            await self.store.save_user(record)
            done.append(user)
        return done

    async def unlock(self, users: Sequence[str], reason: str) -> list[str]:
        """Lift only the locks `reason` set: an operator's lock, or another transmitter's,
        stays."""
        done = []
        for user in sorted(set(users)):
            record = self.store.user(user)
            if record is None or record.lock_reason != reason:
                continue
            record.locked_until, record.lock_reason = None, None
            await self.store.save_user(record)
            done.append(user)
        return done

    async def device_compliance(
        self,
        devices: Sequence[Device],
        *,
        status: str,
        previous: str | None,
        transmitter: str,
        jti: str,
        at: float,
        received: float,
    ) -> list[str]:
        updated = []
        for device in devices:
            key = record_key(device.device_id)
            current = self.store.posture(key)
            if current is not None and (current.collected_at or 0.0) > at:
                # Events can arrive out of order (poll after an outage): the newer verdict stays.
                log.info("device %s: older compliance event %s ignored", device.device_id, jti)
                continue
            await self.store.put_posture(
                PostureRecord(
                    device_id=key,
                    report={
                        "current_status": status,
                        "previous_status": previous,
                        "transmitter": transmitter,
                        "jti": jti,
                    },
                    received_at=received,
                    collected_at=at,
                    signed=True,
                    digest=hashlib.sha256(f"{transmitter}\0{jti}".encode()).hexdigest(),
                )
            )
            updated.append(device.device_id)
        return updated
