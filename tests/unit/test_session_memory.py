"""Issue 9: a session in memory (with its request counter) stays well under 2 KB.

What the store keeps per session: the `Session` as `compact()` leaves it (no decision history,
no OIDC ID token, shared strings) and its `req:<id>` counter (a float). Rows written before 0008
(the last 20 decisions and the verified address in `extra`) and before the ID token was kept
apart (`extra["id_token"]`, ~1 KB) load the same way.
"""

from __future__ import annotations

import base64
import gc
import json
import random
import sys
import time
import tracemalloc
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ztgateway.store.base import ID_TOKEN, Session, take_id_token
from ztgateway.store.codec import session_from_json
from ztgateway.store.sqlite import SQLiteStore

N = 2000


def id_token(i: int) -> str:
    """An RS256 ID token's size (~1 KB: header, claims, 2048-bit signature), unique per session."""
    rng = random.Random(i)
    parts = (b'{"alg":"RS256","kid":"k1","typ":"JWT"}', rng.randbytes(450), rng.randbytes(256))
    return ".".join(base64.urlsafe_b64encode(p).decode().rstrip("=") for p in parts)


def old_row(i: int, *, browser: bool, now: float) -> dict[str, Any]:
    """A session in use as the code before 0008 stored it (a browser's with its ID token)."""
    ip = f"10.{i % 250}.{i // 250 % 250}.7"
    user = f"user{i:06d}@corp.example.com"
    extra: dict[str, Any] = {"verified_ip": ip}
    if browser:
        extra |= {
            "source": "oidc",
            "provider": "corp",
            "email": user,
            "groups": ["staff", "engineering"],
            "mfa_method": "totp",
            ID_TOKEN: id_token(i),
        }
    extra["history"] = [[now - k, ip, "api", "allow", "policy-allowed"] for k in range(20, 0, -1)]
    session = Session(
        session_id=("ck:" if browser else "tok:") + f"{i:048x}",
        kind="cookie" if browser else "token",
        user=user,
        device_id=f"sha256:{i:032x}",
        start_ip=ip,
        last_ip=ip,
        user_agent="Mozilla/5.0 (X11; Linux x86_64) Firefox/125.0" if browser else "curl/8.5.0",
        created=now - 3000,
        last_seen=now - 1,
        expires_at=now + 600,
        mfa_at=now - 2000 if browser else None,
        anomaly=0.0,
        anomaly_at=now - 1,
        requests=1000 + i,
        extra=extra,
    )
    return asdict(session)


def test_old_rows_load_without_history_and_with_shared_strings() -> None:
    now = time.time()
    row = old_row(1, browser=True, now=now)
    s = session_from_json(json.loads(json.dumps(row)))
    # Neither the history nor the ID token (the store reads that from the row when asked).
    assert set(s.extra) == {"source", "provider", "email", "groups", "mfa_method"}
    assert s.verified_ip == row["extra"]["verified_ip"]
    # One object for what is equal within a session, and for what recurs in every session.
    assert s.last_ip is s.start_ip and s.verified_ip is s.start_ip
    assert s.extra["email"] is s.user
    assert s.kind is sys.intern("cookie") and s.user_agent is sys.intern(row["user_agent"])
    again = session_from_json(json.loads(json.dumps(row)))
    assert again.extra["provider"] is s.extra["provider"]
    assert again.extra["groups"][0] is s.extra["groups"][0]
    assert again == s and s.compact() == again  # idempotent
    # A session whose verified address differs keeps it.
    row["extra"]["verified_ip"] = "10.9.9.9"
    assert session_from_json(row).verified_ip == "10.9.9.9"


def test_a_session_given_to_a_store_keeps_its_id_token_out_of_memory() -> None:
    """As the sign-in creates one: the store takes the token, then compacts the session."""
    now = time.time()
    row = old_row(2, browser=True, now=now)
    del row["extra"]["history"]
    s = Session(**row)
    token = take_id_token(s)
    assert token == row["extra"][ID_TOKEN] and len(token) > 900
    assert ID_TOKEN not in s.compact().extra
    assert take_id_token(s) is None
    assert take_id_token(Session(**{**row, "extra": {ID_TOKEN: 42}})) is None


def per_session_bytes(*, browser: bool) -> float:
    now = time.time()
    rows = [json.dumps(old_row(i, browser=browser, now=now)) for i in range(N)]
    store = SQLiteStore(Path("unused.db"))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for raw in rows:
            s = session_from_json(json.loads(raw))
            store._sessions[s.session_id] = s
            store.record_failure(f"req:{s.session_id}", s.last_seen)
        return (tracemalloc.get_traced_memory()[0] - before) / N
    finally:
        tracemalloc.stop()


def test_a_session_in_use_with_its_request_counter_stays_small() -> None:
    # Allocated bytes (resident memory adds the allocator's share; the benchmark measures
    # that). Before 0008: ~9,000 B for the session (its history) and ~900 B for the counter.
    assert per_session_bytes(browser=False) < 1100
    # Its ~1 KB ID token in the row (0008: ~2,300 B in memory with it) stays in the store.
    assert per_session_bytes(browser=True) < 1400
