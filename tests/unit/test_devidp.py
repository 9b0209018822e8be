"""The development OpenID Provider, driven over real HTTP on 127.0.0.1 like a browser and a client.

The "browser" is an aiohttp session with a cookie jar (unsafe=True: cookies for an IP address);
the "client" posts to the token endpoint itself. The provider's clock is injected so the 60 s code
lifetime is checked exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import os
import re
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import jwt as pyjwt
import pytest
from aiohttp import web

from tests.support import CallableClock
from ztgateway.cli import main
from ztgateway.commands.dev_idp import register
from ztgateway.configreader import ConfigError
from ztgateway.dev.idp import BANNER, CODE_TTL, DEVIDP_KEY, create_devidp_app, start_devidp
from ztgateway.dev.idp_users import hash_password, load_devidp_file, verify_password

REPO = Path(__file__).resolve().parents[2]
CLIENT_ID = "gw"
CLIENT_SECRET = "s3cret:with/odd+chars&more"
OTHER_CLIENT_ID = "other"
OTHER_SECRET = "other-secret"
REDIRECT_URI = "https://gw.example.test/.ztgw/oidc/callback"
OTHER_REDIRECT_URI = "https://other.example.test/cb"
LOGOUT_URI = "https://gw.example.test/.ztgw/signed-out"
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}


def toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_users_file(path: Path, *, extra: str = "") -> Path:
    """A users file with cheap scrypt hashes (ln=10) so the tests stay fast."""
    alice = hash_password(PASSWORDS["alice"], log_n=10)
    bob = hash_password(PASSWORDS["bob"], log_n=10)
    path.write_text(
        f"""
[users.alice]
password_hash = {toml_str(alice)}
name = "Alice <b>Example</b>"
email = "alice@example.test"
groups = ["admins", "eng"]

[users.bob]
password_hash = {toml_str(bob)}
groups = ["eng"]

[clients.gw]
client_id = {toml_str(CLIENT_ID)}
client_secret = {toml_str(CLIENT_SECRET)}
redirect_uris = [{toml_str(REDIRECT_URI)}]
post_logout_redirect_uris = [{toml_str(LOGOUT_URI)}]

[clients.other]
client_id = {toml_str(OTHER_CLIENT_ID)}
client_secret = {toml_str(OTHER_SECRET)}
redirect_uris = [{toml_str(OTHER_REDIRECT_URI)}, {toml_str(REDIRECT_URI)}]
{extra}
""",
        encoding="utf-8",
    )
    return path


@dataclass
class IdP:
    issuer: str
    port: int
    clock: CallableClock
    app: web.Application

    def url(self, path: str) -> str:
        return self.issuer + path


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    return write_users_file(tmp_path / "users.toml")


@pytest.fixture
async def idp(users_file: Path) -> AsyncIterator[IdP]:
    clock = CallableClock()
    runner, port, issuer = await start_devidp("127.0.0.1", 0, users_file, clock=clock)
    yield IdP(issuer=issuer, port=port, clock=clock, app=runner.app)
    await runner.cleanup()


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge.rstrip(b"=").decode()


def authorize_url(idp_issuer: str, **overrides: str | None) -> str:
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "scope": "openid email profile",
        "state": "st-123",
        "nonce": "n-456",
        "code_challenge": pkce_pair()[1],
        "code_challenge_method": "S256",
    }
    params.update(overrides)
    query = {k: v for k, v in params.items() if v is not None}
    return f"{idp_issuer}/authorize?{urlencode(query)}"


def form_fields(page: str) -> dict[str, str]:
    fields = dict(re.findall(r'name="(request_id|csrf_token)" value="([^"]*)"', page))
    assert set(fields) == {"request_id", "csrf_token"}, page
    return fields


def login_action(authorize: str, page: str) -> str:
    match = re.search(r'<form method="post" action="([^"]+)"', page)
    assert match is not None, page
    parts = urlsplit(authorize)
    return f"{parts.scheme}://{parts.netloc}{match.group(1)}"


async def login_form(browser: aiohttp.ClientSession, url: str) -> str:
    async with browser.get(url) as response:
        return await response.text()


async def post_login(
    browser: aiohttp.ClientSession, url: str, page: str, username: str, password: str
) -> tuple[int, str | None, str]:
    """Post `page`'s login form: (status, Location, the page answered)."""
    async with browser.post(
        login_action(url, page),
        data={**form_fields(page), "username": username, "password": password},
        allow_redirects=False,
    ) as response:
        return response.status, response.headers.get("Location"), await response.text()


