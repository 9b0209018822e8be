"""TLS alerts for refused handshakes: the client is told *why* (RFC 8446 §6.2, RFC 5246 §7.2).

OpenSSL already verifies the client certificate during the handshake (chain, validity, clientAuth
purpose, CRL) and, on refusing it, writes the matching fatal alert into its outgoing buffer:
certificate_required(116) when a TLS 1.3 client sent none, unknown_ca(48), certificate_expired(45),
certificate_revoked(44), unsupported_certificate(43) for a wrong purpose. But asyncio's and
uvloop's SSL protocols (memory BIOs, not sockets) force-close the transport on a handshake error
without writing that buffer out (CPython gh-98078, fixed upstream only in 2026 and never in 3.11),
so browsers said "site can't be reached" and curl "Empty reply from server".

`AlertingContext` is the server SSLContext: `wrap_bio()` (public API, called by both event loops'
SSL protocols) returns an `AlertingSSLObject` that keeps the outgoing BIO and the sink the listener bound for
the connection's raw transport (`bind_alert_sink`). When `do_handshake()` raises a
fatal error, whatever OpenSSL left in the outgoing BIO (the alert record) is written to the raw
transport's socket before the exception propagates and the protocol closes its descriptor; the
socket itself is closed a little later, after a lingering read (`LingeringAlert`), so that no
RST overtakes the alert, and a TLS 1.3 alert waits for the client's request so that it does not
reach an idle connection. See
docs/decisions/0017-revocation-tls-alerts.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

AlertSink = Callable[[bytes], None]

_AGAIN = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


class AlertingSSLObject(ssl.SSLObject):
    """An SSLObject whose failed handshake still delivers OpenSSL's fatal alert to the peer."""

    _ztgw_outgoing: ssl.MemoryBIO | None = None
    _ztgw_sink: AlertSink | None = None
    _ztgw_bound = False

    def do_handshake(self) -> None:
        if not self._ztgw_bound:
            # The first call comes from the SSL protocol's connection_made() (both loops).
            self._ztgw_bound = True
            ctx = self.context
            if isinstance(ctx, AlertingContext):
                self._ztgw_sink = ctx.take_handshake_sink()
        try:
            super().do_handshake()
        except _AGAIN:
            raise
        except ssl.SSLError:
            self._ztgw_flush_alert()
            raise
        # Done: the connection's transport is not kept alive by this reference any longer.
        self._ztgw_outgoing = self._ztgw_sink = None

    def _ztgw_flush_alert(self) -> None:
        outgoing, sink = self._ztgw_outgoing, self._ztgw_sink
        self._ztgw_outgoing = self._ztgw_sink = None
        if outgoing is None or sink is None:
            return
        pending = outgoing.read()
        if pending:
            # The peer may be gone or the transport closed already: nobody left to tell.
            with contextlib.suppress(OSError, RuntimeError):
                sink(pending)


class AlertingContext(ssl.SSLContext):
    """The gateway's server SSLContext; identical to SSLContext but for the alert on failure."""

    sslobject_class = AlertingSSLObject

    def __init__(self, protocol: int = ssl.PROTOCOL_TLS_SERVER) -> None:
        # Per thread: tests run a second gateway on a uvloop in another thread.
        self._ztgw_next = threading.local()
        self.lingering = 0
        """Refused connections of this context still being read from (LingeringAlert)."""

    def bind_next_handshake(self, sink: AlertSink | None) -> None:
        """The raw transport's `write` for the handshake that starts next on this thread.

        The listener queues this (`call_soon`) immediately before `loop.start_tls()`, which on
        asyncio and uvloop alike queues the SSL protocol's `connection_made()` — where the
        first `do_handshake()` happens — with nothing in between but the listener's own
        `replay_raw` (which only feeds bytes to the not yet started protocol). The next first
        `do_handshake()` on this thread is therefore that connection's. A binding left by a
        start_tls cancelled in between is replaced by the next connection's own binding before
        its first `do_handshake()`."""
        self._ztgw_next.sink = sink

    def take_handshake_sink(self) -> AlertSink | None:
        sink: AlertSink | None = getattr(self._ztgw_next, "sink", None)
        self._ztgw_next.sink = None
        return sink

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        obj: Any = super().wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
        if isinstance(obj, AlertingSSLObject):
            obj._ztgw_outgoing = outgoing
        result: ssl.SSLObject = obj
        return result


