"""OIDC Back-Channel Logout 1.0 against a real provider: a person signs in through the dev IdP,
signs out there, and the dev IdP's logout token ends the gateway session (and its WebSocket)."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.e2e.test_signals import WS_CLOSED, audited
from tests.e2e.test_signin import browser, sign_in, sign_out
from tests.signals_fixtures import Signals, transmitter_session
from tests.support import Certs, client_ssl, metric
from ztgateway.app import Gateway
from ztgateway.dev.ssf import BACKCHANNEL_LOGOUT, sid_for

HTML = {"Accept": "text/html"}


async def signed_in(signals: Signals, certs: Certs) -> aiohttp.ClientSession:
    s = browser(certs)
    r = await sign_in(s, signals.setup)
    assert r.status == 303, await r.text()
    assert (await s.get(signals.origin + "/echo", allow_redirects=False)).status == 200
    return s


async def reaches_the_app(s: aiohttp.ClientSession, signals: Signals) -> bool:
    r = await s.get(signals.origin + "/echo", headers=HTML, allow_redirects=False)
    if r.status == 303:
        assert r.headers["Location"].startswith("/.ztgw/login")
        return False
    assert r.status == 200, await r.text()
    return True


def provider_sid(signals: Signals, s: aiohttp.ClientSession) -> str:
    cookie = next(c for c in s.cookie_jar if c.key == signals.idp.session_cookie)
    return sid_for(cookie.value)


def logout_token(signals: Signals, **change: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": signals.issuer,
        "aud": "ztgateway",
        "iat": now,
        "exp": now + 120,
        "jti": f"lt-{time.monotonic_ns()}",
        "sub": "alice",
        "events": {BACKCHANNEL_LOGOUT: {}},
    }
    header: dict[str, Any] = {"kid": signals.idp.kid, "typ": "logout+jwt"}
    key: Any = signals.idp._key
    for name, value in change.items():
        if name == "header":
            header.update(value)
        elif name == "key":
            key = value
        elif value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return pyjwt.encode(claims, key, algorithm="ES256", headers=header)


async def post_logout(
    signals: Signals, token: str, gw: Gateway | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """What the provider does (§2.5): a form POST with `logout_token`, over mTLS."""
    gw = gw or signals.gateway
    async with (
        transmitter_session(signals.certs) as s,
        s.post(
            f"https://127.0.0.1:{gw.port}/.ztgw/oidc/backchannel-logout",
            data={"logout_token": token},
        ) as r,
    ):
        text = await r.text()
        body = await r.json(content_type=None) if text else {}
        return r.status, body, dict(r.headers)


async def test_signing_out_at_the_provider_ends_that_sign_in_and_closes_its_websocket(
    signals: Signals, certs: Certs
) -> None:
    first = await signed_in(signals, certs)
    second = await signed_in(signals, certs)  # alice in another browser: another provider session
    try:
        async with first.ws_connect(f"wss://127.0.0.1:{signals.gateway.port}/ws") as ws:
            await ws.send_str("ping")
            assert (await ws.receive(timeout=5)).data == "ping"
            # The person signs out at the provider; the provider tells the gateway (§2.5).
            end_session = signals.idp.endpoint("end_session")
            assert end_session is not None
            r = await first.get(end_session)
            assert r.status == 200
            msg = await ws.receive(timeout=5)
            assert msg.type in WS_CLOSED
            assert ws.close_code == 1008
        assert not await reaches_the_app(first, signals)
        assert await reaches_the_app(second, signals), "only that provider session (sid) ends"
    finally:
        await first.close()
        await second.close()
    gw = signals.gateway
    (event,) = await audited(gw)
    signal = event["signal"]
    assert (signal["source"], signal["via"], signal["sub"]) == (
        "backchannel_logout",
        "backchannel",
        "alice",
    )
    assert signal["sid"] and len(signal["sessions_ended"]) == 1
    assert metric(gw, "ztgw_backchannel_logout_tokens_total", result="accepted") == 1
    assert metric(gw, "ztgw_signal_sessions_ended_total", source="backchannel_logout") == 1


async def test_a_logout_token_with_sub_alone_ends_every_sign_in_of_that_person(
    signals: Signals, certs: Certs
) -> None:
    first = await signed_in(signals, certs)
    second = await signed_in(signals, certs)
    try:
        status, _, headers = await post_logout(signals, logout_token(signals))
        assert status == 200
        assert headers["Cache-Control"] == "no-store"
        assert not await reaches_the_app(first, signals)
        assert not await reaches_the_app(second, signals)
    finally:
        await first.close()
        await second.close()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"nonce": "n-0S6_WzA2Mj"}, "nonce"),  # §2.6 step 5: an ID token is not a logout token
        ({"events": None}, "events"),
        ({"events": {BACKCHANNEL_LOGOUT: "yes"}}, "events"),
        ({"events": {"http://schemas.openid.net/event/other": {}}}, "events"),
        ({"sub": None}, "neither"),  # §2.6 step 3: sid, sub or both
        ({"aud": "another-client"}, "aud"),
        ({"iss": "https://another-provider.example"}, "issuer"),
        ({"exp": int(time.time()) - 600}, "expired"),
        ({"exp": None}, "exp"),
        ({"jti": None}, "jti"),
        ({"iat": int(time.time()) - 3600}, "older"),
        ({"key": ec.generate_private_key(ec.SECP256R1())}, "signature"),
        ({"header": {"typ": "secevent+jwt"}}, "typ"),  # a SET is not a logout token
    ],
)
async def test_a_logout_token_that_fails_a_check_is_refused_audited_and_ends_nothing(
    signals: Signals, certs: Certs, change: dict[str, Any], why: str
) -> None:
    s = await signed_in(signals, certs)
    try:
        status, body, headers = await post_logout(signals, logout_token(signals, **change))
        assert status == 400, body
        assert body["error"] == "invalid_request"
        assert why in body["error_description"]
        assert headers["Cache-Control"] == "no-store"
        assert await reaches_the_app(s, signals)
    finally:
        await s.close()
    gw = signals.gateway
    (event,) = await audited(gw)
    assert event["decision_id"] == body["decision_id"]
    assert (event["result"]["verdict"], event["result"]["reason"]) == ("deny", "signal-invalid")
    assert event["signal"]["source"] == "backchannel_logout"


async def test_a_replayed_logout_token_is_refused(signals: Signals, certs: Certs) -> None:
    token = logout_token(signals)
    assert (await post_logout(signals, token))[0] == 200
    s = await signed_in(signals, certs)  # alice signs in again afterwards
    try:
        status, body, _ = await post_logout(signals, token)
        assert status == 400 and "already received" in body["error_description"]
        assert await reaches_the_app(s, signals)
    finally:
        await s.close()
    gw = signals.gateway
    assert metric(gw, "ztgw_backchannel_logout_tokens_total", result="replayed") == 1


async def test_a_logout_token_from_a_browser_is_refused(signals: Signals, certs: Certs) -> None:
    """The form type is CORS-safelisted and the client certificate ambient: a page on another
    site could post a captured token; Fetch Metadata says so and it is refused."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl(certs))) as s,
        s.post(
            f"https://127.0.0.1:{signals.gateway.port}/.ztgw/oidc/backchannel-logout",
            data={"logout_token": logout_token(signals)},
            headers={"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
        ) as r,
    ):
        assert r.status == 400
        assert (await r.json())["error"] == "invalid_request"


