"""The OIDC relying party, over real HTTP on 127.0.0.1.

Two providers: the real dev IdP (`ztgateway dev-idp`, started in-process on port 0) for the whole
flow as a browser drives it, and a small forging provider (discovery, JWKS and a token endpoint
whose ID token each test shapes) for everything a well-behaved provider would never send.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import jwt as pyjwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from tests.support import CallableClock, Certs
from tests.unit.test_devidp import (
    CLIENT_ID,
    CLIENT_SECRET,
    LOGOUT_URI,
    PASSWORDS,
    REDIRECT_URI,
    browser_login,
    write_users_file,
)
from ztgateway.credentials.oidc import (
    LoginResult,
    LoginStart,
    OIDCClaims,
    OIDCClient,
    OIDCError,
    OIDCProviderConfig,
    OIDCReason,
    pkce_challenge,
)
from ztgateway.dev.idp import start_devidp
from ztgateway.portal.redirect import local_path

SECRET = b"k" * 32


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


# -- against the dev IdP ---------------------------------------------------------------------


def dev_config(issuer: str, **overrides: Any) -> OIDCProviderConfig:
    values: dict[str, Any] = {
        "name": "dev",
        "issuer": issuer,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "redirect_uri": REDIRECT_URI,
    }
    values.update(overrides)
    return OIDCProviderConfig(**values)


@dataclass
class DevSetup:
    issuer: str
    runner: web.AppRunner
    clock: CallableClock
    client: OIDCClient
    browser: aiohttp.ClientSession

    def config(self, **overrides: Any) -> OIDCProviderConfig:
        return dev_config(self.issuer, **overrides)

    async def login(self, start: LoginStart, user: str = "alice") -> dict[str, str]:
        query = await browser_login(self.browser, start.authorization_url, user, PASSWORDS[user])
        assert query.pop("_target") == REDIRECT_URI
        return query

    async def finish(self, start: LoginStart, query: dict[str, str]) -> LoginResult:
        return await self.client.finish(
            state=query.get("state"),
            code=query.get("code"),
            error=query.get("error"),
            cookie_value=start.cookie_value,
            iss=query.get("iss"),
        )


@pytest.fixture
async def dev(tmp_path: Path) -> AsyncIterator[DevSetup]:
    users = write_users_file(tmp_path / "users.toml")
    runner, _, issuer = await start_devidp("127.0.0.1", 0, users)
    clock = CallableClock()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        client = OIDCClient(dev_config(issuer), clock=clock, secret=SECRET)
        setup = DevSetup(issuer, runner, clock, client, browser)
        await client.start()
        try:
            yield setup
        finally:
            await setup.client.close()
            await runner.cleanup()


async def test_full_flow_signs_alice_in_with_her_groups(dev: DevSetup) -> None:
    start = await dev.client.begin("/reports/q1?x=1")
    params = query_of(start.authorization_url)
    assert start.authorization_url.startswith(dev.issuer + "/authorize?")
    assert params["state"] == start.state
    assert params["code_challenge_method"] == "S256"
    assert params["scope"] == "openid email profile"
    query = await dev.login(start)
    result = await dev.finish(start, query)
    assert result.subject == "alice"
    assert result.user == "alice"
    assert result.email == "alice@example.test"
    assert result.groups == ("admins", "eng")
    assert result.return_to == "/reports/q1?x=1"
    assert result.claims["iss"] == dev.issuer
    assert result.claims["nonce"] == params["nonce"]
    assert result.claims["name"] == "Alice <b>Example</b>"  # escaping is the page's job
    assert result.id_token.count(".") == 2
    assert dev.client.status()["discovered"] is True
    assert dev.client.status()["pending_logins"] == 0


async def test_bob_gets_only_his_groups_and_the_user_claim_is_configurable(
    dev: DevSetup,
) -> None:
    client = OIDCClient(dev.config(claims=OIDCClaims(user="preferred_username")), secret=SECRET)
    async with client:
        start = await client.begin("/")
        query = await dev.login(start, "bob")
        result = await client.finish(
            state=query["state"],
            code=query["code"],
            error=None,
            cookie_value=start.cookie_value,
            iss=query.get("iss"),
        )
    assert (result.user, result.groups) == ("bob", ("eng",))
    assert result.email is None


async def test_logout_url_ends_the_provider_session(dev: DevSetup) -> None:
    start = await dev.client.begin("/")
    result = await dev.finish(start, await dev.login(start))
    url = dev.client.logout_url(result.id_token, LOGOUT_URI)
    assert url is not None and url.startswith(dev.issuer + "/end_session?")
    params = query_of(url)
    assert params["id_token_hint"] == result.id_token
    assert params["client_id"] == CLIENT_ID
    async with dev.browser.get(url, allow_redirects=False) as response:
        assert response.status == 303
        assert response.headers["Location"] == LOGOUT_URI
    # The provider asks for the password again: its session is gone.
    start = await dev.client.begin("/")
    async with dev.browser.get(start.authorization_url, allow_redirects=False) as response:
        assert response.status == 200
        assert 'type="password"' in await response.text()


async def test_replayed_callback_is_refused(dev: DevSetup) -> None:
    start = await dev.client.begin("/")
    query = await dev.login(start)
    await dev.finish(start, query)
    with pytest.raises(OIDCError) as info:
        await dev.finish(start, query)
    assert info.value.reason == OIDCReason.STATE_INVALID


async def test_missing_or_unknown_state_is_refused(dev: DevSetup) -> None:
    start = await dev.client.begin("/")
    query = await dev.login(start)
    for state in (None, "", "forged-" + start.state[7:]):
        with pytest.raises(OIDCError) as info:
            await dev.client.finish(
                state=state,
                code=query["code"],
                error=None,
                cookie_value=start.cookie_value,
                iss=dev.issuer,
            )
        assert info.value.reason == "state-invalid"
    # The genuine state was not touched by the forgeries.
    result = await dev.finish(start, query)
    assert result.user == "alice"


async def test_state_without_this_browsers_cookie_is_refused(dev: DevSetup) -> None:
    # Login CSRF: the attacker starts a login, and makes the victim's browser (with its own,
    # or no, login cookie) arrive at the callback with the attacker's state and code.
    attacker = await dev.client.begin("/")
    victim = await dev.client.begin("/")
    query = await dev.login(attacker)
    for i, cookie in enumerate((None, "", victim.cookie_value, attacker.cookie_value + "x", "a.b")):
        # Started by other devices: each source keeps only its newest few attempts.
        one_more = await dev.client.begin("/", source=f"device-{i}")
        q = await dev.login(one_more)
        with pytest.raises(OIDCError) as info:
            await dev.client.finish(
                state=q["state"], code=q["code"], error=None, cookie_value=cookie, iss=dev.issuer
            )
        assert info.value.reason == "state-invalid", cookie
    with pytest.raises(OIDCError) as info:
        await dev.client.finish(
            state=query["state"],
            code=query["code"],
            error=None,
            cookie_value=victim.cookie_value,
            iss=dev.issuer,
        )
    assert info.value.reason == "state-invalid"
    # A callback from the wrong browser does not consume the attempt: the right browser can
    # still finish it (and the code alone was useless to the other one).
    result = await dev.finish(attacker, query)
    assert result.user == "alice"


async def test_state_expires_after_max_auth_age(dev: DevSetup) -> None:
    start = await dev.client.begin("/")
    query = await dev.login(start)
    dev.clock.advance(601)
    with pytest.raises(OIDCError) as info:
        await dev.finish(start, query)
    assert info.value.reason == "state-invalid"


async def test_provider_error_is_login_denied_but_only_for_a_valid_state(dev: DevSetup) -> None:
    start = await dev.client.begin("/")
    with pytest.raises(OIDCError) as info:
        await dev.client.finish(
            state=start.state,
            code=None,
            error="access_denied",
            cookie_value=start.cookie_value,
            iss=dev.issuer,
        )
    assert info.value.reason == "login-denied"
    assert "access_denied" in info.value.detail
    with pytest.raises(OIDCError) as info:
        await dev.client.finish(
            state="unknown",
            code=None,
            error="access_denied",
            cookie_value=start.cookie_value,
            iss=dev.issuer,
        )
    assert info.value.reason == "state-invalid"


async def test_a_code_used_twice_fails_at_the_provider(dev: DevSetup) -> None:
    first = await dev.client.begin("/")
    query = await dev.login(first)
    await dev.finish(first, query)
    second = await dev.client.begin("/")
    with pytest.raises(OIDCError) as info:
        await dev.client.finish(
            state=second.state,
            code=query["code"],
            error=None,
            cookie_value=second.cookie_value,
            iss=dev.issuer,
        )
    assert info.value.reason == "code-exchange-failed"
    assert "invalid_grant" in info.value.detail


async def test_callback_without_code_fails(dev: DevSetup) -> None:
    start = await dev.client.begin("/")
    with pytest.raises(OIDCError) as info:
        await dev.client.finish(
            state=start.state,
            code=None,
            error=None,
            cookie_value=start.cookie_value,
            iss=dev.issuer,
        )
    assert info.value.reason == "code-exchange-failed"


async def test_wrong_client_secret_fails_the_exchange(dev: DevSetup) -> None:
    async with OIDCClient(dev.config(client_secret="wrong"), secret=SECRET) as client:
        start = await client.begin("/")
        query = await dev.login(start)
        with pytest.raises(OIDCError) as info:
            await client.finish(
                state=query["state"],
                code=query["code"],
                error=None,
                cookie_value=start.cookie_value,
                iss=dev.issuer,
            )
    assert info.value.reason == "code-exchange-failed"


async def test_provider_going_down_between_begin_and_finish(dev: DevSetup) -> None:
    start = await dev.client.begin("/")
    query = await dev.login(start)
    await dev.runner.cleanup()
    with pytest.raises(OIDCError) as info:
        await dev.finish(start, query)
    assert info.value.reason == "provider-unavailable"


async def test_provider_down_from_the_start_is_provider_unavailable() -> None:
    # A port that was just free: nothing listens there.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = OIDCProviderConfig(
        name="down",
        issuer=f"http://127.0.0.1:{port}",
        client_id="c",
        client_secret="s",
        redirect_uri=REDIRECT_URI,
        timeout=2.0,
    )
    async with OIDCClient(cfg) as client:
        with pytest.raises(OIDCError) as info:
            await client.begin("/")
        assert info.value.reason == "provider-unavailable"
        assert client.status()["discovered"] is False
        assert client.status()["last_error"]
        assert client.logout_url(None, LOGOUT_URI) is None


# -- against a forging provider --------------------------------------------------------------


@dataclass
class Forger:
    """A provider under the test's control: it signs whatever ID token the test describes."""

    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    kid: str = "k1"
    issuer: str = ""
    discovery: dict[str, Any] = field(default_factory=dict)
    claims: dict[str, Any] = field(default_factory=dict)
    token: Callable[[dict[str, Any]], str] | None = None
    token_status: int = 200
    token_body: dict[str, Any] | None = None
    access_token: str = "at-" + "x" * 40
    nonce: str | None = None
    requests: list[tuple[dict[str, str], dict[str, str]]] = field(default_factory=list)

    def id_claims(self) -> dict[str, Any]:
        now = int(time.time())
        base: dict[str, Any] = {
            "iss": self.issuer,
            "aud": "gw",
            "sub": "carol",
            "iat": now,
            "exp": now + 300,
            "nonce": self.nonce,
            "groups": ["eng"],
            "email": "carol@example.test",
        }
        for name, value in self.claims.items():
            if value is None:
                base.pop(name, None)
            else:
                base[name] = value
        return base

    def sign(self, claims: dict[str, Any], key: Any = None, alg: str = "ES256") -> str:
        return pyjwt.encode(claims, key or self.key, algorithm=alg, headers={"kid": self.kid})

    def app(self) -> web.Application:
        async def discovery(request: web.Request) -> web.Response:
            doc: dict[str, Any] = {
                "issuer": self.issuer,
                "authorization_endpoint": self.issuer + "/authorize?tenant=t1",
                "token_endpoint": self.issuer + "/token",
                "jwks_uri": self.issuer + "/jwks",
                "end_session_endpoint": self.issuer + "/logout",
                "response_types_supported": ["code"],
                "id_token_signing_alg_values_supported": ["ES256", "HS256", "none"],
                "code_challenge_methods_supported": ["S256"],
            }
            for name, value in self.discovery.items():
                if value is None:
                    doc.pop(name, None)
                else:
                    doc[name] = value
            return web.json_response(doc)

        async def jwks(request: web.Request) -> web.Response:
            jwk = ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
            jwk.update({"kid": self.kid, "use": "sig", "alg": "ES256"})
            return web.json_response({"keys": [jwk]})

        async def token(request: web.Request) -> web.Response:
            form = {k: str(v) for k, v in (await request.post()).items()}
            self.requests.append((form, dict(request.headers)))
            if self.token_body is not None:
                return web.json_response(self.token_body, status=self.token_status)
            claims = self.id_claims()
            id_token = self.token(claims) if self.token else self.sign(claims)
            return web.json_response(
                {"access_token": self.access_token, "token_type": "Bearer", "id_token": id_token},
                status=self.token_status,
            )

        async def moved(request: web.Request) -> web.Response:
            raise web.HTTPFound("/elsewhere")

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks", jwks)
        app.router.add_post("/token", token)
        app.router.add_get("/moved/.well-known/openid-configuration", moved)
        return app


