"""The data plane's HTTP/1.1 protocol: llhttp (httptools) framing on the mTLS listener's sockets.

One `Connection` per accepted TLS connection (the listener hands it over after the handshake,
with the certificate parsed once). Everything about how a client may talk to the gateway is
decided here, not by a framework default:

- framing by llhttp in its strict mode (no obs-fold, no bare LF, CL with TE refused, duplicate
  or listed Content-Length refused), plus what llhttp lets through and RFC 9112 forbids:
  Transfer-Encoding in HTTP/1.0 or other than exactly `chunked` (§6.1), versions other than 1.x,
  absolute- and asterisk-form targets, a missing, repeated or malformed Host, or one that does
  not belong to the gateway (§3.2), an `Expect` other than 100-continue (RFC 9110 §10.1.1: 417),
  TRACE and CONNECT (refused by default: TRACE reflects credentials, CONNECT would tunnel);
- limits answered before the work: the request target (414), each header line and the number of
  fields (431), the whole head; body limits are the route's (413 before any body byte is read);
- timeouts: the head (slowloris), the body (a slow POST), idle keep-alive, and a slow reader:
  the output buffer per connection is bounded and a reader that leaves it full is cut off;
- pipelining answered in order; a pipelined request that fails to parse is answered after the
  valid ones before it, and the connection is closed (nothing after it is ever read);
- bodies stream both ways with backpressure: reading pauses while a request body waits to be
  consumed, writers wait while the client's socket is full;
- a response is written in as few writes as the caller allows (`respond()`: head and body in
  one `transport.write`, one TLS record for small answers).

No Task per request on the fast path: the handler's coroutine is stepped inline, from
`data_received`, in a context of its own (`contextvars`). When it finishes without awaiting
(a decision from memory, then an upstream exchange driven by the upstream protocol's callbacks,
`forward/exchange.py`), no Task or Future was made. Only when it really waits (a JWKS refresh,
a store miss, an fsync, a streamed body) is the rest of it moved into a Task, resumed exactly
where it stopped (`_Resume`). Timers cost no allocation per request either: one timer per
connection carries the current deadline (header, idle) and is re-armed lazily when it fires
early. Refusals are not rendered here: `Handler.refuse()` turns a reason into the same
recorded decision and problem+json (or page) as every other refusal.

Why one module of about eleven hundred lines: a `Connection` is one state machine over one
transport (reading a head, streaming a body, paused for backpressure, stepping a handler
inline, draining to a slow reader), and its timers, buffers and inline stepping each decide what
the others may do next; split, every part would share every field of `Connection`. What does
not belong to that machine lives elsewhere: TLS (tls.py), the reasons (decision.py), what a
request means (request_path.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Protocol, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from .. import SERVER_BANNER
from ..decision import Reason
from .tls import CertInfo

log = logging.getLogger("ztgateway.http1")

BODY_HIGH_WATER = 256 * 1024
"""Request body bytes buffered before reading from the client pauses."""
OUTPUT_HIGH_WATER = 256 * 1024
OUTPUT_LOW_WATER = 64 * 1024
QUEUED_BODY_BYTES = 64 * 1024
"""Body bytes of a request queued behind the one in progress before reading pauses."""
MAX_PIPELINED = 16
"""Parsed requests waiting behind the one in progress before reading pauses."""
_SERVER_FIELD = b"Server: %s\r\n" % SERVER_BANNER.encode()
_REFUSED_METHODS = frozenset({"TRACE", "CONNECT"})
_HOST_CHARS = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=%"
)


@dataclass(frozen=True, slots=True)
class Limits:
    """Everything the protocol enforces, from `[server]` (one object per listener)."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 60.0
    send_timeout: float = 30.0
    max_header_bytes: int = 8190
    max_headers: int = 100
    max_target_bytes: int = 8190
    hosts: frozenset[str] = frozenset()
    """Host names (lower case, no port) the gateway answers for; empty: any valid one."""
    refuse_methods: frozenset[str] = _REFUSED_METHODS


