"""What happened upstream is in the audit (issue 19): a request allowed and then answered 502 or
504 was audited only as `allow/policy-allowed`. The outcome is now a second event linked to the
decision (ztgateway/audit/events.py)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import GatewayFactory, base_config
from tests.support import (
    Certs,
    accepting,
    deep_merge,
    free_ports,
    get,
    refusing_port,
    session,
    to_toml,
)
from ztgateway.app import Gateway
from ztgateway.audit import search


async def events_of(gw: Gateway, decision_id: str) -> dict[str, dict[str, Any]]:
    await gw.audit.flush()
    found = await search(gw.config.audit.db, decision_id=decision_id)
    return {e["type"]: e for e in found}


async def test_an_unreachable_upstream_is_audited_as_such_after_the_allow(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    with refusing_port() as dead:
        gw = await gateway_factory({"upstreams": {"demo": {"url": f"http://127.0.0.1:{dead}"}}})
        reply = await get(gw, certs, "/echo")
    status, decision_id = reply.status, reply.decision_id
    assert status == 502
    events = await events_of(gw, decision_id)
    assert events["ztgw.decision"]["result"]["verdict"] == "allow"
    outcome = events["ztgw.upstream"]
    assert outcome["decision"] == decision_id
    assert outcome["result"] == {"reason": "upstream-unavailable"}
    assert outcome["upstream"]["outcome"] == "connect"
    assert outcome["upstream"]["status"] is None
    assert outcome["upstream"]["answered"] == 502
    assert outcome["upstream"]["seconds"] >= 0
    # Failures are found by reason like any refusal.
    found = await search(gw.config.audit.db, reason="upstream-unavailable")
    assert [e["decision_id"] for e in found] == [decision_id + "/upstream"]


async def test_a_slow_upstream_is_audited_as_a_timeout(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory({"upstreams": {"demo": {"read_timeout": 0.3}}})
    reply = await get(gw, certs, "/slow?delay=2")
    status, decision_id = reply.status, reply.decision_id
    assert status == 504
    outcome = (await events_of(gw, decision_id))["ztgw.upstream"]
    assert outcome["upstream"]["outcome"] == "timeout"
    assert outcome["upstream"]["answered"] == 504
    assert outcome["result"]["reason"] == "upstream-timeout"
    assert outcome["upstream"]["seconds"] >= 0.3


async def test_an_answered_request_records_the_upstream_status_and_time(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory()
    reply = await get(gw, certs, "/status/418")
    status, decision_id = reply.status, reply.decision_id
    assert status == 418
    outcome = (await events_of(gw, decision_id))["ztgw.upstream"]
    assert outcome["upstream"]["outcome"] == "responded"
    assert (outcome["upstream"]["status"], outcome["upstream"]["answered"]) == (418, 418)
    assert 0 <= outcome["upstream"]["head_seconds"] <= outcome["upstream"]["seconds"]
    assert outcome["input"]["user"] == "alice"
    assert outcome["result"]["reason"] is None


async def test_failures_only_leaves_answered_requests_with_their_decision_alone(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory({"audit": {"upstream_events": "failures"}})
    decision_id = (await get(gw, certs, "/echo")).decision_id
    assert set(await events_of(gw, decision_id)) == {"ztgw.decision"}


async def test_an_upstream_outage_logs_a_few_lines_not_one_per_request(
    certs: Certs, upstream: int, tmp_path: Path
) -> None:
    port, ops = free_ports(2)
    dead = contextlib.ExitStack()
    cfg = deep_merge(
        base_config(certs, upstream, tmp_path),
        {
            "server": {"port": port},
            "ops": {"port": ops},
            "upstreams": {
                "demo": {"url": f"http://127.0.0.1:{dead.enter_context(refusing_port())}"}
            },
            "logging": {"format": "text"},
        },
    )
    path = tmp_path / "outage.toml"
    path.write_text(to_toml(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ztgateway", "run", "-c", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(100):
            if accepting(ops):
                break
            await asyncio.sleep(0.1)
        async with session(certs) as s:
            for _ in range(40):
                async with s.get(f"https://127.0.0.1:{port}/echo") as r:
                    assert r.status == 502
            async with s.get(f"http://127.0.0.1:{ops}/metrics", ssl=False) as r:
                text = await r.text()
        assert "ztgw_log_lines_suppressed_total 35.0" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=40)
        dead.close()
    lines = [line for line in err.decode().splitlines() if "upstream demo connect" in line]
    assert len(lines) == 5, lines
    # At shutdown the held-back count is written, so nothing disappears without a trace.
    assert "35 lines like 'upstream %s %s: %s' suppressed" in err.decode()