async def browser_login(
    browser: aiohttp.ClientSession, url: str, username: str, password: str
) -> dict[str, str]:
    """Open the authorization URL, post the login form, and return the callback's query.

    Asserts the provider answered with a redirect; the callback itself is never fetched.
    """
    async with browser.get(url, allow_redirects=False) as response:
        page = await response.text()
        if response.status in (302, 303):
            return callback_query(response.headers["Location"])
        assert response.status == 200, page
    async with browser.post(
        login_action(url, page),
        data={**form_fields(page), "username": username, "password": password},
        allow_redirects=False,
    ) as response:
        assert response.status == 303, await response.text()
        return callback_query(response.headers["Location"])


def callback_query(location: str) -> dict[str, str]:
    parts = urlsplit(location)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query["_target"] = f"{parts.scheme}://{parts.netloc}{parts.path}"
    return query


def basic(client_id: str, secret: str) -> str:
    # RFC 6749 §2.3.1: form-urlencode, then Basic.
    pair = f"{urlencode({'': client_id})[1:]}:{urlencode({'': secret})[1:]}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


async def exchange(
    session: aiohttp.ClientSession,
    idp: IdP,
    code: str,
    verifier: str,
    *,
    redirect_uri: str = REDIRECT_URI,
    auth: tuple[str, str] | None = (CLIENT_ID, CLIENT_SECRET),
    post_auth: tuple[str, str] | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
    }
    headers = {}
    if auth is not None:
        headers["Authorization"] = basic(*auth)
    if post_auth is not None:
        form["client_id"], form["client_secret"] = post_auth
    async with session.post(idp.url("/token"), data=form, headers=headers) as response:
        return response.status, await response.json(), dict(response.headers)


async def code_for(
    browser: aiohttp.ClientSession, idp: IdP, user: str = "alice", **overrides: str | None
) -> tuple[str, str]:
    verifier, challenge = pkce_pair()
    query = await browser_login(
        browser,
        authorize_url(idp.issuer, code_challenge=challenge, **overrides),
        user,
        PASSWORDS[user],
    )
    return query["code"], verifier


async def jwks_keys(session: aiohttp.ClientSession, idp: IdP) -> pyjwt.PyJWKSet:
    async with session.get(idp.url("/jwks.json")) as response:
        return pyjwt.PyJWKSet.from_dict(await response.json())


# -- discovery and keys ----------------------------------------------------------------------


async def test_discovery_names_exactly_its_issuer_and_requires_pkce_s256(
    idp: IdP, browser: aiohttp.ClientSession
) -> None:
    async with browser.get(idp.url("/.well-known/openid-configuration")) as response:
        assert response.status == 200
        doc = await response.json()
    assert idp.issuer == f"http://127.0.0.1:{idp.port}"
    assert doc["issuer"] == idp.issuer
    for name, path in [
        ("authorization_endpoint", "/authorize"),
        ("token_endpoint", "/token"),
        ("userinfo_endpoint", "/userinfo"),
        ("jwks_uri", "/jwks.json"),
        ("end_session_endpoint", "/end_session"),
    ]:
        assert doc[name] == idp.url(path)
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["id_token_signing_alg_values_supported"] == ["ES256"]
    assert doc["response_types_supported"] == ["code"]
    keys = await jwks_keys(browser, idp)
    assert len(keys.keys) == 1
    assert keys.keys[0].key_id == idp.app[DEVIDP_KEY].kid
    assert keys.keys[0].algorithm_name == "ES256"


# -- the login page --------------------------------------------------------------------------


async def test_login_form_is_labelled_development_only_and_carries_a_csrf_token(
    idp: IdP, browser: aiohttp.ClientSession
) -> None:
    async with browser.get(authorize_url(idp.issuer), allow_redirects=False) as response:
        assert response.status == 200
        page = await response.text()
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        assert "script-src" not in response.headers["Content-Security-Policy"]
        assert response.headers["Cache-Control"] == "no-store"
    assert BANNER in page
    assert 'type="password"' in page
    fields = form_fields(page)
    assert len(fields["csrf_token"]) >= 43
    assert any(c.key == "devidp-csrf" for c in browser.cookie_jar)


async def test_every_page_even_errors_says_development_only(
    idp: IdP, browser: aiohttp.ClientSession
) -> None:
    for url in (
        idp.url("/"),
        authorize_url(idp.issuer, client_id="nobody"),
        idp.url("/end_session"),
    ):
        async with browser.get(url, allow_redirects=False) as response:
            assert BANNER in await response.text(), url


