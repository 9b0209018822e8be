"""Issue 17 item 5: live revocation of client certificates, against real counterparts.

A real OCSP responder and a real HTTP server publishing the CA's CRL run on loopback
(tests/revocation_fixtures.py); the gateway is real, its clock a ManualClock shared with the
responder, and `gw.revocation.tick()` stands in for the background interval (check_interval = 0)
so nothing here sleeps to let time pass.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import GatewayFactory
from tests.e2e.test_mtls import connect, eventually, request_on, samples, scraped_metric
from tests.e2e.test_proxy import closed_by_peer
from tests.e2e.test_security_forward_auth import NGINX_EDGE, ask, nginx_value
from tests.e2e.test_tls_alerts import CERTIFICATE_REVOKED, s_client_alert
from tests.revocation_fixtures import (
    CRLServer,
    OCSPResponder,
    OpenSSLResponder,
    issue,
    load_ca_with,
)
from tests.support import Certs, Reply, audit_events, to_toml
from ztgateway.app import Gateway
from ztgateway.clock import SYSTEM_CLOCK, ManualClock
from ztgateway.dev.pki import CertificateAuthority, atomic_write

HOST = "127.0.0.1"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(SYSTEM_CLOCK.time())


@pytest.fixture
def ca(certs: Certs, clock: ManualClock) -> CertificateAuthority:
    return load_ca_with(certs, clock)


@pytest.fixture
async def responder(ca: CertificateAuthority, clock: ManualClock) -> AsyncIterator[OCSPResponder]:
    r = OCSPResponder(ca, clock)
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def crl_server() -> AsyncIterator[CRLServer]:
    server = CRLServer()
    await server.start()
    yield server
    await server.stop()


ROUTES = [
    {"name": "app", "prefix": "/", "upstream": "demo"},
    {"name": "soft", "prefix": "/soft/", "upstream": "demo", "policy": {"ocsp": "soft-fail"}},
]


@dataclass
class Env:
    """Everything a revocation test works with: the gateway factory and its ManualClock, the
    test CA (on the same clock), a real OCSP responder and a real CRL publication point."""

    factory: GatewayFactory
    certs: Certs
    ca: CertificateAuthority
    responder: OCSPResponder
    crls: CRLServer
    clock: ManualClock
    tmp: Path

    def issue(self, name: str, *, ocsp: bool = True, crl: bool = False) -> tuple[Path, Path, int]:
        return issue(
            self.ca,
            self.tmp,
            name,
            ocsp_url=self.responder.url if ocsp else None,
            crl_url=self.crls.url if crl else None,
        )

    def ctx(self, pem: Path, key: Path) -> ssl.SSLContext:
        return tls_ctx(self.certs, pem, key)

    async def gateway(self, *, extra: dict[str, Any] | None = None, **revocation: Any) -> Gateway:
        """OCSP on, a hard-fail route at / and a soft-fail one at /soft/; `extra`: more
        configuration (a store, forward-auth)."""
        return await self.factory(
            {
                "revocation": {"ocsp": True, "check_interval": 0, **revocation},
                "routes": ROUTES,
                **(extra or {}),
            },
            clock=self.clock,
        )

    async def crl_gateway(self, *, file_crl: bool = False, **revocation: Any) -> Gateway:
        """CRLs fetched over HTTP only, unless `file_crl`: OpenSSL checks a handshake against
        the newest CRL of the issuer alone, so the session's `[tls] crl` file, made in the same
        second, could decide the handshake instead of the fetched CRL."""
        tls = {
            "cert": str(self.certs.server),
            "key": str(self.certs.server_key),
            "client_ca": str(self.certs.ca),
            "reload_interval": 0.2,
        }
        return await self.factory(
            {"revocation": {"check_interval": 0, **revocation}},
            replace=None if file_crl else {"tls": tls},
            clock=self.clock,
        )


@pytest.fixture
def env(
    gateway_factory: GatewayFactory,
    certs: Certs,
    ca: CertificateAuthority,
    responder: OCSPResponder,
    crl_server: CRLServer,
    clock: ManualClock,
    tmp_path: Path,
) -> Env:
    return Env(gateway_factory, certs, ca, responder, crl_server, clock, tmp_path)


def tls_ctx(certs: Certs, pem: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(str(pem), str(key))
    return ctx


async def fetch(gw: Gateway, ctx: ssl.SSLContext, path: str = "/echo") -> Reply:
    """One request on a new connection; it must get an HTTP answer."""
    client = await connect(gw.port or 0, ctx)
    try:
        return await request_on(client, path)
    finally:
        client.close()


# --------------------------------------------------------------------------- OCSP answers


async def test_good_answer_lets_the_certificate_through_and_is_cached_until_next_update(
    env: Env,
) -> None:
    pem, key, serial = env.issue("ocsp-good")
    env.responder.statuses[serial] = "good"
    env.responder.validity = 600
    gw = await env.gateway()
    ctx = env.ctx(pem, key)
    for _ in range(3):
        assert (await fetch(gw, ctx)).status == 200
    assert env.responder.requests == 1, "answers are reused until their nextUpdate"
    # RFC 8954: each request carries a fresh nonce.
    assert env.responder.nonces[0] is not None and len(env.responder.nonces[0]) == 16
    env.clock.advance(601)
    assert (await fetch(gw, ctx)).status == 200
    assert env.responder.requests == 2, "an answer past its nextUpdate is not reused"
    assert len(set(env.responder.nonces)) == 2
    assert await scraped_metric(gw, "ztgw_ocsp_checks_total", result="good") == 2


async def test_revoked_answer_refuses_the_certificate_on_every_route(env: Env) -> None:
    pem, key, serial = env.issue("ocsp-revoked")
    env.responder.statuses[serial] = "revoked"
    gw = await env.gateway()
    ctx = env.ctx(pem, key)
    for path in ("/echo", "/soft/echo"):  # soft-fail is for "cannot tell", never for revoked
        reply = await fetch(gw, ctx, path)
        assert reply.status == 403
        assert reply.json()["reason"] == "client-cert-revoked"
    assert await scraped_metric(gw, "ztgw_ocsp_checks_total", result="revoked") == 1
    events = [
        e
        for e in await audit_events(gw)
        if e.get("result", {}).get("reason") == "client-cert-revoked"
    ]
    assert events and "OCSP" in json.dumps(events[0])


async def test_unknown_answer_is_refused_on_hard_fail_and_audited_on_soft_fail(env: Env) -> None:
    pem, key, _ = env.issue("ocsp-unknown")
    gw = await env.gateway()
    ctx = env.ctx(pem, key)
    hard = await fetch(gw, ctx)
    assert hard.status == 403
    assert hard.json()["reason"] == "client-cert-status-unknown"
    soft = await fetch(gw, ctx, "/soft/echo")
    assert soft.status == 200
    assert await scraped_metric(gw, "ztgw_ocsp_soft_failures_total") == 1
    allowed = [e for e in await audit_events(gw) if e.get("result", {}).get("verdict") == "allow"]
    assert "client-cert-status-unknown" in json.dumps(allowed[-1])


async def test_responder_down_is_503_on_hard_fail_and_let_through_on_soft_fail(env: Env) -> None:
    pem, key, serial = env.issue("ocsp-down")
    env.responder.statuses[serial] = "good"
    await env.responder.stop()
    gw = await env.gateway()
    ctx = env.ctx(pem, key)
    hard = await fetch(gw, ctx)
    assert hard.status == 503
    assert hard.json()["reason"] == "client-cert-status-unavailable"
    assert (await fetch(gw, ctx, "/soft/echo")).status == 200
    assert await scraped_metric(gw, "ztgw_ocsp_checks_total", result="unavailable") >= 1
    # Back up: once the failure's short retry time passed, the responder is asked again.
    await env.responder.start()
    env.clock.advance(10)
    assert (await fetch(gw, ctx)).status == 200


@pytest.mark.parametrize(
    ("mode", "result"),
    [
        ("stale", "stale"),
        ("future", "stale"),
        ("other-serial", "invalid"),
        ("stranger", "signer"),
        ("delegated-no-eku", "signer"),
        ("other-nonce", "nonce"),
        ("try-later", "unavailable"),
    ],
)
async def test_an_answer_that_fails_a_check_is_not_believed(
    env: Env, mode: Any, result: str
) -> None:
    pem, key, serial = env.issue(f"ocsp-{mode}")
    env.responder.statuses[serial] = "good"  # a "good" the gateway must not take
    env.responder.mode = mode
    gw = await env.gateway()
    reply = await fetch(gw, env.ctx(pem, key))
    assert reply.status == 503
    assert reply.json()["reason"] == "client-cert-status-unavailable"
    assert await scraped_metric(gw, "ztgw_ocsp_checks_total", result=result) == 1
    assert await scraped_metric(gw, "ztgw_ocsp_checks_total", result="good") == 0


async def test_a_delegated_responder_the_ca_authorised_is_believed(env: Env) -> None:
    pem, key, serial = env.issue("ocsp-delegated")
    env.responder.statuses[serial] = "revoked"
    env.responder.mode = "delegated"
    gw = await env.gateway()
    reply = await fetch(gw, env.ctx(pem, key))
    assert (reply.status, reply.json()["reason"]) == (403, "client-cert-revoked")


async def test_an_answer_without_our_nonce_is_refused_only_when_nonces_are_required(
    env: Env,
) -> None:
    pem, key, serial = env.issue("ocsp-no-nonce")
    env.responder.statuses[serial] = "good"
    env.responder.mode = "no-nonce"
    lenient = await env.gateway()
    assert (await fetch(lenient, env.ctx(pem, key))).status == 200
    strict = await env.gateway(ocsp_require_nonce=True)
    reply = await fetch(strict, env.ctx(pem, key))
    assert reply.status == 503
    assert await scraped_metric(strict, "ztgw_ocsp_checks_total", result="nonce") == 1


async def test_the_configured_responder_overrides_the_certificates_own(env: Env) -> None:
    # The certificate names a responder nobody listens on (port 9, discard).
    pem, key, serial = issue(env.ca, env.tmp, "ocsp-override", ocsp_url="http://127.0.0.1:9/")
    env.responder.statuses[serial] = "revoked"
    gw = await env.gateway(ocsp_responder=env.responder.url)
    reply = await fetch(gw, env.ctx(pem, key))
    assert reply.json()["reason"] == "client-cert-revoked"
    assert env.responder.requests == 1


# --------------------------------------------------------------------------- revocation while open


async def test_revocation_seen_by_ocsp_closes_the_open_keepalive_connection(env: Env) -> None:
    pem, key, serial = env.issue("ocsp-open")
    env.responder.statuses[serial] = "good"
    env.responder.validity = 300
    gw = await env.gateway()
    reader, writer = await keepalive(gw, env.ctx(pem, key))
    try:
        env.responder.statuses[serial] = "revoked"
        env.clock.advance(301)  # the cached "good" runs out; the tick asks again
        await gw.revocation.tick()
        assert await closed_by_peer(reader, 5.0), "the revoked certificate's connection stays open"
    finally:
        writer.close()
    assert await scraped_metric(gw, "ztgw_revocations_enforced_total", kind="connection") == 1


async def test_revocation_closes_the_certificates_websocket_with_1008(env: Env) -> None:
    pem, key, serial = env.issue("ocsp-ws")
    env.responder.statuses[serial] = "good"
    env.responder.validity = 300
    gw = await env.gateway()
    connector = aiohttp.TCPConnector(ssl=env.ctx(pem, key))
    async with (
        aiohttp.ClientSession(connector=connector) as s,
        s.ws_connect(f"wss://{HOST}:{gw.port}/ws") as ws,
    ):
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "hello"
        env.responder.statuses[serial] = "revoked"
        env.clock.advance(301)
        await gw.revocation.tick()
        msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1008
    assert await scraped_metric(gw, "ztgw_revocations_enforced_total", kind="websocket") == 1


# --------------------------------------------------------------------------- CRLs over HTTP


async def test_crl_from_a_url_refuses_the_revoked_certificate_in_the_handshake(env: Env) -> None:
    pem, key, serial = env.issue("crl-url", ocsp=False)
    env.crls.publish(env.ca, [])
    gw = await env.crl_gateway(crl_urls=[env.crls.url])
    assert env.crls.requests == 1
    assert (await fetch(gw, env.ctx(pem, key))).status == 200

    env.crls.publish(env.ca, [serial])
    env.clock.advance(24 * 3600 - 1800)  # inside crl_refresh_before of the nextUpdate
    await gw.revocation.tick()
    assert env.crls.requests == 2
    # Loaded into the SSLContext: refused in the handshake, with certificate_revoked.
    alert = await s_client_with(gw, pem, key, env.certs)
    assert alert == CERTIFICATE_REVOKED
    assert await scraped_metric(gw, "ztgw_crl_fetches_total", result="success") == 2


async def s_client_with(gw: Gateway, pem: Path, key: Path, certs: Certs) -> int | None:
    # s_client_alert takes a name under certs.dir/clients; link ours there under a unique name.
    name = f"rev-{pem.stem}-{time.monotonic_ns()}"
    target_pem, target_key = certs.client(name)
    target_pem.write_bytes(pem.read_bytes())
    target_key.write_bytes(key.read_bytes())
    try:
        return await s_client_alert(gw.port or 0, certs, name, "-tls1_3")
    finally:
        target_pem.unlink()
        target_key.unlink()


async def test_crl_is_refreshed_before_its_next_update_not_before(env: Env) -> None:
    env.crls.publish(env.ca, [], next_update_days=1)
    gw = await env.crl_gateway(crl_urls=[env.crls.url], crl_refresh_before="2h")
    assert env.crls.requests == 1
    env.clock.advance(22 * 3600 - 60)
    await gw.revocation.tick()
    assert env.crls.requests == 1, "fetched again long before it was due"
    env.clock.advance(120)
    await gw.revocation.tick()
    assert env.crls.requests == 2, "not refreshed crl_refresh_before ahead of nextUpdate"


async def test_stale_crl_fails_closed_is_counted_and_recovers(env: Env) -> None:
    pem, key, _ = env.issue("crl-stale", ocsp=False)
    env.crls.publish(env.ca, [], next_update_days=1)
    # With the file CRL beside it: the gateway's clock runs a day ahead of the system clock
    # OpenSSL reads, so OpenSSL would take the CRLs published "tomorrow" as not yet valid;
    # the file CRL (valid by the system clock) keeps the handshake about this test's subject,
    # the request-time check that reads the gateway's clock.
    gw = await env.crl_gateway(file_crl=True, crl_urls=[env.crls.url])
    ctx = env.ctx(pem, key)
    assert (await fetch(gw, ctx)).status == 200
    assert await scraped_metric(gw, "ztgw_crl_stale") == 0

    env.crls.status = 503  # the CA's publication point breaks
    env.clock.advance(24 * 3600 + 1)
    await gw.revocation.tick()
    assert await scraped_metric(gw, "ztgw_crl_stale") == 1
    assert await scraped_metric(gw, "ztgw_crl_fetches_total", result="unavailable") >= 1
    # The handshake may still pass (OpenSSL reads the system env.clock, not the gateway's), but
    # the request is refused: a CRL past nextUpdate vouches for nobody (RFC 5280 §6.3.3).
    reply = await fetch(gw, ctx)
    assert reply.status == 503
    assert reply.json()["reason"] == "client-cert-status-unavailable"

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{HOST}:{gw.ops_port}/readyz") as r,
    ):
        assert r.status == 503
        ready = await r.json()
    assert ready["checks"]["revocation"]["crl_sources"][env.crls.url]["stale"] is True

    env.crls.status = 200
    env.crls.publish(env.ca, [], next_update_days=1)
    env.clock.advance(60)
    await gw.revocation.tick()
    assert await scraped_metric(gw, "ztgw_crl_stale") == 0
    assert (await fetch(gw, ctx)).status == 200


async def test_an_older_crl_does_not_replace_a_newer_one(env: Env) -> None:
    """A rollback (an earlier CRL served again, by a stale mirror or an attacker) would
    un-revoke certificates: RFC 5280 §5.2.3 CRL numbers only grow."""
    pem, key, serial = env.issue("crl-rollback", ocsp=False)
    old = env.ca.crl([], next_update_days=2, crl_number=1)
    env.crls.publish(env.ca, [serial], next_update_days=1)  # number: ms since the epoch
    gw = await env.crl_gateway(crl_urls=[env.crls.url], crl_refresh_before="23h")
    env.crls.body = old.public_bytes(serialization.Encoding.DER)
    env.clock.advance(12 * 3600 + 1)  # due again: half way through a one-day CRL at the latest
    await gw.revocation.tick()
    assert env.crls.requests == 2
    assert await scraped_metric(gw, "ztgw_crl_fetches_total", result="invalid") == 1
    alert = await s_client_with(gw, pem, key, env.certs)
    assert alert == CERTIFICATE_REVOKED, "the newer CRL's revocation was rolled back"


async def test_crl_signed_by_another_ca_is_refused_and_counted(env: Env) -> None:
    stranger = CertificateAuthority.generate("Mallory CA", clock=env.clock)
    env.crls.publish(stranger, [])
    gw = await env.crl_gateway(crl_urls=[env.crls.url])
    assert await scraped_metric(gw, "ztgw_crl_fetches_total", result="invalid") == 1
    assert await scraped_metric(gw, "ztgw_crl_stale") == 1


async def test_distribution_point_crl_is_fetched_on_first_sight_and_enforced(env: Env) -> None:
    good_pem, good_key, _ = env.issue("cdp-good", ocsp=False, crl=True)
    bad_pem, bad_key, bad_serial = env.issue("cdp-bad", ocsp=False, crl=True)
    env.crls.publish(env.ca, [bad_serial])
    gw = await env.crl_gateway(crl_distribution_points=True)
    assert env.crls.requests == 0
    assert (await fetch(gw, env.ctx(good_pem, good_key))).status == 200
    assert env.crls.requests == 1
    # The fetched CRL is in the SSLContext now: refused in the handshake, saying why.
    assert await s_client_with(gw, bad_pem, bad_key, env.certs) == CERTIFICATE_REVOKED
    assert env.crls.requests == 1
    # A gateway whose first sight of the distribution point is the revoked certificate: the
    # handshake passes (no CRL yet), the request waits for the fetch and is refused.
    fresh = await env.crl_gateway(crl_distribution_points=True)
    reply = await fetch(fresh, env.ctx(bad_pem, bad_key))
    assert (reply.status, reply.json()["reason"]) == (403, "client-cert-revoked")
    assert env.crls.requests == 2


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_revocation_found_on_one_replica_holds_on_another_without_asking(
    env: Env, backend: str, request: pytest.FixtureRequest
) -> None:
    """Two gateways on one store (workers on one SQLite file, or replicas on one real
    redis-server): OCSP on the first finds the revocation; the second refuses the certificate
    after one tick, with the responder down and even on a soft-fail route, and closes the
    connection it held open."""
    store: dict[str, Any] = {}
    if backend == "redis":
        store = {"store": {"url": request.getfixturevalue("redis_server").url}}
    pem, key, serial = env.issue("ocsp-shared")
    env.responder.statuses[serial] = "good"
    first = await env.gateway(extra=store)
    second = await env.gateway(extra=store)
    ctx = env.ctx(pem, key)
    held = await connect(second.port or 0, ctx)
    try:
        assert (await request_on(held, "/soft/echo")).status == 200
        env.responder.statuses[serial] = "revoked"
        assert (await fetch(first, ctx)).json()["reason"] == "client-cert-revoked"
        await env.responder.stop()
        await second.revocation.tick()
        with pytest.raises(OSError):  # the held keep-alive connection was closed
            await request_on(held, "/soft/echo")
    finally:
        held.close()
    reply = await fetch(second, ctx, "/soft/echo")
    assert (reply.status, reply.json()["reason"]) == (403, "client-cert-revoked")


async def test_metrics_for_revocation_are_exposed_before_anything_happens(env: Env) -> None:
    gw = await env.factory(clock=env.clock)
    names = {name for name, _ in await samples(gw)}
    for name in (
        "ztgw_crl_fetches_total",
        "ztgw_crl_stale",
        "ztgw_ocsp_checks_total",
        "ztgw_ocsp_soft_failures_total",
        "ztgw_revocations_enforced_total",
    ):
        assert name in names, name


async def test_openssl_as_the_responder_good_revoked_and_unknown(env: Env) -> None:
    """An independent env.responder implementation (OpenSSL's) behind loopback HTTP: its answers,
    its nonce handling and its CA-signed ResponderID by name are understood."""
    env.ca = CertificateAuthority.load(env.certs.ca, env.certs.ca_key)
    work = env.tmp / "openssl-ocsp"
    work.mkdir()
    env.responder = OpenSSLResponder(env.certs.ca, env.certs.ca_key, work)
    await env.responder.start()
    try:
        good = env.issue("ossl-good")
        revoked = env.issue("ossl-revoked")
        unknown = env.issue("ossl-unknown")
        env.responder.good.add(good[2])
        env.responder.revoked.add(revoked[2])
        gw = await env.factory(
            {"revocation": {"ocsp": True, "check_interval": 0, "ocsp_require_nonce": True}}
        )
        assert (await fetch(gw, env.ctx(good[0], good[1]))).status == 200
        reply = await fetch(gw, env.ctx(revoked[0], revoked[1]))
        assert (reply.status, reply.json()["reason"]) == (403, "client-cert-revoked")
        reply = await fetch(gw, env.ctx(unknown[0], unknown[1]))
        assert (reply.status, reply.json()["reason"]) == (403, "client-cert-status-unknown")
        assert env.responder.requests == 3
    finally:
        await env.responder.stop()


async def test_a_certificate_forwarded_by_the_edge_gets_the_same_revocation_checks(
    env: Env,
) -> None:
    """Forward-auth verifies the edge's forwarded certificate like a handshake (certverify);
    the decision then asks the same revocation service: OCSP on a hard-fail route, and a
    revocation another replica recorded."""
    pem, _, serial = env.issue("edge-ocsp")
    env.responder.statuses[serial] = "revoked"
    gw = await env.gateway(extra={"forward_auth": NGINX_EDGE})
    status, _, body = await ask(gw, {"X-SSL-Client-Cert": nginx_value(pem.read_bytes())})
    assert status == 403 and body is not None
    assert body["reason"] == "client-cert-revoked"
    assert env.responder.requests == 1


async def test_a_forwarded_certificate_with_no_usable_ocsp_answer_fails_closed(env: Env) -> None:
    pem, _, serial = env.issue("edge-down")
    env.responder.statuses[serial] = "good"
    await env.responder.stop()
    gw = await env.gateway(extra={"forward_auth": NGINX_EDGE})
    status, _, body = await ask(gw, {"X-SSL-Client-Cert": nginx_value(pem.read_bytes())})
    # nginx's auth_request understands only 2xx, 401 and 403: the edge gets 403, the reason
    # stays the gateway's own.
    assert status == 403 and body is not None
    assert body["reason"] == "client-cert-status-unavailable"


async def keepalive(gw: Gateway, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, Any]:
    """A connection that has answered one request and stays open."""
    reader, writer = await asyncio.open_connection(HOST, gw.port, ssl=ctx, server_hostname=HOST)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 "), head
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    return reader, writer


async def test_revocation_in_a_refreshed_crl_closes_the_open_keepalive_connection(
    env: Env,
) -> None:
    pem, key, serial = env.issue("crl-open", ocsp=False)
    env.crls.publish(env.ca, [], next_update_days=1)
    gw = await env.crl_gateway(crl_urls=[env.crls.url], crl_refresh_before="1h")
    reader, writer = await keepalive(gw, env.ctx(pem, key))
    try:
        env.crls.publish(env.ca, [serial], next_update_days=1)
        env.clock.advance(23 * 3600 + 1)  # the refresh falls due
        await gw.revocation.tick()
        assert await closed_by_peer(reader, 5.0), "the revoked certificate's connection stays open"
    finally:
        writer.close()
    assert await scraped_metric(gw, "ztgw_revocations_enforced_total", kind="connection") == 1


async def test_revocation_in_the_crl_file_closes_the_open_keepalive_connection(
    env: Env,
) -> None:
    pem, key, _ = env.issue("file-open", ocsp=False)
    gw = await env.crl_gateway(file_crl=True)
    reader, writer = await keepalive(gw, env.ctx(pem, key))
    try:
        serial = x509.load_pem_x509_certificate(pem.read_bytes()).serial_number
        crl = env.ca.crl([serial])
        atomic_write(env.tmp / "ca.crl", crl.public_bytes(serialization.Encoding.PEM))
        await eventually(
            lambda: serial in gw.tls.current.revocations.revoked_serials, "CRL file reloaded"
        )
        await gw.revocation.tick()
        assert await closed_by_peer(reader, 5.0), "the revoked certificate's connection stays open"
    finally:
        writer.close()


async def test_a_reload_applies_new_crl_urls_and_drops_removed_ones(env: Env) -> None:
    pem, key, serial = env.issue("crl-reload", ocsp=False)
    env.crls.publish(env.ca, [serial])
    gw = await env.crl_gateway()
    assert (await fetch(gw, env.ctx(pem, key))).status == 200
    cfg = tomllib.loads(gw.config.file.read_text())
    cfg["revocation"]["crl_urls"] = [env.crls.url]
    gw.config.file.write_text(to_toml(cfg))
    assert gw.reload()
    await gw.revocation.tick()
    assert env.crls.requests == 1
    assert await s_client_with(gw, pem, key, env.certs) == CERTIFICATE_REVOKED
    del cfg["revocation"]["crl_urls"]
    gw.config.file.write_text(to_toml(cfg))
    assert gw.reload()
    assert list(gw.revocation.crls.sources) == []


async def test_concurrent_first_requests_share_one_distribution_point_fetch(env: Env) -> None:
    pem, key, _ = env.issue("cdp-concurrent", ocsp=False, crl=True)
    env.crls.publish(env.ca, [])
    gw = await env.crl_gateway(crl_distribution_points=True)
    replies = await asyncio.gather(*(fetch(gw, env.ctx(pem, key)) for _ in range(6)))
    assert [r.status for r in replies] == [200] * 6, [r.body[:80] for r in replies]
    assert env.crls.requests == 1
