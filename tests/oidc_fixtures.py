"""A dev identity provider and a gateway configured to sign people in with it (for e2e tests)."""

from __future__ import annotations

import copy
import datetime as dt
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.conftest import GatewayFactory
from tests.support import Certs, client_ssl, free_port
from ztgateway.app import Gateway
from ztgateway.clock import Clock
from ztgateway.dev.idp import start_devidp
from ztgateway.dev.idp_users import hash_password
from ztgateway.dev.pki import CertificateAuthority

CLIENT_SECRET = "test-client-secret-0123456789"
PASSWORDS = {"alice": "alice-test-password", "bob": "bob-test-password"}


@dataclass
class SignInSetup:
    gateway: Gateway
    issuer: str
    origin: str


def users_toml(gw_origin: str) -> str:
    alice = hash_password(PASSWORDS["alice"], log_n=10)
    bob = hash_password(PASSWORDS["bob"], log_n=10)
    return f"""
[users.alice]
password_hash = "{alice}"
name = "Alice <b>Example</b>"
email = "alice@example.test"
groups = ["admins", "eng"]

[users.bob]
password_hash = "{bob}"
email = "bob@example.test"
groups = ["eng"]

[clients.ztgateway]
client_id = "ztgateway"
client_secret = "{CLIENT_SECRET}"
redirect_uris = ["{gw_origin}/.ztgw/oidc/callback"]
post_logout_redirect_uris = ["{gw_origin}/.ztgw/signed-out"]
"""


@pytest.fixture
async def signin(
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    gateway_clock: Clock,
) -> AsyncIterator[SignInSetup]:
    """The gateway at a fixed port (the redirect URI must match exactly) with an [oidc] provider.

    Its clock is the `gateway_clock` fixture: the system's, or a ManualClock where a test module
    overrides that fixture to move time."""
    overrides: dict[str, Any] = copy.deepcopy(getattr(request, "param", {}) or {})
    port = free_port()
    origin = f"https://127.0.0.1:{port}"
    users = tmp_path / "idp-users.toml"
    users.write_text(users_toml(origin))
    runner, _, issuer = await start_devidp("127.0.0.1", 0, users)
    routes = overrides.pop(
        "routes",
        [
            {"name": "app", "prefix": "/", "upstream": "demo", "policy": {"login": "browsers"}},
            {
                "name": "admin",
                "prefix": "/admin/",
                "upstream": "demo",
                "policy": {"login": "always", "groups": ["admins"]},
                "session": {"mfa_max_age": 900},
            },
        ],
    )
    server = {**overrides.pop("server", {}), "port": port, "public_url": origin}
    gw = await gateway_factory(
        {
            "server": server,
            "oidc": {
                "name": "dev",
                "issuer": issuer,
                "client_id": "ztgateway",
                "client_secret": CLIENT_SECRET,
            },
            "routes": routes,
            **overrides,
        },
        clock=gateway_clock,
    )
    yield SignInSetup(gw, issuer, origin)
    await runner.cleanup()


def form_fields(page: str) -> dict[str, str]:
    return dict(re.findall(r'name="(request_id|csrf_token)" value="([^"]*)"', page))


def form_action(base_url: str, page: str) -> str:
    match = re.search(r'<form method="post" action="([^"]+)"', page)
    assert match is not None, page
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc}{match.group(1)}"


PROVIDER_LABELS = {"corp": "Corp account", "partners": "Partner account"}


@dataclass
class TwoProviders:
    """A gateway with two providers, `corp` and `partners`: two dev IdPs on two loopback ports,
    each a real OIDC provider with its own signing key, both knowing an "alice"."""

    gateway: Gateway
    origin: str
    issuers: dict[str, str]

    def view(self, provider: str) -> SignInSetup:
        """The setup as the single-provider helpers see it, for one provider."""
        return SignInSetup(self.gateway, self.issuers[provider], self.origin)


def provider_users_toml(gw_origin: str, provider: str) -> str:
    """The dev IdP's users, with the gateway's callback of that provider registered."""
    return users_toml(gw_origin).replace(
        '/.ztgw/oidc/callback"]', f'/.ztgw/oidc/callback/{provider}"]'
    )


def two_provider_config(issuers: dict[str, str]) -> dict[str, Any]:
    """`corp` speaks for the directory (its alice is the alice of the certificates); the
    partners' users are "partners:<user>"."""
    providers: dict[str, Any] = {
        name: {
            "issuer": issuer,
            "client_id": "ztgateway",
            "client_secret": CLIENT_SECRET,
            "display_name": PROVIDER_LABELS[name],
        }
        for name, issuer in issuers.items()
    }
    providers["corp"]["user_namespace"] = ""
    return providers


PARTNER_DEVICE = "alice-partner-laptop"


def partner_device(certs: Certs) -> str:
    """A device issued to the partners' alice: a device belongs to one user, and that user is
    "partners:alice", not the directory's alice (whose laptop is alice-laptop)."""
    pem, key = certs.client(PARTNER_DEVICE)
    if not pem.exists():
        ca = CertificateAuthority.load(certs.ca, certs.ca_key)
        ca.issue_client(PARTNER_DEVICE, user="partners:alice", email="alice@partners.test").write(
            pem, key
        )
    return PARTNER_DEVICE


TWO_PROVIDER_ROUTES: list[dict[str, Any]] = [
    {"name": "app", "prefix": "/", "upstream": "demo", "policy": {"login": "browsers"}},
    {
        "name": "corp-only",
        "prefix": "/corp/",
        "upstream": "demo",
        "policy": {"login": "always", "providers": ["corp"]},
    },
    {
        "name": "partners-only",
        "prefix": "/partners/",
        "upstream": "demo",
        "policy": {"login": "always", "providers": ["partners"]},
    },
]


async def start_two_idps(tmp_path: Path, origin: str) -> tuple[dict[str, str], list[Any]]:
    issuers: dict[str, str] = {}
    runners: list[Any] = []
    for name in PROVIDER_LABELS:
        users = tmp_path / f"idp-{name}-users.toml"
        users.write_text(provider_users_toml(origin, name))
        # Each dev IdP makes its own signing key: a token of one never verifies at the other.
        runner, _, issuer = await start_devidp("127.0.0.1", 0, users)
        issuers[name] = issuer
        runners.append(runner)
    return issuers, runners


@pytest.fixture
async def two_providers(
    gateway_factory: GatewayFactory, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[TwoProviders]:
    overrides: dict[str, Any] = copy.deepcopy(getattr(request, "param", {}) or {})
    port = free_port()
    origin = f"https://127.0.0.1:{port}"
    issuers, runners = await start_two_idps(tmp_path, origin)
    try:
        gw = await gateway_factory(
            {
                "server": {"port": port, "public_url": origin},
                "oidc": two_provider_config(issuers),
                "routes": overrides.pop("routes", TWO_PROVIDER_ROUTES),
                **overrides,
            }
        )
        yield TwoProviders(gw, origin, issuers)
    finally:
        for runner in runners:
            await runner.cleanup()


async def report_unencrypted_mac(signin: SignInSetup, certs: Certs) -> None:
    """alice's laptop's agent reports a Mac without disk encryption (patched today), which a
    route asking for a compliant device refuses with the device page."""
    report = {
        "platform": "macos", "os_version": "15.1", "last_patch": dt.date.today().isoformat(),
        "disk_encrypted": False, "firewall": True, "antivirus": True, "screen_lock": True,
        "mdm_enrolled": True, "jailbroken": False,
    }  # fmt: skip
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl(certs))) as s:
        async with s.post(signin.origin + "/.ztgw/posture", json=report) as r:
            assert r.status == 200
