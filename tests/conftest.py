"""Shared fixtures: a dev PKI per test session, a real demo upstream, real gateways."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import ADMIN_TOKEN, Certs, deep_merge, make_pki, to_toml
from ztgateway.app import Gateway
from ztgateway.clock import SYSTEM_CLOCK, Clock
from ztgateway.config import load_config
from ztgateway.dev.demo_app import start_demo_app

GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def upstream() -> AsyncIterator[int]:
    runner, port = await start_demo_app("127.0.0.1", 0)
    yield port
    await runner.cleanup()


def _admin_token(tmp: Path) -> Path:
    path = tmp / "admin.token"
    path.write_text(ADMIN_TOKEN + "\n")
    return path


def base_config(certs: Certs, upstream_port: int, tmp: Path) -> dict[str, Any]:
    crl = tmp / "ca.crl"
    if not crl.exists():
        crl.write_bytes(certs.crl.read_bytes())
    return {
        "server": {"host": "127.0.0.1", "port": 0, "public_url": "https://127.0.0.1"},
        "tls": {
            "cert": str(certs.server),
            "key": str(certs.server_key),
            "client_ca": str(certs.ca),
            "crl": str(crl),
            "reload_interval": 0.2,
        },
        "ops": {"host": "127.0.0.1", "port": 0, "admin_token_file": str(_admin_token(tmp))},
        "audit": {"db": str(tmp / "audit.db"), "jsonl": str(tmp / "audit.jsonl")},
        "store": {"url": f"sqlite:///{tmp}/state.db"},
        "devices": {"auto_approve": True},
        "mfa": {"key_file": str(tmp / "mfa.key")},
        "zones": {"loopback": ["127.0.0.0/8"], "corp": ["10.0.0.0/8"]},
        "issuers": {
            "dev": {
                "issuer": "https://ztgateway.dev/issuer",
                "audiences": ["ztgateway"],
                "algorithms": ["ES256"],
                "jwks_file": str(certs.issuer_jwks),
            }
        },
        "upstreams": {"demo": {"url": f"http://127.0.0.1:{upstream_port}", "read_timeout": 5.0}},
        "routes": [
            {"name": "app", "prefix": "/", "upstream": "demo"},
            {
                "name": "api",
                "prefix": "/api/",
                "upstream": "demo",
                "policy": {"require_token": True},
            },
            {
                "name": "admin",
                "prefix": "/admin/",
                "upstream": "demo",
                "policy": {"require_token": True, "groups": ["admins"]},
            },
        ],
    }


@pytest.fixture
async def gateway_factory(
    certs: Certs, upstream: int, tmp_path: Path
) -> AsyncIterator[GatewayFactory]:
    started: list[Gateway] = []

    async def make(
        overrides: dict[str, Any] | None = None,
        *,
        replace: dict[str, Any] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> Gateway:
        cfg = deep_merge(base_config(certs, upstream, tmp_path), overrides or {})
        if replace:
            cfg.update(replace)
        path = tmp_path / f"gateway-{len(started)}.toml"
        path.write_text(to_toml(cfg))
        gw = Gateway(load_config(path), clock=clock)
        await gw.start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        await gw.stop()


@pytest.fixture
def gateway_clock() -> Clock:
    """The clock `signin` gives its gateway; a module that moves time overrides this fixture
    with a ManualClock."""
    return SYSTEM_CLOCK


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory) -> Gateway:
    return await gateway_factory()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the test item, so fixtures can act on failures (screenshots)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


# Fixtures defined in helper modules, registered here so every test directory can use them.
from tests.e2e.test_proxy import proxy, recording  # noqa: E402, F401
from tests.oidc_fixtures import signin, two_providers  # noqa: E402, F401
from tests.redis_server import redis_server, redis_server_factory  # noqa: E402, F401
from tests.signals_fixtures import signals  # noqa: E402, F401
