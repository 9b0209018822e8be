"""docs/oidc.md's configurations for Keycloak, Entra ID, Okta and Google, taken from the file as
written, against the dev IdP dressed as each provider: a real sign-in through a real gateway,
what the application receives, who is refused, and where sign-out leads."""

from __future__ import annotations

import re
import ssl
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from tests.conftest import GatewayFactory
from tests.oidc_fixtures import CLIENT_SECRET, form_action, form_fields
from tests.support import Certs, free_port
from ztgateway.app import Gateway
from ztgateway.dev.idp import start_devidp
from ztgateway.dev.idp_shapes import SHAPES
from ztgateway.dev.idp_users import hash_password
from ztgateway.dev.pki import CertificateAuthority

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "oidc.md"
PASSWORD = "shape-test-password"
HTML = {"Accept": "text/html"}


def doc_config(provider: str) -> dict[str, Any]:
    """The TOML block of docs/oidc.md that starts with `# provider: <provider>`."""
    blocks = re.findall(r"```toml\n(# provider: (\w+)\n.*?)```", DOC.read_text(), re.S)
    found = {name: tomllib.loads(text) for text, name in blocks}
    assert set(found) == {"keycloak", "entra", "okta", "google"}
    return found[provider]


def users_file(path: Path, origin: str, client_id: str, *, many_groups: bool = False) -> Path:
    digest = hash_password(PASSWORD, log_n=10)
    carol_groups = ", ".join(f'"team-{i}"' for i in range(201)) if many_groups else '"eng"'
    path.write_text(f"""
[users.alice]
password_hash = "{digest}"
name = "Alice Example"
email = "alice@example.test"
groups = ["admins", "eng"]

[users.bob]
password_hash = "{digest}"
name = "Bob Example"
email = "bob@example.test"
groups = ["eng"]

[users.carol]
password_hash = "{digest}"
email = "carol@gmail.com"
groups = [{carol_groups}]

[clients.gw]
client_id = "{client_id}"
client_secret = "{CLIENT_SECRET}"
redirect_uris = ["{origin}/.ztgw/oidc/callback"]
post_logout_redirect_uris = ["{origin}/.ztgw/signed-out"]
""")
    return path


@dataclass
class Shaped:
    gateway: Gateway
    issuer: str
    origin: str
    provider: str
    documented_issuer: str


@pytest.fixture
async def shaped(
    request: pytest.FixtureRequest, gateway_factory: GatewayFactory, tmp_path: Path
) -> AsyncIterator[Shaped]:
    provider: str = request.param
    doc = doc_config(provider)
    oidc = dict(doc["oidc"])
    port = free_port()
    origin = f"https://127.0.0.1:{port}"
    users = users_file(
        tmp_path / "users.toml", origin, oidc["client_id"], many_groups=provider == "entra"
    )
    runner, _, issuer = await start_devidp("127.0.0.1", 0, users, shape=SHAPES[provider])
    documented = oidc["issuer"]
    # The documented issuer's path is the shape's: only the host differs.
    assert urlsplit(documented).path.rstrip("/") == urlsplit(issuer).path.rstrip("/")
    secret = tmp_path / "oidc-client-secret"
    secret.write_text(CLIENT_SECRET + "\n")
    oidc.update(issuer=issuer, client_secret_file=str(secret))
    routes = [{**r, "upstream": "demo"} for r in doc["routes"]] + [
        {"name": "app", "prefix": "/", "upstream": "demo", "policy": {"login": "browsers"}}
    ]
    gw = await gateway_factory(
        {"server": {"port": port, "public_url": origin}, "oidc": oidc},
        replace={"routes": routes},
    )
    yield Shaped(gw, issuer, origin, provider, documented)
    await runner.cleanup()


USERS = {
    # provider: the user name each person has at that provider (the user claim's value)
    "keycloak": {"alice": "alice", "bob": "bob", "carol": "carol"},
    "entra": {"alice": "alice@example.test", "bob": "bob@example.test", "carol": "carol@gmail.com"},
    "okta": {"alice": "alice@example.test", "bob": "bob@example.test", "carol": "carol@gmail.com"},
    "google": {
        "alice": "alice@example.test",
        "bob": "bob@example.test",
        "carol": "carol@gmail.com",
    },
}


def browser(certs: Certs, tmp_path: Path, provider: str, person: str) -> aiohttp.ClientSession:
    """A browser with the person's own device certificate, whose UID is their name at the
    provider (the gateway refuses a device used by another user than its owner)."""
    ca = CertificateAuthority.load(certs.ca, certs.ca_key)
    pem, key = tmp_path / f"{person}.pem", tmp_path / f"{person}.key"
    name = USERS[provider][person]
    email = name if "@" in name else f"{name}@example.test"
    ca.issue_client(f"{person}-laptop-{provider}", user=name, email=email).write(pem, key)
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(str(pem), str(key))
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx), cookie_jar=aiohttp.CookieJar(unsafe=True)
    )


