"""A dev identity provider and a gateway configured to sign people in with it (for e2e tests)."""

from __future__ import annotations

import copy
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import GatewayFactory
from tests.support import free_port
from ztgateway.app import Gateway
from ztgateway.clock import Clock
from ztgateway.devidp import hash_password, start_devidp

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
