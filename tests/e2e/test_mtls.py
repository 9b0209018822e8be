"""The mTLS listener against a real gateway: who gets through the handshake, what is counted, and
how revocation, resumption, TLS policy, connection limits and certificate reloads behave.

Clients are real TLS stacks on loopback. Blocking `ssl` sockets run in threads (the gateway
shares the test's event loop) because only they expose `session=` / `session_reused` and let two
requests travel over one socket we can see.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import inspect
import logging
import socket
import ssl
import struct
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GatewayFactory, base_config
from tests.support import (
    Certs,
    Reply,
    audit_events,
    client_ssl,
    deep_merge,
    scrape,
    session,
    to_toml,
)
from ztgateway.app import Gateway
from ztgateway.config import load_config
from ztgateway.dev.demo_app import start_demo_app
from ztgateway.dev.pki import CertificateAuthority, atomic_write

HOST = "127.0.0.1"
IO_TIMEOUT = 5.0


# --------------------------------------------------------------------------- helpers


class RawClient:
    """One blocking TLS connection; each `get` is one HTTP/1.1 request on that same socket."""

    def __init__(
        self, port: int, ctx: ssl.SSLContext, *, tls_session: ssl.SSLSession | None = None
    ) -> None:
        raw = socket.create_connection((HOST, port), timeout=IO_TIMEOUT)
        try:
            self.sock = ctx.wrap_socket(raw, server_hostname=HOST, session=tls_session)
        except BaseException:
            raw.close()
            raise

    def get(self, path: str = "/echo") -> Reply:
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nAccept: application/json\r\n\r\n".encode()
        )
        resp = http.client.HTTPResponse(self.sock)
        try:
            resp.begin()
            body = resp.read()
        finally:
            resp.close()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)

    def peer_serial(self) -> int:
        der = self.sock.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    def close(self) -> None:
        self.sock.close()


async def connect(
    port: int, ctx: ssl.SSLContext, *, tls_session: ssl.SSLSession | None = None
) -> RawClient:
    return await asyncio.to_thread(RawClient, port, ctx, tls_session=tls_session)


async def request_on(client: RawClient, path: str = "/echo") -> Reply:
    """One request on the client's own connection (in a thread: the socket blocks)."""
    return await asyncio.to_thread(client.get, path)


async def attempt(
    port: int, ctx: ssl.SSLContext, *, tls_session: ssl.SSLSession | None = None
) -> Reply | OSError:
    """Connect and send one request; the reply, or the error the client saw instead of one."""

    def run() -> Reply | OSError:
        try:
            client = RawClient(port, ctx, tls_session=tls_session)
        except OSError as exc:  # ssl.SSLError and ConnectionError are OSErrors
            return exc
        try:
            return client.get()
        except OSError as exc:  # includes RemoteDisconnected: closed before any status line
            return exc
        finally:
            client.close()

    return await asyncio.to_thread(run)


async def assert_refused(
    port: int, ctx: ssl.SSLContext, *, tls_session: ssl.SSLSession | None = None
) -> OSError:
    outcome = await attempt(port, ctx, tls_session=tls_session)
    assert isinstance(outcome, OSError), (
        f"expected the TLS handshake to be refused, got HTTP {outcome.status}: {outcome.body!r}"
    )
    return outcome