async def test_wrong_password_shows_the_form_again_and_issues_no_code(
    idp: IdP, browser: aiohttp.ClientSession
) -> None:
    url = authorize_url(idp.issuer)
    page = await login_form(browser, url)
    status, location, again = await post_login(browser, url, page, "alice", "wrong")
    assert (status, location) == (401, None)
    assert "Wrong username or password." in again
    # The same attempt can still succeed with the right password.
    status, location, _ = await post_login(browser, url, again, "alice", PASSWORDS["alice"])
    assert status == 303 and location is not None
    assert "code" in callback_query(location)


async def test_unknown_user_gets_the_same_answer_and_html_is_escaped(
    idp: IdP, browser: aiohttp.ClientSession
) -> None:
    url = authorize_url(idp.issuer)
    page = await login_form(browser, url)
    status, _, again = await post_login(browser, url, page, '"><script>alert(1)</script>', "x")
    assert status == 401
    assert "Wrong username or password." in again
    assert "<script>" not in again
    assert "&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in again


async def test_too_many_wrong_passwords_end_the_attempt(
    idp: IdP, browser: aiohttp.ClientSession
) -> None:
    url = authorize_url(idp.issuer)
    page = await login_form(browser, url)
    statuses = [(await post_login(browser, url, page, "alice", "nope"))[0] for _ in range(5)]
    assert statuses == [401, 401, 401, 401, 429]
    status, location, _ = await post_login(browser, url, page, "alice", PASSWORDS["alice"])
    assert (status, location) == (400, None)


async def test_login_post_without_csrf_token_or_from_another_browser_is_refused(
    idp: IdP, browser: aiohttp.ClientSession
) -> None:
    url = authorize_url(idp.issuer)
    async with browser.get(url) as response:
        page = await response.text()
    fields = form_fields(page)
    creds = {"username": "alice", "password": PASSWORDS["alice"]}
    async with browser.post(
        login_action(url, page),
        data={"request_id": fields["request_id"], **creds},
        allow_redirects=False,
    ) as response:
        assert response.status == 403
        assert "Location" not in response.headers
    # Login CSRF: the attacker's page posts a valid-looking form, but the victim's browser has
    # another (or no) binding cookie.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        async with other.post(
            login_action(url, page), data={**fields, **creds}, allow_redirects=False
        ) as response:
            assert response.status == 403
    # The real browser still completes the attempt.
    async with browser.post(
        login_action(url, page), data={**fields, **creds}, allow_redirects=False
    ) as response:
        assert response.status == 303


# -- authorization request checks ------------------------------------------------------------


async def test_pkce_is_required_and_only_s256(idp: IdP, browser: aiohttp.ClientSession) -> None:
    for overrides in (
        {"code_challenge": None, "code_challenge_method": None},
        {"code_challenge_method": "plain"},
        {"code_challenge_method": None},
        {"code_challenge": "too-short"},
    ):
        async with browser.get(
            authorize_url(idp.issuer, **overrides), allow_redirects=False
        ) as response:
            assert response.status == 303, overrides
            query = callback_query(response.headers["Location"])
        assert query["_target"] == REDIRECT_URI
        assert query["error"] == "invalid_request", overrides
        assert query["state"] == "st-123"
        assert query["iss"] == idp.issuer
        assert "code" not in query


async def test_wrong_redirect_uri_or_client_is_an_error_page_never_a_redirect(
    idp: IdP, browser: aiohttp.ClientSession
) -> None:
    for overrides in (
        {"redirect_uri": "https://evil.example/cb"},
        {"redirect_uri": REDIRECT_URI + "/x"},  # exact match, not a prefix
        {"redirect_uri": REDIRECT_URI.upper()},
        {"redirect_uri": OTHER_REDIRECT_URI},  # another client's URI
        {"redirect_uri": None},
        {"client_id": "nobody"},
    ):
        async with browser.get(
            authorize_url(idp.issuer, **overrides), allow_redirects=False
        ) as response:
            assert response.status == 400, overrides
            assert "Location" not in response.headers


async def test_other_authorization_errors_go_back_to_the_client(
    idp: IdP, browser: aiohttp.ClientSession
) -> None:
    cases = [
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "email profile"}, "invalid_scope"),
        ({"prompt": "none"}, "login_required"),
    ]
    for overrides, error in cases:
        async with browser.get(
            authorize_url(idp.issuer, **overrides), allow_redirects=False
        ) as response:
            assert response.status == 303, overrides
            assert callback_query(response.headers["Location"])["error"] == error


