"""Pooled HTTP/1.1 connections to an upstream, parsed by llhttp (httptools).

aiohttp's client was the largest single cost on the proxied request path (issue 9's profile:
~28% of the event loop in `ClientSession._request` alone): it builds a ClientRequest, a
ClientResponse, cookie jars, timers and a StreamReader per request, for features a reverse
proxy never uses. This module keeps only what forwarding needs: one `asyncio.Protocol` per
upstream socket, llhttp (the parser aiohttp and uvicorn use) for the response, a LIFO pool of
keep-alive connections, flow control in both directions and a read timeout that costs one
attribute write per read.

Only HTTP goes through here; WebSocket bridging keeps aiohttp's client (`websocket.py`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import cast

import httptools

from ..config import UpstreamConfig
from ..decision import Reason
from ..edge.inline import in_task

KEEPALIVE_SECONDS = 30.0
HIGH_WATER = 1024 * 1024
LOW_WATER = 256 * 1024
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


@dataclass(frozen=True, slots=True)
class UpstreamFailure(Exception):
    """The upstream could not answer; `kind` is a bounded metrics label."""

    reason: Reason
    kind: str
    detail: str


def _timeout(detail: str) -> UpstreamFailure:
    return UpstreamFailure(Reason.UPSTREAM_TIMEOUT, "timeout", detail)


def _reset(detail: str) -> UpstreamFailure:
    return UpstreamFailure(Reason.UPSTREAM_UNAVAILABLE, "reset", detail)


@dataclass(slots=True)
class UpstreamResponse:
    """What one exchange has read so far; the connection fills it from parser callbacks."""

    head_only: bool
    status: int = 0
    reason: str = ""
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    headers_done: bool = False
    complete: bool = False
    delimited: bool = False  # Content-Length or chunked: the body has its own end
    keep_alive: bool = False
    chunks: deque[bytes] = field(default_factory=deque)
    buffered: int = 0
    received_any: bool = False
    overflow: bool = False  # bytes of a further message arrived


class UpstreamConnection(asyncio.Protocol):
    """One upstream socket, one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._response: UpstreamResponse | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.sink: Callable[[], None] | None = None
        self._feeding = False
        self._stepped = False
        """Called on every step of the exchange instead of waking a waiter: the callback-driven
        exchange (`forward/exchange.py`) that needs no Task."""

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None or self._parser is None:
            # Bytes nobody asked for: this connection can no longer be trusted for framing.
            self._abort()
            return
        self._last_read = self._loop.time()
        response.received_any = True
        self._feeding = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(_reset("the upstream switched protocols unasked"))
        except httptools.HttpParserError as exc:
            self._fail(_reset(f"malformed upstream response: {exc}"))
        finally:
            self._feeding = False
        if self._stepped:
            # The exchange steps once the parser is done with these bytes, never from inside
            # a parser callback (it may answer and give this connection back to the pool).
            self._stepped = False
            sink = self.sink
            if sink is not None:
                sink()

    def eof_received(self) -> bool | None:
        self._finish_on_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish_on_eof()
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(_reset("upstream closed while we were sending"))
        self._pool.forget(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- llhttp callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        response = self._response
        assert response is not None
        if response.headers_done:
            # A second answer to one request (or bytes after one): never let it be taken for
            # the next request's answer; this connection's framing is no longer trusted.
            response.overflow = True

    def on_status(self, status: bytes) -> None:
        assert self._response is not None
        if not self._response.overflow:
            self._response.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._response is not None
        if not self._response.overflow:
            self._response.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        response, parser = self._response, self._parser
        assert response is not None and parser is not None
        if response.overflow:
            return
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # Interim answers (103 Early Hints, a stray 100) are not forwarded; the final
            # response follows on the same parser.
            response.raw_headers.clear()
            return
        response.status = status
        response.headers_done = True
        response.keep_alive = parser.should_keep_alive()
        names = {n.lower() for n, _ in response.raw_headers}
        response.delimited = b"content-length" in names or b"transfer-encoding" in names
        if response.head_only or status in (204, 304):
            response.complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        response = self._response
        assert response is not None
        if response.complete or response.overflow:
            return
        response.chunks.append(body)
        response.buffered += len(body)
        if response.buffered > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        response = self._response
        assert response is not None
        if not response.headers_done or response.overflow:
            return  # an interim 1xx message, or one nobody asked for
        response.complete = True
        self._wake()

    # -- the exchange ------------------------------------------------------------------------

    def start(self, head_only: bool) -> UpstreamResponse:
        self._response = UpstreamResponse(head_only=head_only)
        if self._parser is None or head_only:
            # llhttp does not know a HEAD answer has no body: such an exchange gets a parser
            # of its own and leaves none behind (the pool keeps a parser only after a
            # complete, delimited answer, ready for the next message).
            self._parser = httptools.HttpResponseParser(self)
        self._error = None
        self._last_read = self._loop.time()
        return self._response

    def write(self, data: bytes) -> None:
        if self.transport is None or self.closed:
            raise _reset("upstream connection closed")
        self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise _reset("upstream connection closed")
        if self._paused:
            self._drain = self._loop.create_future()
            await self._drain

    async def wait_head(self, timeout: float) -> UpstreamResponse:
        response = self._response
        assert response is not None
        while not response.headers_done:
            await self._wait(timeout)
        return response

    async def read_all(self, timeout: float) -> bytes:
        response = self._response
        assert response is not None
        while not response.complete:
            if response.buffered > HIGH_WATER and self.transport is not None:
                self.transport.resume_reading()  # the caller asked for all of it
            await self._wait(timeout)
        body = b"".join(response.chunks)
        response.chunks.clear()
        response.buffered = 0
        return body

    async def iter_body(self, timeout: float) -> AsyncIterator[bytes]:
        response = self._response
        assert response is not None
        while True:
            if response.chunks:
                data = b"".join(response.chunks)
                response.chunks.clear()
                response.buffered = 0
                if self.transport is not None and not self.closed:
                    self.transport.resume_reading()
                yield data
                continue
            if response.complete:
                return
            await self._wait(timeout)

    def reusable(self) -> bool:
        response = self._response
        return (
            not self.closed
            and self._error is None
            and response is not None
            and response.complete
            and not response.overflow
            and response.keep_alive
            and (response.delimited or response.head_only or response.status in (204, 304))
        )

    def fail(self, exc: BaseException) -> None:
        """Stop the exchange from outside (the request body could not be sent)."""
        self._fail(exc)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self._response = None
        self._parser = None

    # -- internals ---------------------------------------------------------------------------

    async def _wait(self, timeout: float) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = waiter = self._loop.create_future()
        self._last_read = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_later(timeout, self._check_timeout, timeout)
        try:
            await waiter
        finally:
            self._waiter = None

    def arm_timeout(self, timeout: float) -> None:
        """The read timeout of a callback-driven exchange: the one timer of this connection,
        made only when none is pending (it re-arms itself while the exchange waits)."""
        self._last_read = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_later(timeout, self._check_timeout, timeout)

    def _check_timeout(self, timeout: float) -> None:
        self._timer = None
        if self.sink is None and (self._waiter is None or self._waiter.done()):
            return
        quiet = self._loop.time() - self._last_read
        if quiet >= timeout:
            self._fail(_timeout(f"no answer for {timeout:g} s"))
            self._abort()
        else:
            self._timer = self._loop.call_later(timeout - quiet, self._check_timeout, timeout)

    def _step_sink(self) -> bool:
        """Tell a callback-driven exchange; False when a coroutine waits instead."""
        sink = self.sink
        if sink is None:
            return False
        if self._feeding:
            self._stepped = True  # stepped once the parser returns (data_received)
        else:
            sink()
        return True

    def _wake(self) -> None:
        if self._step_sink():
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        if self._step_sink():
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _finish_on_eof(self) -> None:
        response = self._response
        if response is None or response.complete:
            return
        if response.headers_done and not response.delimited:
            # RFC 9112 §6.3: a response with neither Content-Length nor chunked coding ends
            # when the upstream closes; anything else cut short is a reset.
            response.complete = True
            response.keep_alive = False
            self._wake()
        else:
            self._fail(_reset("upstream closed the connection mid-response"))

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Keep-alive connections to one upstream: LIFO reuse, a hard cap, bounded waiting."""

    def __init__(
        self,
        config: UpstreamConfig,
        ssl_context: ssl.SSLContext | None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.config = config
        self.loop = loop or asyncio.get_running_loop()
        url = config.url
        self._host = url.raw_host or "127.0.0.1"
        self._port = url.port or (443 if url.scheme == "https" else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.host_header = host if url.is_default_port() else f"{host}:{self._port}"
        self._ssl = ssl_context
        self._limit = max(1, min(config.max_connections, config.max_connections_per_host))
        self._idle: list[UpstreamConnection] = []
        self._open: set[UpstreamConnection] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closing = False

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def idle_connections(self) -> int:
        return sum(1 for c in self._idle if not c.closed)

    def take_idle(self) -> UpstreamConnection | None:
        """An idle keep-alive connection, or None (then `acquire()` connects or waits)."""
        if not self._idle:
            return None
        now = self.loop.time()
        while self._idle:
            conn = self._idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > KEEPALIVE_SECONDS:
                conn.close()
                continue
            conn.reused = True
            return conn
        return None

    async def acquire(self) -> UpstreamConnection:
        conn = self.take_idle()
        if conn is not None:
            return conn
        await in_task()  # waiting and connecting are bounded by asyncio.timeout()
        while len(self._open) >= self._limit:
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(self.config.read_timeout):
                    await waiter
            except TimeoutError:
                raise _timeout("every upstream connection stayed busy") from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if self._idle:
                return await self.acquire()
        return await self._connect()

    async def _connect(self) -> UpstreamConnection:
        if self._closing:
            raise UpstreamFailure(Reason.UPSTREAM_UNAVAILABLE, "connect", "gateway stopping")
        conn = UpstreamConnection(self)
        self._open.add(conn)
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                await self.loop.create_connection(
                    lambda: conn,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                )
        except TimeoutError:
            self._drop(conn)
            raise _timeout("connect timed out") from None
        except ssl.SSLError as exc:
            self._drop(conn)
            raise UpstreamFailure(Reason.UPSTREAM_UNAVAILABLE, "tls", type(exc).__name__) from exc
        except OSError as exc:
            self._drop(conn)
            raise UpstreamFailure(
                Reason.UPSTREAM_UNAVAILABLE, "connect", type(exc).__name__
            ) from exc
        except BaseException:
            self._drop(conn)
            raise
        return conn

    def release(self, conn: UpstreamConnection, *, reuse: bool) -> None:
        conn.sink = None
        if reuse and not self._closing and conn.reusable():
            conn.idle_since = self.loop.time()
            response = conn._response
            if response is not None and response.head_only:
                conn._parser = None
            conn._response = None
            self._idle.append(conn)
            self._wake_one()
        else:
            conn.close()
            self._drop(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """Called by a connection once its socket is gone."""
        self._drop(conn)

    def _drop(self, conn: UpstreamConnection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def retire(self) -> None:
        """Stop reusing connections: idle ones close now, busy ones when released."""
        self._closing = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    async def close(self) -> None:
        self._closing = True
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(
                    UpstreamFailure(Reason.UPSTREAM_UNAVAILABLE, "connect", "gateway stopping")
                )
        self._waiters.clear()


def encode_head(method: str, target: str, host: str, headers: list[tuple[str, str]]) -> bytes:
    """The request head; refuses a name or value that would split it (header injection)."""
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    for name, value in headers:
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    # Exactly one CR and one LF per line: anything more came from a name or value.
    expected = len(headers) + 3
    if text.count("\n") != expected or text.count("\r") != expected or "\x00" in text:
        raise ValueError("newline or NUL in a request line or header")
    return text.encode("utf-8", "surrogateescape")
