"""The second factor over HTTP through a real gateway: who may step up or enrol, from where,
with what body (issue 18: M1, M7, L1, I2), and backup codes that work once however they race."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp
import pytest

from tests.conftest import GatewayFactory
from tests.e2e.test_signin import HTML, browser, hidden, session_cookie, sign_in
from tests.oidc_fixtures import SignInSetup
from tests.redis_server import RedisServer
from tests.support import Certs, client_ssl, metric_total
from ztgateway.app import Gateway
from ztgateway.credentials.totp import totp_code
from ztgateway.dev.tokens import issue_token

API = {"name": "api", "prefix": "/", "upstream": "demo", "policy": {"require_token": True}}


def client(certs: Certs, cert: str = "alice-laptop") -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(ssl=client_ssl(certs, cert))
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())


async def post(
    gw: Gateway, certs: Certs, path: str, *, cert: str = "alice-laptop", **kw: Any
) -> tuple[int, dict[str, Any]]:
    async with client(certs, cert) as s, s.post(f"https://127.0.0.1:{gw.port}{path}", **kw) as r:
        body = await r.json(content_type=None) if "json" in r.content_type else {}
        return r.status, body


async def verify(
    gw: Gateway, certs: Certs, token: str, code: str, cert: str = "alice-laptop"
) -> tuple[int, dict[str, Any]]:
    """POST /.ztgw/mfa/verify as an API client with its bearer token."""
    return await post(
        gw,
        certs,
        "/.ztgw/mfa/verify",
        cert=cert,
        json={"code": code},
        headers={"Authorization": f"Bearer {token}"},
    )


async def failures(gw: Gateway, user: str = "alice") -> int:
    return await gw.store.failures_async(f"mfa:{user}", time.time(), 3600)


CROSS_SITE: list[dict[str, Any]] = [
    # fetch(..., {mode: "no-cors", body: '{"code":"000000"}'}): text/plain, a "simple" request
    {"data": b'{"code":"000000"}', "headers": {"Content-Type": "text/plain"}},
    {"data": b'{"code":"000000"}', "headers": {}},  # a Blob without a type: no Content-Type
    {"data": {"code": "000000"}},  # an HTML form
    {"json": {"code": "000000"}, "headers": {"Origin": "https://evil.example"}},
    {"json": {"code": "000000"}, "headers": {"Sec-Fetch-Site": "cross-site"}},
    {"json": {"code": "000000"}, "headers": {"Sec-Fetch-Site": "same-site"}},
    {"json": {"code": "000000"}, "headers": {"Origin": "null"}},
]


@pytest.mark.parametrize("request_kw", CROSS_SITE)
async def test_another_site_cannot_burn_someones_attempts(
    gateway_factory: GatewayFactory, certs: Certs, request_kw: dict[str, Any]
) -> None:
    # Issue 18 (L1): five cross-site text/plain posts used to lock the visitor's MFA for 15
    # minutes, with the certificate alone as the identity.
    gw = await gateway_factory({"mfa": {"max_failures": 3}})
    await gw.mfa.enroll("alice")
    for _ in range(6):
        status, body = await post(gw, certs, "/.ztgw/mfa/verify", **request_kw)
        assert (status, body["reason"]) in (
            (415, "media-type-unsupported"),
            (403, "origin-mismatch"),
        )
    assert await failures(gw) == 0
    user = gw.store.user("alice")
    assert user is not None and user.mfa_locked_until is None
    # The same certificate from a page of this gateway, or from a program, still steps up.
    for headers in (
        {"Sec-Fetch-Site": "same-origin", "Origin": f"https://127.0.0.1:{gw.port}"},
        {"Sec-Fetch-Site": "same-origin", "Origin": "null"},
        {},
    ):
        status, body = await post(
            gw, certs, "/.ztgw/mfa/verify", json={"code": "000000"}, headers=headers
        )
        assert (status, body["reason"]) == (401, "mfa-invalid")


async def test_a_backup_code_works_once_when_sent_many_times_at_once(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    # Issue 18 (M7): one backup code was accepted three times in parallel.
    gw = await gateway_factory({"routes": [API]})
    code = (await gw.mfa.enroll("alice")).backup_codes[0]
    token = issue_token(certs.issuer_key, sub="alice")
    # max_failures at once: more would also lock the user out
    results = await asyncio.gather(*[verify(gw, certs, token, code) for _ in range(5)])
    ok = [body for status, body in results if status == 200]
    assert len(ok) == 1 and ok[0]["method"] == "backup"
    refused = [body["reason"] for status, body in results if status != 200]
    assert refused == ["mfa-replayed"] * 4
    user = gw.store.user("alice")
    assert user is not None and len(user.backup_codes) == 9


@pytest.mark.parametrize("shared", ["sqlite", "redis"])
async def test_a_backup_code_works_once_across_workers_and_replicas(
    gateway_factory: GatewayFactory, certs: Certs, redis_server: RedisServer, shared: str
) -> None:
    """Two gateways on one store: one SQLite file (workers = N on a host), or one Redis."""
    over: dict[str, Any] = {"routes": [API]}
    if shared == "redis":
        over["store"] = {"url": redis_server.url}
    a, b = await gateway_factory(over), await gateway_factory(over)
    code = (await a.mfa.enroll("alice")).backup_codes[3]
    await b.store.sync()
    token = issue_token(certs.issuer_key, sub="alice")
    results = await asyncio.gather(*[verify(gw, certs, token, code) for gw in (a, b, a, b, a, b)])
    assert [status for status, _ in results].count(200) == 1, results


async def test_wrong_backup_codes_are_counted_and_capped_before_the_expensive_check(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    # Issue 18 (M7): each wrong attempt cost 0.38 CPU-s of scrypt before it was counted, and
    # nothing capped how many ran at once.
    gw = await gateway_factory({"routes": [API], "mfa": {"max_failures": 5}})
    await gw.mfa.enroll("alice")
    bob_secret = (await gw.mfa.enroll("bob")).secret
    token = issue_token(certs.issuer_key, sub="alice")
    flood = [verify(gw, certs, token, "aaaa-bbbb-cccc") for _ in range(30)]
    bob_token = issue_token(certs.issuer_key, sub="bob")
    bob = verify(gw, certs, bob_token, totp_code(bob_secret, now=time.time()), cert="bob-phone")
    *results, bob_result = await asyncio.gather(*flood, bob)
    reasons = [body["reason"] for _, body in results]
    assert set(reasons) <= {"mfa-invalid", "mfa-locked", "rate-limited"}, reasons
    assert "mfa-locked" in reasons
    checks = metric_total(gw, "ztgw_mfa_backup_checks_total")
    assert 1 <= checks <= 5, f"{checks} scrypt checks ran for 30 attempts"
    assert gw.mfa.expensive.peak <= 2
    assert bob_result[0] == 200, "another user is served meanwhile"


async def test_a_cookie_client_stepping_up_through_the_api_gets_its_new_cookie(
    signin: SignInSetup, certs: Certs
) -> None:
    # Issue 18 (I2): the rotated cookie was thrown away, so the client had revoked its own
    # session by stepping up.
    gw = signin.gateway
    secret = (await gw.mfa.enroll("alice")).secret
    async with browser(certs) as s:
        assert (await sign_in(s, signin)).status == 303
        old = session_cookie(s)
        r = await s.post(
            signin.origin + "/.ztgw/mfa/verify", json={"code": totp_code(secret, now=time.time())}
        )
        assert r.status == 200 and (await r.json())["method"] == "totp"
        new = session_cookie(s)
        assert new != old
        r = await s.get(signin.origin + "/admin/echo", headers={"Accept": "application/json"})
        assert r.status == 200, "the new session carries the step-up"
    async with client(certs) as other:
        r = await other.get(
            signin.origin + "/echo",
            headers={"Accept": "application/json", "Cookie": f"__Host-ztgw-session={old}"},
        )
        assert (r.status, (await r.json())["reason"]) == (401, "session-terminated")


async def test_only_a_signed_in_person_may_enrol(signin: SignInSetup, certs: Certs) -> None:
    # Issue 18 (M1): the certificate alone (what a cross-site <img> carries) enrolled the user
    # on a GET.
    gw = signin.gateway
    enrol = signin.origin + "/.ztgw/mfa/enroll"
    async with client(certs) as s:
        r = await s.get(enrol + "?rd=/admin/", headers=HTML, allow_redirects=False)
        assert r.status == 303
        assert r.headers["Location"] == "/.ztgw/login?rd=/.ztgw/mfa/enroll%3Frd%3D/admin/"
        r = await s.get(enrol)
        assert (r.status, (await r.json())["reason"]) == (401, "identity-unauthenticated")
        token = issue_token(certs.issuer_key, sub="alice")
        r = await s.get(enrol, headers={"Authorization": f"Bearer {token}"})
        assert (r.status, (await r.json())["reason"]) == (401, "identity-unauthenticated")
        for data, headers, reason in (
            ({"action": "start", "rd": "/"}, {}, "csrf-invalid"),
            ({"action": "start"}, {"Sec-Fetch-Site": "cross-site"}, "origin-mismatch"),
        ):
            r = await s.post(enrol, data=data, headers=headers)
            assert (await r.json())["reason"] == reason
    assert not gw.mfa.enrolled("alice") and gw.mfa.pending("alice", time.time()) is None
    async with browser(certs) as s:
        assert (await sign_in(s, signin)).status == 303
        page = await (await s.get(enrol, headers=HTML)).text()
        form = {"csrf": hidden(page, "csrf"), "rd": "/"}
        r = await s.post(enrol, data={**form, "action": "start"}, headers=HTML)
        assert r.status == 200 and gw.mfa.pending("alice", time.time()) is not None
        r = await s.post(enrol, data={**form, "action": "frobnicate"})
        assert (r.status, (await r.json())["reason"]) == (400, "request-invalid")


async def test_an_enrolled_person_replaces_the_factor_only_with_the_current_one(
    signin: SignInSetup, certs: Certs
) -> None:
    gw = signin.gateway
    old = await gw.mfa.enroll("alice")
    enrol = signin.origin + "/.ztgw/mfa/enroll"
    async with browser(certs) as s:
        assert (await sign_in(s, signin)).status == 303
        page = await (await s.get(enrol, headers=HTML)).text()
        form = {"csrf": hidden(page, "csrf"), "rd": "/"}
        r = await s.post(enrol, data={**form, "action": "start"})
        assert (r.status, (await r.json())["reason"]) == (409, "mfa-enrolment-exists")
        r = await s.post(enrol, data={**form, "action": "confirm", "code": "123456"})
        assert (r.status, (await r.json())["reason"]) == (409, "mfa-enrolment-expired")
        r = await s.post(enrol, data={**form, "action": "replace", "code": "000000"})
        assert (r.status, (await r.json())["reason"]) == (401, "mfa-invalid")
        assert gw.mfa.pending("alice", time.time()) is None
        # A backup code is a current factor too (the phone is lost).
        r = await s.post(
            enrol,
            data={**form, "action": "replace", "code": old.backup_codes[0]},
            headers=HTML,
        )
        page = await r.text()
        new = re.search(r'by hand: <code class="key" aria-label="([A-Z2-7]+)"', page)
        assert new is not None and new.group(1) != old.secret
        assert gw.mfa.enrolled("alice"), "the old factor holds until the new one is confirmed"
    assert await gw.mfa.verify("alice", totp_code(old.secret, now=time.time() + 30)) == "totp"


async def test_without_a_sign_in_provider_it_enrols_people_through_it(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory()
    async with client(certs) as s:
        r = await s.get(f"https://127.0.0.1:{gw.port}/.ztgw/mfa/enroll", headers=HTML)
        assert r.status == 401 and "users mfa enroll" in await r.text()
    assert not gw.mfa.enrolled("alice")


async def test_a_user_without_a_second_factor_is_told_so(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory()
    status, body = await post(gw, certs, "/.ztgw/mfa/verify", json={"code": "123456"})
    assert (status, body["reason"]) == (403, "mfa-not-enrolled")


async def test_a_changed_mfa_key_fails_closed_with_a_clear_refusal(
    gateway_factory: GatewayFactory, certs: Certs, tmp_path: Any
) -> None:
    # Issue 18 (I4): a sealed secret that no longer opens raised into a 503 stage-error.
    a = await gateway_factory()
    await a.mfa.enroll("alice")
    b = await gateway_factory({"mfa": {"key_file": str(tmp_path / "another-mfa.key")}})
    status, body = await post(b, certs, "/.ztgw/mfa/verify", json={"code": "123456"})
    assert (status, body["reason"]) == (503, "service-unavailable")