async def test_repeated_parameters_are_refused(idp: IdP, browser: aiohttp.ClientSession) -> None:
    # Even a repetition of the right value: parsers disagree on which copy wins (RFC 6749 §3.1).
    for name, value in (("redirect_uri", REDIRECT_URI), ("client_id", CLIENT_ID)):
        url = authorize_url(idp.issuer) + "&" + urlencode({name: value})
        async with browser.get(url, allow_redirects=False) as response:
            assert response.status == 400
            assert "Location" not in response.headers


# -- the token endpoint ----------------------------------------------------------------------


async def test_code_flow_issues_a_signed_id_token_with_identity_claims(
    idp: IdP, browser: aiohttp.ClientSession
) -> None:
    verifier, challenge = pkce_pair()
    query = await browser_login(
        browser, authorize_url(idp.issuer, code_challenge=challenge), "alice", "alice-pw"
    )
    assert query["_target"] == REDIRECT_URI
    assert query["state"] == "st-123"
    assert query["iss"] == idp.issuer
    status, body, headers = await exchange(browser, idp, query["code"], verifier)
    assert status == 200, body
    assert headers["Cache-Control"] == "no-store"
    assert body["token_type"] == "Bearer"
    keys = await jwks_keys(browser, idp)
    claims = pyjwt.decode(
        body["id_token"],
        keys.keys[0].key,
        algorithms=["ES256"],
        audience=CLIENT_ID,
        issuer=idp.issuer,
        options={"require": ["exp", "iat", "sub", "aud", "iss", "auth_time", "nonce"]},
    )
    assert claims["sub"] == "alice"
    assert claims["nonce"] == "n-456"
    assert claims["groups"] == ["admins", "eng"]
    assert claims["email"] == "alice@example.test"
    assert claims["name"] == "Alice <b>Example</b>"
    assert claims["exp"] - claims["iat"] == 300
    digest = hashlib.sha256(body["access_token"].encode()).digest()[:16]
    assert claims["at_hash"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert pyjwt.get_unverified_header(body["id_token"])["kid"] == keys.keys[0].key_id
    async with browser.get(
        idp.url("/userinfo"), headers={"Authorization": f"Bearer {body['access_token']}"}
    ) as response:
        assert response.status == 200
        info = await response.json()
    assert info["sub"] == "alice" and info["groups"] == ["admins", "eng"]


async def test_a_code_is_single_use_and_its_reuse_revokes_the_access_token(
    idp: IdP, browser: aiohttp.ClientSession
) -> None:
    code, verifier = await code_for(browser, idp)
    status, body, _ = await exchange(browser, idp, code, verifier)
    assert status == 200
    status, again, _ = await exchange(browser, idp, code, verifier)
    assert status == 400
    assert again["error"] == "invalid_grant"
    async with browser.get(
        idp.url("/userinfo"), headers={"Authorization": f"Bearer {body['access_token']}"}
    ) as response:
        assert response.status == 401
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


async def test_code_is_bound_to_verifier_redirect_uri_and_client(
    idp: IdP, browser: aiohttp.ClientSession
) -> None:
    code, verifier = await code_for(browser, idp)
    status, body, _ = await exchange(browser, idp, code, pkce_pair()[0])
    assert (status, body["error"]) == (400, "invalid_grant")
    # A failed attempt burns the code: the verifier cannot be guessed by retrying.
    status, body, _ = await exchange(browser, idp, code, verifier)
    assert (status, body["error"]) == (400, "invalid_grant")

    code, verifier = await code_for(browser, idp)
    status, body, _ = await exchange(browser, idp, code, verifier, redirect_uri=LOGOUT_URI)
    assert (status, body["error"]) == (400, "invalid_grant")

    code, verifier = await code_for(browser, idp)
    status, body, _ = await exchange(browser, idp, code, "", auth=(CLIENT_ID, CLIENT_SECRET))
    assert (status, body["error"]) == (400, "invalid_grant")

    code, verifier = await code_for(browser, idp)
    status, body, _ = await exchange(
        browser,
        idp,
        code,
        verifier,
        auth=(OTHER_CLIENT_ID, OTHER_SECRET),
    )
    assert (status, body["error"]) == (400, "invalid_grant")
    assert "another client" in body["error_description"]


async def test_a_code_lives_sixty_seconds(idp: IdP, browser: aiohttp.ClientSession) -> None:
    start = idp.clock.time()
    code, verifier = await code_for(browser, idp)
    idp.clock.advance(CODE_TTL + 1)
    status, body, _ = await exchange(browser, idp, code, verifier)
    assert (status, body["error"]) == (400, "invalid_grant")
    idp.clock.set(start)
    code, verifier = await code_for(browser, idp)
    idp.clock.advance(CODE_TTL - 5)
    status, _, _ = await exchange(browser, idp, code, verifier)
    assert status == 200


async def test_token_endpoint_authenticates_the_client(
    idp: IdP, browser: aiohttp.ClientSession
) -> None:
    code, verifier = await code_for(browser, idp)
    status, body, headers = await exchange(browser, idp, code, verifier, auth=None)
    assert (status, body["error"]) == (401, "invalid_client")
    assert "WWW-Authenticate" not in headers

    code, verifier = await code_for(browser, idp)
    status, body, headers = await exchange(browser, idp, code, verifier, auth=(CLIENT_ID, "wrong"))
    assert (status, body["error"]) == (401, "invalid_client")
    assert headers["WWW-Authenticate"].startswith("Basic")

    # The secret must be form-urlencoded inside Basic (RFC 6749 §2.3.1): the raw one is wrong.
    code, verifier = await code_for(browser, idp)
    raw_pair = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    async with browser.post(
        idp.url("/token"),
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        },
        headers={"Authorization": f"Basic {raw_pair}"},
    ) as response:
        assert response.status == 401

    # Two methods at once are refused (RFC 6749 §2.3).
    code, verifier = await code_for(browser, idp)
    status, body, _ = await exchange(
        browser, idp, code, verifier, post_auth=(CLIENT_ID, CLIENT_SECRET)
    )
    assert (status, body["error"]) == (401, "invalid_client")

    code, verifier = await code_for(browser, idp)
    status, body, _ = await exchange(
        browser, idp, code, verifier, auth=None, post_auth=(CLIENT_ID, CLIENT_SECRET)
    )
    assert status == 200, body


