"""Browser sign-in with OIDC through the gateway (HTTP level; Chromium runs in test_browser.py)."""

from __future__ import annotations

import html
import re
import time
from urllib.parse import parse_qs, urlsplit

import aiohttp
import jwt as pyjwt
import pytest

from tests.oidc_fixtures import PASSWORDS, SignInSetup, form_action, form_fields
from tests.support import Certs, client_ssl
from ztgateway.credentials.totp import totp_code
from ztgateway.store.base import ID_TOKEN

HTML = {"Accept": "text/html"}


def browser(certs: Certs, cert: str = "alice-laptop") -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client_ssl(certs, cert)),
        cookie_jar=aiohttp.CookieJar(unsafe=True),
    )


async def sign_in(
    s: aiohttp.ClientSession, setup: SignInSetup, user: str = "alice", path: str = "/echo"
) -> aiohttp.ClientResponse:
    origin = setup.origin
    r = await s.get(origin + path, headers=HTML, allow_redirects=False)
    assert r.status == 303, await r.text()
    login = r.headers["Location"]
    assert login.startswith("/.ztgw/login?rd=")
    # One provider: the sign-in page goes straight to it (no chooser).
    r = await s.get(origin + login, headers=HTML, allow_redirects=False)
    assert r.status == 303, await r.text()
    start = r.headers["Location"]
    assert start.startswith("/.ztgw/login/start?provider=")
    r = await s.get(origin + start, allow_redirects=False)
    assert r.status == 303
    authorize = r.headers["Location"]
    assert authorize.startswith(setup.issuer)
    callback = await idp_login(s, authorize, user)
    assert callback.startswith(origin + "/.ztgw/oidc/callback")
    r = await s.get(callback, headers=HTML, allow_redirects=False)
    return r


async def idp_login(s: aiohttp.ClientSession, authorize: str, user: str = "alice") -> str:
    """Sign in at the dev IdP's form; the callback URL it sends the browser back to."""
    page = await (await s.get(authorize)).text()
    r = await s.post(
        form_action(authorize, page),
        data={**form_fields(page), "username": user, "password": PASSWORDS[user]},
        allow_redirects=False,
    )
    assert r.status == 303, await r.text()
    return r.headers["Location"]


def session_cookie(s: aiohttp.ClientSession) -> str:
    return next(c for c in s.cookie_jar if c.key == "__Host-ztgw-session").value


async def sign_out(s: aiohttp.ClientSession, setup: SignInSetup) -> str:
    """Confirm the sign-out form; where the gateway sends the browser (the provider's logout)."""
    page = await (await s.get(setup.origin + "/.ztgw/logout", headers=HTML)).text()
    csrf = page.split('name="csrf" value="')[1].split('"')[0]
    r = await s.post(setup.origin + "/.ztgw/logout", data={"csrf": csrf}, allow_redirects=False)
    assert r.status == 303
    return r.headers["Location"]