@pytest.fixture
async def forger() -> AsyncIterator[Forger]:
    f = Forger()
    runner = web.AppRunner(f.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    f.issuer = f"http://127.0.0.1:{port}"
    yield f
    await runner.cleanup()


@pytest.fixture
async def tls_forger(certs: Certs) -> AsyncIterator[Forger]:
    """The forger over https with a certificate from the test PKI's private CA."""
    f = Forger()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server, certs.server_key)
    runner = web.AppRunner(f.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    f.issuer = f"https://127.0.0.1:{runner.addresses[0][1]}"
    yield f
    await runner.cleanup()


def forger_client(forger: Forger, **overrides: Any) -> OIDCClient:
    values: dict[str, Any] = {
        "name": "forger",
        "issuer": forger.issuer,
        "client_id": "gw",
        "client_secret": "p@ss:w/rd+&",
        "redirect_uri": REDIRECT_URI,
    }
    values.update(overrides)
    return OIDCClient(OIDCProviderConfig(**values), secret=SECRET)


async def forged_login(forger: Forger, client: OIDCClient) -> LoginResult:
    start = await client.begin("/home")
    forger.nonce = forger.nonce or query_of(start.authorization_url)["nonce"]
    return await client.finish(
        state=start.state,
        code="the-code",
        error=None,
        cookie_value=start.cookie_value,
    )


async def forged_failure(forger: Forger, **overrides: Any) -> OIDCError:
    async with forger_client(forger, **overrides) as client:
        with pytest.raises(OIDCError) as info:
            await forged_login(forger, client)
    return info.value


async def test_a_well_formed_token_from_the_forger_is_accepted(forger: Forger) -> None:
    async with forger_client(forger) as client:
        start = await client.begin("/home")
        params = query_of(start.authorization_url)
        # The endpoint's own query is kept (RFC 6749 §3.1).
        assert params["tenant"] == "t1"
        assert len(params["state"]) >= 43 and len(params["nonce"]) >= 43
        forger.nonce = params["nonce"]
        result = await client.finish(
            state=start.state,
            code="the-code",
            error=None,
            cookie_value=start.cookie_value,
        )
    assert (result.user, result.email, result.groups) == ("carol", "carol@example.test", ("eng",))
    form, headers = forger.requests[-1]
    assert form["grant_type"] == "authorization_code"
    assert form["code"] == "the-code"
    assert form["redirect_uri"] == REDIRECT_URI
    # PKCE: the verifier sent matches the challenge sent at the start (RFC 7636 §4.6).
    assert pkce_challenge(form["code_verifier"]) == params["code_challenge"]
    # client_secret_basic with form-urlencoding inside (RFC 6749 §2.3.1).
    assert "client_secret" not in form
    raw = base64.b64decode(headers["Authorization"].removeprefix("Basic ")).decode()
    assert raw == "gw:p%40ss%3Aw%2Frd%2B%26"


async def test_client_secret_post_when_the_provider_offers_only_that(forger: Forger) -> None:
    forger.discovery["token_endpoint_auth_methods_supported"] = ["client_secret_post"]
    async with forger_client(forger) as client:
        await forged_login(forger, client)
    form, headers = forger.requests[-1]
    assert (form["client_id"], form["client_secret"]) == ("gw", "p@ss:w/rd+&")
    assert "Authorization" not in headers


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"iss": "https://evil.example"}, "id-token-invalid"),
        ({"aud": "another-client"}, "id-token-invalid"),
        ({"aud": ["gw", "another-client"]}, "id-token-invalid"),  # several aud, no azp
        ({"aud": ["gw", "x"], "azp": "x"}, "id-token-invalid"),
        ({"azp": "another-client"}, "id-token-invalid"),
        ({"exp": int(time.time()) - 3600}, "id-token-invalid"),
        ({"iat": int(time.time()) + 3600}, "id-token-invalid"),
        ({"iat": int(time.time()) - 7200, "exp": int(time.time()) + 300}, "id-token-invalid"),
        ({"nbf": int(time.time()) + 3600}, "id-token-invalid"),
        ({"sub": None}, "id-token-invalid"),
        ({"groups": [1, 2]}, "id-token-invalid"),
        ({"at_hash": "AAAAAAAAAAAAAAAAAAAAAA"}, "id-token-invalid"),
        ({"nonce": "not-this-logins-nonce"}, "nonce-invalid"),
        ({"nonce": None}, "nonce-invalid"),
    ],
)
async def test_forged_id_tokens_are_refused(
    forger: Forger, claims: dict[str, Any], reason: str
) -> None:
    forger.claims = claims
    error = await forged_failure(forger)
    assert error.reason == reason, error.detail


