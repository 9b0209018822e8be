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
from multidict import CIMultiDict
from yarl import URL

from ..clock import SYSTEM_CLOCK, Clock
from ..config import RouteConfig, UpstreamConfig
from ..decision import Reason
from ..edge.http1 import BodyTimeout, BodyTooLarge, ClientGone, Request
from ..edge.tls import upstream_context
from ..request.paths import encode_path
from ..responses import DECISION_HEADER
from .headers import downstream_raw_headers
from .upstream import (
    IDEMPOTENT,
    UpstreamConnection,
    UpstreamFailure,
    UpstreamPool,
    UpstreamResponse,
    encode_head,
)

log = logging.getLogger("ztgateway.forward")
CHUNK = 64 * 1024
SMALL_BODY = 64 * 1024


class Upstreams:
    """Per upstream: a raw keep-alive pool for HTTP and an aiohttp session for WebSockets.

    Both are built on first use (they need the running loop) and closed at shutdown.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._pools: dict[str, UpstreamPool] = {}

    def pool(self, up: UpstreamConfig) -> UpstreamPool:
        pool = self._pools.get(up.name)
        # Identity first: a frozen dataclass compared field by field on every request costs
        # more than the rest of this look-up; a reload builds a new config object.
        if pool is None or (pool.config is not up and pool.config != up):
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


def classify(exc: BaseException) -> UpstreamFailure:
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamFailure(Reason.UPSTREAM_TIMEOUT, "timeout", type(exc).__name__)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return UpstreamFailure(Reason.UPSTREAM_UNAVAILABLE, "tls", type(exc).__name__)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailure(Reason.UPSTREAM_UNAVAILABLE, "connect", type(exc).__name__)
    return UpstreamFailure(Reason.UPSTREAM_UNAVAILABLE, "reset", type(exc).__name__)


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


def request_head(
    method: str, target: str, pool: UpstreamPool, headers: CIMultiDict[str], *, body: bool
) -> bytes:
    """The upstream request head of a request (without its body framing when `body`)."""
    fields = list(headers.items())
    if not body and method in ("POST", "PUT", "PATCH") and "Content-Length" not in headers:
        fields.append(("Content-Length", "0"))
    try:
        return encode_head(method, target, pool.host_header, fields)
    except ValueError as exc:
        raise UpstreamFailure(Reason.UPSTREAM_UNAVAILABLE, "reset", str(exc)) from exc


async def forward_http(
    request: Request,
    route: RouteConfig,
    pool: UpstreamPool,
    target: str,
    headers: CIMultiDict[str],
    *,
    decision_id: str,
    extra_headers: dict[str, str] | None = None,
    on_upstream_head: Callable[[float], None] | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> int:
    """Proxy one request and answer it; returns the upstream's status. Raises BodyTooLarge or
    UpstreamFailure before the response starts; after that a fault can only cut the client's
    connection. (A request without a body over an idle pooled connection takes the
    callback-driven `forward.exchange` instead; this is the path for bodies, new connections
    and retries.)"""
    limit = route.client_max_size
    body = request.body
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge
    body.set_limit(limit)
    method = request.method
    inline = b""
    stream: AsyncIterator[bytes] | None = None
    chunked = False
    if request.body_exists:
        # RFC 9110 §10.1.1: the 100 Continue (HTTP/1.1 clients only) goes out when the body
        # is first read: now, after the decision.
        if length is not None and length <= SMALL_BODY:
            inline = await body.read()
        else:
            stream = body.iter_chunks()
            if length is None:
                chunked = True
                headers = headers.copy()
                headers.add("Transfer-Encoding", "chunked")
    head = request_head(method, target, pool, headers, body=request.body_exists)
    timeout = route.upstream.read_timeout
    # A keep-alive connection the upstream closed as we picked it is retried once, when
    # nothing was streamed and repeating the request is harmless (RFC 9110 §9.2.2).
    attempts = 2 if stream is None and method in IDEMPOTENT else 1
    started = clock.monotonic()
    for attempt in range(attempts):
        conn = await pool.acquire()
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
                    pool.release(conn, reuse=False)
                    continue
                raise
        except BaseException as exc:
            if sender is not None and not sender.done():
                sender.cancel()
            pool.release(conn, reuse=False)
            if isinstance(exc, Exception):
                return fault(request, route, exc)
            raise
        if on_upstream_head:
            on_upstream_head(clock.monotonic() - started)
        return await relay(
            request,
            route,
            pool,
            conn,
            up,
            decision_id=decision_id,
            extra_headers=extra_headers,
            sender=sender,
        )
    raise UpstreamFailure(Reason.UPSTREAM_UNAVAILABLE, "reset", "retry exhausted")


def client_head(
    up: UpstreamResponse, decision_id: str, extra_headers: dict[str, str] | None
) -> tuple[list[tuple[str, str]], int | None]:
    """The client's response head from the upstream's, with the decision id."""
    out, content_length = downstream_raw_headers(up.raw_headers)
    out.append((DECISION_HEADER, decision_id))
    if extra_headers:
        out.extend(extra_headers.items())
    return out, content_length


def small_answer(up: UpstreamResponse, content_length: int | None) -> bool:
    """Whether the answer goes out in one write, once read whole: no body, or a small one."""
    if up.head_only or up.status in (204, 304):
        return True
    return content_length is not None and content_length <= SMALL_BODY


async def relay(
    request: Request,
    route: RouteConfig,
    pool: UpstreamPool,
    conn: UpstreamConnection,
    up: UpstreamResponse,
    *,
    decision_id: str,
    extra_headers: dict[str, str] | None,
    sender: asyncio.Task[None] | None = None,
) -> int:
    """Answer the client from an upstream response whose head has arrived; releases `conn`."""
    timeout = route.upstream.read_timeout
    status = up.status
    reuse = False
    try:
        no_body = up.head_only or status in (204, 304)
        out, content_length = client_head(up, decision_id, extra_headers)
        # A declined upgrade (RFC 9110 §7.8): the protocol closes the connection after
        # this answer, so bytes the client pipelined behind it are retried, never lost.
        if no_body:
            # HEAD, 204, 304: the upstream's Content-Length is kept (RFC 9110 §9.3.2).
            request.start(status, out, reason=up.reason, content_length=content_length).end()
        elif small_answer(up, content_length):
            # Most legacy pages and API answers are small: head and body in one write
            # (one TLS record) instead of streaming chunks.
            data = await conn.read_all(timeout)
            request.respond(status, out, data, reason=up.reason)
        else:
            writer = request.start(status, out, reason=up.reason, content_length=content_length)
            async for chunk in conn.iter_body(timeout):
                await writer.write(chunk)
            writer.end()
        reuse = sender is None or (sender.done() and not sender.cancelled())
        return status
    except Exception as exc:  # mapped by fault(), which re-raises the rest
        return fault(request, route, exc, status)
    finally:
        if sender is not None and not sender.done():
            sender.cancel()
        pool.release(conn, reuse=reuse)


def fault(request: Request, route: RouteConfig, exc: Exception, status: int = 0) -> int:
    """A fault while forwarding: before the response started it is raised (as a client, body
    or upstream failure for the request path to answer); after, the only honest signal left
    is a broken connection, and the status already sent is returned."""
    if isinstance(exc, BodyTooLarge | BodyTimeout | ClientGone):
        if request.response_started:
            request.conn.abort()
            return status
        raise exc
    if isinstance(exc, UpstreamFailure | OSError):
        body = request.body
        if body.error is not None and not request.response_started:
            raise body.error from exc
        if request.response_started:
            if request.conn.closed:
                # The client hung up while we wrote to it: nothing failed upstream.
                log.info("client left mid-response: %s", type(exc).__name__)
            else:
                log.warning(
                    "upstream %s failed mid-response: %s", route.upstream.name, type(exc).__name__
                )
            request.conn.abort()
            return status
        if isinstance(exc, UpstreamFailure):
            raise exc
        raise classify(exc) from exc
    raise exc
