"""Who the gateway says a request is (security review M2, M3, L4, L6, L8, L10, I1).

A real gateway with the session PKI and the demo upstream, which echoes what reached it; the
dev IdP where a person signs in.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt as pyjwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import GatewayFactory
from tests.e2e.test_proxy import RecordingUpstream
from tests.e2e.test_signin import browser, sign_in
from tests.oidc_fixtures import SignInSetup
from tests.support import ADMIN_TOKEN, Certs, audit_event, session
from ztgateway.app import Gateway
from ztgateway.credentials.totp import totp_code
from ztgateway.dev.pki import CertificateAuthority
from ztgateway.dev.tokens import issue_token
from ztgateway.sessions import cookie_session_id
from ztgateway.store.base import Session, UserRecord

JSON = {"Accept": "application/json"}


async def call(
    gw: Gateway, certs: Certs, path: str, *, cert: str | None = "alice-laptop", **kw: Any
) -> tuple[int, dict[str, Any]]:
    async with session(certs, cert) as s, s.get(f"https://127.0.0.1:{gw.port}{path}", **kw) as r:
        return r.status, await r.json(content_type=None)


# ------------------------------------------------------------------------------------------
# M3: a cookie bound to a device needs that device's certificate

OPTIONAL_CERT = {
    "server": {"client_cert": "optional"},
    "routes": [
        {
            "name": "app",
            "prefix": "/",
            "upstream": "demo",
            "policy": {"login": "browsers", "require_client_cert": False},
        }
    ],
}


@pytest.mark.parametrize("signin", [OPTIONAL_CERT], indirect=True)
async def test_stolen_session_cookie_without_the_devices_certificate_is_refused(
    signin: SignInSetup, certs: Certs
) -> None:
    async with browser(certs) as s:
        r = await sign_in(s, signin)
        assert r.status == 303
        cookie = next(c for c in s.cookie_jar if c.key == "__Host-ztgw-session").value
        async with s.get(signin.origin + "/echo", headers=JSON) as r:
            assert r.status == 200
    stolen = {"Cookie": f"__Host-ztgw-session={cookie}", **JSON}
    async with (
        session(certs, None) as s,
        s.get(signin.origin + "/echo", headers=stolen) as r,
    ):
        assert r.status == 401
        body = await r.json(content_type=None)
    assert body["reason"] == "session-invalid"
    event = await audit_event(signin.gateway, body["decision_id"])
    assert event["result"]["findings"][-1]["detail"] == "presented without its device"


# ------------------------------------------------------------------------------------------
# M2 without a browser: Fetch Metadata and Origin, as a browser sends them


def site(kind: str, mode: str, dest: str) -> dict[str, str]:
    return {"Sec-Fetch-Site": kind, "Sec-Fetch-Mode": mode, "Sec-Fetch-Dest": dest, **JSON}


CROSS_IMG = site("cross-site", "no-cors", "image")
CROSS_NAV = site("cross-site", "navigate", "document")


@pytest.mark.parametrize(
    ("method", "headers", "status"),
    [
        ("GET", CROSS_IMG, 403),
        ("GET", site("cross-site", "no-cors", "script"), 403),
        ("GET", site("cross-site", "cors", "empty"), 403),
        ("POST", site("cross-site", "no-cors", "empty"), 403),
        ("POST", site("cross-site", "navigate", "document"), 403),  # a form post
        ("GET", site("cross-site", "navigate", "iframe"), 403),  # framing
        ("GET", site("same-site", "no-cors", "image"), 403),  # another origin of the site
        ("GET", CROSS_NAV, 403),  # a link from another site: a page to continue from
        ("GET", site("same-origin", "cors", "empty"), 200),
        ("POST", site("same-origin", "cors", "empty"), 200),
        ("POST", site("none", "navigate", "document"), 200),
        ("POST", {"Origin": "https://evil.example", **JSON}, 403),  # no Fetch Metadata
        ("POST", {"Origin": "null", **JSON}, 403),
        ("POST", JSON, 200),  # no browser at all
    ],
)
async def test_cross_site_requests_carry_no_certificate_identity_to_the_app(
    gateway: Gateway, certs: Certs, method: str, headers: dict[str, str], status: int
) -> None:
    async with (
        session(certs) as s,
        s.request(method, f"https://127.0.0.1:{gateway.port}/echo", headers=headers) as r,
    ):
        assert r.status == status, await r.text()
        body = await r.json(content_type=None)
    if status == 403:
        assert body["reason"] == "origin-denied"
        event = await audit_event(gateway, body["decision_id"])
        # Refused before any identity is taken from the certificate: by the request stage, or
        # (a navigation under cross_site = "strict") by the identity stage.
        assert event["result"]["findings"][-1]["stage"] in ("request", "identity")
    else:
        assert body["headers_map"]["x-forwarded-user"] == "alice"


async def test_a_link_from_another_site_gets_a_page_to_continue_from(
    gateway: Gateway, certs: Certs, recording: RecordingUpstream
) -> None:
    headers = {**site("cross-site", "navigate", "document"), "Accept": "text/html"}
    async with (
        session(certs) as s,
        s.get(f"https://127.0.0.1:{gateway.port}/echo?q=a%20b&x=<1>", headers=headers) as r,
    ):
        assert r.status == 403
        page = await r.text()
    assert 'href="/echo?q=a%20b&amp;x=%3C1%3E"' in page
    assert "origin-denied" in page
    # Not for what is not a navigation: nobody sees an image's page.
    img = {**site("cross-site", "no-cors", "image"), "Accept": "text/html"}
    async with (
        session(certs) as s,
        s.get(f"https://127.0.0.1:{gateway.port}/echo", headers=img) as r,
    ):
        assert r.status == 403
        assert "Continue to" not in await r.text()


async def test_a_link_from_another_site_is_identified_by_a_session_not_by_the_certificate(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    """SameSite=Lax sends the session cookie with a top-level navigation from another site (a
    sign-in coming back from the identity provider is one): the session identifies it. The
    certificate alone does not, not even as a device, where the route needs no user."""
    gw = await gateway_factory(
        {
            "routes": [
                {"name": "app", "prefix": "/", "upstream": "demo"},
                {
                    "name": "anon",
                    "prefix": "/anon/",
                    "upstream": "demo",
                    "policy": {"allow_cert_identity": False},
                },
            ]
        }
    )
    await oidc_session(gw, "c00kie")
    cookie = {"Cookie": "__Host-ztgw-session=c00kie", "User-Agent": ""}
    status, body = await call(gw, certs, "/echo", headers={**CROSS_NAV, **cookie})
    assert status == 200, body
    assert body["headers_map"]["x-forwarded-user"] == "alice"
    status, body = await call(gw, certs, "/anon/echo", headers=CROSS_NAV)
    assert status == 200, body
    seen = body["headers_map"]
    assert "x-zt-device-id" not in seen and "x-forwarded-user" not in seen
    status, body = await call(gw, certs, "/anon/echo", headers=JSON)
    assert body["headers_map"]["x-zt-device-id"] == "alice-laptop"


async def test_same_origin_post_of_a_browser_without_fetch_metadata_passes(
    gateway: Gateway, certs: Certs
) -> None:
    origin = f"https://127.0.0.1:{gateway.port}"
    async with session(certs) as s:
        async with s.post(origin + "/echo", headers={"Origin": origin, **JSON}) as r:
            assert r.status == 200


async def test_routes_opt_in_to_links_or_safe_methods_but_never_unsafe_cross_site(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory(
        {
            "routes": [
                {"name": "app", "prefix": "/", "upstream": "demo"},
                {"name": "wiki", "prefix": "/wiki/", "upstream": "demo", "cross_site": "lax"},
                {
                    "name": "assets",
                    "prefix": "/assets/",
                    "upstream": "demo",
                    "cross_site": "safe-methods",
                },
            ]
        },
    )
    assert (await call(gw, certs, "/echo", headers=CROSS_NAV))[0] == 403
    assert (await call(gw, certs, "/wiki/echo", headers=CROSS_NAV))[0] == 200
    assert (await call(gw, certs, "/wiki/echo", headers=CROSS_IMG))[0] == 403
    assert (await call(gw, certs, "/assets/echo", headers=CROSS_IMG))[0] == 200
    async with (
        session(certs) as s,
        s.post(f"https://127.0.0.1:{gw.port}/assets/echo", headers=CROSS_IMG) as r,
    ):
        assert r.status == 403


async def test_websocket_from_another_origins_page_is_refused_before_the_upgrade(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory(
        {
            "routes": [
                {
                    "name": "app",
                    "prefix": "/",
                    "upstream": "demo",
                    "websocket_origins": ["https://portal.corp.example"],
                }
            ]
        }
    )
    url = f"wss://127.0.0.1:{gw.port}/ws"
    own = f"https://127.0.0.1:{gw.port}"
    async with session(certs) as s:
        for origin in (None, own, "https://portal.corp.example"):
            headers = {"Origin": origin} if origin else {}
            async with s.ws_connect(url, headers=headers) as ws:
                await ws.send_str("hi")
                assert (await ws.receive()).data == "hi"
        for origin in ("https://evil.example", "http://127.0.0.1", "null"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                async with s.ws_connect(url, headers={"Origin": origin}):
                    pass
            assert info.value.status == 403


@pytest.mark.parametrize("signin", [{}], indirect=True)
async def test_a_browsers_fetch_is_held_to_sign_in_whatever_its_accept_header(
    signin: SignInSetup, certs: Certs
) -> None:
    """Security review M2: `Accept: */*` used to make a browser a machine on login = browsers
    routes, skipping sign-in and MFA. Fetch Metadata says it is a browser."""
    fetch = {"Accept": "*/*", "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
    status, body = await call(signin.gateway, certs, "/echo", headers=fetch)
    assert status == 401
    assert body["reason"] == "identity-unauthenticated"
    # A client that is not a browser still uses its certificate.
    status, body = await call(signin.gateway, certs, "/echo", headers={"Accept": "*/*"})
    assert status == 200
    assert body["headers_map"]["x-forwarded-user"] == "alice"


MFA_DAILY = {
    "routes": [
        {
            "name": "app",
            "prefix": "/",
            "upstream": "demo",
            "policy": {"login": "browsers"},
            "session": {"mfa_max_age": 43200},
        },
        {
            "name": "machines",
            "prefix": "/machines/",
            "upstream": "demo",
            "session": {"mfa_max_age": 43200},
        },
    ]
}


@pytest.mark.parametrize("signin", [MFA_DAILY], indirect=True)
async def test_certificate_alone_does_not_skip_the_second_factor_of_a_route_for_people(
    signin: SignInSetup, certs: Certs
) -> None:
    status, body = await call(signin.gateway, certs, "/echo", headers={"Accept": "*/*"})
    assert status == 401
    assert body["reason"] == "mfa-required"
    # Where nobody signs in (login = "never") a certificate is a machine's: no TOTP to give.
    status, body = await call(signin.gateway, certs, "/machines/echo")
    assert status == 200


# ------------------------------------------------------------------------------------------
# L4: monitor mode never vouches for an identity that failed its own checks

MONITOR = {
    "routes": [
        {
            "name": "app",
            "prefix": "/",
            "upstream": "demo",
            "mode": "monitor",
            "policy": {"allow_cert_identity": False, "groups": ["auditors"]},
        }
    ]
}


async def oidc_session(gw: Gateway, cookie: str, user: str = "alice") -> Session:
    now = gw.clock.time()
    s = Session(
        session_id=cookie_session_id(cookie),
        kind="cookie",
        user=user,
        device_id="alice-laptop",
        start_ip="127.0.0.1",
        last_ip="127.0.0.1",
        user_agent="",
        created=now,
        last_seen=now,
        expires_at=now + 3600,
        extra={"source": "oidc", "groups": ["admins"]},
    )
    await gw.store.save_session(s)
    return s


def assertion_claims(headers: dict[str, Any]) -> dict[str, Any]:
    claims: dict[str, Any] = pyjwt.decode(
        headers["x-zt-assertion"], options={"verify_signature": False}
    )
    return claims


async def test_monitor_mode_forwards_a_would_deny_with_the_assertion_saying_so(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory(MONITOR)
    await oidc_session(gw, "c00kie")
    headers = {"Cookie": "__Host-ztgw-session=c00kie", "User-Agent": "", **JSON}
    status, body = await call(gw, certs, "/echo", headers=headers)
    assert status == 200
    claims = assertion_claims(body["headers_map"])
    assert claims["sub"] == "alice"
    assert claims["ztgw"] == {"auth": "session", "monitor": True, "would": "deny"}


@pytest.mark.parametrize("failure", ["signed-out", "account-locked", "device-revoked"])
async def test_monitor_mode_refuses_identities_that_failed_their_own_checks(
    gateway_factory: GatewayFactory, certs: Certs, failure: str
) -> None:
    gw = await gateway_factory(MONITOR)
    store = gw.store
    s = await oidc_session(gw, "c00kie")
    now = gw.clock.time()
    if failure == "signed-out":
        await store.revoke_session(s.session_id, "signed out", now)
        reason = "session-terminated"
    elif failure == "account-locked":
        await store.save_user(UserRecord(user="alice", locked_until=now + 600, lock_reason="x"))
        reason = "account-locked"
    else:
        await call(gw, certs, "/echo", headers=JSON)  # registers the device
        await store.set_device_state("alice-laptop", "revoked")
        reason = "device-revoked"
    headers = {"Cookie": "__Host-ztgw-session=c00kie", "User-Agent": "", **JSON}
    status, body = await call(gw, certs, "/echo", headers=headers)
    assert status in (401, 403), body
    assert body["reason"] == reason
    event = await audit_event(gw, body["decision_id"])
    assert event["result"]["monitor"] is False


# ------------------------------------------------------------------------------------------
# L6: claim values reach the app only in forms it cannot misread


async def test_group_names_with_separators_are_encoded_and_unverified_email_dropped(
    gateway: Gateway, certs: Certs
) -> None:
    token = issue_token(
        certs.issuer_key,
        sub="alice",
        groups=["eng,admins", "ops team", "a;b", "100%"],
        email="ceo@corp.example",
    )
    # issue_token has no email_verified: re-sign the same claims with it set to false.
    claims = pyjwt.decode(token, options={"verify_signature": False})
    claims["email_verified"] = False
    key = certs.issuer_key.read_bytes()
    header = pyjwt.get_unverified_header(token)
    unverified = pyjwt.encode(claims, key, algorithm="ES256", headers={"kid": header["kid"]})
    status, body = await call(
        gateway, certs, "/api/echo", headers={"Authorization": f"Bearer {unverified}"}
    )
    assert status == 200, body
    seen = body["headers_map"]
    assert seen["x-forwarded-groups"] == "100%25,a%3Bb,eng%2Cadmins,ops%20team"
    assert "admins" not in seen["x-forwarded-groups"].split(",")
    assert "x-forwarded-email" not in seen
    asserted = assertion_claims(seen)
    assert asserted["groups"] == ["100%", "a;b", "eng,admins", "ops team"]
    assert "email" not in asserted


async def test_issuer_can_require_a_verified_email(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory({"issuers": {"dev": {"require_email_verified": True}}})
    token = issue_token(certs.issuer_key, sub="alice", email="alice@example.test")
    status, body = await call(gw, certs, "/api/echo", headers={"Authorization": f"Bearer {token}"})
    assert status == 200 and "x-forwarded-email" not in body["headers_map"]


# ------------------------------------------------------------------------------------------
# L8: one name, one person, per identity source


async def test_certificate_without_a_uid_is_its_whole_email_address(
    gateway_factory: GatewayFactory, certs: Certs, tmp_path: Path
) -> None:
    ca = CertificateAuthority.load(certs.ca, certs.ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "partner-laptop")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("urn:ztgw:device:partner-laptop"),
                    x509.RFC822Name("alice@partner.example"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.cert.public_key()),  # type: ignore[arg-type]
            False,
        )
        .sign(ca.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    clients = certs.dir / "clients"
    pem, keyfile = clients / "partner-laptop.pem", clients / "partner-laptop.key"
    if not pem.exists():
        pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        keyfile.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    gw = await gateway_factory()
    status, body = await call(gw, certs, "/echo", cert="partner-laptop")
    assert status == 200
    # Not "alice": the directory's alice is someone else.
    assert body["headers_map"]["x-forwarded-user"] == "alice@partner.example"


async def test_users_of_an_issuer_with_a_namespace_are_never_the_directorys(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory(
        {
            "issuers": {"dev": {"user_namespace": "partner"}},
            "devices": {"owner_mismatch": "risk"},
        }
    )
    token = issue_token(certs.issuer_key, sub="alice")
    status, body = await call(gw, certs, "/api/echo", headers={"Authorization": f"Bearer {token}"})
    assert status == 200, body
    assert body["headers_map"]["x-forwarded-user"] == "partner:alice"
    # A certificate (the directory) naming a user in that namespace is refused.
    ca = CertificateAuthority.load(certs.ca, certs.ca_key)
    clients = certs.dir / "clients"
    if not (clients / "spoof-laptop.pem").exists():
        ca.issue_client("spoof-laptop", user="partner:bob").write(
            clients / "spoof-laptop.pem", clients / "spoof-laptop.key"
        )
    status, body = await call(gw, certs, "/echo", cert="spoof-laptop", headers=JSON)
    assert status == 403
    assert body["reason"] == "identity-ambiguous"


async def test_step_up_records_the_second_factor_for_the_user_the_pipeline_sees(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    """`_who` used the token's raw `sub`: with a claim map, TOTP state ended up under another
    name than the user the routes decide for."""
    gw = await gateway_factory({"issuers": {"dev": {"claims": {"user": "email"}}}})
    enrolled = await gw.mfa.enroll("alice@example.test")
    token = issue_token(certs.issuer_key, sub="u-123", email="alice@example.test")
    code = totp_code(enrolled.secret, now=time.time())
    async with (
        session(certs) as s,
        s.post(
            f"https://127.0.0.1:{gw.port}/.ztgw/mfa/verify",
            json={"code": code},
            headers={"Authorization": f"Bearer {token}", **JSON},
        ) as r,
    ):
        assert r.status == 200, await r.text()
        assert (await r.json())["user"] == "alice@example.test"


# ------------------------------------------------------------------------------------------
# L10: /decide is for operators


async def test_decide_needs_the_admin_token_and_verifies_the_certificate_it_is_given(
    gateway: Gateway, certs: Certs
) -> None:
    url = f"http://127.0.0.1:{gateway.ops_port}/decide"
    body = {"path": "/echo", "cert_pem": certs.client("mallory-laptop")[0].read_text()}
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body) as r:
            assert r.status == 401
            assert (await r.json(content_type=None))["reason"] == "identity-unauthenticated"
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with s.post(url, json=body, headers=admin) as r:
            assert r.status == 200
            out = await r.json()
        assert out["verdict"] == "deny" and out["reason"] == "client-cert-invalid"
        assert out["identity"] is None
        good = {"path": "/echo", "cert_pem": certs.client("alice-laptop")[0].read_text()}
        async with s.post(url, json=good, headers=admin) as r:
            out = await r.json()
        assert out["verdict"] == "allow" and out["identity"]["user"] == "alice"


# ------------------------------------------------------------------------------------------
# I1: a pending device is not let through by default


async def test_pending_device_is_refused_where_the_route_names_no_trust_level(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory(
        {
            "devices": {"auto_approve": False},
            "server": {"client_cert": "optional"},
            "routes": [
                {"name": "app", "prefix": "/", "upstream": "demo"},
                {
                    "name": "kiosk",
                    "prefix": "/kiosk/",
                    "upstream": "demo",
                    "policy": {"min_trust": "unknown"},
                },
                {
                    "name": "api",
                    "prefix": "/api/",
                    "upstream": "demo",
                    "policy": {"require_client_cert": False, "require_token": True},
                },
            ],
        }
    )
    status, body = await call(gw, certs, "/echo", headers=JSON)
    assert status == 403 and body["reason"] == "device-pending"
    assert (await call(gw, certs, "/kiosk/echo"))[0] == 200
    token = issue_token(certs.issuer_key, sub="bob")
    status, _ = await call(
        gw, certs, "/api/echo", cert=None, headers={"Authorization": f"Bearer {token}"}
    )
    assert status == 200
    await gw.store.set_device_state("alice-laptop", "approved")
    assert (await call(gw, certs, "/echo"))[0] == 200