class Refusal(Exception):
    """A request the protocol refuses before any handler sees it; the connection closes."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class BodyTooLarge(Exception):
    """The request body passed the limit the handler set."""


class BodyTimeout(Exception):
    """No request body byte arrived for `body_timeout` seconds."""


class ClientGone(Exception):
    """The client closed the connection; nothing more can be read or written."""


class Handler(Protocol):
    """What the connection calls: the request path of the application."""

    def handle(self, request: Request) -> Coroutine[Any, Any, None]: ...

    def refuse(
        self, conn: Connection, request: Request | None, refusal: Refusal
    ) -> tuple[int, list[tuple[str, str]], bytes]: ...

    def on_event(self, name: str) -> None:
        """Counted events: 'header_timeout', 'body_timeout', 'slow_reader', 'idle_timeout'."""


class Body:
    """A request body as it arrives: read whole or in chunks, with a limit and backpressure."""

    __slots__ = (
        "_conn",
        "_waiter",
        "chunks",
        "complete",
        "error",
        "expect_continue",
        "length",
        "limit",
        "received",
    )

    def __init__(self, conn: Connection, length: int | None, expect_continue: bool) -> None:
        self._conn = conn
        self.length = length
        self.chunks: deque[bytes] = deque()
        self.received = 0
        self.complete = False
        self.error: BaseException | None = None
        self.limit: int | None = None
        self.expect_continue = expect_continue
        self._waiter: asyncio.Future[None] | None = None

    def set_limit(self, limit: int) -> None:
        """The route's body limit; bytes that already arrived count against it too."""
        self.limit = limit
        if self.received > limit:
            self._fail(BodyTooLarge())

    @property
    def buffered(self) -> int:
        return sum(len(c) for c in self.chunks)

    def _feed(self, data: bytes) -> None:
        self.received += len(data)
        if self.limit is not None and self.received > self.limit:
            self._fail(BodyTooLarge())
            return
        self.chunks.append(data)
        self._wake()

    def _finish(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.chunks.clear()
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _ask(self) -> None:
        """RFC 9110 §10.1.1: the 100 goes out only when the body is really wanted."""
        if self.expect_continue:
            self.expect_continue = False
            self._conn.write_interim(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def _wait(self) -> None:
        self._ask()
        self._conn.resume_body()
        self._waiter = self._conn.loop.create_future()
        timer = self._conn.loop.call_later(self._conn.limits.body_timeout, self._timed_out)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _timed_out(self) -> None:
        self._conn.handler.on_event("body_timeout")
        self._fail(BodyTimeout())

    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (all when -1): fewer only at the end of the body."""
        want = None if n < 0 else n
        while True:
            if self.error is not None:
                raise self.error
            have = self.buffered
            if self.complete or (want is not None and have >= want):
                break
            await self._wait()
        data = b"".join(self.chunks)
        self.chunks.clear()
        if want is not None and len(data) > want:
            self.chunks.append(data[want:])
            data = data[:want]
        self._conn.resume_body()
        return data

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while True:
            if self.error is not None:
                raise self.error
            if self.chunks:
                data = b"".join(self.chunks)
                self.chunks.clear()
                self._conn.resume_body()
                yield data
                continue
            if self.complete:
                return
            await self._wait()


class Request:
    """One parsed request head, its body stream and the way to answer it."""

    __slots__ = (
        "_headers",
        "body",
        "chunked",
        "conn",
        "content_length",
        "deferred",
        "head_only",
        "keep_alive",
        "method",
        "raw_headers",
        "refusal",
        "response_started",
        "target",
        "upgrade",
        "upgrade_tail",
        "version",
    )

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.method = ""
        self.target = ""
        self.version = "1.1"
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self._headers: CIMultiDictProxy[str] | None = None
        self.keep_alive = True
        self.upgrade = False
        self.upgrade_tail = b""
        self.chunked = False
        self.content_length: int | None = None
        self.head_only = False
        self.refusal: Refusal | None = None
        self.response_started = False
        self.deferred = False
        """Set while something other than the handler's coroutine (an upstream exchange driven
        by callbacks) owns the answer; it ends with `Connection.finish()`."""
        self.body = Body(conn, None, False)

    # --- what the request path reads ---------------------------------------------------------
    @property
    def headers(self) -> CIMultiDictProxy[str]:
        h = self._headers
        if h is None:
            conn = self.conn
            last = conn.last_head
            if last is not None and last[0] == self.raw_headers:
                # The same fields, byte for byte, as the previous request on this connection
                # (a client repeats them): the same read-only view, and what was derived
                # from it (Connection.head_memo), serves this request too.
                h = last[1]
            else:
                h = CIMultiDictProxy(
                    CIMultiDict(
                        (n.decode("latin-1"), v.decode("utf-8", "surrogateescape"))
                        for n, v in self.raw_headers
                    )
                )
                conn.last_head = (self.raw_headers, h)
            self._headers = h
        return h

    @property
    def host(self) -> str:
        return self.headers.get("Host", "")

    @property
    def raw_path(self) -> str:
        return self.target

    @property
    def content(self) -> Body:
        return self.body

    @property
    def body_exists(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def cert(self) -> CertInfo | None:
        return self.conn.cert

    @property
    def peer_ip(self) -> str:
        return self.conn.peer_ip

    # --- answering ---------------------------------------------------------------------------
    def respond(
        self,
        status: int,
        headers: Iterable[tuple[str, str]],
        body: bytes = b"",
        *,
        reason: str = "",
        close: bool = False,
    ) -> None:
        """A complete response in one write (head and body: one TLS record when small)."""
        self.conn.send_response(self, status, reason, headers, body, close=close)

    def start(
        self,
        status: int,
        headers: Iterable[tuple[str, str]],
        *,
        reason: str = "",
        content_length: int | None = None,
        close: bool = False,
    ) -> Writer:
        """A streamed response: the head now, the body through the writer."""
        return self.conn.start_response(
            self, status, reason, headers, content_length=content_length, close=close
        )


class Writer:
    """The body of a streamed response: chunked unless its length was given."""

    __slots__ = ("_conn", "_ended", "chunked", "head_only")

    def __init__(self, conn: Connection, chunked: bool, head_only: bool) -> None:
        self._conn = conn
        self.chunked = chunked
        self.head_only = head_only
        self._ended = False

    async def write(self, data: bytes) -> None:
        if not data or self.head_only:
            return
        self._conn.write_raw(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        await self._conn.drain()

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self.chunked and not self.head_only:
            self._conn.write_raw(b"0\r\n\r\n")
        self._conn.response_done()


_date_cache: list[Any] = [0, b""]


def http_date(now: float) -> bytes:
    second = int(now)
    if _date_cache[0] != second:
        _date_cache[0] = second
        _date_cache[1] = formatdate(second, usegmt=True).encode()
    return cast(bytes, _date_cache[1])


def _host_name(value: str) -> str | None:
    """The host of a Host field value (RFC 9110 §7.2, RFC 3986 §3.2.2), or None if invalid."""
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[: end + 1], value[end + 1 :]
        if not all(c in "0123456789abcdefABCDEF:." for c in name[1:-1]):
            return None
    else:
        name, _, port = value.partition(":")
        rest = ":" + port if _ else ""
        if not name or not set(name.encode("latin-1", "replace")) <= _HOST_CHARS:
            return None
    if rest and (not rest.startswith(":") or not rest[1:].isdigit() or len(rest) > 6):
        return None
    return name.lower()


class Connection(asyncio.Protocol):
    """One client connection: parser callbacks, the request queue, timers and writing."""

    def __init__(
        self,
        handler: Handler,
        limits: Limits,
        *,
        cert: CertInfo | None,
        peer_ip: str,
        tls_version: str | None,
        clock: Callable[[], float],
        on_close: Callable[[Connection], None],
        sni: str | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.cert = cert
        self.peer_ip = peer_ip
        self.tls_version = tls_version
        self.sni = sni.lower().rstrip(".") if sni else None
        """The server name the TLS handshake asked for (None: none, or an IP address)."""
        self.clock = clock
        self._on_close = on_close
        self._max_head = limits.max_target_bytes + limits.max_header_bytes * (
            limits.max_headers + 1
        )
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._parsing: Request | None = None
        self._url = bytearray()
        self._in_head = False
        self._head_bytes = 0
        self._queue: deque[Request] = deque()
        self.current: Request | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped_parsing = False
        self._reading_paused = False
        self._writing_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0
        self._timer_kind = ""
        self._host_raw = b""
        self._host_seen: str | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._close_after = False
        self.closed = False
        self.draining = False
        self.last_head: tuple[list[tuple[bytes, bytes]], CIMultiDictProxy[str]] | None = None
        """The previous request's raw header fields and their parsed view (Request.headers)."""
        self.head_memo: tuple[Any, ...] | None = None
        """What the request path derived from `last_head`'s view, keyed by it (context.py)."""
        self.takeover: asyncio.Protocol | None = None
        """Set by an upgraded protocol (the WebSocket relay): it receives what arrives next."""

    # --- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        self.transport = t
        t.set_write_buffer_limits(high=OUTPUT_HIGH_WATER, low=OUTPUT_LOW_WATER)
        self._arm("idle", self.limits.idle_timeout)

    def data_received(self, data: bytes) -> None:
        if self.takeover is not None:
            self.takeover.data_received(data)
            return
        if self._stopped_parsing or self.closed:
            return
        if self._timer_kind == "idle":
            self._disarm()
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
            if self._in_head and self._head_bytes > self._max_head:
                # One endless field line is buffered whole by the parser: bound the head.
                raise Refusal(Reason.HEADER_TOO_LARGE, "request head too large")
        except Refusal as refusal:
            self._parse_failed(refusal)
        except httptools.HttpParserUpgrade as up:
            self._stopped_parsing = True
            req = self._parsing_done_upgrade()
            if req is not None:
                req.upgrade_tail = bytes(data[int(up.args[0]) :])
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)
        self._dispatch()
        self._maybe_pause()

    def eof_received(self) -> bool | None:
        if self.takeover is not None:
            return self.takeover.eof_received()
        if self.current is None and not self._queue:
            return False  # nothing in progress: close
        # A half-closed client may still read the answers it asked for.
        self._stopped_parsing = True
        if self._parsing is not None and self._parsing.body.length is not None:
            self._parsing.body._fail(ClientGone())
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.takeover is not None:
            self.takeover.connection_lost(exc)
        self.closed = True
        self._cancel_timer()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        for req in (self.current, self._parsing, *self._queue):
            if req is not None:
                req.body._fail(ClientGone())
        d = self._drain
        if d is not None and not d.done():
            d.set_exception(ClientGone())
        self._queue.clear()
        self._on_close(self)

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.send_timeout, self._slow_reader)
        if self.takeover is not None:
            self.takeover.pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        d = self._drain
        if d is not None and not d.done():
            d.set_result(None)
        if self.takeover is not None:
            self.takeover.resume_writing()
        if self.current is None:
            self._dispatch()

    # --- llhttp callbacks --------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._parsing = Request(self)
        self._in_head = True
        self._url.clear()
        self._head_bytes = 1
        if self._timer_kind != "header":
            self._arm("header", self.limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_target_bytes:
            raise Refusal(Reason.TARGET_TOO_LONG, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._parsing
        if req is None:
            return
        if not self._in_head:
            return  # chunked trailer fields: never forwarded, never believed
        if len(name) + len(value) + 4 > self.limits.max_header_bytes:
            raise Refusal(Reason.HEADER_TOO_LARGE, "header field too long")
        if len(req.raw_headers) >= self.limits.max_headers:
            raise Refusal(Reason.HEADER_TOO_LARGE, "too many header fields")
        req.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        req = self._parsing
        assert req is not None
        p = self._parser
        self._in_head = False
        self._head_bytes = 0
        if self._timer_kind == "header":
            self._disarm()
        req.method = p.get_method().decode("ascii")
        req.version = p.get_http_version()
        req.keep_alive = p.should_keep_alive()
        req.upgrade = p.should_upgrade()
        req.head_only = req.method == "HEAD"
        try:
            req.target = self._url.decode("ascii")
        except UnicodeDecodeError:
            req.refusal = Refusal(Reason.REQUEST_INVALID, "non-ASCII request target")
            return
        req.refusal = self._check_head(req)
        if req.refusal is None:
            req.body.length = req.content_length
        else:
            req.body.expect_continue = False
        self._queue.append(req)

    def on_body(self, data: bytes) -> None:
        req = self._parsing
        if req is not None and req.refusal is None:
            req.body._feed(data)

    def on_message_complete(self) -> None:
        req = self._parsing
        self._parsing = None
        if req is not None:
            req.body._finish()
        if self.current is None and not self._queue and not self._timer_kind:
            self._arm("idle", self.limits.idle_timeout)

    # --- RFC 9110 / 9112 checks llhttp leaves to us ------------------------------------------
    def _check_head(self, req: Request) -> Refusal | None:
        if not req.version.startswith("1."):
            return Refusal(Reason.VERSION_UNSUPPORTED, f"HTTP/{req.version}")
        hosts: list[bytes] = []
        te: list[bytes] = []
        expect: list[bytes] = []
        length: bytes | None = None
        for n, v in req.raw_headers:
            lower = n.lower()
            if lower == b"host":
                hosts.append(v)
            elif lower == b"transfer-encoding":
                te.append(v)
            elif lower == b"content-length":
                length = v
            elif lower == b"expect":
                expect.append(v)
        if te:
            # SECURITY: RFC 9112 §6.1: TE in HTTP/1.0 is faulty framing; anything but exactly
            # one `chunked` is a coding we would have to trust another parser to read alike.
            if req.version != "1.1":
                return Refusal(Reason.REQUEST_INVALID, "Transfer-Encoding in HTTP/1.0")
            if len(te) != 1 or te[0].strip().lower() != b"chunked":
                return Refusal(Reason.REQUEST_INVALID, "Transfer-Encoding other than chunked")
            req.chunked = True
        elif length is not None:
            req.content_length = int(length)  # llhttp refused anything but one decimal
        if req.method in self.limits.refuse_methods:
            return Refusal(Reason.METHOD_NOT_ALLOWED, f"{req.method} is refused")
        target = req.target
        if not target.startswith("/"):
            return Refusal(Reason.REQUEST_INVALID, "request target not in origin form")
        if len(hosts) != 1:
            # RFC 9112 §3.2: exactly one Host; more than one, or none, is a 400.
            return Refusal(Reason.HOST_INVALID, f"{len(hosts)} Host fields")
        raw_host = hosts[0]
        if raw_host == self._host_raw:
            name = self._host_seen  # a client sends the same Host on every request
        else:
            try:
                name = _host_name(raw_host.decode("ascii").strip())
            except UnicodeDecodeError:
                name = None
            self._host_raw, self._host_seen = raw_host, name
        if name is None:
            return Refusal(Reason.HOST_INVALID, "malformed Host")
        allowed = self.limits.hosts
        if allowed and name not in allowed:
            return Refusal(Reason.HOST_MISDIRECTED, name[:100])
        if self.sni is not None and name.rstrip(".") != self.sni:
            # RFC 9110 §15.5.20: a request for another virtual server than the one the
            # connection was opened for (domain fronting) is misdirected.
            return Refusal(Reason.HOST_MISDIRECTED, f"{name[:100]} on a connection for {self.sni}")
        if expect:
            if len(expect) != 1 or expect[0].strip().lower() != b"100-continue":
                return Refusal(Reason.EXPECTATION_UNSUPPORTED, "only 100-continue is supported")
            req.body.expect_continue = req.version == "1.1"
        if req.upgrade and (req.chunked or req.content_length):
            # llhttp skips the body of an upgrade request: refusing it keeps those bytes from
            # ever being read as a request of their own.
            return Refusal(Reason.REQUEST_INVALID, "upgrade request with a body")
        return None

    def _parsing_done_upgrade(self) -> Request | None:
        # The upgrade request was queued at headers-complete and completed; return it.
        for req in reversed(self._queue):
            if req.upgrade:
                return req
        if self.current is not None and self.current.upgrade:
            return self.current
        return None

    def _parse_failed(self, exc: Exception) -> None:
        self._stopped_parsing = True
        cause = exc if isinstance(exc, Refusal) else exc.__context__
        refusal = (
            cause
            if isinstance(cause, Refusal)
            else Refusal(Reason.REQUEST_INVALID, str(exc)[:200] or type(exc).__name__)
        )
        req = self._parsing or Request(self)
        self._parsing = None
        if req.refusal is None:
            req.refusal = refusal
        if req not in self._queue:
            self._queue.append(req)
        if self._timer_kind == "header":
            self._disarm()

    # --- running requests --------------------------------------------------------------------
    def _dispatch(self) -> None:
        while self.current is None and self._queue and not self.closed:
            if self._writing_paused:
                return  # a slow reader: answer the next request once it has read this one
            req = self._queue.popleft()
            self.current = req
            if self._timer_kind == "idle":
                self._disarm()
            self.resume_body()
            if req.refusal is not None:
                self._refuse(req, req.refusal)
                return
            self._run(req)

    def _run(self, req: Request) -> None:
        # Stepped inline: a request decided from memory and forwarded over an idle pooled
        # connection never needs a Task. The context is the request's own, as a Task's would be
        # (the decision id for logging must not leak into the next request's callbacks).
        coro = self.handler.handle(req)
        context = contextvars.copy_context()
        try:
            waiting = context.run(coro.send, None)
        except StopIteration:
            self._handled(req, None)
            return
        except Exception as exc:  # answered as a stage error, as in a Task
            self._handled(req, exc)
            return
        # It awaits something (a JWKS fetch, a store miss, an fsync, a body): the rest of it
        # runs in a Task, resumed exactly where it stopped.
        task = self.loop.create_task(_resumed(_Resume(coro, waiting)), context=context)
        self._task = task
        task.add_done_callback(lambda t: self._task_done(req, t))

    def _task_done(self, req: Request, task: asyncio.Task[None]) -> None:
        self._task = None
        exc = None if task.cancelled() else task.exception()
        self._handled(req, exc)

    def adopt(self, task: asyncio.Task[None]) -> None:
        """A Task that carries on a deferred answer (streaming, a retry): kept referenced."""
        self._task = task
        task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None

    def finish(self, req: Request, exc: BaseException | None = None) -> None:
        """The end of a deferred answer (an upstream exchange driven by callbacks)."""
        req.deferred = False
        self._handled(req, exc)

    def _handled(self, req: Request, exc: BaseException | None) -> None:
        if self.current is not req or self.closed:
            return
        if req.deferred and exc is None:
            return  # the exchange answers and calls finish()
        if exc is not None and not isinstance(exc, ClientGone):
            if not req.response_started:
                log.error("unhandled error answering %s", req.target[:200], exc_info=exc)
                self._refuse(req, Refusal(Reason.STAGE_ERROR, type(exc).__name__))
                return
            log.warning("error after the response started: %r", exc)
            self.abort()
            return
        if not req.response_started:
            if self.takeover is None:
                self._refuse(req, Refusal(Reason.STAGE_ERROR, "no response"))
            return
        if self.current is req and self.takeover is None:
            # The response was not finished by the handler (an error mid-body): cut it.
            self.abort()

    def _refuse(self, req: Request, refusal: Refusal) -> None:
        status, headers, body = self.handler.refuse(self, req, refusal)
        if self.closed:
            return
        self.send_response(req, status, "", headers, body, close=True)

    # --- writing -----------------------------------------------------------------------------
    def _head(
        self,
        req: Request,
        status: int,
        reason: str,
        headers: Iterable[tuple[str, str]],
        framing: bytes,
        close: bool,
    ) -> bytes:
        req.response_started = True
        close = close or self._must_close(req)
        self._close_after = close
        fields = headers if isinstance(headers, list) else list(headers)
        text = "".join([f"{name}: {value}\r\n" for name, value in fields])
        n = len(fields)
        if text.count("\n") != n or text.count("\r") != n:
            # SECURITY: never let a name or value split the response head: such fields go.
            text = "".join(
                [
                    line
                    for line in (f"{name}: {value}\r\n" for name, value in fields)
                    if "\n" not in line[:-2] and "\r" not in line[:-2]
                ]
            )
        # Found in one pass over the joined head, not a comparison per field.
        lowered = "\n" + text.lower()
        parts = [
            b"HTTP/1.1 %d %s\r\n" % (status, (reason or _REASONS.get(status, "")).encode()),
            text.encode("utf-8", "surrogateescape"),
        ]
        if "\nserver:" not in lowered:
            parts.append(_SERVER_FIELD)
        if "\ndate:" not in lowered:
            parts.append(b"Date: " + http_date(self.clock()) + b"\r\n")
        parts.append(framing)
        if close:
            parts.append(b"Connection: close\r\n")
        elif req.version == "1.0":
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _must_close(self, req: Request) -> bool:
        return (
            not req.keep_alive
            or req.upgrade
            or self.draining
            or (self._stopped_parsing and not self._queue)
            or not req.body.complete
            or req.body.error is not None
        )

    def send_response(
        self,
        req: Request,
        status: int,
        reason: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        *,
        close: bool,
    ) -> None:
        if req.response_started or self.closed:
            return
        no_body = req.head_only or status in (204, 304) or status < 200
        framing = b"" if status in (204, 304) else b"Content-Length: %d\r\n" % len(body)
        head = self._head(req, status, reason, headers, framing, close)
        self.write_raw(head if no_body else head + body)
        self.response_done()

    def start_response(
        self,
        req: Request,
        status: int,
        reason: str,
        headers: Iterable[tuple[str, str]],
        *,
        content_length: int | None,
        close: bool,
    ) -> Writer:
        no_body = req.head_only or status in (204, 304)
        if status in (204, 304):
            framing = b""
        elif content_length is not None:
            framing = b"Content-Length: %d\r\n" % content_length
        else:
            framing = b"Transfer-Encoding: chunked\r\n"
        self.write_raw(self._head(req, status, reason, headers, framing, close))
        return Writer(self, content_length is None and not no_body, no_body)

    def switch_protocols(
        self, req: Request, headers: Iterable[tuple[str, str]], protocol: asyncio.Protocol
    ) -> None:
        """101 (RFC 9110 §15.2.2), then every byte either way belongs to `protocol`."""
        if self.closed or self.transport is None:
            raise ClientGone()
        req.response_started = True
        parts = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        parts.extend(f"{n}: {v}\r\n".encode("latin-1") for n, v in headers)
        parts.append(b"\r\n")
        self._disarm()
        self._queue.clear()
        self._stopped_parsing = True
        self.takeover = protocol
        self.transport.write(b"".join(parts))

    def write_interim(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def write_raw(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise ClientGone()
        self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ClientGone()
        if self._writing_paused:
            self._drain = self.loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def response_done(self) -> None:
        req = self.current
        self.current = None
        if self.closed or self.transport is None:
            return
        if self._close_after:
            self._stopped_parsing = True
            self._queue.clear()
            self.transport.close()
            return
        if req is not None and not req.body.complete:
            self.transport.close()
            return
        if self._queue:
            self.loop.call_soon(self._dispatch)
        elif self._parsing is None:
            self._arm("idle", self.limits.idle_timeout)
        self._maybe_pause()

    # --- flow control and timers -------------------------------------------------------------
    def _must_pause(self) -> bool:
        """Read no further while parsed work waits: too many pipelined requests, a body the
        handler has not read, or a body of a request still queued behind the current one
        (it would otherwise be buffered whole, up to the route's limit, per queued request)."""
        if len(self._queue) >= MAX_PIPELINED:
            return True
        parsing = self._parsing
        if parsing is None:
            return False
        waiting = parsing is not self.current and parsing.body.buffered > QUEUED_BODY_BYTES
        return waiting or parsing.body.buffered > BODY_HIGH_WATER

    def _maybe_pause(self) -> None:
        t = self.transport
        if t is None or self.closed or self.takeover is not None:
            return
        if not self._reading_paused and self._must_pause():
            self._reading_paused = True
            t.pause_reading()

    def resume_body(self) -> None:
        t = self.transport
        if self._reading_paused and t is not None and not self.closed and not self._must_pause():
            self._reading_paused = False
            t.resume_reading()

    def _arm(self, kind: str, seconds: float) -> None:
        # One timer per connection, moved only when the new deadline comes before the one it
        # is set for; a timer that fires early re-arms itself for what is left (no timer made
        # and cancelled per request).
        deadline = self.loop.time() + seconds
        self._timer_kind = kind
        self._deadline = deadline
        t = self._timer
        if t is None or self._timer_at > deadline:
            if t is not None:
                t.cancel()
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline, self._expired)

    def _disarm(self) -> None:
        self._timer_kind = ""

    def _cancel_timer(self) -> None:
        self._timer_kind = ""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        kind = self._timer_kind
        if not kind or self.closed:
            return
        if self._deadline > self.loop.time():
            self._timer_at = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._expired)
            return
        self._timer_kind = ""
        if kind == "header":
            # Slowloris: the head did not arrive in time. Nothing is decided on half a head.
            self.handler.on_event("header_timeout")
            self.abort()
        elif kind == "idle" and self.current is None:
            self.handler.on_event("idle_timeout")
            self.close()

    def _slow_reader(self) -> None:
        self._write_timer = None
        if self._writing_paused and not self.closed:
            # SECURITY: a client that does not read its answers holds our buffers: cut it off.
            self.handler.on_event("slow_reader")
            self.abort()

    # --- closing -----------------------------------------------------------------------------
    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def shutdown(self) -> None:
        """Graceful stop: finish the request in progress (answered with close), then close."""
        self.draining = True
        self._stopped_parsing = True
        if self.takeover is not None:
            closer = getattr(self.takeover, "going_away", None)
            if closer is not None:
                closer()
            return
        if self.current is None:
            self.close()

    @property
    def idle(self) -> bool:
        return self.current is None and not self._queue and self.takeover is None


class _Resume:
    """A handler coroutine stepped inline until it first waited on `waiting`: awaited in a
    Task, it hands that Task the awaitable first, then lets the coroutine go on where it
    stopped (what the Task would have done had it run the coroutine from the start)."""

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        self.coro = coro
        self.waiting = waiting

    def __await__(self) -> Generator[Any, None, None]:
        coro = self.coro
        waiting = self.waiting
        self.waiting = None
        while True:
            try:
                yield waiting
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation goes into the coroutine
                try:
                    waiting = coro.throw(exc)
                except StopIteration:
                    return
                continue
            break
        yield from coro.__await__()


async def _resumed(resume: _Resume) -> None:
    await resume


_REASONS = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    201: "Created",
    204: "No Content",
    206: "Partial Content",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    304: "Not Modified",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    414: "URI Too Long",
    417: "Expectation Failed",
    421: "Misdirected Request",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