async def test_several_audiences_with_our_azp_are_accepted(forger: Forger) -> None:
    forger.claims = {"aud": ["gw", "x"], "azp": "gw"}
    async with forger_client(forger) as client:
        result = await forged_login(forger, client)
    assert result.user == "carol"


async def test_matching_at_hash_is_accepted(forger: Forger) -> None:
    digest = hashlib.sha256(forger.access_token.encode()).digest()[:16]
    forger.claims = {"at_hash": base64.urlsafe_b64encode(digest).rstrip(b"=").decode()}
    async with forger_client(forger) as client:
        assert (await forged_login(forger, client)).user == "carol"


def _unsigned(claims: dict[str, Any]) -> str:
    def seg(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{seg({'alg': 'none', 'typ': 'JWT'})}.{seg(claims)}."


@pytest.mark.parametrize(
    "make",
    [
        # alg=none, even though the forger's discovery lists it.
        lambda f, c: _unsigned(c),
        # HS256 keyed with the client secret: a classic confusion, refused whatever discovery says.
        lambda f, c: pyjwt.encode(c, "p@ss:w/rd+&" * 4, algorithm="HS256"),
        # A key the provider does not publish, under the published kid.
        lambda f, c: f.sign(c, key=ec.generate_private_key(ec.SECP256R1())),
        # A token that carries its own key (RFC 8725 §3.10).
        lambda f, c: pyjwt.encode(
            c,
            f.key,
            algorithm="ES256",
            headers={
                "kid": f.kid,
                "jwk": ECAlgorithm.to_jwk(f.key.public_key(), as_dict=True),
            },
        ),
        lambda f, c: "not-a-jwt",
    ],
)
async def test_id_tokens_with_bad_signatures_or_algorithms_are_refused(
    forger: Forger, make: Callable[[Forger, dict[str, Any]], str]
) -> None:
    forger.token = lambda claims: make(forger, claims)
    error = await forged_failure(forger)
    assert error.reason == "id-token-invalid", error.detail


async def test_unverified_email_is_not_passed_on(forger: Forger) -> None:
    forger.claims = {"email_verified": False, "groups": "solo"}
    async with forger_client(forger) as client:
        result = await forged_login(forger, client)
    assert result.email is None
    assert result.groups == ("solo",)


async def test_an_https_provider_with_a_private_ca_needs_ca_file(
    tls_forger: Forger, certs: Certs
) -> None:
    async with forger_client(tls_forger, ca_file=certs.ca) as client:
        assert (await forged_login(tls_forger, client)).user == "carol"
    # Without the CA the provider's certificate is not trusted: nothing is fetched.
    error = await forged_failure(tls_forger)
    assert error.reason == "provider-unavailable"
    assert "certificate" in error.detail.lower()


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (400, {"error": "invalid_grant"}, "code-exchange-failed"),
        (401, {"error": "invalid_client"}, "code-exchange-failed"),
        (200, {"access_token": "x", "token_type": "Bearer"}, "code-exchange-failed"),
        (503, {"error": "temporarily_unavailable"}, "provider-unavailable"),
    ],
)
async def test_token_endpoint_failures(
    forger: Forger, status: int, body: dict[str, Any], reason: str
) -> None:
    forger.token_status, forger.token_body = status, body
    error = await forged_failure(forger)
    assert error.reason == reason


