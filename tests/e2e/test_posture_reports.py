"""Posture reports come from the device's agent, not from a page another site shows the
person using the device (issue 18, L2)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from tests.conftest import GatewayFactory
from tests.e2e.test_devices import REPORT
from tests.support import Certs, session
from ztgateway.app import Gateway


async def post_report(
    gw: Gateway, certs: Certs, report: Any, **kw: Any
) -> tuple[int, dict[str, Any]]:
    if report is not None:
        kw["json"] = report
    async with (
        session(certs) as s,
        s.post(f"https://127.0.0.1:{gw.port}/.ztgw/posture", **kw) as r,
    ):
        return r.status, await r.json(content_type=None)


@pytest.fixture
async def gw(gateway_factory: GatewayFactory) -> Gateway:
    return await gateway_factory()


def at(seconds_from_now: float) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds_from_now)).isoformat()


@pytest.mark.parametrize(
    ("kw", "status", "reason"),
    [
        # fetch(url, {mode: "no-cors", body: new Blob([json])}): no Content-Type at all
        ({"data": json.dumps(REPORT).encode()}, 415, "media-type-unsupported"),
        (
            {"data": json.dumps(REPORT).encode(), "headers": {"Content-Type": "text/plain"}},
            415,
            "media-type-unsupported",
        ),
        ({"data": {"report": "x"}}, 415, "media-type-unsupported"),  # an HTML form
        (
            {"json": REPORT, "headers": {"Sec-Fetch-Site": "cross-site"}},
            403,
            "origin-mismatch",
        ),
        (
            {"json": REPORT, "headers": {"Origin": "https://evil.example"}},
            403,
            "origin-mismatch",
        ),
    ],
)
async def test_a_report_another_site_could_send_is_refused(
    gw: Gateway, certs: Certs, kw: dict[str, Any], status: int, reason: str
) -> None:
    got, answer = await post_report(gw, certs, None, **kw)
    assert (got, answer["reason"]) == (status, reason)
    assert answer["decision_id"]
    assert gw.store.posture("alice-laptop") is None


async def test_a_future_collected_at_does_not_hold_back_the_agents_next_report(
    gw: Gateway, certs: Certs
) -> None:
    status, _ = await post_report(gw, certs, {**REPORT, "collected_at": at(290)})
    assert status == 200
    stored = gw.store.posture("alice-laptop")
    assert stored is not None and stored.collected_at is not None
    assert stored.collected_at <= stored.received_at, "kept as no later than its arrival"
    # The agent reports again a few seconds later with its honest clock: accepted (it used to
    # be refused as a replay for five minutes).
    status, answer = await post_report(gw, certs, {**REPORT, "collected_at": at(2)})
    assert status == 200, answer


async def test_a_collected_at_beyond_the_clock_skew_is_refused_saying_why(
    gw: Gateway, certs: Certs
) -> None:
    status, answer = await post_report(gw, certs, {**REPORT, "collected_at": at(3600)})
    assert (status, answer["reason"]) == (400, "posture-invalid")
    assert "ahead of the gateway's clock" in answer["detail"] and "300 s" in answer["detail"]


async def test_deeply_nested_json_is_refused_not_an_error(gw: Gateway, certs: Certs) -> None:
    body = b"[" * 5000 + b"]" * 5000
    status, answer = await post_report(
        gw, certs, None, data=body, headers={"Content-Type": "application/json"}
    )
    assert (status, answer["reason"]) == (400, "posture-invalid")
