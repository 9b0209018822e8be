"""The ops listener, hot reload, graceful shutdown, and WebSockets that outlive a revocation."""

from __future__ import annotations

import asyncio
import json
import shutil
import tomllib
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from tests.conftest import GatewayFactory
from tests.support import Certs, session, to_toml
from ztgateway.app import Gateway
from ztgateway.dev.pki import CertificateAuthority, load_certificate


async def ops_get(gw: Gateway, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{gw.ops_port}{path}") as r:
        return r.status, await r.text()


async def test_healthz_and_readyz(gateway: Gateway) -> None:
    assert (await ops_get(gateway, "/healthz"))[0] == 200
    status, body = await ops_get(gateway, "/readyz")
    assert status == 200, body
    checks = json.loads(body)["checks"]
    assert checks["audit"]["ok"] and checks["certificates"]["ok"] and checks["upstreams"]["ok"]
    assert checks["issuers"]["status"]["dev"]["stale"] is False


async def test_readyz_fails_when_an_upstream_is_unreachable(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory({"upstreams": {"demo": {"url": "http://127.0.0.1:9"}}})
    status, body = await ops_get(gw, "/readyz")
    assert status == 503
    assert json.loads(body)["checks"]["upstreams"]["reachable"]["demo"] is False


async def test_metrics_count_decisions_and_expose_security_series(
    gateway: Gateway, certs: Certs
) -> None:
    async with session(certs) as s:
        async with s.get(f"https://127.0.0.1:{gateway.port}/echo") as r:
            assert r.status == 200
        async with s.get(f"https://127.0.0.1:{gateway.port}/api/echo") as r:
            assert r.status == 401
    status, text = await ops_get(gateway, "/metrics")
    assert status == 200
    for series in (
        'ztgw_requests_total{reason="policy-allowed",route="app",verdict="allow"} 1.0',
        'ztgw_requests_total{reason="token-required",route="api",verdict="deny"} 1.0',
        "ztgw_request_duration_seconds_bucket",
        "ztgw_decision_duration_seconds_count 2.0",
        "ztgw_upstream_duration_seconds_bucket",
        'ztgw_certificate_expiry_timestamp_seconds{cert="server"}',
        "ztgw_crl_next_update_timestamp_seconds",
        "ztgw_connections_open",
        'ztgw_jwks_keys{issuer="dev"} 1.0',
        "# TYPE ztgw_tls_handshake_failures_total counter",
        'ztgw_store_duration_seconds_count{operation="write_device"} 1.0',
        'ztgw_refusals_total{reason="token-required",route="api",stage="identity"} 1.0',
    ):
        assert series in text, series


async def test_reload_applies_a_new_policy_and_refuses_a_broken_one(
    gateway: Gateway, certs: Certs
) -> None:
    path = gateway.config.file
    url = f"https://127.0.0.1:{gateway.port}/echo"
    async with session(certs) as s:
        async with s.get(url) as r:
            assert r.status == 200
        cfg = tomllib.loads(path.read_text())
        cfg["routes"][0]["policy"] = {"users": ["bob"]}
        path.write_text(to_toml(cfg))
        assert gateway.reload() is True
        async with s.get(url) as r:
            assert r.status == 403
            assert (await r.json(content_type=None))["reason"] == "user-not-allowed"
        revision = gateway.config.revision
        path.write_text(path.read_text() + "\n[bogus]\n")
        assert gateway.reload() is False
        assert gateway.config.revision == revision
        async with s.get(url) as r:
            assert r.status == 403, "the old configuration keeps serving"
    text = gateway.metrics.render().decode()
    assert 'ztgw_config_reloads_total{result="failure"} 1.0' in text
    assert 'ztgw_config_reloads_total{result="success"} 1.0' in text


async def test_shutdown_finishes_in_flight_requests(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory()
    async with session(certs) as s:
        pending = asyncio.ensure_future(s.get(f"https://127.0.0.1:{gw.port}/slow?delay=0.5"))
        await asyncio.sleep(0.2)
        stopping = asyncio.ensure_future(gw.stop())
        r = await pending
        assert r.status == 200
        r.release()
        await stopping
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session(certs) as s, s.get(f"https://127.0.0.1:{gw.port}/echo"):
            pass


async def test_websocket_is_closed_with_1008_when_the_certificate_is_revoked(
    gateway_factory: GatewayFactory, certs: Certs, tmp_path: Path
) -> None:
    gw = await gateway_factory()
    async with (
        session(certs, "stolen-laptop") as s,
        s.ws_connect(f"wss://127.0.0.1:{gw.port}/ws") as ws,
    ):
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "hello"
        ca = CertificateAuthority.load(certs.ca, certs.ca_key)
        serial = load_certificate(certs.client("stolen-laptop")[0]).serial_number
        (tmp_path / "ca.crl").write_bytes(ca.crl([serial]).public_bytes(Encoding.PEM))
        msg = await ws.receive(timeout=5)
        assert msg.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.CLOSING,
        )
        assert ws.close_code == 1008


async def test_failing_audit_log_fails_closed_with_503_and_recovers(
    gateway_factory: GatewayFactory, certs: Certs, tmp_path: Path
) -> None:
    sink_dir = tmp_path / "siem"
    sink_dir.mkdir()
    gw = await gateway_factory({"audit": {"jsonl": str(sink_dir / "audit.jsonl")}})
    url = f"https://127.0.0.1:{gw.port}/echo"
    async with session(certs) as s:
        async with s.get(url) as r:
            assert r.status == 200
        await gw.audit.flush()
        # The SIEM volume disappears (a full or read-only disk behaves the same for us).
        shutil.rmtree(sink_dir)
        sink_dir.write_text("not a directory")
        async with s.get(url) as r:
            first = r.status  # accepted into the queue before the writer notices
        for _ in range(100):
            if not gw.audit.healthy:
                break
            await asyncio.sleep(0.05)
        assert not gw.audit.healthy
        async with s.get(url) as r:
            assert r.status == 503
            body = await r.json(content_type=None)
            assert body["reason"] == "service-unavailable"
            assert "Retry-After" in r.headers
        status, _ = await ops_get(gw, "/readyz")
        assert status == 503
        sink_dir.unlink()
        sink_dir.mkdir()
        await gw.audit.flush()
        assert gw.audit.healthy
        async with s.get(url) as r:
            assert r.status == 200
    assert first in (200, 503)
    metrics = gw.metrics.render().decode()
    assert (
        "ztgw_audit_unavailable_total 1.0" in metrics
        or "ztgw_audit_unavailable_total 2.0" in metrics
    )
    # nothing acknowledged was lost: every 200 above has its event in the database
    await gw.audit.flush()
    from ztgateway.audit import verify_db

    result = await verify_db(gw.config.audit.db)
    assert result.ok, result.problem
