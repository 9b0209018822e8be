"""Sign-in, forms and assertions across workers and replicas (issue 18, I3): the CSRF key, the
sign-in's state and login-cookie key, and the default assertion key are the same in every
process, so a sign-in that starts on one finishes on another, and a form shown by one is
accepted by another."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GatewayFactory
from tests.e2e.test_signin import HTML, browser, hidden, idp_login
from tests.oidc_fixtures import CLIENT_SECRET, users_toml
from tests.redis_server import RedisServer
from tests.support import Certs, free_port
from ztgateway.app import Gateway
from ztgateway.dev.idp import start_devidp

pytestmark = pytest.mark.replicas


@pytest.fixture
async def idp(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """The dev IdP, with the first replica's origin registered (the redirect URI)."""
    origin = f"https://127.0.0.1:{free_port()}"
    users = tmp_path / "idp-users.toml"
    users.write_text(users_toml(origin))
    runner, _, issuer = await start_devidp("127.0.0.1", 0, users)
    yield origin, issuer
    await runner.cleanup()


async def two_replicas(
    gateway_factory: GatewayFactory, origin: str, issuer: str, store: dict[str, Any]
) -> tuple[Gateway, Gateway]:
    over: dict[str, Any] = {
        "oidc": {
            "name": "dev",
            "issuer": issuer,
            "client_id": "ztgateway",
            "client_secret": CLIENT_SECRET,
            "redirect_uri": origin + "/.ztgw/oidc/callback",
        },
        "routes": [
            {"name": "app", "prefix": "/", "upstream": "demo", "policy": {"login": "browsers"}}
        ],
        **store,
    }
    port = int(origin.rsplit(":", 1)[1])
    a = await gateway_factory({**over, "server": {"port": port, "public_url": origin}})
    b = await gateway_factory({**over, "server": {"port": free_port(), "public_url": origin}})
    return a, b


@pytest.mark.parametrize("shared", ["sqlite", "redis"])
async def test_a_sign_in_started_on_one_replica_finishes_on_another(
    gateway_factory: GatewayFactory,
    certs: Certs,
    redis_server: RedisServer,
    idp: tuple[str, str],
    shared: str,
) -> None:
    origin, issuer = idp
    store = {"store": {"url": redis_server.url}} if shared == "redis" else {}
    a, b = await two_replicas(gateway_factory, origin, issuer, store)
    other = f"https://127.0.0.1:{b.port}"
    async with browser(certs) as s:
        r = await s.get(origin + "/.ztgw/login/start?rd=/echo", allow_redirects=False)
        # The provider sends the browser back; a load balancer hands it to the other replica.
        callback = (await idp_login(s, r.headers["Location"])).replace(origin, other)
        r = await s.get(callback, headers=HTML, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/echo", await r.text()
        for replica in (origin, other):
            r = await s.get(replica + "/echo", headers={"Accept": "application/json"})
            assert r.status == 200
            assert (await r.json())["headers_map"]["x-forwarded-user"] == "alice"
        # A form one replica showed is accepted by the other.
        page = await (await s.get(other + "/.ztgw/logout", headers=HTML)).text()
        r = await s.post(
            origin + "/.ztgw/logout", data={"csrf": hidden(page, "csrf")}, allow_redirects=False
        )
        assert r.status == 303, await r.text()
    # An upstream checks assertions from either replica with the one JWKS it fetched.
    assert a.signer.jwks == b.signer.jwks
