"""The JSON both store backends keep: one encoding of sessions, users and posture reports.

A session or a user written by one backend (or by an older release of either) must read back the
same through the other, and a field added to `Session` or `UserRecord` must not make older rows
unreadable: the decoders drop keys the dataclass no longer has and default the ones it gained.
`Session.compact()` migrates an older row's `extra` history and verified IP.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any

from .base import PostureRecord, Session, UserRecord

_SESSION_FIELDS = frozenset(f.name for f in fields(Session))
_USER_FIELDS = frozenset(f.name for f in fields(UserRecord))
_POSTURE_FIELDS = frozenset(f.name for f in fields(PostureRecord))

USER_HISTORY_FIELDS = ("known_devices", "known_routes", "last_location")
"""What requests add to a user record (written behind by touches); the rest is what an operator
or an enrolment writes (locks, TOTP, backup codes), which a touch never writes back."""


def session_json(session: Session) -> str:
    return json.dumps(asdict(session))


def session_from_json(data: dict[str, Any]) -> Session:
    """Rows of every version: an older one's `extra` history and verified IP are migrated."""
    return Session(**{k: v for k, v in data.items() if k in _SESSION_FIELDS}).compact()


def user_json(record: UserRecord) -> str:
    return json.dumps(asdict(record))


def user_parts(record: UserRecord) -> tuple[str, str]:
    """A user as (record, history), for a backend that writes the history apart."""
    data = asdict(record)
    history = {k: data.pop(k) for k in USER_HISTORY_FIELDS}
    return json.dumps(data), json.dumps(history)


def user_from_json(data: dict[str, Any]) -> UserRecord:
    data = {k: v for k, v in data.items() if k in _USER_FIELDS}
    for key in ("backup_codes", "known_devices", "known_routes"):
        data[key] = tuple(data.get(key) or ())
    if data.get("last_location") is not None:
        data["last_location"] = tuple(data["last_location"])
    return UserRecord(**data)


def posture_json(record: PostureRecord) -> str:
    return json.dumps(asdict(record))


def posture_from_json(data: dict[str, Any]) -> PostureRecord:
    known = {k: v for k, v in data.items() if k in _POSTURE_FIELDS}
    return PostureRecord(**(known | {"signed": bool(known["signed"])}))
