"""A real transmitter for the signal receiver's tests: the dev IdP with its [ssf] section,
pushing signed SETs over mTLS to a real gateway, or queueing them for the gateway's poll."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import GatewayFactory
from tests.oidc_fixtures import CLIENT_SECRET, SignInSetup, users_toml
from tests.support import Certs, client_ssl, deep_merge, free_port
from ztgateway.app import Gateway
from ztgateway.clock import SYSTEM_CLOCK, Clock
from ztgateway.dev.idp import DEVIDP_KEY, DevIdP, start_devidp
from ztgateway.dev.pki import CertificateAuthority
from ztgateway.dev.ssf import DevTransmitter

POLL_TOKEN = "poll-token-0123456789abcdef"
CONTROL_TOKEN = "control-token-0123456789abcdef"


def transmitter_cert(certs: Certs) -> tuple[Path, Path]:
    """The dev IdP's own client certificate: the gateway's port asks every client for one."""
    pem, key = certs.dir / "clients" / "dev-idp.pem", certs.dir / "clients" / "dev-idp.key"
    if not pem.exists():
        ca = CertificateAuthority.load(certs.ca, certs.ca_key)
        ca.issue_client("dev-idp", user="dev-idp").write(pem, key)
    return pem, key


def ssf_toml(certs: Certs, origin: str, *, push: bool = True) -> str:
    pem, key = transmitter_cert(certs)
    push_url = f'push_url = "{origin}/.ztgw/ssf/events"\n' if push else ""
    return f"""
[ssf]
audience = "{origin}"
{push_url}poll_token = "{POLL_TOKEN}"
control_token = "{CONTROL_TOKEN}"

[outgoing]
ca_file = "{certs.ca}"
client_cert = "{pem}"
client_key = "{key}"
"""


ROUTES = [
    {"name": "api", "prefix": "/api/", "upstream": "demo", "policy": {"require_token": True}},
    {"name": "app", "prefix": "/", "upstream": "demo", "policy": {"login": "browsers"}},
]


@dataclass
class Signals:
    gateway: Gateway
    idp: DevIdP
    issuer: str
    origin: str
    certs: Certs
    make: Callable[..., Awaitable[Gateway]]

    @property
    def setup(self) -> SignInSetup:
        """For the sign-in helpers of tests/e2e/test_signin.py."""
        return SignInSetup(self.gateway, self.issuer, self.origin)

    @property
    def transmitter(self) -> DevTransmitter:
        return self.idp.transmitter

    async def send(self, **body: Any) -> dict[str, Any]:
        """What `ztgateway dev-ssf send` does: ask the dev IdP to make and deliver a SET."""
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                self.issuer + "/ssf/send",
                json=body,
                headers={"Authorization": f"Bearer {CONTROL_TOKEN}"},
            ) as r,
        ):
            assert r.status == 200, await r.text()
            answer: dict[str, Any] = await r.json()
            return answer

    async def push(
        self, token: str, gw: Gateway | None = None, **headers: str
    ) -> tuple[int, dict[str, Any]]:
        """POST a SET as a transmitter does (RFC 8935 §2), over mTLS."""
        return await push_set(self.certs, (gw or self.gateway).port, token, **headers)


def transmitter_session(certs: Certs) -> aiohttp.ClientSession:
    """The provider's side of a connection to the gateway: its own client certificate, and a
    new connection for each request (so `workers = N` may hand each to another worker)."""
    pem, key = transmitter_cert(certs)
    ctx = client_ssl(certs, None)
    ctx.load_cert_chain(str(pem), str(key))
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, force_close=True))


async def push_set(
    certs: Certs, port: int | None, token: str, **headers: str
) -> tuple[int, dict[str, Any]]:
    async with (
        transmitter_session(certs) as s,
        s.post(
            f"https://127.0.0.1:{port}/.ztgw/ssf/events",
            data=token.encode(),
            headers={"Content-Type": "application/secevent+jwt", **headers},
        ) as r,
    ):
        text = await r.text()
        return r.status, json.loads(text) if text else {}


def signals_config(issuer: str, origin: str, **over: Any) -> dict[str, Any]:
    return {
        "issuer": issuer,
        "jwks_url": issuer + "/ssf/jwks",
        "audience": origin,
        "algorithms": ["ES256"],
        **over,
    }


@pytest.fixture
async def signals(
    gateway_factory: GatewayFactory, certs: Certs, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Signals]:
    """A gateway at a fixed port receiving from the dev IdP; `request.param` overrides
    `[signals.dev]` (delivery = "poll"...) and may add gateway settings under "gateway"."""
    over: dict[str, Any] = dict(getattr(request, "param", {}) or {})
    gateway_over = over.pop("gateway", {})
    port = free_port()
    origin = f"https://127.0.0.1:{port}"
    users = tmp_path / "idp-users.toml"
    users.write_text(
        users_toml(origin)
        + f'backchannel_logout_uri = "{origin}/.ztgw/oidc/backchannel-logout"\n'
        + ssf_toml(certs, origin, push=over.get("delivery", "push") == "push")
    )
    runner, _, issuer = await start_devidp("127.0.0.1", 0, users)
    idp = runner.app[DEVIDP_KEY]
    if over.get("delivery") == "poll":
        token_file = tmp_path / "poll.token"
        token_file.write_text(POLL_TOKEN + "\n")
        over = {"poll_url": issuer + "/ssf/poll", "poll_token_file": str(token_file), **over}

    async def make(extra: dict[str, Any] | None = None, clock: Clock = SYSTEM_CLOCK) -> Gateway:
        extra = dict(extra or {})
        any_port = extra.pop("any_port", False)
        cfg: dict[str, Any] = {
            "server": {"port": 0 if any_port else port, "public_url": origin},
            "routes": ROUTES,
            "oidc": {
                "name": "dev",
                "issuer": issuer,
                "client_id": "ztgateway",
                "client_secret": CLIENT_SECRET,
            },
            "signals": {"dev": signals_config(issuer, origin, **over)},
        }
        cfg = deep_merge(deep_merge(cfg, gateway_over), extra)
        if "routes" in extra:
            cfg["routes"] = extra["routes"]
        return await gateway_factory(cfg, clock=clock)

    gw = await make()
    yield Signals(gw, idp, issuer, origin, certs, make)
    await runner.cleanup()
