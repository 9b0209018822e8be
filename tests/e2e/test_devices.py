"""Device registry and posture through a real gateway: reports, trust levels, remediation."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from tests.conftest import GatewayFactory
from tests.support import Certs, session
from ztgateway.app import Gateway
from ztgateway.cli import main
from ztgateway.clock import SYSTEM_CLOCK, ManualClock
from ztgateway.dev.tokens import issue_token

REPORT: dict[str, Any] = {
    "platform": "macos",
    "os_version": "15.1",
    "last_patch": dt.date.today().isoformat(),
    "disk_encrypted": True,
    "firewall": True,
    "antivirus": True,
    "screen_lock": True,
    "mdm_enrolled": True,
    "jailbroken": False,
}
SECURE = {
    "name": "secure",
    "prefix": "/secure/",
    "upstream": "demo",
    "policy": {"require_token": True, "min_trust": "compliant"},
}


@pytest.fixture
async def gw(gateway_factory: GatewayFactory, gateway_routes: list[dict[str, Any]]) -> Gateway:
    return await gateway_factory({"routes": gateway_routes})


@pytest.fixture
def gateway_routes() -> list[dict[str, Any]]:
    return [{"name": "app", "prefix": "/", "upstream": "demo"}, SECURE]


async def post_report(
    gw: Gateway, certs: Certs, report: Any, cert: str = "alice-laptop", **kw: Any
) -> tuple[int, dict[str, Any]]:
    async with (
        session(certs, cert) as s,
        s.post(
            f"https://127.0.0.1:{gw.port}/.ztgw/posture",
            **({"json": report} if "data" not in kw else kw),
        ) as r,
    ):
        return r.status, await r.json(content_type=None)


async def get_secure(
    gw: Gateway, certs: Certs, cert: str = "alice-laptop", user: str = "alice"
) -> tuple[int, dict[str, Any]]:
    token = issue_token(certs.issuer_key, sub=user)
    async with (
        session(certs, cert) as s,
        s.get(
            f"https://127.0.0.1:{gw.port}/secure/echo", headers={"Authorization": f"Bearer {token}"}
        ) as r,
    ):
        return r.status, await r.json(content_type=None)


async def test_compliant_report_opens_the_secure_route_and_disk_encryption_off_closes_it(
    gw: Gateway, certs: Certs
) -> None:
    status, body = await get_secure(gw, certs)
    assert (status, body["reason"]) == (403, "device-noncompliant")  # no report yet
    status, answer = await post_report(gw, certs, REPORT)
    assert status == 200 and answer["compliant"] is True
    assert (await get_secure(gw, certs))[0] == 200
    status, answer = await post_report(gw, certs, {**REPORT, "disk_encrypted": False})
    assert status == 200 and answer["compliant"] is False
    assert answer["failed_checks"] == ["disk_encrypted"]
    status, body = await get_secure(gw, certs)
    assert (status, body["reason"]) == (403, "device-noncompliant")
    async with session(certs) as s, s.get(f"https://127.0.0.1:{gw.port}/.ztgw/device") as r:
        device = await r.json()
    assert device["posture"]["failed_checks"] == ["disk_encrypted"]
    assert any("disk encryption" in step for step in device["remediation"])
    async with (
        session(certs) as s,
        s.get(f"https://127.0.0.1:{gw.port}/.ztgw/device", headers={"Accept": "text/html"}) as r,
    ):
        page = await r.text()
    assert "Turn on disk encryption" in page and "does not meet" in page


async def test_posture_judged_compliant_turns_stale_on_time_despite_the_evaluation_cache(
    gateway_factory: GatewayFactory, certs: Certs, gateway_routes: list[dict[str, Any]]
) -> None:
    # The device stage reuses one evaluation per device for up to a second, but never past
    # the moment the report goes stale: judged fresh at ~1.4 s, the same device must be
    # refused at ~2.05 s, while a plain one-second cache would still say compliant.
    clock = ManualClock(SYSTEM_CLOCK.time())
    gw = await gateway_factory(
        {"routes": gateway_routes, "posture": {"max_report_age": 2.0}}, clock=clock
    )
    status, answer = await post_report(gw, certs, REPORT)
    assert status == 200 and answer["compliant"] is True
    clock.advance(1.4)
    assert (await get_secure(gw, certs))[0] == 200
    clock.advance(0.65)
    status, body = await get_secure(gw, certs)
    assert (status, body["reason"]) == (403, "posture-stale")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**REPORT, "disk_encrypted": "yes"}, "disk_encrypted"),
        ({**REPORT, "os_version": "latest"}, "os_version"),
        ({**REPORT, "unexpected": 1}, "unexpected"),
        ({**REPORT, "device_id": "bob-phone"}, "device_id"),
        ([1, 2], "(body)"),
    ],
)
async def test_bad_reports_are_refused_naming_the_field(
    gw: Gateway, certs: Certs, body: Any, field: str
) -> None:
    status, answer = await post_report(gw, certs, body)
    assert status == 400
    assert answer["reason"] == "posture-invalid"
    assert answer["detail"].startswith(field)
    assert answer["decision_id"]


async def test_malformed_json_and_oversized_bodies_are_refused(gw: Gateway, certs: Certs) -> None:
    status, answer = await post_report(
        gw, certs, None, data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert (status, answer["reason"]) == (400, "posture-invalid")
    status, answer = await post_report(
        gw,
        certs,
        None,
        data=b"{" + b" " * 20_000 + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert (status, answer["reason"]) == (413, "body-too-large")


async def test_replayed_and_back_dated_reports_are_refused(gw: Gateway, certs: Certs) -> None:
    now = dt.datetime.now(dt.UTC)
    first = {**REPORT, "collected_at": now.isoformat()}
    assert (await post_report(gw, certs, first))[0] == 200
    status, answer = await post_report(gw, certs, first)
    assert (status, answer["reason"]) == (409, "posture-replayed")
    older = {**REPORT, "collected_at": (now - dt.timedelta(hours=1)).isoformat()}
    status, answer = await post_report(gw, certs, older)
    assert (status, answer["reason"]) == (409, "posture-replayed")
    future = {**REPORT, "collected_at": (now + dt.timedelta(hours=1)).isoformat()}
    assert (await post_report(gw, certs, future))[1]["reason"] == "posture-invalid"


async def test_signed_reports_verify_against_the_certificate_key(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    route = {**SECURE, "policy": {**SECURE["policy"], "require_signed_posture": True}}
    gw = await gateway_factory({"routes": [route]})
    report = {**REPORT, "collected_at": dt.datetime.now(dt.UTC).isoformat()}
    assert (await post_report(gw, certs, report))[0] == 200
    status, body = await get_secure(gw, certs)
    assert (status, body["reason"]) == (403, "device-noncompliant"), (
        "unsigned report is not enough here"
    )
    key = load_pem_private_key(certs.client("alice-laptop")[1].read_bytes(), None)
    later = {
        **report,
        "collected_at": (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)).isoformat(),
    }
    signed = jwt.api_jws.encode(json.dumps(later).encode(), key, algorithm="ES256")  # type: ignore[arg-type]
    status, answer = await post_report(
        gw, certs, None, data=signed.encode(), headers={"Content-Type": "application/jose"}
    )
    assert status == 200 and answer["signed"] is True
    assert (await get_secure(gw, certs))[0] == 200
    bob_key = load_pem_private_key(certs.client("bob-phone")[1].read_bytes(), None)
    forged = jwt.api_jws.encode(json.dumps(later).encode(), bob_key, algorithm="ES256")  # type: ignore[arg-type]
    status, answer = await post_report(
        gw, certs, None, data=forged.encode(), headers={"Content-Type": "application/jose"}
    )
    assert (status, answer["reason"]) == (400, "posture-invalid")


async def test_device_used_by_another_user_is_refused(gw: Gateway, certs: Certs) -> None:
    await post_report(gw, certs, REPORT)
    status, body = await get_secure(gw, certs, user="bob")
    assert (status, body["reason"]) == (403, "device-owner-mismatch")


async def test_pending_devices_wait_for_approval_and_cli_revocation_holds_at_once(
    gateway_factory: GatewayFactory,
    certs: Certs,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    route = {"name": "app", "prefix": "/", "upstream": "demo", "policy": {"min_trust": "approved"}}
    gw = await gateway_factory({"devices": {"auto_approve": False}, "routes": [route]})
    async with session(certs, "carol-laptop") as s, s.get(f"https://127.0.0.1:{gw.port}/echo") as r:
        assert r.status == 403
        assert (await r.json())["reason"] == "device-pending"
    config = str(gw.config.file)
    assert await asyncio.to_thread(main, ["devices", "list", "-c", config]) == 0
    assert "carol-laptop" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["devices", "approve", "carol-laptop", "-c", config]) == 0
    # What the gateway's poll of the change log would pick up (the CLI is another process).
    assert await gw.store.sync() > 0
    async with session(certs, "carol-laptop") as s, s.get(f"https://127.0.0.1:{gw.port}/echo") as r:
        assert r.status == 200
    assert await asyncio.to_thread(main, ["devices", "revoke", "carol-laptop", "-c", config]) == 0
    assert await gw.store.sync() > 0
    async with session(certs, "carol-laptop") as s, s.get(f"https://127.0.0.1:{gw.port}/echo") as r:
        assert r.status == 403
        assert (await r.json())["reason"] == "device-revoked"
    assert await asyncio.to_thread(main, ["devices", "show", "carol-laptop", "-c", config]) == 0
    assert "state:" in (shown := capsys.readouterr().out) and "revoked" in shown
    args = ["devices", "show", "carol-laptop", "--json", "-c", config]
    assert await asyncio.to_thread(main, args) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "revoked"
    text = gw.metrics.render().decode()
    assert 'ztgw_devices{state="revoked"} 1.0' in text


async def test_policy_explain_shows_device_trust(
    gw: Gateway, certs: Certs, capsys: pytest.CaptureFixture[str]
) -> None:
    await post_report(gw, certs, {**REPORT, "firewall": False})
    token = issue_token(certs.issuer_key, sub="alice")
    code = await asyncio.to_thread(
        main,
        ["policy", "explain", "-c", str(gw.config.file), "--path", "/secure/x", "--token", token,
         "--cert", str(certs.client("alice-laptop")[0])],
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "device-noncompliant" in out and "failed: firewall" in out
