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

from tests.support import Certs, client_ssl, deep_merge, session
from ztgateway.app import Gateway
from ztgateway.credentials.devtoken import issue_token
from ztgateway.demo_app import GZIP_PLAINTEXT, create_demo_app, expected_download_sha256

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
        hit = Hit(request.method, request.raw_path)
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


async def audit_event(gw: Gateway, decision_id: str) -> dict[str, Any]:
    await gw.audit.flush()
    path = gw.config.audit.jsonl
    assert path is not None
    for line in path.read_text().splitlines():
        event: dict[str, Any] = json.loads(line)
        if event["decision_id"] == decision_id:
            return event
    raise AssertionError(f"no audit event for decision {decision_id}")


def finding_reasons(event: dict[str, Any]) -> list[str]:
    return [f["reason"] for f in event["result"]["findings"]]


def metric(gw: Gateway, name: str, **labels: str) -> float:
    return gw.metrics.registry.get_sample_value(name, labels) or 0.0


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
            return RawResponse(status, headers, await reader.readexactly(int(headers["Content-Length"])))
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
    except (ConnectionError, ssl.SSLError, OSError):
        return True
    except TimeoutError:
        return False
    return True


def get(path: str, *extra: str, method: str = "GET", version: str = "1.1") -> bytes:
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
    print("growth", growth[0] / MB)
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
    print("growth", growth[0] / MB)
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
        writer.write(get("/download?size=12345", method="HEAD"))
        writer.write(get("/status/200"))
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
        writer.write(get(f"/status/{status}"))
        writer.write(get("/status/200"))
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
    r = await exchange(certs, gw, get(f"/download?size={size}&chunked=1"))
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
