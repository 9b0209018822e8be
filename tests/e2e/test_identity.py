"""Bearer tokens, certificate binding, policy and the signed assertion, through a real gateway."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest

from tests.conftest import GatewayFactory
from tests.support import ADMIN_TOKEN, Certs, get, session
from ztgateway.app import Gateway
from ztgateway.dev.tokens import issue_token


def tok(certs: Certs, **kw: Any) -> str:
    kw.setdefault("sub", "alice")
    return issue_token(certs.issuer_key, **kw)


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def forged(header: dict[str, Any], claims: dict[str, Any] | None = None, sig: str = "") -> str:
    now = int(time.time())
    claims = claims or {
        "iss": "https://ztgateway.dev/issuer",
        "aud": "ztgateway",
        "sub": "alice",
        "iat": now,
        "exp": now + 300,
    }
    return f"{b64(header)}.{b64(claims)}.{sig}"


async def test_token_route_without_token_is_401_with_a_bearer_challenge(
    gateway: Gateway, certs: Certs
) -> None:
    reply = await get(gateway, certs, "/api/echo")
    status, headers, body = reply.status, reply.headers, reply.json()
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="ztgateway"'
    assert body["reason"] == "token-required"
    assert headers["Content-Type"].startswith("application/problem+json")


async def test_valid_token_reaches_the_app_with_identity_and_a_verifiable_assertion(
    gateway: Gateway, certs: Certs
) -> None:
    reply = await get(
        gateway, certs, "/api/echo", tok(certs, groups=["eng"], email="alice@corp.test")
    )
    status, body = reply.status, reply.json()
    assert status == 200
    seen = body["headers_map"]
    assert seen["x-forwarded-user"] == "alice"
    assert seen["x-forwarded-email"] == "alice@corp.test"
    assert seen["x-forwarded-groups"] == "eng"
    assert "authorization" not in seen, "the client's token must not reach the app by default"
    reply = await get(gateway, certs, "/.ztgw/jwks.json")
    jwks = reply.json()
    key = jwt.PyJWK(jwks["keys"][0])
    claims = jwt.decode(seen["x-zt-assertion"], key, algorithms=["ES256"], audience="api")
    assert claims["sub"] == "alice" and claims["device_id"] == "alice-laptop"
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(seen["x-zt-assertion"], key, algorithms=["ES256"], audience="admin")


async def test_admin_route_needs_the_admins_group(gateway: Gateway, certs: Certs) -> None:
    reply = await get(gateway, certs, "/admin/echo", tok(certs))
    status, headers, body = reply.status, reply.headers, reply.json()
    assert (status, body["reason"]) == (403, "group-required")
    assert headers["X-ZT-Decision-Id"] == body["decision_id"]
    reply = await get(gateway, certs, "/admin/echo", tok(certs, groups=["admins"]))
    status, body = reply.status, reply.json()
    assert status == 200 and body["headers_map"]["x-forwarded-groups"] == "admins"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (forged({"alg": "none", "typ": "JWT"}), "token-algorithm-refused"),
        (forged({"alg": "NONE"}), "token-algorithm-refused"),
        (forged({"alg": "HS256"}, sig="c2lnbmF0dXJl"), "token-algorithm-refused"),
        (
            forged({"alg": "ES256", "jku": "https://evil.example/jwks.json"}, sig="AAAA"),
            "token-header-refused",
        ),
        ("not.a.jwt", "token-invalid"),
    ],
)
async def test_forged_tokens_are_refused_with_their_reason(
    gateway: Gateway, certs: Certs, token: str, reason: str
) -> None:
    reply = await get(gateway, certs, "/api/echo", token)
    status, headers, body = reply.status, reply.headers, reply.json()
    assert status == 401
    assert body["reason"] == reason
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert "headers_map" not in body


async def test_expired_token_is_refused(gateway: Gateway, certs: Certs) -> None:
    token = tok(certs, ttl=60, now=time.time() - 3600)
    reply = await get(gateway, certs, "/api/echo", token)
    status, body = reply.status, reply.json()
    assert (status, body["reason"]) == (401, "token-expired")


async def test_two_authorization_headers_are_refused(gateway: Gateway, certs: Certs) -> None:
    t = tok(certs)
    async with session(certs) as s:
        from multidict import CIMultiDict

        h: CIMultiDict[str] = CIMultiDict(
            [("Authorization", f"Bearer {t}"), ("Authorization", f"Bearer {t}")]
        )
        async with s.get(f"https://127.0.0.1:{gateway.port}/api/echo", headers=h) as r:
            assert r.status == 401
            assert (await r.json(content_type=None))["reason"] == "token-invalid"


async def test_oversized_tokens_are_refused_never_500(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory({"server": {"max_header_bytes": 65536}})
    reply = await get(gw, certs, "/api/echo", "a" * 20_000)
    status, body = reply.status, reply.json()
    assert (status, body["reason"]) == (401, "token-invalid")
    gw2 = await gateway_factory()
    async with session(certs) as s:
        async with s.get(
            f"https://127.0.0.1:{gw2.port}/api/echo",
            headers={"Authorization": "Bearer " + "a" * 100_000},
        ) as r:
            assert r.status == 431
            assert (await r.json(content_type=None))["reason"] == "header-too-large"


async def test_certificate_bound_token_must_match_the_presented_certificate(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory()
    alice_pem = certs.client("alice-laptop")[0]
    bound = tok(certs, bind_cert=alice_pem)
    assert (await get(gw, certs, "/api/echo", bound)).status == 200
    reply = await get(gw, certs, "/api/echo", bound, cert="bob-phone")
    status, body = reply.status, reply.json()
    assert (status, body["reason"]) == (401, "token-binding-mismatch")


async def test_route_requiring_bound_tokens_refuses_unbound_ones(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory(
        {
            "routes": [
                {
                    "name": "bound",
                    "prefix": "/",
                    "upstream": "demo",
                    "policy": {"require_token": True, "require_bound_token": True},
                }
            ]
        }
    )
    reply = await get(gw, certs, "/echo", tok(certs))
    status, body = reply.status, reply.json()
    assert (status, body["reason"]) == (401, "token-binding-required")
    bound = tok(certs, bind_cert=certs.client("alice-laptop")[0])
    assert (await get(gw, certs, "/echo", bound)).status == 200


async def test_authorization_is_forwarded_only_when_the_route_says_so(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory(
        {
            "routes": [
                {"name": "legacy", "prefix": "/", "upstream": "demo", "forward_authorization": True}
            ]
        }
    )
    reply = await get(gw, certs, "/echo", headers={"Authorization": "Basic YWxpY2U6cHc="})
    status, body = reply.status, reply.json()
    assert status == 200
    assert body["headers_map"]["authorization"] == "Basic YWxpY2U6cHc="


async def test_monitor_mode_forwards_and_audits_would_deny(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory(
        {
            "routes": [
                {
                    "name": "migr",
                    "prefix": "/",
                    "upstream": "demo",
                    "mode": "monitor",
                    "policy": {"users": ["bob"]},
                }
            ]
        }
    )
    reply = await get(gw, certs, "/echo")
    status, headers, body = reply.status, reply.headers, reply.json()
    assert status == 200 and body["headers_map"]["x-forwarded-user"] == "alice"
    await gw.audit.flush()
    events = [
        json.loads(line)
        for line in (gw.config.audit.jsonl or gw.config.audit.db).read_text().splitlines()
    ]
    event = next(e for e in events if e["decision_id"] == headers["X-ZT-Decision-Id"])
    assert event["result"]["monitor"] is True
    assert event["result"]["would_verdict"] == "deny"
    assert event["result"]["reason"] == "user-not-allowed"
    metrics = gw.metrics.render().decode()
    assert 'ztgw_monitor_would_deny_total{reason="user-not-allowed",route="migr"} 1.0' in metrics


async def test_refusals_are_audited_without_secrets(gateway: Gateway, certs: Certs) -> None:
    token = tok(certs)
    reply = await get(gateway, certs, "/admin/echo", token)
    status, headers = reply.status, reply.headers
    assert status == 403
    await gateway.audit.flush()
    text = (gateway.config.audit.jsonl or gateway.config.audit.db).read_text()
    assert token not in text
    event = next(json.loads(x) for x in text.splitlines() if headers["X-ZT-Decision-Id"] in x)
    assert "input.headers.authorization" in event["masked"]
    assert event["identity"]["user"] == "alice"


async def test_ops_decide_explains_a_request(gateway: Gateway, certs: Certs) -> None:
    import aiohttp

    body = {
        "method": "GET",
        "path": "/admin/x",
        "token": tok(certs),
        "cert_pem": certs.client("alice-laptop")[0].read_text(),
    }
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{gateway.ops_port}/decide", json=body, headers=admin) as r,
    ):
        assert r.status == 200
        out = await r.json()
    assert (
        out["verdict"] == "deny" and out["reason"] == "group-required" and out["route"] == "admin"
    )
    assert out["identity"]["user"] == "alice"
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{gateway.ops_port}/decide", data=b"[1", headers=admin) as r,
    ):
        assert r.status == 400