@pytest.mark.parametrize(
    "discovery",
    [
        {"issuer": "https://evil.example"},  # OIDC Discovery §4.3
        {"issuer": "__SELF__/"},  # exact: not even a trailing slash
        {"id_token_signing_alg_values_supported": ["HS256", "none"]},
        {"id_token_signing_alg_values_supported": None},
        {"code_challenge_methods_supported": ["plain"]},
        {"response_types_supported": ["id_token"]},
        {"token_endpoint": "http://203.0.113.9/token"},  # plain http off loopback
        {"jwks_uri": None},
        {"token_endpoint_auth_methods_supported": ["private_key_jwt"]},
    ],
)
async def test_unacceptable_discovery_documents(forger: Forger, discovery: dict[str, Any]) -> None:
    if discovery.get("issuer") == "__SELF__/":
        discovery = {"issuer": forger.issuer + "/"}
    forger.discovery = discovery
    async with forger_client(forger) as client:
        with pytest.raises(OIDCError) as info:
            await client.begin("/")
        assert info.value.reason == "provider-unavailable"
        assert client.status()["discovered"] is False


async def test_discovery_is_not_followed_through_redirects(forger: Forger) -> None:
    async with forger_client(forger, issuer=forger.issuer + "/moved") as client:
        with pytest.raises(OIDCError) as info:
            await client.begin("/")
    assert info.value.reason == "provider-unavailable"
    assert "HTTP 302" in info.value.detail


