"""The operator's first request through a real gateway: real TLS, real upstream."""

from __future__ import annotations

import json

from tests.support import Certs, session
from ztgateway.app import Gateway


async def test_alice_reaches_echo_with_her_certificate(gateway: Gateway, certs: Certs) -> None:
    async with session(certs) as s, s.get(f"https://127.0.0.1:{gateway.port}/echo") as r:
        assert r.status == 200
        body = await r.json()
        assert r.headers["X-ZT-Decision-Id"]
        assert r.headers["Server"] == "ztgateway"
    seen = body["headers_map"]
    assert seen["x-forwarded-user"] == "alice"
    assert seen["x-zt-device-id"] == "alice-laptop"
    assert seen["x-zt-decision-id"] == r.headers["X-ZT-Decision-Id"]
    await gateway.audit.flush()
    lines = (gateway.config.audit.jsonl or gateway.config.audit.db).read_text().splitlines()
    event, outcome = json.loads(lines[-2]), json.loads(lines[-1])
    assert event["decision_id"] == r.headers["X-ZT-Decision-Id"]
    assert event["result"]["verdict"] == "allow"
    # What the upstream then did follows, linked to the decision (audit/events.py).
    assert outcome["decision"] == event["decision_id"]
    assert outcome["upstream"]["status"] == 200