# -- sessions and logout ---------------------------------------------------------------------


async def test_session_signs_in_again_without_the_form_until_end_session(
    idp: IdP, browser: aiohttp.ClientSession
) -> None:
    code, verifier = await code_for(browser, idp)
    status, tokens, _ = await exchange(browser, idp, code, verifier)
    assert status == 200
    # Second authorization: the provider's session answers at once.
    async with browser.get(authorize_url(idp.issuer), allow_redirects=False) as response:
        assert response.status == 303
        assert "code" in callback_query(response.headers["Location"])
    # prompt=login forces the form even with a session.
    async with browser.get(
        authorize_url(idp.issuer, prompt="login"), allow_redirects=False
    ) as response:
        assert response.status == 200
    # RP-initiated logout: redirected to the registered URI with the state.
    logout = idp.url("/end_session?") + urlencode(
        {
            "id_token_hint": tokens["id_token"],
            "post_logout_redirect_uri": LOGOUT_URI,
            "state": "bye",
        }
    )
    async with browser.get(logout, allow_redirects=False) as response:
        assert response.status == 303
        assert response.headers["Location"] == LOGOUT_URI + "?state=bye"
    assert not [c for c in browser.cookie_jar if c.key == "devidp-session" and c.value]
    async with browser.get(authorize_url(idp.issuer), allow_redirects=False) as response:
        assert response.status == 200  # the form again


async def test_end_session_redirects_only_to_a_registered_uri(
    idp: IdP, browser: aiohttp.ClientSession
) -> None:
    for params in (
        {"client_id": CLIENT_ID, "post_logout_redirect_uri": "https://evil.example/"},
        {"post_logout_redirect_uri": LOGOUT_URI},  # no client named
        {"client_id": OTHER_CLIENT_ID, "post_logout_redirect_uri": LOGOUT_URI},
        {
            "client_id": CLIENT_ID,
            "id_token_hint": "not-a-token",
            "post_logout_redirect_uri": LOGOUT_URI,
        },
    ):
        async with browser.get(
            idp.url("/end_session?") + urlencode(params), allow_redirects=False
        ) as response:
            assert response.status == 200, params
            assert "Location" not in response.headers
            assert "signed out" in await response.text()
    async with browser.get(
        idp.url("/end_session?")
        + urlencode({"client_id": CLIENT_ID, "post_logout_redirect_uri": LOGOUT_URI}),
        allow_redirects=False,
    ) as response:
        assert response.status == 303


# -- the users file and passwords ------------------------------------------------------------


