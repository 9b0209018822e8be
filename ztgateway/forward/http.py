"""The streaming HTTP proxy.

Bodies stream in both directions in chunks (a 200 MB upload or download keeps memory flat);
no redirects are followed and nothing is decompressed, so the client gets exactly what the
upstream said. Upstream faults map to 502 (unreachable, reset) and 504 (timeout); once the
response head has been sent a fault can only abort the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import HttpVersion11, web
from multidict import CIMultiDict
from yarl import URL

from ..clock import SYSTEM_CLOCK, Clock
from ..config import RouteConfig, UpstreamConfig
from ..decision import Reason
from ..paths import encode_path
from ..tls import upstream_context
from .headers import downstream_raw_headers, upgrade_requested
from .upstream import (
    IDEMPOTENT,
    UpstreamConnection,
    UpstreamFailure,
    UpstreamPool,
    encode_head,
)

log = logging.getLogger("ztgateway.forward")
CHUNK = 64 * 1024
SMALL_BODY = 64 * 1024


class BodyTooLarge(Exception):
    pass


class Upstreams:
    """Per upstream: a raw keep-alive pool for HTTP and an aiohttp session for WebSockets.

    Both are built on first use (they need the running loop) and closed at shutdown.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._pools: dict[str, UpstreamPool] = {}

    def pool(self, up: UpstreamConfig) -> UpstreamPool:
        pool = self._pools.get(up.name)
        if pool is None or pool.config != up:
            ssl_ctx = upstream_context(up) if up.url.scheme == "https" else None
            pool = UpstreamPool(up, ssl_ctx)
            old = self._pools.get(up.name)
            self._pools[up.name] = pool
            if old is not None:
                # A reload changed this upstream: new requests use the new pool, the old
                # one's idle connections go now and its busy ones when their exchange ends.
                old.retire()
        return pool

    def session(self, up: UpstreamConfig) -> aiohttp.ClientSession:
        s = self._sessions.get(up.name)
        if s is None or s.closed:
            ssl_ctx = upstream_context(up) if up.url.scheme == "https" else False
            connector = aiohttp.TCPConnector(
                limit=up.max_connections,
                limit_per_host=up.max_connections_per_host,
                ssl=ssl_ctx,
                enable_cleanup_closed=False,
                keepalive_timeout=30,
            )
            s = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                # The upstream sees the client's headers, not ones aiohttp would invent.
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=up.connect_timeout, sock_read=up.read_timeout
                ),
                trust_env=False,
            )
            self._sessions[up.name] = s
        return s

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.close()
        for s in sessions:
            await s.close()


def upstream_target(route: RouteConfig, path: str, query: str) -> str:
    """The request target: the normalised path, re-encoded, under the upstream's base path."""
    if route.strip_prefix:
        # The route matched the path's first segments (parameters stripped, case folded for a
        # case-insensitive upstream), so those segments go, whatever their spelling.
        depth = route.prefix.count("/") - 1
        parts = path.split("/", depth + 1)
        if depth and len(parts) > depth:
            path = "/" + (parts[depth + 1] if len(parts) > depth + 1 else "")
    target = route.upstream.url.raw_path.rstrip("/") + encode_path(path)
    return target + "?" + query if query else target


def upstream_url(route: RouteConfig, path: str, query: str) -> URL:
    """The same target as an absolute URL (the WebSocket client wants one)."""
    base = route.upstream.url
    return base.with_path("/", encoded=True).join(
        URL(upstream_target(route, path, query), encoded=True)
    )


async def _limited(
    content: aiohttp.StreamReader, limit: int, state: list[int]
) -> AsyncIterator[bytes]:
    async for chunk in content.iter_chunked(CHUNK):
        state[0] += len(chunk)
        if state[0] > limit:
            raise BodyTooLarge
        yield chunk


def classify(exc: BaseException) -> UpstreamFailure:
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamFailure(Reason.UPSTREAM_TIMEOUT, "timeout", type(exc).__name__)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return UpstreamFailure(Reason.UPSTREAM_UNAVAILABLE, "tls", type(exc).__name__)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailure(Reason.UPSTREAM_UNAVAILABLE, "connect", type(exc).__name__)
    return UpstreamFailure(Reason.UPSTREAM_UNAVAILABLE, "reset", type(exc).__name__)


async def _read_small(request: web.BaseRequest, state: list[int]) -> bytes:
    body = await request.content.read()
    state[0] = len(body)
    return body


async def _send_body(conn: UpstreamConnection, data: AsyncIterator[bytes], chunked: bool) -> None:
    async for chunk in data:
        if not chunk:
            continue
        if chunked:
            conn.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        else:
            conn.write(chunk)
        await conn.drain()
    if chunked:
        conn.write(b"0\r\n\r\n")


def _body_failed(conn: UpstreamConnection) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            conn.fail(exc)

    return done


