"""Issue 16 item 7: every refused handshake tells the client why, with the right TLS alert.

Real clients (`openssl s_client`, curl) against a real gateway, on asyncio and on uvloop (the
production loop): OpenSSL refuses the certificate during the handshake and the gateway must
deliver OpenSSL's alert before it closes the socket (edge/tlsalert.py; CPython gh-98078 drops it).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from pathlib import Path

import pytest
from playwright.async_api import Browser
from playwright.async_api import Error as PlaywrightError

from tests.conftest import GatewayFactory
from tests.e2e import test_browser, test_mtls
from tests.e2e.test_mtls import HOST, attempt, metric_reaches, revoke, tls_client
from tests.support import Certs, Reply
from ztgateway.app import Gateway
from ztgateway.edge import tlsalert

any_loop_gateway = test_mtls.any_loop_gateway
"""The same gateway on asyncio and on uvloop (the production loop)."""

# RFC 8446 §6 / RFC 5246 §7.2 AlertDescription values.
HANDSHAKE_FAILURE = 40
UNSUPPORTED_CERTIFICATE = 43
CERTIFICATE_REVOKED = 44
CERTIFICATE_EXPIRED = 45
UNKNOWN_CA = 48
CERTIFICATE_REQUIRED = 116


async def s_client_alert(port: int, certs: Certs, name: str | None, version: str) -> int | None:
    """The alert number `openssl s_client` received, or None if it received none."""
    args = ["openssl", "s_client", "-connect", f"{HOST}:{port}", version]
    args += ["-CAfile", str(certs.ca), "-servername", "localhost", "-ign_eof"]
    if name is not None:
        pem, key = certs.client(name)
        args += ["-cert", str(pem), "-key", str(key)]
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    found = re.search(rb"SSL alert number (\d+)", err)
    return int(found.group(1)) if found else None


async def curl_error(port: int, certs: Certs, name: str | None, *extra: str) -> str:
    args = ["curl", "-sS", "--max-time", "10", "--cacert", str(certs.ca)]
    args += ["--resolve", f"localhost:{port}:{HOST}", *extra]
    if name is not None:
        pem, key = certs.client(name)
        args += ["--cert", str(pem), "--key", str(key)]
    args.append(f"https://localhost:{port}/echo")
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode != 0, "curl got through"
    return err.decode()


@pytest.mark.parametrize(
    ("device", "version", "alert"),
    [
        (None, "-tls1_3", CERTIFICATE_REQUIRED),
        # TLS 1.2 has no certificate_required; RFC 5246 §7.4.6 says handshake_failure.
        (None, "-tls1_2", HANDSHAKE_FAILURE),
        ("mallory-laptop", "-tls1_3", UNKNOWN_CA),
        ("mallory-laptop", "-tls1_2", UNKNOWN_CA),
        ("old-laptop", "-tls1_3", CERTIFICATE_EXPIRED),
        ("old-laptop", "-tls1_2", CERTIFICATE_EXPIRED),
        ("server-cert-as-client", "-tls1_3", UNSUPPORTED_CERTIFICATE),
    ],
)
async def test_refused_handshake_sends_the_alert_that_says_why(
    any_loop_gateway: Gateway, certs: Certs, device: str | None, version: str, alert: int
) -> None:
    assert await s_client_alert(any_loop_gateway.port or 0, certs, device, version) == alert


async def test_certificate_revoked_by_the_crl_gets_certificate_revoked(
    any_loop_gateway: Gateway, certs: Certs, tmp_path: Path
) -> None:
    gw = any_loop_gateway
    port = gw.port or 0
    await revoke(gw, certs, tmp_path, "stolen-laptop")
    for version in ("-tls1_3", "-tls1_2"):
        assert await s_client_alert(port, certs, "stolen-laptop", version) == CERTIFICATE_REVOKED
    await metric_reaches(gw, "ztgw_tls_handshake_failures_total", 2, reason="revoked")
    # A certificate the CRL does not name still gets through.
    alice = await attempt(port, tls_client(certs))
    assert isinstance(alice, Reply) and alice.status == 200


@pytest.mark.parametrize(
    ("device", "says"),
    [
        (None, "alert certificate required"),
        ("mallory-laptop", "alert unknown ca"),
        ("old-laptop", "alert certificate expired"),
    ],
)
async def test_curl_says_why_instead_of_empty_reply(
    any_loop_gateway: Gateway, certs: Certs, device: str | None, says: str
) -> None:
    err = await curl_error(any_loop_gateway.port or 0, certs, device)
    assert says in err, err
    assert "Empty reply" not in err


async def test_concurrent_refused_and_accepted_handshakes_each_get_their_own_outcome(
    any_loop_gateway: Gateway, certs: Certs
) -> None:
    """Each alert goes to its own connection: interleaved handshakes on one loop never get
    another connection's alert bytes (a good client would see a corrupt record)."""
    port = any_loop_gateway.port or 0
    bad = [("mallory-laptop", UNKNOWN_CA), ("old-laptop", CERTIFICATE_EXPIRED)] * 4
    bad += [(None, CERTIFICATE_REQUIRED)] * 4
    alerts = [s_client_alert(port, certs, name, "-tls1_3") for name, _ in bad]
    goods = [attempt(port, tls_client(certs, version=ssl.TLSVersion.TLSv1_3)) for _ in range(8)]
    results = await asyncio.gather(*alerts, *goods)
    assert list(results[: len(bad)]) == [alert for _, alert in bad]
    for outcome in results[len(bad) :]:
        assert isinstance(outcome, Reply) and outcome.status == 200, outcome