def test_password_hashes_are_salted_scrypt_and_verify() -> None:
    one = hash_password("pw", log_n=10)
    two = hash_password("pw", log_n=10)
    assert one != two
    assert one.startswith("$scrypt$ln=10,r=8,p=1$")
    assert verify_password("pw", one)
    assert not verify_password("pW", one)


def test_the_demo_file_holds_real_hashes_of_the_documented_passwords() -> None:
    config = load_devidp_file(REPO / "config" / "dev-idp-users.toml")
    assert config.users["alice"].groups == ("admins", "eng")
    assert config.users["bob"].groups == ("eng",)
    assert verify_password("alice-dev-password", config.users["alice"].password_hash)
    assert verify_password("bob-dev-password", config.users["bob"].password_hash)
    assert not verify_password("bob-dev-password", config.users["alice"].password_hash)
    client = config.clients["ztgateway"]
    assert "https://127.0.0.1:8443/.ztgw/oidc/callback" in client.redirect_uris


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('[users.carol]\npassword_hash = "plain"\n', "users.carol.password_hash"),
        ('[users.carol]\npasword_hash = "x"\n', "users.carol"),
        ('[clients.x]\nclient_secret = "s"\nredirect_uris = ["/relative"]\n', "clients.x"),
        ('[clients.x]\nclient_secret = "s"\n', "clients.x.redirect_uris"),
        ('[clients.x]\nclient_id = "gw"\nclient_secret = "s"\n', "clients.x.client_id"),
        ("[surprise]\n", "surprise"),
    ],
)
def test_mistakes_in_the_users_file_name_the_key(tmp_path: Path, extra: str, key: str) -> None:
    path = write_users_file(tmp_path / "users.toml", extra=extra)
    with pytest.raises(ConfigError) as info:
        load_devidp_file(path)
    assert info.value.key.startswith(key), info.value


# -- command line ----------------------------------------------------------------------------


async def test_refuses_a_non_loopback_address(users_file: Path) -> None:
    with pytest.raises(ValueError, match="non-loopback"):
        await start_devidp("0.0.0.0", 0, users_file)
    assert main(["dev-idp", "--host", "0.0.0.0", "--users", str(users_file)]) == 2


def test_register_adds_dev_idp_and_hash_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="ztgateway")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["dev-idp", "--port", "9300", "--issuer", "http://127.0.0.1:9300", "--users", "u.toml"]
    )
    assert (args.host, args.port, args.issuer, args.users) == (
        "127.0.0.1",
        9300,
        "http://127.0.0.1:9300",
        "u.toml",
    )
    assert args.func.__name__ == "_cmd_serve"
    args = parser.parse_args(["dev-idp", "hash-password"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("hunter2\n"))
    assert args.func(args) == 0
    printed = capsys.readouterr().out.strip()
    assert verify_password("hunter2", printed)


async def test_dev_idp_command_serves_until_sigterm(users_file: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ztgateway",
        "dev-idp",
        "--port",
        "0",
        "--users",
        str(users_file),
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stderr is not None
    lines: list[str] = []
    issuer = None
    try:
        while issuer is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
            assert line, "".join(lines)
            lines.append(line)
            match = re.search(r"issuer (http://127\.0\.0\.1:\d+) listening", line)
            if match:
                issuer = match.group(1)
        assert any(BANNER in line for line in lines)
        async with aiohttp.ClientSession() as session:
            async with session.get(issuer + "/.well-known/openid-configuration") as response:
                assert (await response.json())["issuer"] == issuer
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_an_https_issuer_with_a_path_serves_under_it_with_host_cookies(
    users_file: Path,
) -> None:
    # As behind a TLS-terminating proxy: the issuer is public, the app still answers on loopback.
    from aiohttp.test_utils import TestServer

    issuer = "https://idp.example.test/dev"
    server = TestServer(create_devidp_app(users_file, issuer=issuer), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{server.port}"
            async with session.get(base + "/dev/.well-known/openid-configuration") as response:
                doc = await response.json()
            assert doc["issuer"] == issuer
            assert doc["token_endpoint"] == issuer + "/token"
            url = authorize_url(base + "/dev")
            async with session.get(url, allow_redirects=False) as response:
                assert response.status == 200
                cookie = response.headers["Set-Cookie"]
                page = await response.text()
            assert cookie.startswith("__Host-devidp-csrf=")
            assert "Secure" in cookie and "HttpOnly" in cookie and "Path=/" in cookie
            assert 'action="/dev/login"' in page
    finally:
        await server.close()
