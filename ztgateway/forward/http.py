"""The streaming HTTP proxy.

Bodies stream in both directions in chunks (a 200 MB upload or download keeps memory flat);
no redirects are followed and nothing is decompressed, so the client gets exactly what the
upstream said. Upstream faults map to 502 (unreachable, reset) and 504 (timeout); once the
response head has been sent a fault can only abort the connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import HttpVersion11, web
from multidict import CIMultiDict
from yarl import URL

from ..config import RouteConfig, UpstreamConfig
from ..decision import Reason
from ..paths import encode_path
from ..tls import upstream_context
from .headers import downstream_response_headers, upgrade_requested

log = logging.getLogger("ztgateway.forward")
CHUNK = 64 * 1024
SMALL_BODY = 64 * 1024


class BodyTooLarge(Exception):
    pass


@dataclass(frozen=True, slots=True)
class UpstreamFailure(Exception):
    """The upstream could not answer; `kind` is a bounded metrics label."""

    reason: Reason
    kind: str
    detail: str


class Upstreams:
    """One pooled ClientSession per upstream; built at start, closed at shutdown."""

    def __init__(self, upstreams: list[UpstreamConfig]) -> None:
        self._configs = {u.name: u for u in upstreams}
        self._sessions: dict[str, aiohttp.ClientSession] = {}

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
        for s in sessions:
            await s.close()


def upstream_url(route: RouteConfig, path: str, query: str) -> URL:
    """The normalised path, re-encoded, under the upstream's base path."""
    if route.strip_prefix and path.startswith(route.prefix):
        path = "/" + path[len(route.prefix) :]
    base = route.upstream.url
    base_path = base.raw_path.rstrip("/")
    raw = base_path + encode_path(path)
    if query:
        raw += "?" + query
    return base.with_path("/", encoded=True).join(URL(raw, encoded=True))


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


async def forward_http(
    request: web.BaseRequest,
    route: RouteConfig,
    session: aiohttp.ClientSession,
    url: URL,
    headers: CIMultiDict[str],
    *,
    decision_id: str,
    extra_headers: dict[str, str] | None = None,
    on_upstream_head: Callable[[float], None] | None = None,
) -> web.StreamResponse:
    """Proxy one request. Raises BodyTooLarge or UpstreamFailure before the response starts."""
    limit = route.client_max_size
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge
    data: AsyncIterator[bytes] | None = None
    sent = [0]
    if request.body_exists:
        # RFC 9110 §10.1.1: an HTTP/1.0 client cannot read an interim response, and a server
        # MUST ignore its 100-continue expectation.
        expects = request.headers.get("Expect", "").lower() == "100-continue"
        if expects and request.version >= HttpVersion11:
            # Decided already: now, and only now, ask the client for its body.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        data = _limited(request.content, limit, sent)
    started = time.monotonic()
    response: web.StreamResponse | None = None
    try:
        async with session.request(
            request.method,
            url,
            headers=headers,
            data=data,
            allow_redirects=False,
            compress=None,
            auto_decompress=False,
        ) as up:
            if on_upstream_head:
                on_upstream_head(time.monotonic() - started)
            no_body = request.method == "HEAD" or up.status in (204, 304) or 100 <= up.status < 200
            length = up.content_length
            small = not no_body and length is not None and length <= SMALL_BODY
            if small:
                # Most legacy pages and API answers are small: take the whole body and send
                # head and body in one write (one TLS record) instead of streaming chunks.
                body = await up.read()
                ready: web.StreamResponse = web.Response(
                    status=up.status, reason=up.reason, body=body
                )
            else:
                ready = web.StreamResponse(status=up.status, reason=up.reason)
            response = ready
            out_headers = downstream_response_headers(up.headers)
            if small:
                out_headers.popall("Content-Length", None)
            ready.headers.update(out_headers)
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
                async for chunk in up.content.iter_chunked(CHUNK):
                    await ready.write(chunk)
            await ready.write_eof()
            return ready
    except BodyTooLarge:
        if response is not None and response.prepared:
            _abort(request)
            return response
        raise
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        if sent[0] > limit:
            raise BodyTooLarge from exc
        if response is not None and response.prepared:
            # The head is out: the only honest signal left is a broken connection.
            log.warning(
                "upstream %s failed mid-response: %s", route.upstream.name, type(exc).__name__
            )
            _abort(request)
            return response
        raise classify(exc) from exc


def _abort(request: web.BaseRequest) -> None:
    if request.transport is not None:
        request.transport.abort()
