"""The mTLS listener: we run the TLS handshake ourselves, then hand the connection to http1.

Why not `create_server(ssl=...)`: Python's ssl layer logs refused handshakes only in debug
mode, so a wrong-CA or revoked certificate would be invisible; the context could not be swapped
on reload per connection; and there is no hook to parse the client certificate once. Here each
accepted socket is upgraded with `loop.start_tls()` using the *current* context, failures are
counted by reason, and the parsed certificate rides on the connection (`http1.Connection`),
which then owns every HTTP limit and timeout.

Server-side limits that come before HTTP live here: maximum connections and the handshake
timeout. Connections that have not finished their handshake are budgeted apart from established
ones, and per source address (issue 19: one host holding 700 raw sockets that never sent a
ClientHello filled `max_connections` and kept every legitimate client out for 7.6 s): at most
`max_pending_handshakes` in all and `max_pending_handshakes_per_source` from one address (one
/64 for IPv6) may be mid-handshake; `max_connections` counts established connections. Every
refusal is counted by cause, including the file-descriptor budget (`fd_budget`) that keeps the
process below its RLIMIT_NOFILE, where libuv would otherwise reset connections silently. Shutdown drains: no new connections, idle ones close, requests in progress finish
(answered with `Connection: close`), open WebSockets are closed with 1001, and whatever is
left at the deadline is cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
from collections.abc import Callable
from typing import Any

from .http1 import Connection, Handler, Limits
from .tls import CertInfoCache, handshake_failure_reason, server_name
from .tlsalert import bind_alert_sink

log = logging.getLogger("ztgateway.listener")


class Listener:
    """Owns the listening socket, the TLS upgrade and the per-connection limits."""

    def __init__(
        self,
        *,
        handler: Handler,
        context: Callable[[], ssl.SSLContext],
        limits: Limits,
        handshake_timeout: float,
        max_connections: int,
        max_pending_handshakes: int = 1024,
        max_pending_handshakes_per_source: int = 64,
        clock: Callable[[], float],
        on_handshake: Callable[[str | None, str | None], None],
        on_connection_change: Callable[[int], None],
        on_rejected: Callable[[str], None],
    ) -> None:
        self._handler = handler
        self._context = context
        self.fd_budget: int | None = None
        """Connections (pending + established) the file-descriptor limit leaves room for."""
        self.pending_by_source: dict[str, int] = {}
        self.established = 0
        self.apply_limits(
            limits=limits,
            handshake_timeout=handshake_timeout,
            max_connections=max_connections,
            max_pending_handshakes=max_pending_handshakes,
            max_pending_handshakes_per_source=max_pending_handshakes_per_source,
        )
        self._clock = clock
        self._on_handshake = on_handshake
        self._on_connection_change = on_connection_change
        self._on_rejected = on_rejected
        self.open_connections = 0
        self.pending: set[asyncio.Task[None]] = set()
        self.connections: set[Connection] = set()
        self.certs = CertInfoCache()
        self.server: asyncio.Server | None = None
        self._drained: asyncio.Event | None = None

    def apply_limits(
        self,
        *,
        limits: Limits,
        handshake_timeout: float,
        max_connections: int,
        max_pending_handshakes: int,
        max_pending_handshakes_per_source: int,
    ) -> None:
        """A reload's `[server]` limits, for every connection accepted from now on (issue 19
        D4); connections already open keep the protocol limits they were accepted with."""
        self.limits = limits
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.max_pending = max_pending_handshakes
        self.max_pending_per_source = max_pending_handshakes_per_source

    def on_connection_closed(self, conn: Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.established -= 1
            self.open_connections -= 1
            self._on_connection_change(self.open_connections)
            if not self.connections and self._drained is not None:
                self._drained.set()

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Acceptor(self), host, port, backlog=1024, reuse_port=reuse_port
        )
        sock = self.server.sockets[0]
        return int(sock.getsockname()[1])

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def accept(self, transport: asyncio.Transport, acceptor: _Acceptor) -> None:
        source = source_key(acceptor.peer)
        pending = len(self.pending)
        if self.fd_budget is not None and self.open_connections >= self.fd_budget:
            refused = "fd_limit"
        elif self.established >= self.max_connections:
            refused = "max_connections"
        elif pending >= self.max_pending:
            refused = "pending_handshakes"
        elif self.pending_by_source.get(source, 0) >= self.max_pending_per_source:
            refused = "pending_per_source"
        else:
            refused = ""
        if refused:
            self._on_rejected(refused)
            transport.abort()
            return
        self.open_connections += 1
        self.pending_by_source[source] = self.pending_by_source.get(source, 0) + 1
        self._on_connection_change(self.open_connections)
        task = asyncio.ensure_future(self._handshake(transport, acceptor))
        self.pending.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self.pending.discard(task)
            left = self.pending_by_source.get(source, 1) - 1
            if left > 0:
                self.pending_by_source[source] = left
            else:
                self.pending_by_source.pop(source, None)

        task.add_done_callback(done)

    async def _handshake(self, transport: asyncio.Transport, acceptor: _Acceptor) -> None:
        loop = asyncio.get_running_loop()
        context = self._context()
        # A refused handshake's alert goes out on this raw transport (tlsalert.py).
        loop.call_soon(bind_alert_sink, context, transport)
        loop.call_soon(acceptor.replay_raw, transport)
        try:
            tls_transport = await loop.start_tls(
                transport,
                acceptor,
                context,
                server_side=True,
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except (
            ssl.SSLError,
            OSError,
            TimeoutError,
            ConnectionError,
            asyncio.CancelledError,
        ) as exc:
            self.open_connections -= 1
            self._on_connection_change(self.open_connections)
            reason = handshake_failure_reason(exc)
            self._on_handshake(None, reason)
            peer = acceptor.peer
            log.info(
                "TLS handshake refused from %s: %s (%s)", peer[0] if peer else "?", reason, exc
            )
            transport.abort()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        ssl_object = (
            tls_transport.get_extra_info("ssl_object") if tls_transport is not None else None
        )
        if (
            tls_transport is None
            or ssl_object is None
            or acceptor.lost
            or tls_transport.is_closing()
        ):
            # The client left before or during the handshake. uvloop then returns from
            # start_tls() without an error (its waiter is woken by connection_lost(None)), so
            # this is a failed handshake too, and is counted like asyncio's ConnectionResetError.
            self.open_connections -= 1
            self._on_connection_change(self.open_connections)
            self._on_handshake(None, "connection_lost")
            if tls_transport is not None:
                tls_transport.abort()
            return
        der = ssl_object.getpeercert(binary_form=True)
        cert = None
        if der:
            try:
                cert = self.certs.get(der)
            except ValueError:
                # OpenSSL accepted it but we cannot parse it: refuse rather than guess.
                self._on_handshake(None, "unparseable_certificate")
                self.open_connections -= 1
                self._on_connection_change(self.open_connections)
                tls_transport.abort()
                return
        if self.established >= self.max_connections:
            # Others finished their handshakes first: the established budget is full.
            self._on_rejected("max_connections")
            self.open_connections -= 1
            self._on_connection_change(self.open_connections)
            tls_transport.abort()
            return
        self.established += 1
        version = ssl_object.version()
        conn = Connection(
            self._handler,
            self.limits,
            cert=cert,
            # Recorded once: a request decided after the client hung up still has its peer.
            peer_ip=str(acceptor.peer[0]) if acceptor.peer else "",
            tls_version=version,
            clock=self._clock,
            on_close=self.on_connection_closed,
            sni=server_name(ssl_object),
        )
        self.connections.add(conn)
        self._on_handshake(version, None)
        tls_transport.set_protocol(conn)
        conn.connection_made(tls_transport)
        acceptor.hand_over(conn)

    async def close(self, timeout: float) -> None:
        """Stop accepting, let requests in progress finish up to `timeout`, then cut the rest."""
        if self.server is not None:
            self.server.close()
        for t in list(self.pending):
            t.cancel()
        await asyncio.gather(*self.pending, return_exceptions=True)
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout)
        for conn in list(self.connections):
            conn.abort()
        if self.server is not None:
            await self.server.wait_closed()


class _Acceptor(asyncio.Protocol):
    """Holds a raw connection while its TLS handshake runs; buffers early application data.

    Two kinds of bytes can reach it. Before `start_tls()` takes the transport over: raw TLS
    records. uvloop starts reading as soon as `connection_made()` returns, before our handshake
    task runs (asyncio's selector loop happens not to), so the ClientHello can land here; left
    here, the TLS layer would wait for it until `handshake_timeout`. `replay_raw()` hands them to
    the TLS protocol. After: decrypted application data that followed the client's Finished
    before `hand_over()` gave the connection to the HTTP protocol.
    """

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.raw: list[bytes] = []
        self.tls_installed = False
        self.buffer: list[bytes] = []
        self.eof = False
        self.lost = False
        self.peer: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Kept now: once a handshake failed, uvloop's closed transport cannot report it.
        self.peer = transport.get_extra_info("peername")
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.listener.accept(transport, self)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        (self.buffer if self.tls_installed else self.raw).append(data)

    def replay_raw(self, transport: asyncio.Transport) -> None:
        """Scheduled just before `start_tls()`, so it runs after the TLS protocol was installed
        and before that protocol's `connection_made()` starts the handshake (both event loops
        queue it with call_soon): the bytes are read from its incoming buffer as if they had
        just arrived."""
        self.tls_installed = True
        data = b"".join(self.raw)
        self.raw.clear()
        if not data or transport.is_closing():
            return
        # Both loops' SSLProtocol speak the BufferedProtocol interface; uvloop's (a Cython class)
        # does not subclass asyncio.BufferedProtocol, hence no isinstance().
        tls: Any = transport.get_protocol()
        if tls is self:  # start_tls() failed before installing its protocol
            return
        view = memoryview(data)
        while view:
            buf = tls.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            tls.buffer_updated(n)
            view = view[n:]

    def eof_received(self) -> bool | None:
        self.eof = True
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True

    def hand_over(self, conn: Connection) -> None:
        for chunk in self.buffer:
            conn.data_received(chunk)
        self.buffer.clear()
        if self.eof and not conn.eof_received():
            conn.close()


def source_key(peer: Any) -> str:
    """The address a pending-handshake budget is kept for: the IPv4 address, or the /64 of an
    IPv6 one (one host is routinely given a whole /64)."""
    if not peer:
        return "?"
    host = str(peer[0])
    if ":" in host:
        try:
            return str(ipaddress.ip_network(f"{host}/64", strict=False))
        except ValueError:
            return host
    return host
