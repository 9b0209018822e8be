"""The risk stage through a real gateway: zones, blocklists, thresholds, impossible travel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from mmdb_writer import MMDBWriter
from netaddr import IPSet  # type: ignore[import-untyped]

from tests.conftest import GatewayFactory
from tests.support import Certs, audit_event, get

PARIS_IP, TOKYO_IP = "2.0.1.1", "126.0.7.7"


def write_city_db(path: Path) -> Path:
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-City")
    for cidr, (lat, lon) in {
        "2.0.0.0/16": (48.8566, 2.3522),
        "126.0.0.0/16": (35.6762, 139.6503),
    }.items():
        writer.insert_network(IPSet([cidr]), {"location": {"latitude": lat, "longitude": lon}})
    writer.to_db_file(str(path))
    return path


async def test_blocked_zone_is_denied_by_risk(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory(
        {"zones": {"loopback": ["127.0.0.0/8"]}, "risk": {"blocked_zones": ["loopback"]}}
    )
    reply = await get(gw, certs)
    status, body = reply.status, reply.json()
    assert (status, body["reason"]) == (403, "risk-denied")


async def test_blocklist_file_entries_are_blocked(
    gateway_factory: GatewayFactory, certs: Certs, tmp_path: Path
) -> None:
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("# abuse feed\n203.0.113.0/24\n127.0.0.1\n")
    gw = await gateway_factory({"risk": {"blocklist": str(blocklist)}})
    reply = await get(gw, certs)
    status, body = reply.status, reply.json()
    assert (status, body["reason"]) == (403, "risk-denied")


async def test_risk_contributions_are_explained_and_thresholds_are_per_route(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    # A first visit from a new device on an unknown network: 1 - (1-0.3)(1-0.2) = 0.44.
    strict = {
        "name": "app",
        "prefix": "/",
        "upstream": "demo",
        "risk": {"allow_up_to": 0.3, "step_up_up_to": 0.6},
    }
    gw = await gateway_factory({"routes": [strict]})
    reply = await get(gw, certs)
    status, body = reply.status, reply.json()
    assert (status, body["reason"]) == (401, "risk-step-up")
    await gw.audit.flush()
    event = await audit_event(gw, body["decision_id"])
    contributions = {
        f["reason"]: f["risk"]
        for f in event["result"]["findings"]
        if f["stage"] == "risk" and "verdict" not in f
    }
    assert set(contributions) == {"new-device", "zone-unknown"}
    assert abs(sum(contributions.values()) - 0.44) < 0.001
    assert (
        'ztgw_risk_refusals_total{route="app",signal="new-device",verdict="step_up"} 1.0'
        in gw.metrics.render().decode()
    )
    lenient = {**strict, "risk": {"allow_up_to": 0.5, "step_up_up_to": 0.8}}
    gw2 = await gateway_factory({"routes": [lenient]})
    assert (await get(gw2, certs)).status == 200


async def test_known_device_on_trusted_network_carries_no_risk(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory({"risk": {"trusted_zones": ["loopback"]}})
    assert (await get(gw, certs)).status == 200
    await gw.store.flush()
    status = (await get(gw, certs)).status
    assert status == 200
    assert gw.metrics.risk_score.labels("app")._sum.get() < 0.31  # first 0.3 (new device), then 0


async def test_impossible_travel_is_detected_from_a_geolocation_database(
    gateway_factory: GatewayFactory, certs: Certs, tmp_path: Path
) -> None:
    db = write_city_db(tmp_path / "city.mmdb")
    route = {
        "name": "app",
        "prefix": "/",
        "upstream": "demo",
        "risk": {"allow_up_to": 0.5, "step_up_up_to": 0.9},
    }
    gw = await gateway_factory(
        {
            "server": {"trusted_proxies": ["127.0.0.1/32"]},
            "risk": {"geoip_db": str(db), "trusted_zones": ["loopback"]},
            "routes": [route],
        }
    )
    status = (await get(gw, certs, headers={"X-Forwarded-For": PARIS_IP})).status
    assert status == 200
    reply = await get(gw, certs, headers={"X-Forwarded-For": TOKYO_IP})
    status, body = reply.status, reply.json()
    assert (status, body["reason"]) == (401, "risk-step-up")
    await gw.audit.flush()
    event = await audit_event(gw, body["decision_id"])
    travel = [f for f in event["result"]["findings"] if f["reason"] == "impossible-travel"]
    assert travel and "km/h" in travel[0]["detail"]


async def test_missing_geolocation_database_is_reported_not_fatal(
    gateway_factory: GatewayFactory, certs: Certs, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.mmdb"
    corrupt.write_bytes(b"\x00not a database" * 100)
    gw = await gateway_factory({"risk": {"geoip_db": str(corrupt)}})
    assert (await get(gw, certs)).status == 200
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{gw.ops_port}/readyz") as r:
        ready = await r.json()
    assert ready["checks"]["geoip"]["available"] is False
    assert ready["checks"]["geoip"]["error"]


def test_policy_explain_shows_each_risk_contribution(
    certs: Certs, tmp_path: Path, capsys: Any
) -> None:
    from tests.conftest import base_config
    from tests.support import to_toml
    from ztgateway.cli import main

    path = tmp_path / "gw.toml"
    path.write_text(to_toml(base_config(certs, 9, tmp_path)))
    code = main(
        [
            "policy",
            "explain",
            "-c",
            str(path),
            "--path",
            "/echo",
            "--cert",
            str(certs.client("alice-laptop")[0]),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "[risk] info      new-device risk=0.2" in out
    assert "[risk] info      zone-unknown risk=0.1" in out
