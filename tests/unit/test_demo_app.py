"""The demo upstream is the instrument every end-to-end test reads; a wrong reading there would
make gateway bugs look like passes, so its observations are checked against independent
computations here."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import hashlib
import ipaddress
import json
import signal
import ssl
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpClient

from ztgateway.dev.demo_app import (
    DOWNLOAD_DEFAULT_SIZE,
    DOWNLOAD_MAX_SIZE,
    GZIP_PLAINTEXT,
    create_demo_app,
    expected_download_sha256,
    main,
    start_demo_app,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

DemoClient = TestClient[web.Request, web.Application]


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> DemoClient:
    return await aiohttp_client(create_demo_app())


def _pattern(size: int) -> bytes:
    """Independent re-statement of the documented download pattern."""
    reps = size // 256 + 1
    return (bytes(range(256)) * reps)[:size]


async def _raw_request(client: DemoClient, request: bytes) -> bytes:
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()


def _json_body(raw_response: bytes) -> dict[str, Any]:
    head, _, body = raw_response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    result: dict[str, Any] = json.loads(body)
    return result


# ------------------------------------------------------------------------------------------
# /echo


async def test_echo_reports_method_path_query_duplicate_headers_and_body(
    client: DemoClient,
) -> None:
    body = b"payload \x00\xff" * 1000
    headers = CIMultiDict([("X-Dup", "first"), ("X-Other", "o"), ("X-Dup", "second")])
    async with client.post("/echo?b=2&a=1&a=3", data=body, headers=headers) as resp:
        assert resp.status == 200
        report = await resp.json()

    assert report["method"] == "POST"
    assert report["path"] == "/echo"
    assert report["raw_path"] == "/echo?b=2&a=1&a=3"
    assert report["query"] == "b=2&a=1&a=3"
    assert report["body_length"] == len(body)
    assert report["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert report["remote"] == "127.0.0.1"
    assert report["scheme"] == "http"
    assert report["tls"] is None

    pairs = [tuple(pair) for pair in report["headers"]]
    dup_values = [value for name, value in pairs if name.lower() == "x-dup"]
    assert dup_values == ["first", "second"]
    names = [name.lower() for name, _ in pairs]
    assert names.index("x-dup") < names.index("x-other")
    assert report["headers_map"]["x-dup"] == "second"
    assert report["headers_map"]["x-other"] == "o"
    assert report["headers_map"]["content-length"] == str(len(body))


@pytest.mark.parametrize("path", ["/api/echo", "/admin/echo", "/a/b/echo", "/echo"])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_echo_answers_any_method_on_any_path_ending_in_echo(
    client: DemoClient, path: str, method: str
) -> None:
    async with client.request(method, path, data=b"abc") as resp:
        assert resp.status == 200
        report = await resp.json()
    assert report["method"] == method
    assert report["path"] == path
    assert report["body_sha256"] == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize("path", ["/xecho", "/echo/", "/echo/more", "/api/echoes"])
async def test_paths_merely_containing_echo_are_not_echoed(client: DemoClient, path: str) -> None:
    async with client.get(path) as resp:
        assert resp.status == 404


async def test_echo_head_has_headers_but_no_body(client: DemoClient) -> None:
    async with client.head("/a/echo") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/json")
        assert await resp.read() == b""


@pytest.mark.parametrize(
    "target",
    ["/api/%2e%2e/admin/echo", "/a/../b/echo", "//double//echo", "/caf%C3%A9/echo"],
)
async def test_echo_path_is_the_raw_target_not_a_normalised_one(
    client: DemoClient, target: str
) -> None:
    # aiohttp's client would normalise these, so write the request line by hand.
    raw = await _raw_request(
        client,
        f"GET {target}?q=%20x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".encode(),
    )
    report = _json_body(raw)
    assert report["path"] == target
    assert report["raw_path"] == f"{target}?q=%20x"
    assert report["query"] == "q=%20x"


async def test_echo_keeps_header_name_case_and_non_ascii_bytes(client: DemoClient) -> None:
    raw = await _raw_request(
        client,
        b"GET /echo HTTP/1.1\r\nHost: h\r\nX-MiXeD: a\r\nX-Bytes: \xc3\xa9\xff\r\n"
        b"Connection: close\r\n\r\n",
    )
    report = _json_body(raw)
    pairs = dict(report["headers"])
    assert pairs["X-MiXeD"] == "a"
    assert pairs["X-Bytes"].encode("utf-8", "surrogateescape") == b"\xc3\xa9\xff"


# ------------------------------------------------------------------------------------------
# WebSocket


@pytest.mark.parametrize("path", ["/ws", "/api/ws", "/a/b/ws"])
async def test_websocket_echoes_text_and_binary(client: DemoClient, path: str) -> None:
    async with client.ws_connect(path) as ws:
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=5) == "hello"
        blob = bytes(range(256)) * 3
        await ws.send_bytes(blob)
        assert await ws.receive_bytes(timeout=5) == blob


async def test_websocket_headers_command_reports_handshake(client: DemoClient) -> None:
    headers = CIMultiDict([("X-Forwarded-User", "alice"), ("X-Dup", "1"), ("X-Dup", "2")])
    async with client.ws_connect("/ws?room=7", headers=headers) as ws:
        await ws.send_str("headers")
        report = json.loads(await ws.receive_str(timeout=5))
    assert report["path"] == "/ws?room=7"
    assert report["headers_map"]["x-forwarded-user"] == "alice"
    assert report["headers_map"]["upgrade"].lower() == "websocket"
    assert [v for n, v in report["headers"] if n.lower() == "x-dup"] == ["1", "2"]


async def test_websocket_close_command_closes_with_1000(client: DemoClient) -> None:
    async with client.ws_connect("/ws") as ws:
        await ws.send_str("close")
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 1000
    assert ws.closed
    assert ws.close_code == 1000


async def test_websocket_accepts_first_offered_subprotocol(client: DemoClient) -> None:
    async with client.ws_connect("/ws", protocols=("chat.v2", "chat.v1")) as ws:
        assert ws.protocol == "chat.v2"


async def test_websocket_path_without_upgrade_is_rejected(client: DemoClient) -> None:
    async with client.get("/ws") as resp:
        assert resp.status == 400


# ------------------------------------------------------------------------------------------
# /download and /upload


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65_535, 65_536, 65_537, 300_001])
@pytest.mark.parametrize("chunked", [False, True])
async def test_download_streams_requested_size_and_pattern(
    client: DemoClient, size: int, chunked: bool
) -> None:
    query = f"/download?size={size}" + ("&chunked=1" if chunked else "")
    async with client.get(query) as resp:
        assert resp.status == 200
        body = await resp.read()
        if chunked:
            assert "Content-Length" not in resp.headers
            assert resp.headers["Transfer-Encoding"] == "chunked"
        else:
            assert resp.headers["Content-Length"] == str(size)
            assert "Transfer-Encoding" not in resp.headers
    assert len(body) == size
    assert body == _pattern(size)
    assert hashlib.sha256(body).hexdigest() == expected_download_sha256(size)


async def test_download_defaults_to_one_mebibyte(client: DemoClient) -> None:
    async with client.get("/download") as resp:
        assert resp.headers["Content-Length"] == str(1024 * 1024)
        digest = hashlib.sha256()
        total = 0
        async for chunk in resp.content.iter_chunked(65536):
            digest.update(chunk)
            total += len(chunk)
    assert total == DOWNLOAD_DEFAULT_SIZE == 1024 * 1024
    assert digest.hexdigest() == expected_download_sha256(DOWNLOAD_DEFAULT_SIZE)


async def test_download_head_announces_length_without_body(client: DemoClient) -> None:
    async with client.head("/download?size=5000") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "5000"
        assert await resp.read() == b""
    # The connection must still be usable, i.e. no stray body bytes were sent.
    async with client.get("/download?size=10") as resp:
        assert await resp.read() == _pattern(10)


@pytest.mark.parametrize("size", ["-1", str(DOWNLOAD_MAX_SIZE + 1), "ten", "1e3"])
async def test_download_rejects_bad_sizes(client: DemoClient, size: str) -> None:
    async with client.get("/download", params={"size": size}) as resp:
        assert resp.status == 400


def test_expected_download_sha256_matches_the_pattern() -> None:
    for size in (0, 7, 256, 65_536 * 2 + 3):
        assert expected_download_sha256(size) == hashlib.sha256(_pattern(size)).hexdigest()
    with pytest.raises(ValueError):
        expected_download_sha256(-1)


async def test_upload_hashes_a_200_megabyte_stream(client: DemoClient) -> None:
    chunk = bytes(range(256)) * 4096  # 1 MiB
    count = 200
    expected = hashlib.sha256()
    for _ in range(count):
        expected.update(chunk)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield chunk

    async with client.post("/upload", data=body()) as resp:
        assert resp.status == 200
        result = await resp.json()
    assert result == {"length": count * len(chunk), "sha256": expected.hexdigest()}


async def test_upload_does_not_hold_the_body_in_memory(client: DemoClient) -> None:
    chunk = b"z" * 65536
    count = 512  # 32 MiB

    async def body() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield chunk

    tracemalloc.start()
    try:
        async with client.post("/upload", data=body()) as resp:
            result = await resp.json()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result["length"] == count * len(chunk)
    assert peak < 8 * 1024 * 1024, f"peak traced memory {peak} bytes"


# ------------------------------------------------------------------------------------------
# status, redirect, gzip, cookie, headers


@pytest.mark.parametrize("code", [204, 304])
async def test_bodiless_statuses(client: DemoClient, code: int) -> None:
    async with client.get(f"/status/{code}") as resp:
        assert resp.status == code
        assert await resp.read() == b""


@pytest.mark.parametrize("code", [200, 404, 418, 500, 503, 599])
async def test_other_statuses_have_a_short_body(client: DemoClient, code: int) -> None:
    async with client.get(f"/status/{code}") as resp:
        assert resp.status == code
        assert (await resp.text()).startswith(str(code))


@pytest.mark.parametrize("code", ["100", "101", "600", "999"])
async def test_unusable_statuses_are_refused(client: DemoClient, code: str) -> None:
    async with client.get(f"/status/{code}") as resp:
        assert resp.status == 400


async def test_redirect_is_not_followed(client: DemoClient) -> None:
    target = "https://elsewhere.example/landing?x=1"
    async with client.get("/redirect", params={"to": target}, allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == target
        assert not resp.history


async def test_redirect_refuses_header_injection(client: DemoClient) -> None:
    async with client.get("/redirect", params={"to": "/x\r\nSet-Cookie: a=b"}) as resp:
        assert resp.status == 400
        assert "Set-Cookie" not in resp.headers


async def test_gzip_body_is_sent_compressed(aiohttp_client: AiohttpClient) -> None:
    raw_client = await aiohttp_client(create_demo_app(), auto_decompress=False)
    async with raw_client.get("/gzip") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Encoding"] == "gzip"
        body = await resp.read()
    assert body[:2] == b"\x1f\x8b"
    assert gzip.decompress(body) == GZIP_PLAINTEXT == b"hello gzip\n" * 100


async def test_cookie_is_set(client: DemoClient) -> None:
    async with client.get("/cookie") as resp:
        assert resp.status == 200
        set_cookie = resp.headers.getall("Set-Cookie")
    assert len(set_cookie) == 1
    assert set_cookie[0].startswith("legacy=1")
    assert resp.cookies["legacy"].value == "1"


async def test_big_headers(client: DemoClient) -> None:
    async with client.get("/big-headers?n=50") as resp:
        assert resp.status == 200
        big = [name for name in resp.headers if name.lower().startswith("x-big-")]
    assert sorted(big, key=lambda n: int(n.rsplit("-", 1)[1])) == [f"X-Big-{i}" for i in range(50)]


async def test_head_works_on_get_routes(client: DemoClient) -> None:
    for path in ("/", "/form", "/gzip", "/cookie", "/status/503", "/big-headers?n=3"):
        async with client.head(path) as resp:
            assert resp.status in {200, 503}, path
            assert await resp.read() == b""


# ------------------------------------------------------------------------------------------
# slow answers and resets


async def test_slow_answers_after_the_delay(client: DemoClient) -> None:
    started = time.monotonic()
    async with client.get("/slow?delay=0.2") as resp:
        assert resp.status == 200
        await resp.read()
    assert time.monotonic() - started >= 0.2


async def test_slow_body_sends_headers_first(client: DemoClient) -> None:
    delay = 1.0
    started = time.monotonic()
    async with client.get(f"/slow-body?delay={delay}") as resp:
        headers_at = time.monotonic() - started
        assert resp.status == 200
        body = await resp.read()
        body_at = time.monotonic() - started
    assert body
    assert headers_at < delay * 0.8
    assert body_at >= delay


@pytest.mark.parametrize("path", ["/slow", "/slow-body"])
@pytest.mark.parametrize("delay", ["-1", "61", "nan", "inf", "soon"])
async def test_slow_rejects_bad_delays(client: DemoClient, path: str, delay: str) -> None:
    async with client.get(path, params={"delay": delay}) as resp:
        assert resp.status == 400


async def test_reset_drops_the_connection_without_a_response(client: DemoClient) -> None:
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        async with client.get("/reset") as resp:
            await resp.read()
    # The server itself keeps serving.
    async with client.get("/status/200") as resp:
        assert resp.status == 200


# ------------------------------------------------------------------------------------------
# HTML pages


async def test_home_escapes_identity_headers(client: DemoClient) -> None:
    headers = {
        "X-Forwarded-User": "<script>alert(1)</script>",
        "X-Forwarded-Email": 'a"b@example.com',
    }
    async with client.get("/", headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        page = await resp.text()
    assert "Acme Payroll (legacy)" in page
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a&quot;b@example.com" in page
    assert "(not set)" in page  # groups and device id were not sent
    for link in ('href="/form"', 'href="/echo"', 'href="/cookie"'):
        assert link in page


async def test_home_shows_every_value_of_a_duplicated_identity_header(
    client: DemoClient,
) -> None:
    headers = CIMultiDict([("X-Forwarded-User", "alice"), ("X-Forwarded-User", "mallory")])
    async with client.get("/", headers=headers) as resp:
        page = await resp.text()
    assert "alice" in page
    assert "mallory" in page


async def test_form_round_trip_escapes_fields(client: DemoClient) -> None:
    async with client.get("/form") as resp:
        form_page = await resp.text()
    assert '<form method="post" action="/form">' in form_page

    fields = {"employee": "<b>bob</b>", "amount": "12", "note": "x & y"}
    async with client.post("/form", data=fields) as resp:
        assert resp.status == 200
        page = await resp.text()
    assert "<b>bob</b>" not in page
    assert "&lt;b&gt;bob&lt;/b&gt;" in page
    assert "x &amp; y" in page
    assert "Received 3 field(s)" in page


# ------------------------------------------------------------------------------------------
# real servers from start_demo_app and main()


async def test_start_demo_app_serves_on_a_free_port() -> None:
    runner, port = await start_demo_app("127.0.0.1", 0)
    try:
        assert port > 0
        async with (
            aiohttp.ClientSession() as session,
            session.put(
                f"http://127.0.0.1:{port}/x/echo?k=v",
                data=b"hi",
                headers={"X-Forwarded-User": "alice"},
            ) as resp,
        ):
            report = await resp.json()
    finally:
        await runner.cleanup()
    assert report["method"] == "PUT"
    assert report["path"] == "/x/echo"
    assert report["query"] == "k=v"
    assert report["headers_map"]["x-forwarded-user"] == "alice"
    assert report["headers_map"]["host"] == f"127.0.0.1:{port}"
    assert report["body_sha256"] == hashlib.sha256(b"hi").hexdigest()
    assert report["remote"] == "127.0.0.1"


async def test_cleanup_does_not_wait_for_a_slow_request() -> None:
    runner, port = await start_demo_app()
    async with aiohttp.ClientSession() as session:

        async def slow() -> int:
            async with session.get(f"http://127.0.0.1:{port}/slow?delay=30") as resp:
                return resp.status

        pending = asyncio.create_task(slow())
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await runner.cleanup()
        assert time.monotonic() - started < 10
        with pytest.raises(aiohttp.ClientError):
            await pending


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "demo-upstream")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "upstream.pem"
    key_path = directory / "upstream.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_start_demo_app_serves_https(tmp_path: Path) -> None:
    cert_path, key_path = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_path, key_path)
    client_ctx = ssl.create_default_context(cafile=str(cert_path))

    runner, port = await start_demo_app(ssl_context=server_ctx)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://127.0.0.1:{port}/echo", ssl=client_ctx) as resp,
        ):
            report = await resp.json()
    finally:
        await runner.cleanup()
    assert report["scheme"] == "https"
    assert report["tls"]["version"].startswith("TLS")
    assert report["tls"]["peer_subject"] is None


async def test_main_runs_until_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ztgateway.dev.demo_app",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=20)).decode()
        assert line.startswith("demo app listening on http://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1].strip()
        async with aiohttp.ClientSession() as session, session.get(f"{url}/") as resp:
            assert resp.status == 200
            assert "Acme Payroll" in await resp.text()
        proc.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(proc.wait(), timeout=20)
        assert returncode == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_main_requires_cert_and_key_together(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["--tls-cert", "cert.pem"])
    assert excinfo.value.code == 2
    assert "--tls-key" in capsys.readouterr().err


def test_main_reports_unreadable_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.pem"
    assert main(["--port", "0", "--tls-cert", str(missing), "--tls-key", str(missing)]) == 2
    assert "cannot load TLS certificate" in capsys.readouterr().err