async def forward_http(
    request: web.BaseRequest,
    route: RouteConfig,
    pool: UpstreamPool,
    target: str,
    headers: CIMultiDict[str],
    *,
    decision_id: str,
    extra_headers: dict[str, str] | None = None,
    on_upstream_head: Callable[[float], None] | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> web.StreamResponse:
    """Proxy one request. Raises BodyTooLarge or UpstreamFailure before the response starts."""
    limit = route.client_max_size
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge
    method = request.method
    fields = list(headers.items())
    inline = b""
    stream: AsyncIterator[bytes] | None = None
    chunked = False
    sent = [0]
    if request.body_exists:
        # RFC 9110 §10.1.1: an HTTP/1.0 client cannot read an interim response, and a server
        # MUST ignore its 100-continue expectation.
        expects = request.headers.get("Expect", "").lower() == "100-continue"
        if expects and request.version >= HttpVersion11:
            # Decided already: now, and only now, ask the client for its body.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if length is not None and length <= SMALL_BODY:
            inline = await _read_small(request, sent)
        else:
            stream = _limited(request.content, limit, sent)
            if length is None:
                chunked = True
                fields.append(("Transfer-Encoding", "chunked"))
    elif method in ("POST", "PUT", "PATCH") and "Content-Length" not in headers:
        fields.append(("Content-Length", "0"))
    try:
        head = encode_head(method, target, pool.host_header, fields)
    except ValueError as exc:
        raise UpstreamFailure(Reason.UPSTREAM_UNAVAILABLE, "reset", str(exc)) from exc
    timeout = route.upstream.read_timeout
    # A keep-alive connection the upstream closed as we picked it is retried once, when
    # nothing was streamed and repeating the request is harmless (RFC 9110 §9.2.2).
    attempts = 2 if stream is None and method in IDEMPOTENT else 1
    started = clock.monotonic()
    response: web.StreamResponse | None = None
    for attempt in range(attempts):
        conn = await pool.acquire()
        reuse = False
        sender: asyncio.Task[None] | None = None
        try:
            progress = conn.start(head_only=method == "HEAD")
            if stream is None:
                conn.write(head + inline if inline else head)
            else:
                conn.write(head)
                sender = asyncio.get_running_loop().create_task(_send_body(conn, stream, chunked))
                sender.add_done_callback(_body_failed(conn))
            try:
                up = await conn.wait_head(timeout)
            except UpstreamFailure as fail:
                if (
                    fail.kind == "reset"
                    and conn.reused
                    and not progress.received_any
                    and attempt + 1 < attempts
                ):
                    continue
                raise
            if on_upstream_head:
                on_upstream_head(clock.monotonic() - started)
            status = up.status
            no_body = method == "HEAD" or status in (204, 304)
            out_headers, content_length = downstream_raw_headers(up.raw_headers)
            small = not no_body and content_length is not None and content_length <= SMALL_BODY
            if small:
                # Most legacy pages and API answers are small: take the whole body and send
                # head and body in one write (one TLS record) instead of streaming chunks.
                body = await conn.read_all(timeout)
                out_headers.popall("Content-Length", None)
                ready: web.StreamResponse = web.Response(
                    status=status, reason=up.reason or None, body=body, headers=out_headers
                )
            else:
                ready = web.StreamResponse(
                    status=status, reason=up.reason or None, headers=out_headers
                )
            response = ready
            ready.headers["X-ZT-Decision-Id"] = decision_id
            if extra_headers:
                for name, value in extra_headers.items():
                    ready.headers.add(name, value)
            if no_body:
                # Keep the upstream's Content-Length for HEAD (RFC 9110 §9.3.2) without a body.
                ready.headers.pop("Transfer-Encoding", None)
            if upgrade_requested(request.headers):
                # The upgrade is declined (RFC 9110 §7.8), but bytes pipelined behind it may have
                # been dropped by the parser: close, so the client retries them (RFC 9112 §9.3.2)
                # instead of waiting for answers that never come.
                ready.force_close()
            await ready.prepare(request)
            if not no_body and not small:
                async for chunk in conn.iter_body(timeout):
                    await ready.write(chunk)
            await ready.write_eof()
            reuse = sender is None or (sender.done() and not sender.cancelled())
            return ready
        except BodyTooLarge:
            if response is not None and response.prepared:
                _abort(request)
                return response
            raise
        except (UpstreamFailure, aiohttp.ClientError, OSError) as exc:
            if sent[0] > limit:
                raise BodyTooLarge from exc
            if response is not None and response.prepared:
                # The head is out: the only honest signal left is a broken connection.
                client = request.transport
                if client is None or client.is_closing():
                    # The client hung up while we wrote to it: nothing failed upstream.
                    log.info("client left mid-response: %s", type(exc).__name__)
                else:
                    log.warning(
                        "upstream %s failed mid-response: %s",
                        route.upstream.name,
                        type(exc).__name__,
                    )
                _abort(request)
                return response
            if isinstance(exc, UpstreamFailure):
                raise
            raise classify(exc) from exc
        finally:
            if sender is not None and not sender.done():
                sender.cancel()
            pool.release(conn, reuse=reuse)
    raise UpstreamFailure(Reason.UPSTREAM_UNAVAILABLE, "reset", "retry exhausted")


def _abort(request: web.BaseRequest) -> None:
    if request.transport is not None:
        request.transport.abort()
