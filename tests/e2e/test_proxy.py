"""The reverse proxy, proven end to end through a real gateway with alice's certificate.

Every request crosses real TLS to an in-process gateway and real TCP to the demo upstream. The
upstream here is the demo app with one addition, a middleware that records every request that
reaches it and how its handler ended, so "refused and never forwarded" is an observation rather
than an inference. Smuggling-shaped and slow requests go over raw TLS sockets, because an HTTP
client library would refuse to send them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import resource
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.support import Certs, audit_event, client_ssl, deep_merge, metric, session
from ztgateway.app import Gateway
from ztgateway.dev.demo_app import GZIP_PLAINTEXT, create_demo_app, expected_download_sha256
from ztgateway.dev.tokens import issue_token

MB = 1024 * 1024
BIG = 200 * MB
CHUNK = 64 * 1024
# Peak RSS growth allowed while 200 MB crosses the gateway: a few socket buffers and stream
# high-water marks on both sides of the in-process gateway, never the body.
RSS_GROWTH_LIMIT = 64 * MB

ProxyFactory = Callable[..., Awaitable[Gateway]]


# --------------------------------------------------------------------------------------------
# the recording upstream


@dataclass
class Hit:
    method: str
    raw_path: str
    upgrade: str | None = None
    outcome: str = "pending"  # "complete", or the exception that ended the handler


@dataclass
class RecordingUpstream:
    port: int
    hits: list[Hit] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [h.raw_path for h in self.hits]

    async def settled(self, timeout: float = 5.0) -> list[Hit]:
        """The hits, once every handler has finished (an aborted body ends a handler late)."""
        deadline = time.monotonic() + timeout
        while any(h.outcome == "pending" for h in self.hits):
            assert time.monotonic() < deadline, f"upstream handlers still running: {self.hits}"
            await asyncio.sleep(0.02)
        return list(self.hits)


@pytest.fixture
async def recording() -> AsyncIterator[RecordingUpstream]:
    up = RecordingUpstream(port=0)

    @web.middleware
    async def record(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        hit = Hit(request.method, request.raw_path, request.headers.get("Upgrade"))
        up.hits.append(hit)
        try:
            response = await handler(request)
        except BaseException as exc:
            hit.outcome = type(exc).__name__
            raise
        hit.outcome = "complete"
        return response

    app = create_demo_app()
    app.middlewares.append(record)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    up.port = int(runner.addresses[0][1])
    yield up
    await runner.cleanup()


@pytest.fixture
def proxy(gateway_factory: ProxyFactory, recording: RecordingUpstream) -> ProxyFactory:
    """A gateway whose `demo` upstream is the recording demo app."""

    async def make(overrides: dict[str, Any] | None = None) -> Gateway:
        base = {"upstreams": {"demo": {"url": f"http://127.0.0.1:{recording.port}"}}}
        return await gateway_factory(deep_merge(base, overrides or {}))

    return make


def routes(**app_route: Any) -> dict[str, Any]:
    """Overrides replacing the route list with one catch-all route to the demo upstream."""
    return {"routes": [{"name": "app", "prefix": "/", "upstream": "demo", **app_route}]}


# --------------------------------------------------------------------------------------------
# helpers: URLs, audit, metrics, raw TLS


def url(gw: Gateway, path: str) -> str:
    return f"https://127.0.0.1:{gw.port}{path}"


def finding_reasons(event: dict[str, Any]) -> list[str]:
    return [f["reason"] for f in event["result"]["findings"]]


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def problem(self) -> dict[str, Any]:
        assert self.headers.get("Content-Type", "").startswith("application/problem+json"), (
            self.status,
            self.headers,
            self.body[:200],
        )
        out: dict[str, Any] = json.loads(self.body)
        return out


@contextlib.asynccontextmanager
async def raw_tls(
    certs: Certs, gw: Gateway
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=client_ssl(certs), server_hostname="127.0.0.1"
    )
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError, OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 2.0)


async def read_response(
    reader: asyncio.StreamReader, *, head: bool = False, timeout: float = 5.0
) -> RawResponse:
    """One HTTP/1.1 response, framed the way a client must frame it (RFC 9112 §6.3)."""

    async def read() -> RawResponse:
        line = await reader.readline()
        assert line.startswith(b"HTTP/1."), f"not a status line: {line!r}"
        status = int(line.split()[1])
        headers: CIMultiDict[str] = CIMultiDict()
        while (h := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = h.decode("latin-1").partition(":")
            headers.add(name.strip(), value.strip())
        if head or status in (204, 304) or 100 <= status < 200:
            return RawResponse(status, headers, b"")
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    while await reader.readline() not in (b"\r\n", b""):
                        pass
                    return RawResponse(status, headers, bytes(body))
                body += await reader.readexactly(size)
                await reader.readexactly(2)
        if "Content-Length" in headers:
            return RawResponse(
                status, headers, await reader.readexactly(int(headers["Content-Length"]))
            )
        return RawResponse(status, headers, await reader.read())

    return await asyncio.wait_for(read(), timeout)


async def exchange(certs: Certs, gw: Gateway, data: bytes, *, head: bool = False) -> RawResponse:
    async with raw_tls(certs, gw) as (reader, writer):
        writer.write(data)
        await writer.drain()
        return await read_response(reader, head=head)


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bool:
    """True when the server closes the connection (EOF or reset) within `timeout`."""
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    except TimeoutError:  # before OSError, of which it is a subclass
        return False
    except (ConnectionError, ssl.SSLError, OSError):
        return True
    return True


def request_bytes(path: str, *extra: str, method: str = "GET", version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: 127.0.0.1", *extra, "", ""]
    return "\r\n".join(lines).encode()


# --------------------------------------------------------------------------------------------
# memory measurement


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def peak_rss_growth() -> Iterator[list[int]]:
    """Peak resident-set growth of this process (gateway, upstream and client) inside the block.

    ru_maxrss never goes down, so an earlier test's peak could hide this one's growth; on Linux
    the peak is reset first through /proc/self/clear_refs ("5" resets VmHWM, proc(5)).
    """
    out = [0]
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reset = False
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            hwm = _vm_hwm()
            if hwm is not None:
                baseline, reset = hwm, True
    yield out
    if reset:
        after = _vm_hwm()
        assert after is not None
    else:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out[0] = after - baseline


def pattern_chunks(size: int) -> Iterator[bytes]:
    block = bytes(range(256)) * (CHUNK // 256)
    for offset in range(0, size, CHUNK):
        yield block[: min(CHUNK, size - offset)]


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for chunk in pattern_chunks(size):
        digest.update(chunk)
    return digest.hexdigest()


async def pattern_stream(size: int) -> AsyncIterator[bytes]:
    for chunk in pattern_chunks(size):
        yield chunk


# --------------------------------------------------------------------------------------------
# 1. streaming: 200 MB each way, memory flat


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_200_mb_download_streams_through_with_flat_memory(
    proxy: ProxyFactory, certs: Certs, chunked: bool
) -> None:
    gw = await proxy()
    target = f"/download?size={BIG}" + ("&chunked=1" if chunked else "")
    digest = hashlib.sha256()
    received = 0
    with peak_rss_growth() as growth:
        async with session(certs) as s, s.get(url(gw, target)) as r:
            assert r.status == 200
            if chunked:
                assert "Content-Length" not in r.headers
            else:
                assert r.headers["Content-Length"] == str(BIG)
            async for chunk in r.content.iter_chunked(CHUNK):
                digest.update(chunk)
                received += len(chunk)
    assert received == BIG
    assert digest.hexdigest() == expected_download_sha256(BIG)
    assert growth[0] < RSS_GROWTH_LIMIT, f"peak RSS grew by {growth[0] / MB:.0f} MB"


@pytest.mark.parametrize(
    "limit",
    [{"server": {"client_max_size": 256 * MB}}, routes(client_max_size=256 * MB)],
    ids=["server-client_max_size", "route-client_max_size"],
)
async def test_200_mb_streamed_upload_reaches_upstream_intact_with_flat_memory(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream, limit: dict[str, Any]
) -> None:
    gw = await proxy(limit)
    with peak_rss_growth() as growth:
        async with session(certs) as s, s.post(url(gw, "/upload"), data=pattern_stream(BIG)) as r:
            assert r.status == 200
            body = await r.json()
    assert body == {"length": BIG, "sha256": pattern_sha256(BIG)}
    assert growth[0] < RSS_GROWTH_LIMIT, f"peak RSS grew by {growth[0] / MB:.0f} MB"
    assert [(h.method, h.raw_path, h.outcome) for h in recording.hits] == [
        ("POST", "/upload", "complete")
    ]


# --------------------------------------------------------------------------------------------
# 2. response semantics pass through unchanged


async def test_head_keeps_content_length_and_sends_no_body(
    proxy: ProxyFactory, certs: Certs
) -> None:
    gw = await proxy()
    async with raw_tls(certs, gw) as (reader, writer):
        writer.write(request_bytes("/download?size=12345", method="HEAD"))
        writer.write(request_bytes("/status/200"))
        await writer.drain()
        head = await read_response(reader, head=True)
        # Had the HEAD leaked body bytes, this would read them instead of a status line.
        after = await read_response(reader)
    assert head.status == 200
    assert head.headers["Content-Length"] == "12345"
    assert after.status == 200
    assert after.body == b"200 OK\n"


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses_pass_with_no_body(
    proxy: ProxyFactory, certs: Certs, status: int
) -> None:
    gw = await proxy()
    async with raw_tls(certs, gw) as (reader, writer):
        writer.write(request_bytes(f"/status/{status}"))
        writer.write(request_bytes("/status/200"))
        await writer.drain()
        first = await read_response(reader)
        after = await read_response(reader)
    assert first.status == status
    assert "chunked" not in first.headers.get("Transfer-Encoding", "")
    assert first.headers.get("Content-Length", "0") == "0"
    assert (after.status, after.body) == (200, b"200 OK\n")


async def test_chunked_response_passes_chunked(proxy: ProxyFactory, certs: Certs) -> None:
    gw = await proxy()
    size = 3 * CHUNK + 17
    r = await exchange(certs, gw, request_bytes(f"/download?size={size}&chunked=1"))
    assert r.status == 200
    assert r.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in r.headers
    assert hashlib.sha256(r.body).hexdigest() == expected_download_sha256(size)


@pytest.mark.parametrize("to", ["https://example.com/elsewhere?x=1", "/echo?from=redirect"])
async def test_redirect_is_passed_through_not_followed(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream, to: str
) -> None:
    gw = await proxy()
    async with (
        session(certs) as s,
        s.get(url(gw, "/redirect"), params={"to": to}, allow_redirects=False) as r,
    ):
        assert r.status == 302
        assert r.headers["Location"] == to
    # One upstream hit: the gateway did not chase the Location itself.
    assert [h.raw_path.partition("?")[0] for h in recording.hits] == ["/redirect"]


async def test_gzip_body_is_passed_compressed_as_is(proxy: ProxyFactory, certs: Certs) -> None:
    gw = await proxy()
    async with (
        session(certs) as s,
        s.get(url(gw, "/gzip"), headers={"Accept-Encoding": "gzip"}) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Encoding"] == "gzip"
        body = await r.read()
    assert body == gzip.compress(GZIP_PLAINTEXT, mtime=0)
    assert r.headers["Content-Length"] == str(len(body))


# --------------------------------------------------------------------------------------------
# 3. WebSocket


async def test_websocket_echoes_text_and_binary_with_identity_headers_only_from_the_gateway(
    proxy: ProxyFactory, certs: Certs
) -> None:
    gw = await proxy()
    spoofed = {"X-Forwarded-User": "mallory", "X-ZT-Device-Id": "mallory-laptop"}
    async with session(certs) as s, s.ws_connect(url(gw, "/ws"), headers=spoofed) as ws:
        await ws.send_str("hello over the gateway")
        assert await ws.receive_str(timeout=5) == "hello over the gateway"
        payload = bytes(range(256)) * 40
        await ws.send_bytes(payload)
        assert await ws.receive_bytes(timeout=5) == payload
        await ws.send_str("headers")
        seen = json.loads(await ws.receive_str(timeout=5))
    names = [name.lower() for name, _ in seen["headers"]]
    assert names.count("x-forwarded-user") == 1
    assert names.count("x-zt-device-id") == 1
    assert seen["headers_map"]["x-forwarded-user"] == "alice"
    assert seen["headers_map"]["x-zt-device-id"] == "alice-laptop"
    assert seen["headers_map"]["x-forwarded-for"] == "127.0.0.1"
    assert seen["headers_map"]["x-zt-assertion"]
    assert "mallory" not in json.dumps(seen)


async def test_route_without_websocket_refuses_the_upgrade(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    gw = await proxy(routes(websocket=False))
    async with session(certs) as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(url(gw, "/ws"))
        # Plain HTTP on the same route still works.
        async with s.get(url(gw, "/echo")) as r:
            assert r.status == 200
    assert refused.value.status == 400
    assert recording.paths() == ["/echo"]


WS_KEY = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="
HALF_HANDSHAKES = {
    "no-key": ("GET", "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13"),
    "short-key": (
        "GET",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: c2hvcnQ=",
    ),
    "no-connection-upgrade": ("GET", "Upgrade: websocket", "Sec-WebSocket-Version: 13", WS_KEY),
    "post": (
        "POST",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        WS_KEY,
        "Content-Length: 0",
    ),
}


@pytest.mark.parametrize("shape", list(HALF_HANDSHAKES.values()), ids=list(HALF_HANDSHAKES))
async def test_incomplete_websocket_handshake_is_not_bridged(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream, shape: tuple[str, ...]
) -> None:
    gw = await proxy()
    method, *lines = shape
    r = await exchange(certs, gw, request_bytes("/ws", *lines, method=method))
    # Not upgraded, and not blamed on the upstream: it is passed on as the plain request it is,
    # with the same method, and the upstream answers it.
    assert r.status not in (101, 502), r.body
    assert metric(gw, "ztgw_upstream_errors_total", route="app", kind="reset") == 0
    hits = await recording.settled()
    assert [(h.method, h.raw_path, h.upgrade) for h in hits] == [(method, "/ws", None)]


# --------------------------------------------------------------------------------------------
# 4. header hygiene


@pytest.mark.parametrize(
    "connection",
    ["keep-alive, X-Listed-Hop, X-Other-Listed", "Upgrade, X-Listed-Hop, X-Other-Listed"],
    ids=["keep-alive", "upgrade-h2c"],
)
async def test_hop_by_hop_and_connection_listed_headers_do_not_reach_the_upstream(
    proxy: ProxyFactory, certs: Certs, connection: str
) -> None:
    gw = await proxy()
    hop = {
        "Connection": connection,
        "X-Listed-Hop": "private to this hop",
        "X-Other-Listed": "also private",
        "Keep-Alive": "timeout=5, max=100",
        "TE": "trailers",
        "Trailer": "X-Checksum",
        "Upgrade": "h2c",
        "Proxy-Authorization": "Basic bWFsbG9yeTpzZWNyZXQ=",
        "Proxy-Connection": "keep-alive",
    }
    r = await exchange(
        certs,
        gw,
        request_bytes("/echo", *(f"{k}: {v}" for k, v in hop.items()), "X-End-To-End: kept"),
    )
    assert r.status == 200, r.body
    seen = json.loads(r.body)["headers_map"]
    for name in hop:
        if name != "Connection":
            assert name.lower() not in seen, f"{name} reached the upstream"
    assert "listed" not in seen.get("connection", "").lower()
    assert "upgrade" not in seen.get("connection", "").lower()
    assert seen["x-end-to-end"] == "kept"


SPOOFED = [
    ("X-Forwarded-For", "6.6.6.6"),
    ("X-Forwarded-Proto", "gopher"),
    ("X-Forwarded-Host", "evil.example"),
    ("Forwarded", "for=6.6.6.6;proto=gopher;host=evil.example"),
    ("X-Forwarded-User", "mallory"),
    ("X_Forwarded_User", "mallory"),
    ("X-ZT-Device-Id", "mallory-laptop"),
    ("Remote-User", "mallory"),
]


@pytest.mark.parametrize(("name", "value"), SPOOFED, ids=[n for n, _ in SPOOFED])
async def test_inbound_forwarding_or_identity_header_is_stripped_and_audited(
    proxy: ProxyFactory, certs: Certs, name: str, value: str
) -> None:
    gw = await proxy()
    async with session(certs) as s, s.get(url(gw, "/echo"), headers={name: value}) as r:
        assert r.status == 200
        decision_id = r.headers["X-ZT-Decision-Id"]
        seen = await r.json()
    assert not [(n, v) for n, v in seen["headers"] if value in v], "spoofed value arrived"
    m = seen["headers_map"]
    # The gateway's own values, each exactly once.
    assert m["x-forwarded-for"] == "127.0.0.1"
    assert m["x-forwarded-proto"] == "https"
    assert m["x-forwarded-host"] == f"127.0.0.1:{gw.port}"
    assert m["x-forwarded-user"] == "alice"
    assert m["x-zt-device-id"] == "alice-laptop"
    for own in ("x-forwarded-for", "x-forwarded-user", "x-zt-device-id"):
        assert [n.lower() for n, _ in seen["headers"]].count(own) == 1
    assert "forwarded" not in m and "remote-user" not in m and "x_forwarded_user" not in m
    event = await audit_event(gw, decision_id)
    spoof = [f for f in event["result"]["findings"] if f["reason"] == "header-spoofed"]
    assert len(spoof) == 1
    assert name.lower() in spoof[0]["detail"].lower()
    assert event["result"]["verdict"] == "allow"
    assert metric(gw, "ztgw_spoofed_headers_total") == 1


async def test_request_without_spoofing_counts_no_spoofing(
    proxy: ProxyFactory, certs: Certs
) -> None:
    gw = await proxy()
    async with session(certs) as s, s.get(url(gw, "/echo")) as r:
        assert r.status == 200
        decision_id = r.headers["X-ZT-Decision-Id"]
    assert "header-spoofed" not in finding_reasons(await audit_event(gw, decision_id))
    assert metric(gw, "ztgw_spoofed_headers_total") == 0


@pytest.mark.parametrize(("name", "value"), SPOOFED, ids=[n for n, _ in SPOOFED])
async def test_spoofed_header_in_deny_mode_is_refused_and_never_forwarded(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream, name: str, value: str
) -> None:
    gw = await proxy({"server": {"spoofed_headers": "deny"}})
    async with session(certs) as s:
        async with s.get(url(gw, "/echo"), headers={name: value}) as r:
            assert r.status == 400
            assert r.content_type == "application/problem+json"
            problem = await r.json(content_type=None)
        async with s.get(url(gw, "/echo")) as clean:
            assert clean.status == 200
    assert problem["reason"] == "header-spoofed"
    assert problem["decision_id"] == r.headers["X-ZT-Decision-Id"]
    assert recording.paths() == ["/echo"]  # only the clean request
    event = await audit_event(gw, problem["decision_id"])
    assert event["result"]["reason"] == "header-spoofed"
    assert metric(gw, "ztgw_spoofed_headers_total") == 1


async def test_authorization_is_not_forwarded_unless_the_route_says_so(
    proxy: ProxyFactory, certs: Certs
) -> None:
    token = issue_token(certs.issuer_key, sub="alice")
    auth = {"Authorization": f"Bearer {token}"}
    gw = await proxy()
    async with session(certs) as s, s.get(url(gw, "/echo"), headers=auth) as r:
        assert r.status == 200
        seen = (await r.json())["headers_map"]
    assert "authorization" not in seen
    assert token not in json.dumps(seen)
    assert seen["x-forwarded-user"] == "alice"

    gw2 = await proxy(routes(forward_authorization=True))
    async with session(certs) as s, s.get(url(gw2, "/echo"), headers=auth) as r:
        assert r.status == 200
        seen = (await r.json())["headers_map"]
    assert seen["authorization"] == f"Bearer {token}"


@pytest.mark.parametrize(
    "request_bytes",
    [
        request_bytes("/echo"),  # forwarded: the upstream said "Python/3.x aiohttp/3.x"
        request_bytes("/status/503"),  # forwarded error
        request_bytes("/%2e%2e/etc/passwd"),  # refused by policy
        request_bytes(
            "/echo", "Content-Length: 1", "Content-Length: 2", method="POST"
        ),  # by the parser
        request_bytes("/.ztgw/whoami"),  # a page of the gateway's own
        request_bytes("/.ztgw/static/portal.css"),  # its static assets
        request_bytes("/.ztgw/webauthn.js"),  # the pages' script
    ],
    ids=["forwarded", "forwarded-error", "refused", "malformed", "page", "static", "script"],
)
async def test_response_server_banner_is_the_gateways_without_versions(
    proxy: ProxyFactory, certs: Certs, request_bytes: bytes
) -> None:
    gw = await proxy()
    r = await exchange(certs, gw, request_bytes)
    assert r.headers.getall("Server") == ["ztgateway"]
    assert "X-Powered-By" not in r.headers


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/forward-auth", "/no-such-page"])
async def test_ops_listener_answers_carry_the_gateways_banner(
    proxy: ProxyFactory, path: str
) -> None:
    gw = await proxy({"forward_auth": {"enabled": True, "trusted_proxies": ["127.0.0.1/32"]}})
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{gw.ops_port}{path}") as r,
    ):
        assert r.headers.getall("Server") == ["ztgateway"], r.status


@pytest.fixture
async def hop_upstream() -> AsyncIterator[int]:
    """A legacy upstream that puts hop-by-hop and private headers on its responses."""
    response = (
        b"HTTP/1.1 200 OK\r\n"
        b"Server: Apache/2.2.3 (Unix) OpenSSL/0.9.8e PHP/5.2.4\r\n"
        b"Connection: X-Upstream-Private, close\r\n"
        b"X-Upstream-Private: internal-node-7\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n"
        b"Proxy-Authenticate: Basic realm=internal\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: h2c\r\n"
        b"Set-Cookie: a=1; Path=/\r\n"
        b"Set-Cookie: b=2; Path=/\r\n"
        b"X-End-To-End: kept\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Length: 3\r\n"
        b"\r\n"
        b"ok\n"
    )

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(response)
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()


async def test_upstream_hop_by_hop_response_headers_are_removed(
    proxy: ProxyFactory, certs: Certs, hop_upstream: int
) -> None:
    gw = await proxy(
        {
            "routes": [
                {"name": "app", "prefix": "/", "upstream": "demo"},
                {
                    "name": "legacy",
                    "prefix": "/legacy/",
                    "upstream": f"http://127.0.0.1:{hop_upstream}",
                },
            ]
        }
    )
    r = await exchange(certs, gw, request_bytes("/legacy/page"))
    assert (r.status, r.body) == (200, b"ok\n")
    for name in (
        "X-Upstream-Private",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Connection",
        "Trailer",
        "Upgrade",
    ):
        assert name not in r.headers, name
    assert r.headers.getall("Server") == ["ztgateway"]
    assert r.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert r.headers["X-End-To-End"] == "kept"
    assert "x-upstream-private" not in r.headers.get("Connection", "").lower()


# --------------------------------------------------------------------------------------------
# 5. paths: normalised once, forwarded exactly as policy saw them


@pytest.mark.parametrize(
    ("sent", "forwarded"),
    [
        ("/a/../echo", "/echo"),
        ("//echo", "/echo"),
        ("/a/./b//echo", "/a/b/echo"),
        ("/x/%2e%2e/echo", "/echo"),
        ("/%65cho", "/echo"),
        ("/caf%c3%a9/echo", "/caf%C3%A9/echo"),
        ("/caf%C3%A9/echo", "/caf%C3%A9/echo"),
        ("/a%20b/echo?q=%2F..%2F&x=1", "/a%20b/echo?q=%2F..%2F&x=1"),
        ("/a%3Fb/echo", "/a%3Fb/echo"),
        ("/100%25/echo", "/100%25/echo"),
    ],
)
async def test_normalised_path_is_exactly_what_the_upstream_receives(
    proxy: ProxyFactory, certs: Certs, sent: str, forwarded: str
) -> None:
    gw = await proxy()
    request = f"GET {sent} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    r = await exchange(certs, gw, request)
    assert r.status == 200, r.body
    assert json.loads(r.body)["raw_path"] == forwarded
    event = await audit_event(gw, r.headers["X-ZT-Decision-Id"])
    assert event["result"]["verdict"] == "allow"


@pytest.mark.parametrize(
    "sent",
    [
        "/%2e%2e/etc/passwd",
        "/..",
        "/a/../../echo",
        "/a%2Fb/echo",
        "/a%2fb/echo",
        "/a%5Cb/echo",
        "/a%5c..%5c..%5cecho",
        "/a%00/echo",
        "/echo%00.html",
        "/a%0d%0aX-Injected:%20yes/echo",
        "/%C0%AE%C0%AE/echo",
        "/%ff/echo",
        "/%zz/echo",
        "/..;/echo",
        "/public/..;/echo",
        "/public/%2e%2e%3bjsessionid=x/echo",
    ],
)
async def test_unsafe_path_is_refused_by_the_gateway_and_never_forwarded(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream, sent: str
) -> None:
    gw = await proxy()
    r = await exchange(certs, gw, request_bytes(sent))
    assert r.status == 400
    problem = r.problem()
    assert problem["reason"] == "path-invalid"
    assert r.headers["X-ZT-Decision-Id"] == problem["decision_id"]
    event = await audit_event(gw, problem["decision_id"])
    assert event["result"]["reason"] == "path-invalid"
    assert event["input"]["path"] is None
    assert metric(gw, "ztgw_requests_total", route="-", verdict="deny", reason="path-invalid") == 1
    assert recording.hits == []


@pytest.mark.parametrize(
    "sent",
    [b"/a\\b/echo", b"/\\..\\echo", b"/\xff/echo", b"/a\x7f/echo", "/caf\u00e9/echo".encode()],
)
async def test_raw_path_bytes_other_servers_read_differently_are_refused(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream, sent: bytes
) -> None:
    gw = await proxy()
    r = await exchange(certs, gw, b"GET " + sent + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert r.status == 400
    assert r.problem()["reason"] in ("path-invalid", "request-invalid")
    await audit_event(gw, r.problem()["decision_id"])
    assert recording.hits == []


# --------------------------------------------------------------------------------------------
# 6. upstream faults


@pytest.fixture
async def closed_port() -> int:
    """A port that was just bound and released: connecting to it is refused."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()
    return port


