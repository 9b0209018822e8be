"""The device agent on this Linux machine against a real gateway, and the operator's bulk
posture endpoint a management system posts to."""

from __future__ import annotations

import asyncio
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GatewayFactory
from tests.support import ADMIN_TOKEN, Certs, admin, session
from ztgateway.agent.linux import parse_lsblk, parse_os_release
from ztgateway.app import Gateway
from ztgateway.cli import main
from ztgateway.risk.posture import validate_report

COMPLIANT_ONLY = {
    "name": "secure",
    "prefix": "/secure/",
    "upstream": "demo",
    "policy": {"min_trust": "compliant"},
}


def agent(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ztgateway", "agent", "report", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def device_args(gw: Gateway, certs: Certs, name: str = "alice-laptop") -> list[str]:
    pem, key = certs.client(name)
    return [
        "--gateway",
        f"https://127.0.0.1:{gw.port}",
        "--cert",
        str(pem),
        "--key",
        str(key),
        "--ca",
        str(certs.ca),
    ]


async def test_the_agent_reports_this_machine_signed_over_mtls(
    gateway: Gateway, certs: Certs, capsys: pytest.CaptureFixture[str]
) -> None:
    out = await asyncio.to_thread(agent, *device_args(gateway, certs), "--json")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["status"] == 200 and answer["accepted"] is True
    assert answer["device_id"] == "alice-laptop" and answer["signed"] is True
    record = gateway.store.posture("alice-laptop")
    assert record is not None and record.signed
    report = record.report
    # What the agent said is what this machine is, read here independently.
    assert report["platform"] == "linux"
    assert report["kernel"] == platform.release()
    os_release = parse_os_release(Path("/etc/os-release").read_text())
    assert report["os_name"] == os_release["PRETTY_NAME"]
    lsblk = subprocess.run(
        ["lsblk", "--json", "--output", "NAME,TYPE,FSTYPE,MOUNTPOINTS"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert report["disk_encrypted"] == parse_lsblk(lsblk.stdout).value
    assert set(report["evidence"]) >= {"disk_encrypted", "firewall", "screen_lock", "last_patch"}
    # The gateway judged it, audited it, and counted it.
    await gateway.audit.flush()
    events = [json.loads(x) for x in gateway.config.audit.jsonl.read_text().splitlines()]  # type: ignore[union-attr]
    assert any(
        e["input"]["device"] == "alice-laptop" and e["input"]["path"] == "/.ztgw/posture"
        for e in events
    )
    text = gateway.metrics.render().decode()
    assert 'ztgw_posture_reports_total{result="noncompliant"}' in text or (
        'ztgw_posture_reports_total{result="compliant"}' in text
    )
    # The operator sees the checks with what the agent saw.
    capsys.readouterr()
    args = ["devices", "show", "alice-laptop", "-c", str(gateway.config.file)]
    assert await asyncio.to_thread(main, args) == 0
    shown = capsys.readouterr().out
    assert f"seen: {report['evidence']['disk_encrypted']}" in shown
    assert f"seen: {report['evidence']['last_patch']}" in shown
    # A second run is a new report (collected later), not a replay.
    again = await asyncio.to_thread(agent, *device_args(gateway, certs))
    assert again.returncode == 0, again.stderr
    assert "report accepted" in again.stdout


async def test_the_agent_says_why_a_revoked_device_is_refused(
    gateway: Gateway, certs: Certs
) -> None:
    # First contact registers the device; an operator then revokes it.
    async with session(certs, "carol-laptop") as s:
        async with s.get(f"https://127.0.0.1:{gateway.port}/echo") as r:
            assert r.status == 200
    await gateway.store.set_device_state("carol-laptop", "revoked")
    out = await asyncio.to_thread(agent, *device_args(gateway, certs, "carol-laptop"))
    assert out.returncode == 1
    assert "carol-laptop: report refused, device-revoked" in out.stdout
    assert gateway.store.posture("carol-laptop") is None


async def test_the_agent_from_another_ca_cannot_reach_the_gateway(
    gateway: Gateway, certs: Certs
) -> None:
    out = await asyncio.to_thread(agent, *device_args(gateway, certs, "mallory-laptop"))
    assert out.returncode == 1
    assert out.stderr.startswith(f"error: cannot reach https://127.0.0.1:{gateway.port}")
    assert "Traceback" not in out.stderr


def test_dry_run_prints_a_report_the_gateway_would_accept(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["agent", "report", "--dry-run", "--config", "/dev/null"]) == 0
    report = json.loads(capsys.readouterr().out)
    validate_report(report)
    assert report["platform"] == "linux" and report["evidence"]["jailbroken"]


def test_the_agent_without_a_gateway_says_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = tmp_path / "agent.toml"
    settings.write_text('gateway = "http://gateway.example"\n')
    assert main(["agent", "report", "-c", str(settings)]) == 2
    assert "gateway: must be the gateway's https:// URL" in capsys.readouterr().err
    settings.write_text('gateway = "https://gateway.example"\ntimeout = "30m"\n')
    assert main(["agent", "report", "-c", str(settings)]) == 2
    assert "error: no cert, key" in capsys.readouterr().err


def _mdm_report(device: str, collected: str, **over: Any) -> dict[str, Any]:
    return {
        "device_id": device,
        "platform": "windows",
        "os_version": "10.0.22631",
        "last_patch": collected[:10],
        "disk_encrypted": True,
        "firewall": True,
        "antivirus": True,
        "screen_lock": True,
        "mdm_enrolled": True,
        "jailbroken": False,
        "collected_at": collected,
        **over,
    }


async def test_a_management_system_posts_posture_for_many_devices(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory({"routes": [COMPLIANT_ONLY]})
    now = gw.clock.now().isoformat(timespec="seconds")
    url = f"https://127.0.0.1:{gw.port}/secure/echo"
    async with session(certs) as s, s.get(url) as r:
        assert r.status == 403 and (await r.json())["reason"] == "device-noncompliant"

    body = {
        "source": "intune",
        "reports": [
            _mdm_report("alice-laptop", now),
            _mdm_report("bob-phone", now, jailbroken="no"),
            _mdm_report("carol-laptop", now, firewall=False),
            {"platform": "linux"},
        ],
    }
    status, answer = await admin(gw, "POST", "/admin/posture", body=body)
    assert status == 200, answer
    assert (answer["accepted"], answer["refused"]) == (2, 2)
    by_device = {r["device_id"]: r for r in answer["results"]}
    assert by_device["alice-laptop"]["compliant"] is True
    assert by_device["carol-laptop"]["failed_checks"] == ["firewall"]
    assert by_device["bob-phone"] == {
        "device_id": "bob-phone",
        "accepted": False,
        "reason": "posture-invalid",
        "field": "jailbroken",
        "detail": "must be true or false",
    }
    assert answer["results"][3]["field"] == "device_id"
    record = gw.store.posture("alice-laptop")
    assert record is not None and record.report["source"] == "operator:intune"
    assert not record.signed
    # The device's access follows at once.
    async with session(certs) as s, s.get(url) as r:
        assert r.status == 200
    # The same data again is a replay, refused for that device only.
    status, answer = await admin(
        gw, "POST", "/admin/posture", body={**body, "reports": body["reports"][:1]}
    )
    assert status == 200 and answer["results"][0]["reason"] == "posture-replayed"
    # Every device's outcome is its own audit event, found by the device.
    await gw.audit.flush()
    status, events = await admin(gw, "GET", "/admin/audit?device=carol-laptop")
    assert status == 200
    assert any(
        "posture from intune accepted" in e["result"]["findings"][0]["detail"] for e in events
    ), events


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"reports": [{}]}, 400),
        ({"source": "Intune!", "reports": [{}]}, 400),
        ({"source": "intune", "reports": []}, 400),
        ({"source": "intune", "reports": [{}] * 1001}, 413),
    ],
)
async def test_a_malformed_bulk_post_is_refused_whole(
    gateway: Gateway, body: dict[str, Any], status: int
) -> None:
    got, answer = await admin(gateway, "POST", "/admin/posture", body=body)
    assert got == status and answer["decision_id"]


async def test_the_bulk_endpoint_needs_the_admin_token(gateway: Gateway) -> None:
    status, answer = await admin(
        gateway, "POST", "/admin/posture", token={"Authorization": "Bearer x"}, body={}
    )
    assert status == 401 and answer["reason"] == "identity-unauthenticated"
    assert ADMIN_TOKEN not in json.dumps(answer)
