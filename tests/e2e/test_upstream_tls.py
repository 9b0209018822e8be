"""https upstreams: verified against their CA, with service-to-service mTLS when configured."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import GatewayFactory
from tests.support import Certs, session
from ztgateway.dev.demo_app import start_demo_app
from ztgateway.dev.pki import CertificateAuthority


@pytest.fixture
async def tls_upstream(certs: Certs, tmp_path: Path) -> AsyncIterator[tuple[int, Path, Path, Path]]:
    """A demo app over TLS that itself requires a client certificate from the gateway."""
    upstream_ca = CertificateAuthority.generate("upstream CA")
    server = upstream_ca.issue_server("legacy.internal", dns=("localhost",), ips=("127.0.0.1",))
    server.write(tmp_path / "up.pem", tmp_path / "up.key")
    (tmp_path / "up-ca.pem").write_bytes(upstream_ca.cert_pem())
    gw_client = upstream_ca.issue_client("gateway", user="ztgateway")
    gw_client.write(tmp_path / "gw-client.pem", tmp_path / "gw-client.key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "up-ca.pem"))
    ctx.load_cert_chain(str(tmp_path / "up.pem"), str(tmp_path / "up.key"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    runner, port = await start_demo_app("127.0.0.1", 0, ssl_context=ctx)
    yield port, tmp_path / "up-ca.pem", tmp_path / "gw-client.pem", tmp_path / "gw-client.key"
    await runner.cleanup()


async def test_https_upstream_with_service_mtls(
    gateway_factory: GatewayFactory, certs: Certs, tls_upstream: tuple[int, Path, Path, Path]
) -> None:
    port, ca, cert, key = tls_upstream
    gw = await gateway_factory(
        {"upstreams": {"secure": {"url": f"https://127.0.0.1:{port}", "ca": str(ca), "client_cert": str(cert), "client_key": str(key)}},
         "routes": [{"name": "app", "prefix": "/", "upstream": "secure"}]}
    )  # fmt: skip
    async with session(certs) as s, s.get(f"https://127.0.0.1:{gw.port}/echo") as r:
        assert r.status == 200
        body = await r.json()
    assert body["tls"] is not None and "gateway" in str(body["tls"]["peer_subject"])


async def test_https_upstream_with_an_unknown_ca_is_502(
    gateway_factory: GatewayFactory, certs: Certs, tls_upstream: tuple[int, Path, Path, Path]
) -> None:
    port, _, cert, key = tls_upstream
    gw = await gateway_factory(
        {"upstreams": {"secure": {"url": f"https://127.0.0.1:{port}", "ca": str(certs.ca), "client_cert": str(cert), "client_key": str(key)}},
         "routes": [{"name": "app", "prefix": "/", "upstream": "secure"}]}
    )  # fmt: skip
    async with session(certs) as s, s.get(f"https://127.0.0.1:{gw.port}/echo") as r:
        assert r.status == 502
        assert (await r.json(content_type=None))["reason"] == "upstream-unavailable"
    assert 'ztgw_upstream_errors_total{kind="tls",route="app"} 1.0' in gw.metrics.render().decode()