async def test_upstream_down_is_502_upstream_unavailable_with_decision_id(
    proxy: ProxyFactory, certs: Certs, closed_port: int
) -> None:
    gw = await proxy({"upstreams": {"demo": {"url": f"http://127.0.0.1:{closed_port}"}}})
    async with session(certs) as s, s.get(url(gw, "/echo")) as r:
        assert r.status == 502
        assert r.content_type == "application/problem+json"
        problem = await r.json(content_type=None)
    assert problem["reason"] == "upstream-unavailable"
    assert problem["decision_id"] == r.headers["X-ZT-Decision-Id"]
    assert r.headers["Server"] == "ztgateway"
    assert metric(gw, "ztgw_upstream_errors_total", route="app", kind="connect") == 1


async def test_slow_upstream_is_504_upstream_timeout(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    gw = await proxy({"upstreams": {"demo": {"read_timeout": 0.5}}})
    async with session(certs) as s, s.get(url(gw, "/slow?delay=3")) as r:
        assert r.status == 504
        problem = await r.json(content_type=None)
    assert problem["reason"] == "upstream-timeout"
    assert problem["decision_id"] == r.headers["X-ZT-Decision-Id"]
    assert metric(gw, "ztgw_upstream_errors_total", route="app", kind="timeout") == 1
    # The gateway hung up on the upstream instead of waiting the 3 s out.
    hits = await recording.settled()
    assert [(h.raw_path, h.outcome) for h in hits] == [("/slow?delay=3", "CancelledError")]


async def test_upstream_reset_is_502(proxy: ProxyFactory, certs: Certs) -> None:
    gw = await proxy()
    async with session(certs) as s, s.get(url(gw, "/reset")) as r:
        assert r.status == 502
        problem = await r.json(content_type=None)
    assert problem["reason"] == "upstream-unavailable"
    assert metric(gw, "ztgw_upstream_errors_total", route="app", kind="reset") == 1


async def test_upstream_stalling_on_a_small_body_is_a_clean_504(
    proxy: ProxyFactory, certs: Certs
) -> None:
    # A small answer (Content-Length within SMALL_BODY) is taken whole before anything is sent,
    # so an upstream that stalls after its head still gets the client an honest 504.
    gw = await proxy({"upstreams": {"demo": {"read_timeout": 0.5}}})
    async with session(certs) as s, s.get(url(gw, "/slow-body?delay=3")) as r:
        assert r.status == 504
        assert (await r.json(content_type=None))["reason"] == "upstream-timeout"


# --------------------------------------------------------------------------------------------
# 7. limits


async def test_body_over_client_max_size_with_content_length_is_413_and_not_forwarded(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    gw = await proxy(routes(client_max_size=1024))
    body = b"x" * 2048
    r = await exchange(
        certs,
        gw,
        request_bytes("/upload", f"Content-Length: {len(body)}", method="POST")[:-2]
        + b"\r\n"
        + body,
    )
    assert r.status == 413
    assert r.problem()["reason"] == "body-too-large"
    assert r.headers["Connection"] == "close"
    assert recording.hits == []
    assert (
        metric(gw, "ztgw_requests_total", route="app", verdict="deny", reason="body-too-large") == 1
    )


async def test_chunked_body_over_client_max_size_is_413_and_never_completes_upstream(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    gw = await proxy(routes(client_max_size=100_000))
    chunk = b"y" * 16_384
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(10)) + b"0\r\n\r\n"
    r = await exchange(
        certs,
        gw,
        request_bytes("/upload", "Transfer-Encoding: chunked", method="POST") + body,
    )
    assert r.status == 413
    assert r.problem()["reason"] == "body-too-large"
    # The upstream may have seen the start of the body, never all of it.
    assert all(h.outcome != "complete" for h in await recording.settled())


async def test_body_within_client_max_size_is_forwarded(proxy: ProxyFactory, certs: Certs) -> None:
    gw = await proxy(routes(client_max_size=100_000))
    async with session(certs) as s, s.post(url(gw, "/upload"), data=b"z" * 100_000) as r:
        assert r.status == 200
        assert (await r.json())["length"] == 100_000


async def test_oversized_header_is_431_header_too_large(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    gw = await proxy({"server": {"max_header_bytes": 4096}})
    r = await exchange(certs, gw, request_bytes("/echo", "X-Big: " + "a" * 5000))
    assert r.status == 431
    problem = r.problem()
    assert problem["reason"] == "header-too-large"
    event = await audit_event(gw, problem["decision_id"])
    assert event["result"]["reason"] == "header-too-large"
    assert recording.hits == []
    # Just under the limit is fine.
    ok = await exchange(certs, gw, request_bytes("/echo", "X-Big: " + "a" * 3000))
    assert ok.status == 200


async def test_slowloris_head_is_cut_off_after_header_timeout(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    gw = await proxy({"server": {"header_timeout": 0.5}})
    async with raw_tls(certs, gw) as (reader, writer):
        writer.write(b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed = False
        started = time.monotonic()
        for i in range(25):  # 5 s of trickling, far beyond the 0.5 s allowed
            try:
                writer.write(b"X-Trickle-%d: x\r\n" % i)
                await writer.drain()
            except (ConnectionError, ssl.SSLError, OSError):
                closed = True
                break
            if await closed_by_peer(reader, 0.2):
                closed = True
                break
        elapsed = time.monotonic() - started
    assert closed, "the gateway kept a trickling request head open"
    assert elapsed < 3.0
    assert metric(gw, "ztgw_header_timeouts_total") == 1
    assert recording.hits == []


async def test_idle_keep_alive_connection_is_not_cut_by_the_header_timer(
    proxy: ProxyFactory, certs: Certs
) -> None:
    gw = await proxy({"server": {"header_timeout": 0.5}})
    async with raw_tls(certs, gw) as (reader, writer):
        for _ in range(2):
            writer.write(request_bytes("/echo"))
            await writer.drain()
            r = await read_response(reader)
            assert r.status == 200
            # Idle between requests for longer than the header timeout.
            assert not await closed_by_peer(reader, 0.8)
    assert metric(gw, "ztgw_header_timeouts_total") == 0


async def test_connection_that_never_sends_a_byte_is_closed_after_idle_timeout(
    proxy: ProxyFactory, certs: Certs
) -> None:
    # The header timer starts at the first byte; a silent connection is the idle timer's.
    gw = await proxy({"server": {"header_timeout": 0.5, "idle_timeout": 0.5}})
    async with raw_tls(certs, gw) as (reader, _):
        assert await closed_by_peer(reader, 3.0), "a silent TLS connection was held open"


# --------------------------------------------------------------------------------------------
# 8. smuggling-shaped requests: refused by the parser, audited, never forwarded

SMUGGLING = {
    "content-length-and-transfer-encoding": request_bytes(
        "/echo", "Content-Length: 4", "Transfer-Encoding: chunked", method="POST"
    )
    + b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "transfer-encoding-then-content-length": request_bytes(
        "/echo", "Transfer-Encoding: chunked", "Content-Length: 40", method="POST"
    )
    + b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "http-1.0-with-transfer-encoding": request_bytes(
        "/echo", "Transfer-Encoding: chunked", method="POST", version="1.0"
    )
    + b"0\r\n\r\n",
    "duplicate-content-length-values": request_bytes(
        "/echo", "Content-Length: 5", "Content-Length: 30", method="POST"
    )
    + b"hello",
    "content-length-list": request_bytes("/echo", "Content-Length: 5, 30", method="POST")
    + b"hello",
    "chunked-then-identity": request_bytes(
        "/echo", "Transfer-Encoding: chunked, identity", method="POST"
    )
    + b"0\r\n\r\n",
    "chunked-and-identity-headers": request_bytes(
        "/echo", "Transfer-Encoding: chunked", "Transfer-Encoding: identity", method="POST"
    )
    + b"0\r\n\r\n",
    "chunked-twice": request_bytes("/echo", "Transfer-Encoding: chunked, chunked", method="POST")
    + b"0\r\n\r\n",
    "unknown-coding": request_bytes("/echo", "Transfer-Encoding: xchunked", method="POST")
    + b"0\r\n\r\n",
    "space-before-colon": request_bytes("/echo", "Transfer-Encoding : chunked", method="POST")
    + b"0\r\n\r\n",
    "obs-fold-transfer-encoding": request_bytes(
        "/echo", "Transfer-Encoding: identity", " chunked", method="POST"
    )
    + b"0\r\n\r\n",
    "bad-chunk-size": request_bytes("/echo", "Transfer-Encoding: chunked", method="POST")
    + b"5;\x00\r\nhello\r\n0\r\n\r\n",
    "bare-lf-in-chunk": request_bytes("/echo", "Transfer-Encoding: chunked", method="POST")
    + b"5\nhello\n0\n\n",
}


@pytest.mark.parametrize("raw", list(SMUGGLING.values()), ids=list(SMUGGLING))
async def test_smuggling_shaped_request_is_400_audited_and_never_forwarded(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream, raw: bytes
) -> None:
    gw = await proxy()
    async with raw_tls(certs, gw) as (reader, writer):
        writer.write(raw)
        await writer.drain()
        r = await read_response(reader)
        # The connection is closed: nothing after the refused request is ever parsed.
        assert await closed_by_peer(reader, 2.0)
    assert r.status == 400, (
        f"{r.status} {r.body[:120]!r}: the gateway accepted a smuggling-shaped request. For "
        "HTTP/1.0 + Transfer-Encoding, RFC 9112 §6.1 says the framing is faulty, but llhttp "
        "accepts it; Gateway.handle (app.py) must refuse it through conn.handle_error(request, "
        "400, BadHttpMessage(...)) before the pipeline runs"
    )
    problem = r.problem()
    assert problem["reason"] == "request-invalid"
    assert r.headers["X-ZT-Decision-Id"] == problem["decision_id"]
    assert r.headers["Server"] == "ztgateway"
    event = await audit_event(gw, problem["decision_id"])
    assert event["result"]["verdict"] == "deny"
    assert event["result"]["reason"] == "request-invalid"
    assert metric(gw, "ztgw_http_protocol_errors_total", reason="request-invalid") == 1
    assert recording.hits == []


async def test_chunked_trailer_fields_never_reach_the_upstream(
    proxy: ProxyFactory, certs: Certs
) -> None:
    gw = await proxy()
    r = await exchange(
        certs,
        gw,
        request_bytes(
            "/echo", "Transfer-Encoding: chunked", "Trailer: X-Forwarded-User", method="POST"
        )
        + b"5\r\nhello\r\n0\r\nX-Forwarded-User: mallory\r\nX-ZT-Device-Id: evil\r\n\r\n",
    )
    assert r.status == 200
    seen = json.loads(r.body)
    assert seen["body_length"] == 5
    assert seen["headers_map"]["x-forwarded-user"] == "alice"
    assert seen["headers_map"]["x-zt-device-id"] == "alice-laptop"
    assert b"mallory" not in r.body and b"evil" not in r.body


# --------------------------------------------------------------------------------------------
# 9. X-Forwarded-For is believed only from a trusted proxy


async def test_x_forwarded_for_from_a_trusted_proxy_names_the_client(
    proxy: ProxyFactory, certs: Certs
) -> None:
    gw = await proxy({"server": {"trusted_proxies": ["127.0.0.1/32"]}})
    async with (
        session(certs) as s,
        s.get(url(gw, "/echo"), headers={"X-Forwarded-For": "10.1.2.3"}) as r,
    ):
        assert r.status == 200
        seen = await r.json()
    assert seen["headers_map"]["x-forwarded-for"] == "10.1.2.3"
    assert [n.lower() for n, _ in seen["headers"]].count("x-forwarded-for") == 1
    event = await audit_event(gw, r.headers["X-ZT-Decision-Id"])
    assert event["input"]["client_ip"] == "10.1.2.3"
    assert event["input"]["peer_ip"] == "127.0.0.1"


async def test_x_forwarded_for_from_an_untrusted_peer_is_replaced_by_the_peer(
    proxy: ProxyFactory, certs: Certs
) -> None:
    gw = await proxy()
    async with (
        session(certs) as s,
        s.get(url(gw, "/echo"), headers={"X-Forwarded-For": "10.1.2.3"}) as r,
    ):
        assert r.status == 200
        seen = await r.json()
    assert seen["headers_map"]["x-forwarded-for"] == "127.0.0.1"
    event = await audit_event(gw, r.headers["X-ZT-Decision-Id"])
    assert event["input"]["client_ip"] == "127.0.0.1"


async def test_trusted_proxy_chain_is_walked_from_the_right(
    proxy: ProxyFactory, certs: Certs
) -> None:
    gw = await proxy({"server": {"trusted_proxies": ["127.0.0.1/32", "10.9.0.0/16"]}})
    # The client wrote 6.6.6.6 itself; 10.1.2.3 is what the trusted 10.9.0.1 saw.
    xff = "6.6.6.6, 10.1.2.3, 10.9.0.1"
    async with session(certs) as s, s.get(url(gw, "/echo"), headers={"X-Forwarded-For": xff}) as r:
        seen = await r.json()
    assert seen["headers_map"]["x-forwarded-for"] == "10.1.2.3"


@pytest.mark.parametrize(
    ("xff", "client"),
    [
        # The client wrote 203.0.113.66; 10.1.2.3 is what the trusted 10.9.0.1 saw.
        ("203.0.113.66, 10.1.2.3, 10.9.0.1", "10.1.2.3"),
        ("10.1.2.3, 10.9.0.1, 10.9.0.2", "10.1.2.3"),
        # A hop that is not an address: nothing left of it is believed, the proxy is the client.
        ("10.1.2.3, not-an-address", "127.0.0.1"),
        ("10.1.2.3, 10.9.0.1, not-an-address", "127.0.0.1"),
    ],
)
async def test_forward_auth_and_the_data_plane_name_the_same_client_for_a_spoofed_chain(
    proxy: ProxyFactory, certs: Certs, xff: str, client: str
) -> None:
    trusted = ["127.0.0.1/32", "10.9.0.0/16"]
    gw = await proxy(
        {
            "server": {"trusted_proxies": trusted},
            "forward_auth": {"enabled": True, "trusted_proxies": trusted, "edge": "nginx"},
        }
    )
    async with session(certs) as s, s.get(url(gw, "/echo"), headers={"X-Forwarded-For": xff}) as r:
        data_plane = await audit_event(gw, r.headers["X-ZT-Decision-Id"])
    asked = {"X-Original-URI": "/echo", "X-Original-Method": "GET", "X-Forwarded-For": xff}
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{gw.ops_port}/forward-auth", headers=asked) as r,
    ):
        decision_id = r.headers.get("X-ZT-Decision-Id") or (await r.json())["decision_id"]
    edge = await audit_event(gw, decision_id)
    assert data_plane["input"]["client_ip"] == edge["input"]["client_ip"] == client


async def test_trusted_proxys_forwarding_headers_are_not_a_spoofing_attempt(
    proxy: ProxyFactory, certs: Certs
) -> None:
    gw = await proxy({"server": {"trusted_proxies": ["127.0.0.1/32"], "spoofed_headers": "deny"}})
    async with session(certs) as s:
        async with s.get(url(gw, "/echo"), headers={"X-Forwarded-For": "10.1.2.3"}) as r:
            assert r.status == 200
            decision_id = r.headers["X-ZT-Decision-Id"]
        # Identity headers are never a proxy's to set.
        async with s.get(url(gw, "/echo"), headers={"X-Forwarded-User": "mallory"}) as spoof:
            assert spoof.status == 400
    assert "header-spoofed" not in finding_reasons(await audit_event(gw, decision_id))
    assert metric(gw, "ztgw_spoofed_headers_total") == 1


# --------------------------------------------------------------------------------------------
# 10. Expect: 100-continue


async def test_expect_100_continue_upload_is_forwarded(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    gw = await proxy()
    body = b"q" * 300_000
    async with (
        session(certs, timeout=aiohttp.ClientTimeout(total=10)) as s,
        s.post(url(gw, "/upload"), data=body, expect100=True) as r,
    ):
        assert r.status == 200
        assert await r.json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert [(h.raw_path, h.outcome) for h in recording.hits] == [("/upload", "complete")]


async def test_expect_100_continue_gets_100_only_after_the_decision(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    gw = await proxy(routes(client_max_size=1000))
    async with raw_tls(certs, gw) as (reader, writer):
        writer.write(
            request_bytes("/upload", "Content-Length: 5", "Expect: 100-continue", method="POST")
        )
        await writer.drain()
        interim = await read_response(reader)
        assert interim.status == 100
        writer.write(b"hello")
        await writer.drain()
        final = await read_response(reader)
    assert final.status == 200
    assert json.loads(final.body)["length"] == 5
    # Refused (too large) before the body: no 100, the refusal straight away.
    async with raw_tls(certs, gw) as (reader, writer):
        writer.write(
            request_bytes("/upload", "Content-Length: 5000", "Expect: 100-continue", method="POST")
        )
        await writer.drain()
        refused = await read_response(reader)
    assert refused.status == 413
    assert [h.raw_path for h in recording.hits] == ["/upload"]


async def test_expect_100_continue_from_an_http_1_0_client_is_ignored(
    proxy: ProxyFactory, certs: Certs
) -> None:
    gw = await proxy()
    request = request_bytes(
        "/upload", "Content-Length: 5", "Expect: 100-continue", method="POST", version="1.0"
    )
    r = await exchange(certs, gw, request + b"hello")
    # An HTTP/1.0 client cannot read an interim response: the first answer must be final.
    assert r.status == 200
    assert json.loads(r.body)["length"] == 5


@pytest.mark.parametrize(
    ("first", "status"),
    [("/echo", 200), ("/%2e%2e/echo", 400)],
    ids=["forwarded", "refused"],
)
async def test_request_pipelined_behind_a_declined_upgrade_is_not_silently_lost(
    proxy: ProxyFactory, certs: Certs, first: str, status: int
) -> None:
    gw = await proxy()
    async with raw_tls(certs, gw) as (reader, writer):
        writer.write(
            request_bytes(first, "Connection: Upgrade", "Upgrade: h2c")
            + request_bytes("/echo?second")
        )
        await writer.drain()
        r = await read_response(reader)
        assert r.status == status
        # Either the pipelined request is answered, or the connection is closed so the client
        # knows to retry it (RFC 9112 §9.3.2). Waiting forever is neither.
        try:
            second: RawResponse | None = await read_response(reader, timeout=2.0)
        except (TimeoutError, AssertionError, asyncio.IncompleteReadError):
            second = None
        if second is None:
            assert await closed_by_peer(reader, 0.1), (
                "the request pipelined behind an h2c upgrade was dropped by aiohttp's parser and "
                "the connection kept open; Gateway.handle (app.py) must force_close() every "
                "response to a request with Connection: upgrade that it does not upgrade"
            )
        else:
            assert second.status == 200


# --------------------------------------------------------------------------------------------
# the fast path: no Task per request (issue 14)


@contextlib.contextmanager
def tasks_started() -> Iterator[list[str]]:
    """The qualified names of the coroutines of every Task made on this loop meanwhile."""
    loop = asyncio.get_running_loop()
    names: list[str] = []
    previous = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        names.append(getattr(coro, "__qualname__", type(coro).__name__))
        return asyncio.Task(coro, loop=loop, **kw)

    loop.set_task_factory(factory)
    try:
        yield names
    finally:
        loop.set_task_factory(previous)


async def test_keep_alive_requests_run_without_a_task(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    gw = await proxy()
    async with raw_tls(certs, gw) as (reader, writer):
        # The first request connects the upstream pool: that waits, so it runs in a Task.
        writer.write(request_bytes("/status/200"))
        assert (await read_response(reader)).status == 200
        with tasks_started() as started:
            for _ in range(20):
                writer.write(request_bytes("/status/200"))
                response = await reader.readuntil(b"200 OK\n")
                assert response.startswith(b"HTTP/1.1 200 ")
    # Decided from memory, forwarded over the idle pooled connection, answered from the
    # upstream protocol's callback: not one of the 20 requests was moved into a Task.
    assert [n for n in started if n.startswith(("_resumed", "Exchange.", "RequestPath."))] == []
    assert recording.paths().count("/status/200") == 21


async def test_request_that_must_wait_moves_into_a_task_and_is_answered(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    gw = await proxy()
    async with raw_tls(certs, gw) as (reader, writer):
        with tasks_started() as started:
            # No pooled upstream connection yet: connecting awaits (asyncio.timeout needs a
            # Task), so the request is resumed in one, exactly where it stopped.
            writer.write(request_bytes("/status/200"))
            first = await read_response(reader)
        writer.write(request_bytes("/status/200"))
        second = await read_response(reader)
    assert (first.status, second.status) == (200, 200)
    assert "_resumed" in started
    assert first.headers["X-ZT-Decision-Id"] != second.headers["X-ZT-Decision-Id"]
