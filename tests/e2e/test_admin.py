"""The admin API: refused and audited without the admin token; with it, the operator's tools."""

from __future__ import annotations

import asyncio
import json
import tomllib

import pytest

from tests.conftest import GatewayFactory
from tests.support import ADMIN_TOKEN, Certs, admin, session, to_toml
from ztgateway.app import Gateway
from ztgateway.cli import main
from ztgateway.dev.tokens import issue_token


@pytest.mark.parametrize(
    "token", [None, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN_TOKEN}"}]
)
async def test_admin_api_without_admin_credentials_is_refused_and_audited(
    gateway: Gateway, token: dict[str, str] | None
) -> None:
    status, body = await admin(gateway, "GET", "/admin/sessions", token=token)
    assert status == 401
    assert body["reason"] == "identity-unauthenticated"
    await gateway.audit.flush()
    assert gateway.config.audit.jsonl is not None
    events = [json.loads(x) for x in gateway.config.audit.jsonl.read_text().splitlines()]
    event = next(e for e in events if e["decision_id"] == body["decision_id"])
    assert event["type"] == "ztgw.admin" and event["result"]["verdict"] == "deny"


async def test_admin_terminates_sessions_locks_users_and_searches_the_audit(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory()
    token = issue_token(certs.issuer_key, sub="alice")
    url = f"https://127.0.0.1:{gw.port}/api/echo"
    async with session(certs) as s:
        async with s.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200
        status, sessions = await admin(gw, "GET", "/admin/sessions?user=alice")
        assert status == 200 and len(sessions) == 1
        status, out = await admin(gw, "POST", "/admin/sessions/terminate", body={"user": "alice"})
        assert (status, out["terminated"]) == (200, 1)
        async with s.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
            assert (await r.json(content_type=None))["reason"] == "session-terminated"
        status, out = await admin(gw, "POST", "/admin/users/alice/lock", body={"minutes": 5})
        assert status == 200
        fresh = issue_token(certs.issuer_key, sub="alice")
        async with s.get(url, headers={"Authorization": f"Bearer {fresh}"}) as r:
            assert (await r.json(content_type=None))["reason"] == "account-locked"
        assert (await admin(gw, "POST", "/admin/users/alice/unlock"))[0] == 200
        async with s.get(url, headers={"Authorization": f"Bearer {fresh}"}) as r:
            assert r.status == 200
    status, devices = await admin(gw, "GET", "/admin/devices")
    assert any(d["device_id"] == "alice-laptop" for d in devices)
    status, device = await admin(gw, "POST", "/admin/devices/alice-laptop/revoke")
    assert (status, device["state"]) == (200, "revoked")
    assert (await admin(gw, "POST", "/admin/devices/nope/revoke"))[0] == 404
    status, events = await admin(gw, "GET", "/admin/audit?user=alice&reason=session-terminated")
    assert (
        status == 200
        and events
        and all(e["result"]["reason"] == "session-terminated" for e in events)
    )
    assert (await admin(gw, "GET", "/admin/audit?since=yesterday"))[0] == 400


async def test_reload_under_load_drops_no_request(
    gateway_factory: GatewayFactory, certs: Certs, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = await gateway_factory()
    path = gw.config.file
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:
        async with session(certs) as s:
            while not stop.is_set():
                async with s.get(f"https://127.0.0.1:{gw.port}/echo") as r:
                    statuses.append(r.status)
                    await r.read()

    workers = [asyncio.ensure_future(load()) for _ in range(4)]
    revisions = {gw.config.revision}
    for i in range(6):
        cfg = tomllib.loads(path.read_text())
        cfg["server"]["header_timeout"] = 10.0 + i
        path.write_text(to_toml(cfg))
        assert (await admin(gw, "POST", "/admin/reload"))[0] == 200
        revisions.add(gw.config.revision)
        await asyncio.sleep(0.05)
    path.write_text(path.read_text() + "\n[broken\n")
    status, out = await admin(gw, "POST", "/admin/reload")
    assert status == 409 and out["reloaded"] is False
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*workers)
    assert len(revisions) == 7
    assert statuses and set(statuses) == {200}, (
        f"{len(statuses)} requests, statuses {set(statuses)}"
    )


async def test_reload_command_reaches_the_running_gateway(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    path = gateway.config.file
    cfg = tomllib.loads(path.read_text())
    cfg["ops"]["port"] = gateway.ops_port
    path.write_text(to_toml(cfg))
    before = gateway.config.revision
    assert await asyncio.to_thread(main, ["reload", "-c", str(path)]) == 0
    assert '"reloaded": true' in capsys.readouterr().out
    assert gateway.config.revision != before