async def sign_in(s: aiohttp.ClientSession, setup: Shaped, user: str) -> aiohttp.ClientResponse:
    """From the protected page through the IdP's form back to the gateway's callback."""
    origin = setup.origin
    r = await s.get(origin + "/admin/echo", headers=HTML, allow_redirects=False)
    assert r.status == 303
    # One provider: the sign-in page goes straight to it.
    r = await s.get(origin + r.headers["Location"], headers=HTML, allow_redirects=False)
    assert r.status == 303
    r = await s.get(origin + r.headers["Location"], allow_redirects=False)
    authorize = r.headers["Location"]
    shape = SHAPES[setup.provider]
    expected = shape.endpoints["authorize"].format(issuer=urlsplit(setup.issuer).path.rstrip("/"))  # type: ignore[union-attr]
    assert urlsplit(authorize).path == expected
    scopes = parse_qs(urlsplit(authorize).query)["scope"][0].split()
    assert scopes == doc_config(setup.provider)["oidc"]["scopes"]
    page = await (await s.get(authorize)).text()
    r = await s.post(
        form_action(authorize, page),
        data={**form_fields(page), "username": user, "password": PASSWORD},
        allow_redirects=False,
    )
    assert r.status == 303, await r.text()
    return await s.get(r.headers["Location"], headers=HTML, allow_redirects=False)


EXPECTED = {
    # provider: (X-Forwarded-User, X-Forwarded-Groups) for alice
    "keycloak": ("alice", "/admins,/eng"),
    "entra": (
        "alice@example.test",
        "e94a7a1e-4917-5338-a7d3-786e89197fae,f153f350-3b3d-5eb5-8136-f44e1b9a6a15",
    ),
    "okta": ("alice@example.test", "admins,eng"),
    "google": ("alice@example.test", ""),
}


@pytest.mark.parametrize("shaped", ["keycloak", "entra", "okta", "google"], indirect=True)
async def test_the_documented_configuration_signs_people_in(
    shaped: Shaped, certs: Certs, tmp_path: Path
) -> None:
    async with browser(certs, tmp_path, shaped.provider, "alice") as s:
        r = await sign_in(s, shaped, "alice")
        assert r.status == 303 and r.headers["Location"] == "/admin/echo", await r.text()
        r = await s.get(shaped.origin + "/admin/echo", headers={"Accept": "application/json"})
        assert r.status == 200, await r.text()
        seen = (await r.json())["headers_map"]
        user, groups = EXPECTED[shaped.provider]
        assert seen["x-forwarded-user"] == user
        assert seen.get("x-forwarded-groups", "") == groups
        assert seen["x-forwarded-email"] == "alice@example.test"
        # Sign-out: through the provider's own logout where it has one.
        page = await (await s.get(shaped.origin + "/.ztgw/logout", headers=HTML)).text()
        csrf = page.split('name="csrf" value="')[1].split('"')[0]
        r = await s.post(
            shaped.origin + "/.ztgw/logout", data={"csrf": csrf}, allow_redirects=False
        )
        assert r.status == 303
        location = r.headers["Location"]
        end_session = SHAPES[shaped.provider].endpoints["end_session"]
        if end_session is None:
            assert not location.startswith("http") or location.startswith(shaped.origin)
        else:
            assert urlsplit(location).path == end_session.format(
                issuer=urlsplit(shaped.issuer).path.rstrip("/")
            )
            r = await s.get(location, allow_redirects=False)
            assert r.status == 303 and r.headers["Location"] == shaped.origin + "/.ztgw/signed-out"


@pytest.mark.parametrize("shaped", ["keycloak", "entra", "okta", "google"], indirect=True)
async def test_someone_outside_the_documented_policy_is_refused(
    shaped: Shaped, certs: Certs, tmp_path: Path
) -> None:
    async with browser(certs, tmp_path, shaped.provider, "bob") as s:
        r = await sign_in(s, shaped, "bob")
        assert r.status == 303
        r = await s.get(shaped.origin + "/admin/echo", headers={"Accept": "application/json"})
        assert r.status == 403
        body = await r.json()
        assert (
            body["reason"]
            == ("user-not-allowed" if shaped.provider == "google" else "group-required")
            or body["reason"].endswith("required")
            or body["reason"].startswith("user")
        )


@pytest.mark.parametrize(
    ("shaped", "why"),
    [
        # Google: a consumer account outside the Workspace domain of required_claims.
        ("google", "claim 'hd' is not one of the accepted values (example.test)"),
        # Entra ID: more groups than fit a token; the overage pointer is refused, explained.
        ("entra", "groups overage"),
    ],
    indirect=["shaped"],
)
async def test_a_sign_in_the_configuration_must_not_accept_is_refused_with_why(
    shaped: Shaped, certs: Certs, tmp_path: Path, why: str
) -> None:
    async with browser(certs, tmp_path, shaped.provider, "carol") as s:
        r = await sign_in(s, shaped, "carol")
        assert r.status >= 400
    await shaped.gateway.audit.flush()
    log = shaped.gateway.config.audit.jsonl.read_text()  # type: ignore[union-attr]
    assert why in log