async def test_failed_discovery_is_retried_after_a_pause(forger: Forger) -> None:
    clock = CallableClock()
    forger.discovery = {"issuer": "https://evil.example"}
    cfg = OIDCProviderConfig(
        name="f", issuer=forger.issuer, client_id="gw", client_secret="s", redirect_uri=REDIRECT_URI
    )
    async with OIDCClient(cfg, clock=clock) as client:
        forger.discovery = {}
        # Within the retry pause the cached failure answers, without asking the provider.
        with pytest.raises(OIDCError):
            await client.begin("/")
        clock.advance(6)
        start = await client.begin("/")
    assert start.authorization_url.startswith(forger.issuer + "/authorize?tenant=t1&")


async def test_logout_url_uses_the_end_session_endpoint(forger: Forger) -> None:
    async with forger_client(forger) as client:
        url = client.logout_url("tok", LOGOUT_URI)
    assert url is not None
    assert url.startswith(forger.issuer + "/logout?")
    assert query_of(url) == {
        "client_id": "gw",
        "id_token_hint": "tok",
        "post_logout_redirect_uri": LOGOUT_URI,
    }
    forger.discovery = {"end_session_endpoint": None}
    async with forger_client(forger) as client:
        await client.begin("/")
        assert client.logout_url("tok", LOGOUT_URI) is None


