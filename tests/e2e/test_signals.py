"""The gateway as a Shared Signals receiver, against a real transmitter: the dev IdP signs SETs
and pushes them over mTLS (RFC 8935) or queues them for the gateway's poll (RFC 8936)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.e2e.test_devices import REPORT
from tests.e2e.test_mfa_http import verify
from tests.signals_fixtures import Signals
from tests.support import Certs, metric, session
from ztgateway.app import Gateway
from ztgateway.cli import main
from ztgateway.clock import ManualClock
from ztgateway.credentials.totp import totp_code
from ztgateway.dev.ssf import CAEP
from ztgateway.dev.tokens import issue_token

WS_CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
DEV_ISSUER = "https://ztgateway.dev/issuer"  # the bearer tokens' issuer in conftest.base_config


async def call(
    gw: Gateway, certs: Certs, token: str, path: str = "/api/echo", cert: str = "alice-laptop"
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with (
        session(certs, cert) as s,
        s.get(
            f"https://127.0.0.1:{gw.port}{path}", headers={"Authorization": f"Bearer {token}"}
        ) as r,
    ):
        return r.status, await r.json(content_type=None), dict(r.headers)


@contextlib.asynccontextmanager
async def open_websocket(
    gw: Gateway, certs: Certs, token: str
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """alice's WebSocket through the gateway, answering (the demo app echoes)."""
    async with (
        session(certs) as s,
        s.ws_connect(
            f"wss://127.0.0.1:{gw.port}/api/ws", headers={"Authorization": f"Bearer {token}"}
        ) as ws,
    ):
        await ws.send_str("ping")
        assert (await ws.receive(timeout=5)).data == "ping"
        yield ws


def signal_events(gw: Gateway) -> list[dict[str, Any]]:
    """The `ztgw.signal` audit events, from the gateway's audit log."""
    path = gw.config.audit.jsonl
    assert path is not None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [e for e in rows if e.get("type") == "ztgw.signal"]


async def audited(gw: Gateway) -> list[dict[str, Any]]:
    await gw.audit.flush()
    return signal_events(gw)