async def test_a_tls13_alert_waits_for_the_clients_first_bytes(
    any_loop_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TLS 1.3 client thinks its handshake done before the server judged its certificate. An
    alert that reached it while idle (before it sent its request) made Chromium report the socket
    as not connected (ERR_SOCKET_NOT_CONNECTED) instead of a refused certificate, about one
    navigation in six. The encrypted alert now waits for the client's first bytes; a client that
    sends none still gets it when the wait ends."""
    monkeypatch.setattr(tlsalert, "FIRST_FLIGHT_SECONDS", 30.0)
    port = any_loop_gateway.port or 0
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    reader, writer = await asyncio.open_connection(HOST, port, ssl=context)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.5)  # idle: no alert yet
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
            await asyncio.wait_for(reader.read(1), 10)  # far less than the 30 s wait
    finally:
        writer.close()
    monkeypatch.setattr(tlsalert, "FIRST_FLIGHT_SECONDS", 0.2)
    reader, writer = await asyncio.open_connection(HOST, port, ssl=context)
    try:
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
            await asyncio.wait_for(reader.read(1), 10)
    finally:
        writer.close()


browser = test_browser.browser
"""Debian's Chromium, launched as tests/e2e/test_browser.py does."""


async def test_chromium_without_a_certificate_is_told_the_certificate_was_refused(
    browser: Browser, gateway_factory: GatewayFactory
) -> None:
    """Before: net::ERR_EMPTY_RESPONSE ("didn't send any data"). Now Chromium reads the
    certificate_required alert: net::ERR_BAD_SSL_CLIENT_AUTH_CERT ("didn't accept your login
    certificate, or one wasn't provided"). ERR_SOCKET_NOT_CONNECTED means the alert reached an idle
    socket before Chromium sent its request (see the test above); a loaded machine may still
    delay Chromium's request past the first-flight wait, so a second navigation is allowed, and
    no attempt may ever look like an empty reply."""
    gw = await gateway_factory()
    seen: list[str] = []
    for _ in range(2):
        context = await browser.new_context(ignore_https_errors=True)
        page = await context.new_page()
        with pytest.raises(PlaywrightError) as info:
            await page.goto(f"https://{HOST}:{gw.port}/", timeout=15_000)
        await context.close()
        code = re.search(r"net::(ERR_[A-Z_]+)", str(info.value))
        seen.append(code.group(1) if code else str(info.value))
        if seen[-1] == "ERR_BAD_SSL_CLIENT_AUTH_CERT":
            break
    assert "ERR_BAD_SSL_CLIENT_AUTH_CERT" in seen, seen
    assert "ERR_EMPTY_RESPONSE" not in seen and "ERR_CONNECTION_CLOSED" not in seen, seen