async def assert_provider_logout_with_hint(
    s: aiohttp.ClientSession, setup: SignInSetup, location: str
) -> None:
    """RP-initiated logout with the ID token the sign-in received as `id_token_hint`, which the
    provider accepts (it sends the browser back to the gateway's signed-out page)."""
    assert location.startswith(setup.issuer) and "end_session" in location
    params = parse_qs(urlsplit(location).query)
    assert params["post_logout_redirect_uri"] == [setup.origin + "/.ztgw/signed-out"]
    (hint,) = params["id_token_hint"]
    claims = pyjwt.decode(hint, options={"verify_signature": False})
    assert (claims["iss"], claims["aud"], claims["sub"]) == (setup.issuer, "ztgateway", "alice")
    r = await s.get(location, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == setup.origin + "/.ztgw/signed-out"


def sessions_hold_no_id_token(setup: SignInSetup) -> bool:
    """Issue 9: the ID token is in the store, never in the sessions in memory."""
    sessions = setup.gateway.store.sessions("alice")
    return bool(sessions) and all(ID_TOKEN not in s.extra for s in sessions)


async def test_a_person_signs_in_and_reaches_the_app_as_themselves(
    signin: SignInSetup, certs: Certs
) -> None:
    async with browser(certs) as s:
        r = await sign_in(s, signin)
        assert r.status == 303 and r.headers["Location"] == "/echo"
        assert "__Host-ztgw-session=" in r.headers.getall("Set-Cookie", [""])[-1]
        r = await s.get(
            signin.origin + "/echo", headers={"Accept": "application/json, text/html;q=0.5"}
        )
        assert r.status == 200
        seen = (await r.json())["headers_map"]
        assert seen["x-forwarded-user"] == "alice"
        assert seen["x-forwarded-groups"] == "admins,eng"
        assert "__host-ztgw-session" not in seen.get("cookie", "").lower()
        r = await s.get(signin.origin + "/.ztgw/whoami", headers=HTML)
        page = await r.text()
        assert "alice" in page and "session" in page
    assert (
        'ztgw_logins_total{provider="dev",result="success"} 1.0'
        in signin.gateway.metrics.render().decode()
    )


async def test_the_session_cookie_is_host_prefixed_and_ends_with_the_browser(
    signin: SignInSetup, certs: Certs
) -> None:
    async with browser(certs) as s:
        r = await sign_in(s, signin)
        cookie = next(
            c for c in r.headers.getall("Set-Cookie") if c.startswith("__Host-ztgw-session=")
        )
        for attr in ("Path=/", "Secure", "HttpOnly", "SameSite=Lax"):
            assert attr in cookie
        # Issue 18 (I6): no Max-Age (nor Expires): a session cookie, gone when the browser
        # closes; the gateway's idle and absolute timeouts hold on the server regardless
        # (test_session_lifetime.py).
        assert "Domain" not in cookie and "Max-Age" not in cookie and "Expires" not in cookie


@pytest.mark.parametrize("signin", [{"sessions": {"persistent_cookie": True}}], indirect=True)
async def test_a_persistent_cookie_is_an_explicit_choice(signin: SignInSetup, certs: Certs) -> None:
    async with browser(certs) as s:
        r = await sign_in(s, signin)
        cookie = next(
            c for c in r.headers.getall("Set-Cookie") if c.startswith("__Host-ztgw-session=")
        )
        assert "Max-Age=43200" in cookie


async def test_machines_still_use_their_certificate_on_a_browsers_only_login_route(
    signin: SignInSetup, certs: Certs
) -> None:
    async with browser(certs) as s:
        r = await s.get(signin.origin + "/echo")
        assert r.status == 200
        assert (await r.json())["headers_map"]["x-forwarded-user"] == "alice"


async def test_callback_with_a_wrong_or_replayed_state_is_refused(
    signin: SignInSetup, certs: Certs
) -> None:
    async with browser(certs) as s:
        r = await s.get(signin.origin + "/.ztgw/oidc/callback?state=forged&code=abc", headers=HTML)
        assert r.status == 401
        assert "state-invalid" in await r.text()
        r = await sign_in(s, signin)
        assert r.status == 303
        # The same callback URL again (replayed state and code): refused.
        replay = r.url
        r2 = await s.get(str(replay), headers=HTML, allow_redirects=False)
        assert r2.status == 401


async def test_login_redirect_target_stays_on_this_origin(
    signin: SignInSetup, certs: Certs
) -> None:
    async with browser(certs) as s:
        r = await s.get(
            signin.origin + "/.ztgw/login/start?rd=//evil.example/x", allow_redirects=False
        )
        callback = await idp_login(s, r.headers["Location"])
        r = await s.get(callback, headers=HTML, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/"


async def test_sign_out_ends_the_session_and_the_next_visit_asks_to_sign_in(
    signin: SignInSetup, certs: Certs
) -> None:
    async with browser(certs) as s:
        assert (await sign_in(s, signin)).status == 303
        page = await (await s.get(signin.origin + "/.ztgw/logout", headers=HTML)).text()
        csrf = page.split('name="csrf" value="')[1].split('"')[0]
        r = await s.post(signin.origin + "/.ztgw/logout", data={}, allow_redirects=False)
        assert r.status == 400, "no CSRF token, no sign-out"
        assert sessions_hold_no_id_token(signin)
        r = await s.post(
            signin.origin + "/.ztgw/logout", data={"csrf": csrf}, allow_redirects=False
        )
        assert r.status == 303
        await assert_provider_logout_with_hint(s, signin, r.headers["Location"])
        r = await s.get(signin.origin + "/echo", headers=HTML, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"].startswith("/.ztgw/login")


async def test_a_terminated_session_bounces_to_sign_in(signin: SignInSetup, certs: Certs) -> None:
    async with browser(certs) as s:
        assert (await sign_in(s, signin)).status == 303
        for sess in signin.gateway.store.sessions("alice"):
            await signin.gateway.store.revoke_session(sess.session_id, "test", 0.0 + 1)
        r = await s.get(signin.origin + "/echo", headers=HTML, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"].startswith("/.ztgw/login")


async def test_session_cookie_from_another_device_is_refused(
    signin: SignInSetup, certs: Certs
) -> None:
    async with browser(certs) as s:
        assert (await sign_in(s, signin)).status == 303
        cookie = session_cookie(s)
    async with browser(certs, "bob-phone") as s:
        r = await s.get(
            signin.origin + "/echo",
            headers={"Cookie": f"__Host-ztgw-session={cookie}"},
            allow_redirects=False,
        )
        assert r.status == 403
        assert (await r.json(content_type=None))["reason"] == "device-owner-mismatch"


@pytest.mark.parametrize("claim_user", ["alice"])
async def test_html_in_claims_is_escaped_on_every_page(
    signin: SignInSetup, certs: Certs, claim_user: str
) -> None:
    async with browser(certs) as s:
        assert (await sign_in(s, signin)).status == 303
        page = await (await s.get(signin.origin + "/.ztgw/whoami", headers=HTML)).text()
        assert "<b>" not in page


def hidden(page: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert match is not None, (name, page)
    return html.unescape(match.group(1))


async def test_signed_in_person_enrols_totp_and_steps_up_for_the_admin_route(
    signin: SignInSetup, certs: Certs
) -> None:
    # Issue 18 (M1): enrolment is the signed-in person's POST with a CSRF token, pending (the
    # same secret on every GET) until a code from it confirms it. This test used to read the
    # secret off the first GET, which enrolled the user by itself.
    origin = signin.origin
    async with browser(certs) as s:
        r = await sign_in(s, signin, path="/admin/echo?x=1")
        assert r.status == 303 and r.headers["Location"] == "/admin/echo?x=1"
        r = await s.get(origin + "/admin/echo?x=1", headers=HTML, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/.ztgw/mfa?rd=/admin/echo%3Fx%3D1"
        r = await s.get(origin + r.headers["Location"], headers=HTML, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"].startswith("/.ztgw/mfa/enroll")
        enrol = origin + r.headers["Location"]
        page = await (await s.get(enrol, headers=HTML)).text()
        assert "<svg" not in page and not signin.gateway.mfa.enrolled("alice")
        csrf, rd = hidden(page, "csrf"), hidden(page, "rd")
        assert rd == "/admin/echo?x=1"
        r = await s.post(
            origin + "/.ztgw/mfa/enroll",
            data={"csrf": csrf, "rd": rd, "action": "start"},
            headers=HTML,
            allow_redirects=False,
        )
        assert r.status == 303
        page = await (await s.get(origin + r.headers["Location"], headers=HTML)).text()
        secret = re.search(r"enter this key by hand: <code>([A-Z2-7]+)</code>", page)
        assert secret is not None and "<svg" in page
        again = await (await s.get(enrol, headers=HTML)).text()
        assert secret.group(1) in again, "the same pending secret on every GET"
        csrf = hidden(page, "csrf")
        confirm = {"csrf": csrf, "rd": rd, "action": "confirm"}
        r = await s.post(
            origin + "/.ztgw/mfa/enroll", data={**confirm, "code": "000000"}, headers=HTML
        )
        assert r.status == 401 and "did not work" in await r.text()
        assert secret.group(1) in await r.text(), "a wrong code keeps the QR code"
        code = totp_code(secret.group(1), now=time.time())
        r = await s.post(origin + "/.ztgw/mfa/enroll", data={**confirm, "csrf": "", "code": code})
        assert (r.status, (await r.json(content_type=None))["reason"]) == (400, "csrf-invalid")
        assert not signin.gateway.mfa.enrolled("alice")
        r = await s.post(origin + "/.ztgw/mfa/enroll", data={**confirm, "code": code})
        page = await r.text()
        assert r.status == 200 and "Your backup codes" in page
        assert len(re.findall(r"<li><code>[a-z2-9-]{14}</code></li>", page)) == 10
        assert signin.gateway.mfa.enrolled("alice")
        # Confirming was a step-up: the admin route lets alice in with the rotated session.
        r = await s.get(origin + "/admin/echo?x=1", headers={"Accept": "application/json"})
        assert r.status == 200, await r.text()
        assert (await r.json())["headers_map"]["x-forwarded-user"] == "alice"
        # The step-up gave the browser a new session: signing out of it still ends the
        # provider's session with the ID token of the sign-in.
        assert sessions_hold_no_id_token(signin)
        await assert_provider_logout_with_hint(s, signin, await sign_out(s, signin))