async def until(predicate: Any, timeout: float = 2.0) -> float:
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < timeout, "not within the time allowed"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_dev_ssf_send_ends_the_subjects_session_and_closes_its_websocket_with_1008(
    signals: Signals, certs: Certs, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = signals.gateway
    token = issue_token(certs.issuer_key, sub="alice")
    carol = issue_token(certs.issuer_key, sub="carol")
    assert (await call(gw, certs, token))[0] == 200
    assert (await call(gw, certs, carol, cert="carol-laptop"))[0] == 200
    async with open_websocket(gw, certs, token) as ws:
        # The real command line, against the real dev IdP, which pushes to the real gateway.
        code = await asyncio.to_thread(
            main,
            [
                "dev-ssf", "send", "--idp", signals.issuer, "--event", "session-revoked",
                "--sub", "alice", "--format", "iss_sub", "--control-token", "control-token-0123456789abcdef",
            ],
        )  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0, out
        assert json.loads(out)["receiver_status"] == 202
        msg = await ws.receive(timeout=5)
        assert msg.type in WS_CLOSED
        assert ws.close_code == 1008
    status, body, _ = await call(gw, certs, token)
    assert (status, body["reason"]) == (401, "session-terminated")
    assert (await call(gw, certs, carol, cert="carol-laptop"))[0] == 200, "only alice's end"
    (event,) = await audited(gw)
    assert event["result"]["verdict"] == "allow"
    assert event["result"]["reason"] == "signal-accepted"
    signal = event["signal"]
    assert (signal["transmitter"], signal["via"], signal["iss"]) == ("dev", "push", signals.issuer)
    (applied,) = signal["events"]
    assert applied["event"] == "session-revoked" and len(applied["sessions_ended"]) == 1
    assert applied["subject"] == {"user": [f"iss_sub:{signals.issuer}/alice"]}
    assert metric(gw, "ztgw_ssf_sets_total", transmitter="dev", via="push", result="accepted") == 1
    assert (
        metric(
            gw,
            "ztgw_ssf_events_total",
            transmitter="dev",
            event="session-revoked",
            action="terminate",
        )
        == 1
    )
    assert metric(gw, "ztgw_signal_sessions_ended_total", source="ssf") == 1


@pytest.mark.parametrize(
    ("event", "subject"),
    [
        ("account-disabled", {"format": "iss_sub", "iss": DEV_ISSUER, "sub": "alice"}),
        ("credential-compromise", {"format": "opaque", "id": "alice"}),
        (
            "account-disabled",
            {
                "format": "aliases",
                "identifiers": [
                    {"format": "phone_number", "phone_number": "+12065550100"},
                    {"format": "opaque", "id": "alice"},
                ],
            },
        ),
    ],
)
@pytest.mark.parametrize("signals", [{"subject_issuers": [DEV_ISSUER]}], indirect=True)
async def test_risc_account_events_end_the_accounts_sessions(
    signals: Signals, certs: Certs, event: str, subject: dict[str, Any]
) -> None:
    gw = signals.gateway
    token = issue_token(certs.issuer_key, sub="alice")
    assert (await call(gw, certs, token))[0] == 200
    answer = await signals.send(event=event, subject=subject)
    assert answer["receiver_status"] == 202, answer
    _, body, _ = await call(gw, certs, token)
    # A disabled account is also locked; a compromised credential ends the sessions only.
    expected = "account-locked" if event == "account-disabled" else "session-terminated"
    assert body["reason"] == expected
    (audit,) = await audited(gw)
    assert len(audit["signal"]["events"][0]["sessions_ended"]) == 1


async def test_a_disabled_account_stays_locked_until_the_provider_enables_it(
    signals: Signals, certs: Certs
) -> None:
    gw = signals.gateway
    alice = {"format": "opaque", "id": "alice"}
    # A token minted before the account was disabled, not presented until after.
    unused = issue_token(certs.issuer_key, sub="alice", extra_claims={"n": "unused"})
    assert (await call(gw, certs, issue_token(certs.issuer_key, sub="alice")))[0] == 200
    assert (await signals.send(event="account-disabled", subject=alice))["receiver_status"] == 202
    status, body, _ = await call(gw, certs, unused)
    assert (status, body["reason"]) == (403, "account-locked")
    account = gw.store.user("alice")
    assert account is not None
    assert account.lock_reason == "account disabled at dev (RISC, opaque:alice)"
    assert (await signals.send(event="account-enabled", subject=alice))["receiver_status"] == 202
    assert (await call(gw, certs, unused))[0] == 200
    # An operator's lock is the operator's: the provider's account-enabled does not lift it.
    code = await asyncio.to_thread(
        main, ["users", "lock", "alice", "--for", "1h", "-c", str(gw.config.file)]
    )
    assert code == 0
    await until(lambda: _locked(gw, "alice"))
    assert (await signals.send(event="account-enabled", subject=alice))["receiver_status"] == 202
    assert (await call(gw, certs, unused))[0] == 403
    effects = [e["signal"]["events"][0] for e in await audited(gw)]
    assert [(e["event"], e["users_locked"], e["users_unlocked"]) for e in effects] == [
        ("account-disabled", ["alice"], []),
        ("account-enabled", [], ["alice"]),
        ("account-enabled", [], []),
    ]


async def _locked(gw: Gateway, user: str) -> bool:
    account = gw.store.user(user)
    return account is not None and account.locked(time.time())


def forged(signals: Signals, **change: Any) -> str:
    """A SET like the transmitter's, with one thing changed."""
    now = int(time.time())
    claims = {
        "iss": signals.issuer,
        "aud": signals.origin,
        "iat": now,
        "jti": f"forged-{time.monotonic_ns()}",
        "sub_id": {"format": "opaque", "id": "alice"},
        "events": {CAEP + "session-revoked": {"event_timestamp": now}},
    }
    header = {"kid": signals.transmitter.kid, "typ": "secevent+jwt"}
    key: Any = signals.transmitter._key
    alg = "ES256"
    for name, value in change.items():
        if name == "header":
            header.update(value)
        elif name == "key":
            key = value
        elif name == "alg":
            alg = value
        elif value is None:
            claims.pop(name)
        else:
            claims[name] = value
    return pyjwt.encode(claims, key, algorithm=alg, headers=header)


@pytest.mark.parametrize(
    ("change", "err"),
    [
        ({"key": ec.generate_private_key(ec.SECP256R1())}, "invalid_key"),
        ({"aud": "https://another-receiver.example"}, "invalid_audience"),
        ({"iss": "https://not-configured.example"}, "invalid_issuer"),
        ({"header": {"typ": "JWT"}}, "invalid_request"),  # an ID token is not an event
        ({"header": {"kid": "unknown-key"}}, "invalid_key"),
        ({"alg": "HS256", "key": "a-shared-secret-of-enough-length-0123456789"}, "invalid_key"),
        ({"iat": int(time.time()) - 3 * 86400}, "invalid_request"),  # beyond max_event_age
        ({"jti": None}, "invalid_request"),
        ({"events": {CAEP + "session-revoked": "not an object"}}, "invalid_request"),
        ({"sub_id": {"format": "iss_sub", "sub": "alice"}}, "invalid_request"),  # RFC 9493
        ({"sub_id": None}, "invalid_request"),
    ],
)
async def test_a_set_that_fails_verification_is_refused_with_the_rfc_8935_code_and_audited(
    signals: Signals, certs: Certs, change: dict[str, Any], err: str
) -> None:
    gw = signals.gateway
    token = issue_token(certs.issuer_key, sub="alice")
    assert (await call(gw, certs, token))[0] == 200
    status, body = await signals.push(forged(signals, **change))
    assert status == 400, body
    assert body["err"] == err
    assert body["description"] and body["decision_id"]
    assert body["reason"] == "signal-invalid"
    (event,) = await audited(gw)
    assert event["decision_id"] == body["decision_id"]
    assert event["result"]["verdict"] == "deny"
    assert event["signal"]["error"] == err
    transmitter = "unknown" if err == "invalid_issuer" else "dev"
    assert metric(gw, "ztgw_ssf_sets_total", transmitter=transmitter, via="push", result=err) == 1
    assert (await call(gw, certs, token))[0] == 200, "a refused SET ends nothing"


async def test_a_replayed_set_is_refused_and_acts_once(
    signals: Signals, certs: Certs, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = signals.gateway
    token = forged(signals)
    status, _ = await signals.push(token)
    assert status == 202
    # alice signs in again after the revocation; the same SET replayed must not end that.
    fresh = issue_token(certs.issuer_key, sub="alice", extra_claims={"n": 2})
    assert (await call(gw, certs, fresh))[0] == 200
    status, body = await signals.push(token)
    assert status == 400
    assert (body["err"], body["reason"]) == ("invalid_request", "signal-replayed")
    assert "already received" in body["description"]
    assert (await call(gw, certs, fresh))[0] == 200
    results = [e["result"]["reason"] for e in await audited(gw)]
    assert results == ["signal-accepted", "signal-replayed"]
    # What an operator runs to see why (docs/signals.md): the refusal, with its decision id.
    code = await asyncio.to_thread(
        main,
        ["audit", "search", "--reason", "signal-replayed", "--json", "-c", str(gw.config.file)],
    )
    found = capsys.readouterr().out
    assert code == 0 and body["decision_id"] in found and "already received" in found
    assert metric(gw, "ztgw_ssf_sets_total", transmitter="dev", via="push", result="replayed") == 1


async def test_a_set_from_a_browser_or_of_another_type_is_refused(signals: Signals) -> None:
    token = forged(signals)
    for headers in (
        {"Content-Type": "application/jwt"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "https://evil.example"},
    ):
        status, body = await signals.push(token, **headers)
        assert (status, body["err"]) == (400, "invalid_request"), headers
    status, _ = await signals.push(token)
    assert status == 202, "none of the refused requests consumed the jti"


@pytest.mark.parametrize(
    "signals", [{"gateway": {"sessions": {"step_up_validity": 300}}}], indirect=True
)
@pytest.mark.parametrize("event", ["credential-change", "assurance-level-change"])
async def test_credential_and_assurance_changes_ask_sessions_from_before_for_a_second_factor(
    signals: Signals, certs: Certs, event: str
) -> None:
    clock = ManualClock(time.time())  # moved below, never slept on
    gw = await signals.make({"any_port": True}, clock=clock)
    secret = (await gw.mfa.enroll("alice")).secret
    token = issue_token(certs.issuer_key, sub="alice")
    assert (await call(gw, certs, token))[0] == 200
    _, set_token = signals.transmitter.make_set(
        event, {"format": "opaque", "id": "alice"}, iat=int(clock.time())
    )
    assert (await signals.push(set_token, gw))[0] == 202
    status, body, headers = await call(gw, certs, token)
    assert (status, body["reason"]) == (401, "signal-step-up")
    assert 'error="insufficient_user_authentication"' in headers["WWW-Authenticate"]
    assert gw.store.user("alice").step_up_after is not None  # type: ignore[union-attr]
    # A fresh second factor answers it (RFC 9470: the client steps up and retries).
    status, body = await verify(gw, certs, token, totp_code(secret, now=time.time()))
    assert status == 200, body
    assert (await call(gw, certs, token))[0] == 200
    clock.advance(2.0)  # a session started after the event (whose time is whole seconds)
    later = issue_token(certs.issuer_key, sub="alice", extra_claims={"n": 2})
    assert (await call(gw, certs, later))[0] == 200
    (audit,) = await audited(gw)
    assert audit["signal"]["events"][0]["users_stepped_up"] == ["alice"]
    assert metric(gw, "ztgw_signal_step_ups_total") == 1


async def post_report(gw: Gateway, certs: Certs) -> None:
    async with (
        session(certs) as s,
        s.post(f"https://127.0.0.1:{gw.port}/.ztgw/posture", json=REPORT) as r,
    ):
        assert r.status == 200, await r.text()


SECURE = {
    "name": "secure",
    "prefix": "/secure/",
    "upstream": "demo",
    "policy": {"require_token": True, "min_trust": "compliant"},
}


async def test_device_compliance_change_updates_the_devices_posture(
    signals: Signals, certs: Certs
) -> None:
    gw = await signals.make({"any_port": True, "routes": [SECURE]})
    token = issue_token(certs.issuer_key, sub="alice")
    await post_report(gw, certs)
    assert (await call(gw, certs, token, "/secure/echo"))[0] == 200
    (device,) = gw.store.devices()
    subject = {
        "format": "complex",
        "user": {"format": "opaque", "id": "alice"},
        "device": {"format": "opaque", "id": device.device_id},
    }
    status, _ = await signals.push(
        signals.transmitter.make_set("device-compliance-change", subject, status="not-compliant")[
            1
        ],
        gw,
    )
    assert status == 202
    status, body, _ = await call(gw, certs, token, "/secure/echo")
    assert (status, body["reason"]) == (403, "device-noncompliant")
    async with (
        session(certs) as s,
        s.get(
            f"https://127.0.0.1:{gw.port}/.ztgw/device", headers={"Accept": "application/json"}
        ) as r,
    ):
        checks = (await r.json())["posture"]["checks"]
    (verdict,) = [c for c in checks if c["check"] == "transmitter_compliance"]
    assert not verdict["passed"] and "not-compliant" in verdict["detail"]
    # The agent reporting "all fine" does not clear the transmitter's verdict.
    await post_report(gw, certs)
    assert (await call(gw, certs, token, "/secure/echo"))[0] == 403
    # An older event arriving late does not override the newer verdict.
    old = signals.transmitter.make_set(
        "device-compliance-change", subject, status="compliant", iat=int(time.time()) - 60
    )[1]
    assert (await signals.push(old, gw))[0] == 202
    assert (await call(gw, certs, token, "/secure/echo"))[0] == 403
    status, _ = await signals.push(
        signals.transmitter.make_set("device-compliance-change", subject, status="compliant")[1],
        gw,
    )
    assert status == 202
    assert (await call(gw, certs, token, "/secure/echo"))[0] == 200


@pytest.mark.parametrize("signals", [{"delivery": "poll", "poll_interval": 0.1}], indirect=True)
async def test_polled_events_act_and_are_acknowledged_and_bad_ones_reported(
    signals: Signals, certs: Certs
) -> None:
    gw = signals.gateway
    token = issue_token(certs.issuer_key, sub="alice")
    assert (await call(gw, certs, token))[0] == 200
    answer = await signals.send(
        event="session-revoked", subject={"format": "opaque", "id": "alice"}
    )
    assert answer["delivery"] == "poll"
    bad_jti, bad = signals.transmitter.make_set(
        "session-revoked", {"format": "opaque", "id": "bob"}, audience="https://elsewhere.example"
    )
    signals.transmitter.enqueue(bad_jti, bad)

    async def acknowledged() -> bool:
        return (
            answer["jti"] in signals.transmitter.acknowledged
            and bad_jti in signals.transmitter.errors
        )

    await until(acknowledged, timeout=5.0)
    assert signals.transmitter.errors[bad_jti]["err"] == "invalid_audience"
    assert not signals.transmitter.queue
    status, body, _ = await call(gw, certs, token)
    assert (status, body["reason"]) == (401, "session-terminated")
    assert metric(gw, "ztgw_ssf_sets_total", transmitter="dev", via="poll", result="accepted") == 1
    assert metric(gw, "ztgw_ssf_last_delivery_timestamp_seconds", transmitter="dev") > 0
    events = await audited(gw)
    assert sorted(e["signal"].get("error") or "ok" for e in events) == ["invalid_audience", "ok"]
    assert all(e["signal"]["via"] == "poll" for e in events)


@pytest.mark.parametrize(
    "signals", [{"delivery": "poll", "poll_interval": 0.1, "poll_url": "http://127.0.0.1:9/x"}],
    indirect=True,
)  # fmt: skip
async def test_an_unreachable_poll_endpoint_is_counted(signals: Signals) -> None:
    gw = signals.gateway

    async def failed() -> bool:
        return (
            metric(gw, "ztgw_ssf_poll_failures_total", transmitter="dev", reason="unreachable") > 0
        )

    await until(failed, timeout=5.0)


async def test_a_push_token_when_configured_is_required(
    signals: Signals, certs: Certs, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZTGW_TEST_PUSH_TOKEN", "push-token-0123456789abcdef")
    gw = await signals.make(
        {
            "any_port": True,
            "signals": {"dev": {"push_token_env": "ZTGW_TEST_PUSH_TOKEN"}},
        }
    )
    status, body = await signals.push(forged(signals), gw)
    assert (status, body["err"]) == (401, "authentication_failed")
    status, body = await signals.push(forged(signals), gw, Authorization="Bearer wrong-token")
    assert (status, body["err"]) == (401, "authentication_failed")
    status, _ = await signals.push(
        forged(signals), gw, Authorization="Bearer push-token-0123456789abcdef"
    )
    assert status == 202
