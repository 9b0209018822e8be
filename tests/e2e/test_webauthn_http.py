"""WebAuthn through a real gateway without a browser: what a route that takes only a security
key accepts as a step-up, and how the ceremony endpoints refuse what is not a person's browser
(the browser flows are clicked in tests/e2e/test_webauthn_browser.py)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.conftest import GatewayFactory
from tests.e2e.test_mfa_http import client, post, verify
from tests.support import Certs
from ztgateway.credentials.totp import totp_code
from ztgateway.dev.tokens import issue_token

NAMED = {"server": {"public_url": "https://gw.localhost"}}
ROUTES: list[dict[str, Any]] = [
    {
        "name": "keys",
        "prefix": "/keys/",
        "upstream": "demo",
        "policy": {"require_token": True},
        "session": {"mfa_max_age": 900, "step_up_factors": ["webauthn"]},
    },
    {
        "name": "codes",
        "prefix": "/",
        "upstream": "demo",
        "policy": {"require_token": True},
        "session": {"mfa_max_age": 900},
    },
]


async def test_a_totp_step_up_does_not_answer_a_route_that_takes_only_a_security_key(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory({**NAMED, "routes": ROUTES})
    secret = (await gw.mfa.enroll("alice")).secret
    token = issue_token(certs.issuer_key, sub="alice")
    auth = {"Authorization": f"Bearer {token}"}

    async def get(path: str) -> tuple[int, dict[str, Any], str]:
        async with (
            client(certs) as s,
            s.get(f"https://127.0.0.1:{gw.port}{path}", headers=auth) as r,
        ):
            body = await r.json(content_type=None) if "json" in r.content_type else {}
            return r.status, body, r.headers.get("WWW-Authenticate", "")

    status, body, challenge = await get("/keys/echo")
    assert (status, body["reason"]) == (401, "mfa-required")
    assert "insufficient_user_authentication" in challenge and "security key" in challenge
    assert (await verify(gw, certs, token, totp_code(secret, now=time.time())))[0] == 200
    # The code answers the route that takes TOTP...
    assert (await get("/echo"))[0] == 200
    # ... and not the one that asks for a phishing-resistant factor.
    status, body, challenge = await get("/keys/echo")
    assert (status, body["reason"]) == (401, "mfa-required")
    await gw.audit.flush()
    assert gw.config.audit.jsonl is not None
    events = [json.loads(x) for x in gw.config.audit.jsonl.read_text().splitlines()]
    (event,) = [e for e in events if e.get("decision_id") == body["decision_id"]]
    assert any("by webauthn" in f.get("detail", "") for f in event["result"]["findings"])


ENDPOINTS = [
    "/.ztgw/webauthn/register/options",
    "/.ztgw/webauthn/register",
    "/.ztgw/webauthn/authenticate/options",
    "/.ztgw/webauthn/authenticate",
]


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_the_ceremonies_refuse_what_is_not_a_persons_browser(
    gateway_factory: GatewayFactory, certs: Certs, path: str
) -> None:
    gw = await gateway_factory({**NAMED, "routes": ROUTES})
    token = issue_token(certs.issuer_key, sub="alice")
    cases: list[tuple[dict[str, Any], int, str]] = [
        # another site: Fetch Metadata, a CORS-safelisted type, a foreign Origin
        ({"json": {}, "headers": {"Sec-Fetch-Site": "cross-site"}}, 403, "origin-mismatch"),
        ({"data": b"{}", "headers": {"Content-Type": "text/plain"}}, 415, "media-type-unsupported"),
        ({"json": {}, "headers": {"Origin": "https://evil.localhost"}}, 403, "origin-mismatch"),
        # a certificate alone, or a token: not a person signed in at a browser
        ({"json": {"csrf": "1.x"}}, 401, "identity-unauthenticated"),
        (
            {"json": {"csrf": "1.x"}, "headers": {"Authorization": f"Bearer {token}"}},
            401,
            "identity-unauthenticated",
        ),
        ({"data": b"[1, 2]", "headers": {"Content-Type": "application/json"}}, 400, "request-invalid"),
        ({"data": b"x" * 20000, "headers": {"Content-Type": "application/json"}}, 413, "body-too-large"),
    ]  # fmt: skip
    for kw, status, reason in cases:
        got, body = await post(gw, certs, path, **kw)
        assert (got, body.get("reason")) == (status, reason), (kw, body)
        assert body["decision_id"]
    # Nothing was started or stored.
    assert await gw.store.webauthn_credentials("alice") == []


async def test_without_a_relying_party_the_pages_say_so(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory()  # public_url is an address: no RP ID
    assert not gw.config.webauthn.enabled
    async with (
        client(certs) as s,
        s.get(
            f"https://127.0.0.1:{gw.port}/.ztgw/webauthn", headers={"Accept": "application/json"}
        ) as r,
    ):
        assert (
            r.status == 503 and (await r.json(content_type=None))["reason"] == "service-unavailable"
        )
    status, body = await post(gw, certs, "/.ztgw/webauthn/authenticate/options", json={})
    assert (status, body["reason"]) == (503, "service-unavailable")