LINGER_SECONDS = 2.0
"""How long a refused connection is read from (and what arrives discarded) after its alert."""
FIRST_FLIGHT_SECONDS = 0.25
"""How long an encrypted (TLS 1.3) alert waits for the client's first bytes after its Finished."""
MAX_LINGERING = 256
"""Refused connections lingering at once; beyond, the alert is sent and the socket closed."""

_ALERT_RECORD = 21
"""TLS record content type of a plaintext alert; a TLS 1.3 alert sent after the server's
Finished is encrypted and travels as application_data (23) instead."""


class LingeringAlert:
    """Sends the alert when the client can read it, then closes like nginx's lingering_close.

    A TLS 1.3 client believes its handshake done once it has sent its Finished, before the
    server has judged its certificate, and sends its request right behind. Two races follow:
    - Closing a socket with those bytes unread makes the kernel send a RST, which can reach the
      client before it reads the alert. So the socket is kept open through a duplicate
      descriptor (the event loop closes its own one as usual): the alert and a FIN go out, what
      still arrives is read and dropped until the client closes or LINGER_SECONDS pass.
    - An alert that arrives before the client has sent its request is read while the
      connection sits idle in the client's pool: Chromium then reports the socket as not
      connected (ERR_SOCKET_NOT_CONNECTED, "site can't be reached") instead of "didn't accept
      your login certificate" (ERR_BAD_SSL_CLIENT_AUTH_CERT). So an encrypted alert (TLS 1.3,
      after the server's Finished) waits for the client's first bytes, at most
      FIRST_FLIGHT_SECONDS; a plaintext one (TLS 1.2, where the client waits for the server's
      Finished and would send nothing) goes at once.
    At most MAX_LINGERING at once (a flood of refused handshakes must not pile up
    descriptors)."""

    def __init__(self, transport: asyncio.BaseTransport, owner: AlertingContext) -> None:
        self._transport = transport
        self._owner = owner
        self._sock: socket.socket | None = None
        self._pending: bytes | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, data: bytes) -> None:
        raw = self._transport.get_extra_info("socket")
        owner = self._owner
        if raw is None or owner.lingering >= MAX_LINGERING:
            self._transport.write(data)  # type: ignore[attr-defined]
            return
        try:
            sock = socket.socket(fileno=os.dup(raw.fileno()))
        except OSError:
            self._transport.write(data)  # type: ignore[attr-defined]
            return
        sock.setblocking(False)
        owner.lingering += 1
        loop = asyncio.get_running_loop()
        self._sock, self._pending = sock, data
        self._timer = loop.call_later(FIRST_FLIGHT_SECONDS, self._first_flight_over)
        if data[:1] == bytes([_ALERT_RECORD]) and not self._send_alert():
            return
        loop.add_reader(sock.fileno(), self._readable)

    def _send_alert(self) -> bool:
        sock, alert = self._sock, self._pending
        self._pending = None
        assert sock is not None and alert is not None
        try:
            sock.send(alert)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._finish()
            return False
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, self._finish)
        return True

    def _first_flight_over(self) -> None:
        if self._pending is not None:
            self._send_alert()
        else:
            self._finish()

    def _readable(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            got = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            got = b""
        if not got:
            self._finish()
        elif self._pending is not None:
            self._send_alert()

    def _finish(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        asyncio.get_running_loop().remove_reader(sock.fileno())
        if self._timer is not None:
            self._timer.cancel()
        sock.close()
        self._owner.lingering -= 1


def bind_alert_sink(context: ssl.SSLContext, transport: asyncio.BaseTransport) -> None:
    """Queued by the listener right before `start_tls()` (see `bind_next_handshake`)."""
    if isinstance(context, AlertingContext):
        context.bind_next_handshake(LingeringAlert(transport, context))