def tls_client(
    certs: Certs,
    name: str | None = "alice-laptop",
    *,
    version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    ctx = client_ssl(certs, name)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


async def samples(gw: Gateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, by name and labels."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(await scrape(gw.ops_port)):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


async def scraped_metric(gw: Gateway, name: str, **labels: str) -> float:
    """One sample as Prometheus reads it from the ops listener (support.metric reads the
    registry); a labelled counter never touched counts as 0."""
    return (await samples(gw)).get((name, frozenset(labels.items())), 0.0)


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 3.0
) -> None:
    async def holds() -> bool:
        result = check()
        return bool(await result) if inspect.isawaitable(result) else bool(result)

    deadline = time.monotonic() + timeout
    while not await holds():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for: {what}")
        await asyncio.sleep(0.02)


async def metric_reaches(gw: Gateway, name: str, value: float, **labels: str) -> None:
    async def check() -> bool:
        return await scraped_metric(gw, name, **labels) >= value

    await eventually(check, f"{name}{labels} >= {value}")


def ca(certs: Certs) -> CertificateAuthority:
    return CertificateAuthority.load(certs.ca, certs.ca_key)


def serial_of(certs: Certs, name: str) -> int:
    pem, _ = certs.client(name)
    return x509.load_pem_x509_certificate(pem.read_bytes()).serial_number


async def revoke(gw: Gateway, certs: Certs, tmp_path: Path, *names: str) -> set[int]:
    """Write a CRL signed by the CA revoking `names` and wait until the gateway loaded it."""
    serials = {serial_of(certs, n) for n in names}
    crl = ca(certs).crl(serials)
    atomic_write(tmp_path / "ca.crl", crl.public_bytes(serialization.Encoding.PEM))

    async def loaded() -> bool:
        return serials <= gw.tls.current.revocations.revoked_serials

    await eventually(loaded, f"gateway loaded a CRL revoking {names}")
    return serials


# --------------------------------------------------------------------------- 1. who gets in


async def test_alice_certificate_gets_through_to_echo(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory()
    client = await connect(gw.port or 0, tls_client(certs))
    try:
        reply = await request_on(client)
    finally:
        client.close()
    assert reply.status == 200
    assert reply.json()["path"] == "/echo"
    assert await scraped_metric(gw, "ztgw_tls_handshakes_total", tls_version="TLSv1.3") == 1


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"]
)
async def test_client_without_certificate_is_refused_at_the_handshake(
    gateway_factory: GatewayFactory, certs: Certs, version: ssl.TLSVersion
) -> None:
    gw = await gateway_factory()
    await assert_refused(gw.port or 0, tls_client(certs, None, version=version))
    await metric_reaches(gw, "ztgw_tls_handshake_failures_total", 1, reason="no_certificate")
    assert await scraped_metric(gw, "ztgw_tls_handshakes_total", tls_version=version.name) == 0
    requests = [k for k in await samples(gw) if k[0] == "ztgw_requests_total"]
    assert requests == [], "a refused handshake must never reach the request pipeline"


@pytest.mark.parametrize(
    ("device", "reason"),
    [
        ("mallory-laptop", "unknown_ca"),
        ("old-laptop", "expired"),
        ("server-cert-as-client", "bad_purpose"),
    ],
)
async def test_untrusted_client_certificate_is_refused_at_the_handshake(
    gateway_factory: GatewayFactory, certs: Certs, device: str, reason: str
) -> None:
    gw = await gateway_factory()
    await assert_refused(gw.port or 0, tls_client(certs, device))
    await metric_reaches(gw, "ztgw_tls_handshake_failures_total", 1, reason=reason)
    failures = {
        dict(labels)["reason"]: v
        for (name, labels), v in (await samples(gw)).items()
        if name == "ztgw_tls_handshake_failures_total" and v
    }
    assert failures == {reason: 1.0}, "exactly one failure, counted under its own reason"
    completed = [k for k in await samples(gw) if k[0] == "ztgw_tls_handshakes_total"]
    assert completed == []


async def test_revoked_certificate_is_refused_at_the_handshake_once_the_crl_is_reloaded(
    gateway_factory: GatewayFactory, certs: Certs, tmp_path: Path
) -> None:
    gw = await gateway_factory()
    port = gw.port or 0
    before = await attempt(port, tls_client(certs, "stolen-laptop"))
    assert isinstance(before, Reply) and before.status == 200

    await revoke(gw, certs, tmp_path, "stolen-laptop")

    await assert_refused(port, tls_client(certs, "stolen-laptop"))
    await metric_reaches(gw, "ztgw_tls_handshake_failures_total", 1, reason="revoked")
    # The new CRL is not a blanket refusal: other devices of the same CA still get in.
    alice = await attempt(port, tls_client(certs))
    assert isinstance(alice, Reply) and alice.status == 200


# --------------------------------------------------------------------------- 2. keep-alive


async def test_revocation_refuses_the_next_request_on_an_open_keepalive_connection(
    gateway_factory: GatewayFactory, certs: Certs, tmp_path: Path
) -> None:
    gw = await gateway_factory()
    client = await connect(gw.port or 0, tls_client(certs, "stolen-laptop"))
    try:
        first = await request_on(client)
        assert first.status == 200
        assert first.headers.get("connection", "").lower() != "close"

        (serial,) = await revoke(gw, certs, tmp_path, "stolen-laptop")

        # Same socket object, so the same TCP and TLS connection: no new handshake happened
        # (which the CRL would have refused).
        second = await request_on(client)
    finally:
        client.close()
    assert second.status == 403
    assert second.headers["content-type"].startswith("application/problem+json")
    problem = second.json()
    assert problem["reason"] == "client-cert-revoked"
    decision_id = second.headers["x-zt-decision-id"]
    assert decision_id
    assert await scraped_metric(gw, "ztgw_tls_handshakes_total", tls_version="TLSv1.3") == 1

    events = [e for e in await audit_events(gw) if e["decision_id"] == decision_id]
    assert len(events) == 1
    assert events[0]["result"]["verdict"] == "deny"
    assert events[0]["result"]["reason"] == "client-cert-revoked"
    assert events[0]["input"]["cert"]["serial"] == format(serial, "x")


# --------------------------------------------------------------------------- 3. resumption


async def session_after_one_request(port: int, ctx: ssl.SSLContext) -> ssl.SSLSession:
    """A new connection's TLS session, taken after one answered request: TLS 1.3 tickets
    arrive after the handshake, so the session resumes nothing before a response was read."""
    first = await connect(port, ctx)
    try:
        assert (await request_on(first)).status == 200
        tls_session = first.sock.session
    finally:
        first.close()
    assert tls_session is not None
    return tls_session


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"]
)
async def test_resumed_tls_session_does_not_outlive_a_revocation(
    gateway_factory: GatewayFactory, certs: Certs, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    gw = await gateway_factory()
    port = gw.port or 0
    ctx = tls_client(certs, "stolen-laptop", version=version)

    tls_session = await session_after_one_request(port, ctx)

    # Without a revocation the server does resume: otherwise this test would prove nothing.
    resumed = await connect(port, ctx, tls_session=tls_session)
    try:
        assert resumed.sock.session_reused, f"server did not resume a {version.name} session"
        reply = await request_on(resumed)
        assert reply.status == 200
        # The identity survives resumption (OpenSSL keeps the peer certificate in the session).
        assert reply.json()["headers_map"]["x-zt-device-id"] == "stolen-laptop"
        if version is ssl.TLSVersion.TLSv1_3:
            tls_session = resumed.sock.session or tls_session
    finally:
        resumed.close()

    await revoke(gw, certs, tmp_path, "stolen-laptop")

    outcome = await attempt(port, ctx, tls_session=tls_session)
    if isinstance(outcome, Reply):
        assert outcome.status == 403, outcome.body
        assert outcome.json()["reason"] == "client-cert-revoked"
    else:
        await metric_reaches(gw, "ztgw_tls_handshake_failures_total", 1, reason="revoked")


async def test_a_tls13_handshake_issues_one_session_ticket_and_it_resumes(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    # One ticket, not OpenSSL's two: each ticket made after a full handshake carries the client
    # certificate and cost ~200 µs of CPU (edge/tls.py SESSION_TICKETS, docs/performance.md).
    gw = await gateway_factory()
    port = gw.port or 0
    ctx = tls_client(certs, version=ssl.TLSVersion.TLSv1_3)
    tickets: list[int] = []

    def on_message(
        conn: Any, direction: str, version: Any, kind: Any, msg: Any, data: bytes
    ) -> None:
        if direction == "read" and msg == _NEW_SESSION_TICKET:
            tickets.append(len(data))

    ctx._msg_callback = on_message  # type: ignore[attr-defined]  # CPython's TLS message trace
    tls_session = await session_after_one_request(port, ctx)
    assert len(tickets) == 1, tickets

    resumed = await connect(port, ctx, tls_session=tls_session)
    try:
        assert resumed.sock.session_reused
        assert (await request_on(resumed)).status == 200
    finally:
        resumed.close()
    assert len(tickets) == 2, tickets  # the resumed connection got its own fresh one


_NEW_SESSION_TICKET = ssl._TLSMessageType.NEWSESSION_TICKET  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- 4. TLS policy


def legacy_client(certs: Certs, version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that really offers TLS 1.0/1.1: OpenSSL 3 refuses to unless told SECLEVEL=0."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(certs.ca))
    pem, key = certs.client("alice-laptop")
    ctx.load_cert_chain(str(pem), str(key))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = version
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["tls10", "tls11"]
)
async def test_tls_older_than_1_2_is_refused(
    gateway_factory: GatewayFactory, certs: Certs, version: ssl.TLSVersion
) -> None:
    gw = await gateway_factory()
    await assert_refused(gw.port or 0, legacy_client(certs, version))
    # The server refused it (not our client declining to send a ClientHello).
    await metric_reaches(gw, "ztgw_tls_handshake_failures_total", 1, reason="protocol_version")


async def test_tls_1_2_and_1_3_are_accepted_and_alpn_selects_http_1_1(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory()
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = tls_client(certs, version=version)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        client = await connect(gw.port or 0, ctx)
        try:
            assert client.sock.version() == version.name.replace("_", ".")
            assert client.sock.selected_alpn_protocol() == "http/1.1"
            reply = await request_on(client)
        finally:
            client.close()
        assert reply.status == 200
        assert reply.json()["http_version"] == "1.1"
    assert await scraped_metric(gw, "ztgw_tls_handshakes_total", tls_version="TLSv1.2") == 1
    assert await scraped_metric(gw, "ztgw_tls_handshakes_total", tls_version="TLSv1.3") == 1


@pytest.mark.parametrize("group", ["X25519", "prime256v1", "secp384r1"])
async def test_tls_1_3_client_offering_one_mozilla_intermediate_group_is_accepted(
    gateway_factory: GatewayFactory, certs: Certs, group: str
) -> None:
    # TLS 1.3 only: under TLS 1.2 the client's group list also limits the curve of the
    # server's ECDSA certificate (RFC 8422 §5.1), so a P-256 certificate needs P-256 offered.
    gw = await gateway_factory()
    ctx = tls_client(certs, version=ssl.TLSVersion.TLSv1_3)
    ctx.set_ecdh_curve(group)  # OpenSSL 3: the client offers this group and no other
    outcome = await attempt(gw.port or 0, ctx)
    assert isinstance(outcome, Reply), f"key exchange group {group} refused: {outcome!r}"
    assert outcome.status == 200


@pytest.fixture
def rsa_server(certs: Certs, tmp_path: Path) -> dict[str, Any]:
    """An RSA server certificate: with an EC one, RSA key exchange could never be negotiated and
    a refusal of it would prove nothing about the cipher policy."""
    issued = ca(certs).issue_server("localhost", key_type="rsa")
    cert, key = tmp_path / "rsa-server.pem", tmp_path / "rsa-server.key"
    issued.write(cert, key)
    return {"tls": {"cert": str(cert), "key": str(key)}}


async def test_forward_secret_aead_suite_is_accepted_under_tls_1_2_with_an_rsa_certificate(
    gateway_factory: GatewayFactory, certs: Certs, rsa_server: dict[str, Any]
) -> None:
    gw = await gateway_factory(rsa_server)
    ctx = tls_client(certs, version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-RSA-AES128-GCM-SHA256")
    client = await connect(gw.port or 0, ctx)
    try:
        cipher = client.sock.cipher()
        reply = await request_on(client)
    finally:
        client.close()
    assert cipher is not None and cipher[0] == "ECDHE-RSA-AES128-GCM-SHA256"
    assert reply.status == 200


@pytest.mark.parametrize(
    "cipher",
    [
        "AES128-GCM-SHA256",  # RSA key transport: no forward secrecy
        "AES128-SHA",  # RSA key transport, CBC
        "ECDHE-RSA-AES128-SHA",  # forward secret but CBC with SHA-1 MAC: not in Mozilla intermediate
    ],
)
async def test_tls_1_2_client_offering_only_a_weak_suite_is_refused(
    gateway_factory: GatewayFactory, certs: Certs, rsa_server: dict[str, Any], cipher: str
) -> None:
    gw = await gateway_factory(rsa_server)
    await assert_refused(
        gw.port or 0, tls_client(certs, version=ssl.TLSVersion.TLSv1_2, ciphers=cipher)
    )
    await metric_reaches(gw, "ztgw_tls_handshake_failures_total", 1, reason="no_shared_cipher")


# --------------------------------------------------------------------------- 5, 6. limits


async def read_to_close(reader: asyncio.StreamReader) -> bytes:
    """What the gateway sent before it closed the connection (nothing, if it reset it)."""
    try:
        return await asyncio.wait_for(reader.read(), IO_TIMEOUT)
    except ConnectionResetError:
        return b""


async def test_silent_tcp_client_is_closed_after_the_handshake_timeout_and_counted(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory({"server": {"handshake_timeout": 0.5}})
    reader, writer = await asyncio.open_connection(HOST, gw.port)
    try:
        # The default handshake_timeout is 10 s: being closed well before proves ours applied.
        data = await read_to_close(reader)
        assert data == b""
    finally:
        writer.close()
    await metric_reaches(gw, "ztgw_tls_handshake_failures_total", 1, reason="timeout")
    await eventually(
        lambda: gw.listener is not None and gw.listener.open_connections == 0,
        "the timed-out connection is no longer counted as open",
    )


async def test_plain_http_on_the_tls_port_is_refused_and_counted(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory()
    reader, writer = await asyncio.open_connection(HOST, gw.port)
    try:
        writer.write(b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = await read_to_close(reader)
        assert b"HTTP/" not in data
    finally:
        writer.close()
    await metric_reaches(gw, "ztgw_tls_handshake_failures_total", 1, reason="plain_http")


async def test_connection_beyond_max_connections_is_closed_and_counted(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory({"server": {"max_connections": 2}})
    port = gw.port or 0
    held = [await connect(port, tls_client(certs)) for _ in range(2)]
    try:
        for client in held:
            assert (await request_on(client)).status == 200

        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            data = await read_to_close(reader)
            assert data == b""
        finally:
            writer.close()
        await metric_reaches(gw, "ztgw_connections_rejected_total", 1, reason="max_connections")
        # Both held connections still work: the limit refused the newcomer only.
        for client in held:
            assert (await request_on(client)).status == 200
    finally:
        held.pop().close()

    # A slot that is released is usable again: the open-connection count does not leak.
    await eventually(
        lambda: gw.listener is not None and gw.listener.open_connections == 1,
        "the closed connection released its slot",
    )
    try:
        again = await attempt(port, tls_client(certs))
        assert isinstance(again, Reply) and again.status == 200
    finally:
        for client in held:
            client.close()
    assert (
        await scraped_metric(gw, "ztgw_connections_rejected_total", reason="max_connections") == 1
    )


# --------------------------------------------------------------------------- 7. reload


@pytest.fixture
def server_files(certs: Certs, tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / "server"
    d.mkdir()
    cert, key = d / "server.pem", d / "server.key"
    atomic_write(cert, certs.server.read_bytes())
    atomic_write(key, certs.server_key.read_bytes(), mode=0o600)
    return cert, key


async def _peer_serial(port: int, certs: Certs) -> int:
    client = await connect(port, tls_client(certs))
    try:
        assert (await request_on(client)).status == 200
        return client.peer_serial()
    finally:
        client.close()


async def test_replaced_server_certificate_is_served_to_new_connections(
    gateway_factory: GatewayFactory, certs: Certs, server_files: tuple[Path, Path]
) -> None:
    cert_path, key_path = server_files
    gw = await gateway_factory({"tls": {"cert": str(cert_path), "key": str(key_path)}})
    port = gw.port or 0
    old_serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
    assert await _peer_serial(port, certs) == old_serial

    new = ca(certs).issue_server("localhost", ips=("127.0.0.1", "::1"), days=90)
    new.write(cert_path, key_path)

    async def serving_new() -> bool:
        return await _peer_serial(port, certs) == new.serial

    await eventually(serving_new, "new connections get the replaced server certificate")
    await metric_reaches(gw, "ztgw_tls_reloads_total", 1, result="success")
    expiry = await scraped_metric(gw, "ztgw_certificate_expiry_timestamp_seconds", cert="server")
    assert expiry == new.cert.not_valid_after_utc.timestamp()


async def test_broken_server_certificate_keeps_the_previous_one_serving(
    gateway_factory: GatewayFactory, certs: Certs, server_files: tuple[Path, Path]
) -> None:
    cert_path, key_path = server_files
    gw = await gateway_factory({"tls": {"cert": str(cert_path), "key": str(key_path)}})
    port = gw.port or 0
    old_serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number

    atomic_write(cert_path, b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    await metric_reaches(gw, "ztgw_tls_reloads_total", 1, result="failure")
    assert await _peer_serial(port, certs) == old_serial

    # Half a rotation (a new certificate whose key was not replaced) is refused the same way.
    atomic_write(cert_path, ca(certs).issue_server("localhost").cert_pem())
    await metric_reaches(gw, "ztgw_tls_reloads_total", 2, result="failure")
    assert await _peer_serial(port, certs) == old_serial
    assert await scraped_metric(gw, "ztgw_tls_reloads_total", result="success") == 0


# --------------------------------------------------------------------------- 8. identity


async def test_identity_comes_from_each_connections_own_certificate(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory()
    url = f"https://{HOST}:{gw.port}/echo"
    async with session(certs, "alice-laptop") as alice, session(certs, "bob-phone") as bob:
        # Interleaved keep-alive requests on two connections never borrow each other's identity.
        for _ in range(2):
            for s, device, user in ((alice, "alice-laptop", "alice"), (bob, "bob-phone", "bob")):
                async with s.get(url) as r:
                    assert r.status == 200
                    seen = (await r.json())["headers_map"]
                assert seen["x-zt-device-id"] == device
                assert seen["x-forwarded-user"] == user
    assert await scraped_metric(gw, "ztgw_tls_handshakes_total", tls_version="TLSv1.3") == 2


# --------------------------------------------------------------------------- 9. metrics


async def test_certificate_expiry_and_crl_next_update_are_exposed_and_in_the_future(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory()
    scraped = await samples(gw)
    now = time.time()
    server = scraped[("ztgw_certificate_expiry_timestamp_seconds", frozenset({("cert", "server")}))]
    server_cert = x509.load_pem_x509_certificate(certs.server.read_bytes())
    assert server == server_cert.not_valid_after_utc.timestamp()
    assert server > now
    client_ca = scraped[
        ("ztgw_certificate_expiry_timestamp_seconds", frozenset({("cert", "client_ca")}))
    ]
    assert client_ca > now
    next_update = scraped[("ztgw_crl_next_update_timestamp_seconds", frozenset())]
    crl = x509.load_pem_x509_crl((Path(str(gw.config.tls.crl))).read_bytes())
    assert crl.next_update_utc is not None
    assert next_update == crl.next_update_utc.timestamp()
    assert next_update > now


async def test_expired_crl_refuses_every_client_and_is_counted_as_crl_expired(
    gateway_factory: GatewayFactory, certs: Certs, tmp_path: Path
) -> None:
    gw = await gateway_factory()
    last = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    stale = ca(certs).crl([], last_update=last, next_update_days=1)
    atomic_write(tmp_path / "ca.crl", stale.public_bytes(serialization.Encoding.PEM))
    await metric_reaches(gw, "ztgw_tls_reloads_total", 1, result="success")

    # Fail closed (RFC 5280 §6.3.3: a CRL past nextUpdate cannot vouch for anyone), and labelled
    # as the operator's problem, not as the client's expired certificate.
    await assert_refused(gw.port or 0, tls_client(certs))
    await metric_reaches(gw, "ztgw_tls_handshake_failures_total", 1, reason="crl_expired")
    assert await scraped_metric(gw, "ztgw_tls_handshake_failures_total", reason="expired") == 0
    assert await scraped_metric(gw, "ztgw_crl_next_update_timestamp_seconds") < time.time()


# --------------------------------------------------------------------------- event loops
#
# Production runs on uvloop (commands/run.py installs it), whose transports start reading as soon as
# connection_made() returns and report a client leaving mid-handshake differently from asyncio's.
# These scenarios run the same gateway on both loops; the uvloop one lives in its own thread.


@pytest.fixture(params=["asyncio", "uvloop"])
async def any_loop_gateway(
    request: pytest.FixtureRequest,
    gateway_factory: GatewayFactory,
    certs: Certs,
    tmp_path: Path,
) -> AsyncIterator[Gateway]:
    overrides = {"server": {"handshake_timeout": 2.0}}
    if request.param == "asyncio":
        yield await gateway_factory(overrides)
        return
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="uvloop-gateway")
    thread.start()

    async def on_uvloop(coro: Coroutine[Any, Any, Any]) -> Any:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    async def start() -> tuple[Any, Gateway]:
        runner, upstream_port = await start_demo_app(HOST, 0)
        cfg = deep_merge(base_config(certs, upstream_port, tmp_path), overrides)
        path = tmp_path / "uvloop-gateway.toml"
        path.write_text(to_toml(cfg))
        gw = Gateway(load_config(path))
        await gw.start()
        return runner, gw

    async def stop(runner: Any, gw: Gateway) -> None:
        await gw.stop()
        await runner.cleanup()

    try:
        runner, gw = await on_uvloop(start())
        try:
            yield gw
        finally:
            await on_uvloop(stop(runner, gw))
    finally:
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join)
        loop.close()


async def test_every_handshake_completes_on_either_event_loop(
    any_loop_gateway: Gateway, certs: Certs
) -> None:
    gw = any_loop_gateway
    for i in range(6):
        version = ssl.TLSVersion.TLSv1_3 if i % 2 else ssl.TLSVersion.TLSv1_2
        outcome = await attempt(gw.port or 0, tls_client(certs, version=version))
        assert isinstance(outcome, Reply), f"connection {i} ({version.name}) failed: {outcome!r}"
        assert outcome.status == 200
    assert await scraped_metric(gw, "ztgw_tls_handshake_failures_total", reason="timeout") == 0


async def test_refused_handshakes_are_counted_by_reason_on_either_event_loop(
    any_loop_gateway: Gateway, certs: Certs
) -> None:
    gw = any_loop_gateway
    await assert_refused(gw.port or 0, tls_client(certs, None))
    await assert_refused(gw.port or 0, tls_client(certs, "mallory-laptop"))
    await metric_reaches(gw, "ztgw_tls_handshake_failures_total", 1, reason="no_certificate")
    await metric_reaches(gw, "ztgw_tls_handshake_failures_total", 1, reason="unknown_ca")


async def test_client_leaving_before_the_handshake_is_counted_and_frees_its_slot(
    any_loop_gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    gw = any_loop_gateway
    caplog.set_level(logging.ERROR)

    def leave(reset: bool) -> None:
        sock = socket.create_connection((HOST, gw.port or 0), timeout=IO_TIMEOUT)
        if reset:  # SO_LINGER 0: close() sends RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_WR)
        sock.close()

    for reset in (True, False, True, False):
        await asyncio.to_thread(leave, reset)
    await metric_reaches(gw, "ztgw_tls_handshake_failures_total", 4, reason="connection_lost")
    await eventually(
        lambda: gw.listener is not None and gw.listener.open_connections == 0,
        "every abandoned connection released its slot",
    )
    assert await scraped_metric(gw, "ztgw_connections_open") == 0
    unhandled = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert unhandled == []


def coalesced_get(port: int, ctx: ssl.SSLContext) -> bytes:
    """TLS 1.3 by hand: the client's Finished and its request leave in one TCP write, so the
    request is decrypted before the gateway has attached aiohttp to the connection."""
    raw = socket.create_connection((HOST, port), timeout=IO_TIMEOUT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=HOST)
    with raw:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                data = raw.recv(65536)
                if not data:
                    raise ConnectionResetError("closed during the handshake") from None
                incoming.write(data)
        tls.write(b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        raw.sendall(outgoing.read())
        response = b""
        while True:
            try:
                chunk = tls.read(65536)
            except ssl.SSLWantReadError:
                data = raw.recv(65536)
                if not data:
                    return response
                incoming.write(data)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return response
            if not chunk:
                return response
            response += chunk


async def test_request_arriving_with_the_clients_finished_is_not_lost_on_either_event_loop(
    any_loop_gateway: Gateway, certs: Certs
) -> None:
    ctx = tls_client(certs, version=ssl.TLSVersion.TLSv1_3)
    response = await asyncio.to_thread(coalesced_get, any_loop_gateway.port or 0, ctx)
    assert response.startswith(b"HTTP/1.1 200 "), response[:200]
    assert b'"x-zt-device-id": "alice-laptop"' in response