# -- begin(), pending attempts and configuration ---------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example/",
        "https://evil.example/",
        "/\\evil.example",
        "evil",
        "",
        "/a\r\nb",
        # Paths on this origin, but not as the one guard (portal/redirect.py) gives them.
        "/a b",
        "/a/../b",
    ],
)
async def test_begin_refuses_a_return_to_off_this_origin(forger: Forger, target: str) -> None:
    async with forger_client(forger) as client:
        with pytest.raises(ValueError):
            await client.begin(target)


def test_the_one_redirect_guard_takes_paths_on_this_origin_only() -> None:
    assert local_path("/") == "/"
    assert local_path("/a/b?c=d&e=%2F") == "/a/b?c=d&e=%2F"
    assert local_path("/a b") == "/a%20b"  # re-encoded, so begin() refuses the raw form
    for bad in (
        None,
        "",
        "a",
        "//x",
        "/\\x",
        "/a\\b",
        "https://x/",
        "/a\x00",
        "/a\x7f",
        "/%2e%2e/x",
    ):
        assert local_path(bad) is None, bad


async def test_pending_attempts_are_bounded(forger: Forger) -> None:
    async with forger_client(forger, max_pending=2) as client:
        first = await client.begin("/")
        await client.begin("/")
        third = await client.begin("/")
        assert client.status()["pending_logins"] == 2
        with pytest.raises(OIDCError) as info:
            await client.finish(
                state=first.state,
                code="c",
                error=None,
                cookie_value=first.cookie_value,
            )
        assert info.value.reason == "state-invalid"
        forger.nonce = query_of(third.authorization_url)["nonce"]
        result = await client.finish(
            state=third.state, code="c", error=None, cookie_value=third.cookie_value
        )
    assert result.user == "carol"