async def test_front_channel_sign_out_keeps_working_beside_the_back_channel(
    signals: Signals, certs: Certs
) -> None:
    s = await signed_in(signals, certs)
    try:
        location = await sign_out(s, signals.setup)
        assert location.startswith(signals.issuer)
        # The provider ends its session and sends its logout token for a session the gateway
        # already ended: accepted (200), nothing more to end.
        r = await s.get(location, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == signals.origin + "/.ztgw/signed-out"
        assert not await reaches_the_app(s, signals)
    finally:
        await s.close()
    events = await audited(signals.gateway)
    assert [(e["signal"]["source"], e["signal"]["sessions_ended"]) for e in events] == [
        ("backchannel_logout", [])
    ]


async def test_shared_signals_name_a_browser_sign_in_by_the_providers_sub_and_sid(
    signals: Signals, certs: Certs
) -> None:
    first = await signed_in(signals, certs)
    second = await signed_in(signals, certs)
    try:
        user = {"format": "iss_sub", "iss": signals.issuer, "sub": "alice"}
        answer = await signals.send(
            event="session-revoked",
            subject={
                "format": "complex",
                "user": user,
                "session": {"format": "opaque", "id": provider_sid(signals, first)},
            },
        )
        assert answer["receiver_status"] == 202
        assert not await reaches_the_app(first, signals)
        assert await reaches_the_app(second, signals)
        answer = await signals.send(
            event="credential-compromise",
            subject={"format": "email", "email": "ALICE@example.test"},
        )
        assert answer["receiver_status"] == 202
        assert not await reaches_the_app(second, signals)
    finally:
        await first.close()
        await second.close()


@pytest.mark.parametrize(
    "signals", [{"gateway": {"oidc": {"backchannel_logout": False}}}], indirect=True
)
async def test_back_channel_logout_can_be_turned_off(signals: Signals) -> None:
    status, body, _ = await post_logout(signals, logout_token(signals))
    assert status == 501 and body["error"] == "invalid_request"
