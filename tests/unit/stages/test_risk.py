"""The risk stage, signal by signal: the network zone, a device new to the user, the device's
posture, working hours, failed attempts, a sensitive route the user never used, a large
request, geolocation that cannot be checked; and the verdict the route's thresholds make of
the score. Each: the signal absent (valid), present (it counts), and what it decides."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests import factories
from ztgateway.context import DeviceView, RequestContext
from ztgateway.decision import Finding, Reason, Verdict
from ztgateway.risk.geo import GeoLocator
from ztgateway.risk.posture import evaluate
from ztgateway.runtime import Runtime
from ztgateway.stages.risk import RiskStage, build_zones
from ztgateway.store.sqlite import SQLiteStore


async def check(
    ctx: RequestContext, rt: Runtime, geo: GeoLocator | None = None
) -> Sequence[Finding]:
    stage = RiskStage(rt, zones=build_zones(rt), geo=geo or rt.geo)
    return await stage.check(ctx)


def signals(findings: Sequence[Finding]) -> list[Reason]:
    return [f.reason for f in findings if f.verdict is None]


def verdicts(findings: Sequence[Finding]) -> list[tuple[Reason, Verdict]]:
    return [(f.reason, f.verdict) for f in findings if f.verdict is not None]


async def test_alice_on_her_known_laptop_from_a_trusted_network_is_no_risk(
    alice: SQLiteStore,
) -> None:
    rt = factories.runtime(store=alice)
    ctx = factories.identified(rt)
    assert await check(ctx, rt) == []
    assert ctx.risk_score == 0.0


# --- the network -----------------------------------------------------------------------------


async def test_an_address_outside_every_trusted_zone_is_a_light_signal(alice: SQLiteStore) -> None:
    rt = factories.runtime(store=alice, overrides={"risk": {"trusted_zones": ["corp"]}})
    ctx = factories.identified(rt)
    findings = await check(ctx, rt)
    assert signals(findings) == [Reason.ZONE_UNKNOWN] and verdicts(findings) == []
    assert ctx.risk_score == pytest.approx(0.2)


async def test_a_blocked_zone_is_denied(alice: SQLiteStore) -> None:
    rt = factories.runtime(
        store=alice, overrides={"risk": {"trusted_zones": [], "blocked_zones": ["loopback"]}}
    )
    findings = await check(factories.identified(rt), rt)
    assert Reason.ZONE_BLOCKED in signals(findings)
    assert verdicts(findings) == [(Reason.RISK_DENIED, Verdict.DENY)]


# --- the device ------------------------------------------------------------------------------


async def test_a_device_the_user_never_used_is_new(store: SQLiteStore) -> None:
    rt = factories.runtime(store=store)
    assert signals(await check(factories.identified(rt), rt)) == [
        Reason.NEW_DEVICE
    ]  # no account yet
    await store.save_user(factories.user(known_devices=("another-laptop",)))
    assert signals(await check(factories.identified(rt), rt)) == [Reason.NEW_DEVICE]


async def test_no_user_means_no_new_device_signal(store: SQLiteStore) -> None:
    rt = factories.runtime(store=store)
    ctx = factories.routed(rt)  # nobody identified
    assert await check(ctx, rt) == []


@pytest.mark.parametrize(
    ("report", "signal"),
    [
        ({"firewall": False}, Reason.DEVICE_NONCOMPLIANT),
        ({"collected_at": factories.NOW - 3 * 86400}, Reason.POSTURE_STALE),
        ({}, None),
    ],
)
async def test_the_devices_posture_counts(
    alice: SQLiteStore, report: dict[str, Any], signal: Reason | None
) -> None:
    rt = factories.runtime(store=alice)
    record = factories.posture(**report)
    posture = evaluate(record.report, record.received_at, rt.config.posture, now=factories.NOW)
    ctx = factories.identified(rt, device=DeviceView(factories.device(), "approved", posture))
    assert signals(await check(ctx, rt)) == ([signal] if signal else [])


# --- working hours ---------------------------------------------------------------------------


@pytest.mark.parametrize(("hour", "off"), [(10, False), (22, True)])
async def test_outside_working_hours_is_a_signal(alice: SQLiteStore, hour: int, off: bool) -> None:
    rt = factories.runtime(
        store=alice, overrides={"risk": {"default_working_hours": "mon-fri 07:00-20:00"}}
    )
    at = datetime(2027, 3, 10, hour, 0, tzinfo=UTC).timestamp()
    findings = await check(factories.identified(rt, now=at), rt)
    assert signals(findings) == ([Reason.OFF_HOURS] if off else [])


async def test_the_users_own_time_zone_decides_what_is_off_hours(alice: SQLiteStore) -> None:
    await alice.save_user(
        factories.user(timezone="Asia/Tokyo", working_hours="mon-fri 09:00-17:00")
    )
    rt = factories.runtime(store=alice)
    ten_utc = datetime(2027, 3, 10, 10, 0, tzinfo=UTC).timestamp()  # 19:00 in Tokyo
    assert signals(await check(factories.identified(rt, now=ten_utc), rt)) == [Reason.OFF_HOURS]


# --- behaviour -------------------------------------------------------------------------------


async def test_recent_failed_attempts_are_a_signal_that_grows_to_the_threshold(
    alice: SQLiteStore,
) -> None:
    rt = factories.runtime(store=alice)
    await alice.record_failure_async("user:alice", factories.NOW - 10)
    one = [
        f for f in await check(factories.identified(rt), rt) if f.reason is Reason.FAILED_ATTEMPTS
    ]
    for i in range(4):
        await alice.record_failure_async("ip:127.0.0.1", factories.NOW - 5 + i)
        await alice.record_failure_async("user:alice", factories.NOW - 5 + i)
    full = [
        f for f in await check(factories.identified(rt), rt) if f.reason is Reason.FAILED_ATTEMPTS
    ]
    assert len(one) == len(full) == 1
    assert 0 < one[0].risk < full[0].risk
    assert full[0].detail.startswith("5 recent failed attempts")


async def test_failed_attempts_outside_the_window_do_not_count(alice: SQLiteStore) -> None:
    rt = factories.runtime(store=alice)
    for i in range(10):
        await alice.record_failure_async("user:alice", factories.NOW - 3600 - i)
    assert await check(factories.identified(rt), rt) == []


async def test_a_sensitive_route_the_user_never_used_is_unusual(alice: SQLiteStore) -> None:
    rt = factories.runtime(store=alice, risk={"sensitive": True})
    assert signals(await check(factories.identified(rt), rt)) == [Reason.SENSITIVE_ROUTE_UNUSUAL]
    await alice.save_user(factories.user(known_routes=("app",)))
    assert await check(factories.identified(rt), rt) == []


@pytest.mark.parametrize(("length", "large"), [("100", False), ("2048", True), ("abc", False)])
async def test_a_large_request_is_a_signal(alice: SQLiteStore, length: str, large: bool) -> None:
    rt = factories.runtime(store=alice, overrides={"risk": {"large_request_bytes": 1024}})
    findings = await check(
        factories.identified(rt, method="POST", headers={"Content-Length": length}), rt
    )
    assert signals(findings) == ([Reason.LARGE_REQUEST] if large else [])


async def test_travel_that_cannot_be_checked_is_recorded_as_such(
    alice: SQLiteStore, tmp_path: Path
) -> None:
    broken = tmp_path / "geo.mmdb"
    broken.write_bytes(b"not a database")
    rt = factories.runtime(store=alice, overrides={"risk": {"geoip_db": str(broken)}})
    geo = GeoLocator.open(broken)
    assert not geo.available
    findings = await check(factories.identified(rt), rt, geo)
    assert signals(findings) == [Reason.GEO_UNAVAILABLE]
    assert verdicts(findings) == []


# --- the verdict -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("thresholds", "verdict"),
    [
        ({"allow_up_to": 0.5, "step_up_up_to": 0.8}, None),
        ({"allow_up_to": 0.1, "step_up_up_to": 0.8}, (Reason.RISK_STEP_UP, Verdict.STEP_UP)),
        ({"allow_up_to": 0.05, "step_up_up_to": 0.1}, (Reason.RISK_DENIED, Verdict.DENY)),
    ],
)
async def test_the_routes_thresholds_turn_the_score_into_a_verdict(
    alice: SQLiteStore, thresholds: dict[str, float], verdict: tuple[Reason, Verdict] | None
) -> None:
    rt = factories.runtime(
        store=alice, overrides={"risk": {"trusted_zones": []}}, risk=thresholds
    )  # zone-unknown: 0.2
    findings = await check(factories.identified(rt), rt)
    assert verdicts(findings) == ([verdict] if verdict else [])