async def test_a_cookie_forged_with_the_mac_secret_is_still_not_the_issued_one(
    forger: Forger,
) -> None:
    # Defence in depth: even whoever holds the MAC secret cannot mint a cookie for a state;
    # only the very value handed out at begin() (kept as a hash) is accepted.
    async with forger_client(forger) as client:
        start = await client.begin("/")
        binder = secrets.token_urlsafe(32)
        forged = f"{binder}.{client._cookie_mac(start.state, binder)}"
        with pytest.raises(OIDCError) as info:
            await client.finish(state=start.state, code="c", error=None, cookie_value=forged)
        assert info.value.reason == "state-invalid"
        assert "not the one issued" in info.value.detail
        # That attempt is now spent: its state was matched by a valid MAC and consumed.
        with pytest.raises(OIDCError) as info:
            await client.finish(
                state=start.state,
                code="c",
                error=None,
                cookie_value=start.cookie_value,
            )
    assert info.value.reason == "state-invalid"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scopes": ("email",)}, "openid"),
        ({"issuer": "http://idp.example.test"}, "https"),
        ({"issuer": "https://idp.example.test?x=1"}, "query"),
        ({"redirect_uri": "/relative"}, "redirect_uri"),
        ({"client_secret": ""}, "client_secret"),
        ({"leeway": -1}, "leeway"),
        ({"max_auth_age": 0}, "max_auth_age"),
    ],
)
def test_provider_config_is_validated(overrides: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {
        "name": "p",
        "issuer": "https://idp.example.test",
        "client_id": "c",
        "client_secret": "s",
        "redirect_uri": REDIRECT_URI,
    }
    values.update(overrides)
    with pytest.raises(ValueError, match=message):
        OIDCProviderConfig(**values)


def test_secrets_stay_out_of_reprs() -> None:
    cfg = OIDCProviderConfig(
        name="p",
        issuer="https://idp.example.test",
        client_id="c",
        client_secret="hunter2-secret",
        redirect_uri=REDIRECT_URI,
    )
    assert "hunter2-secret" not in repr(cfg)
    start = LoginStart(authorization_url="https://x/", state="s", cookie_value="cookie-secret")
    assert "cookie-secret" not in repr(start)
    with pytest.raises(ValueError, match="32 bytes"):
        OIDCClient(cfg, secret=b"short")
