"""The WebSocket relay on the data plane: decided before the 101, frame-aware while open.

Frames on both legs are parsed and re-framed by wsproto (RFC 6455), so what reaches the
upstream is what the gateway understood, never bytes it passed along blind:
- an unmasked client frame, a bad opcode or a broken close is a protocol error: 1002 to the
  client (invalid UTF-8 in a text message: 1007), and the upstream leg is closed with 1001;
- a message larger than `MAX_MESSAGE` is closed with 1009 (RFC 6455 §7.4.1) before it is
  forwarded whole: the relay streams frames, counting each message as it goes;
- both peers are pinged when quiet and cut off when they stop answering;
- subprotocols and extensions are what both sides accept: the client's offer goes upstream,
  and only what the upstream selected is confirmed to the client (permessage-deflate is
  negotiated per leg, since the relay decompresses and re-compresses each message);
- the decision is re-run on an interval and whenever `wake()` is called (a revocation, a
  reload), and a verdict that is no longer ALLOW closes both sides with 1008;
- a gateway shutting down closes both sides with 1001.

None of Pomerium, oauth2-proxy or Oathkeeper re-checks an open WebSocket.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httptools
from multidict import CIMultiDict
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.utilities import LocalProtocolError

from .. import SERVER_BANNER
from ..config import UpstreamConfig
from ..decision import Decision, Reason
from ..edge.http1 import Request
from ..responses import DECISION_HEADER
from .upstream import UpstreamFailure, encode_head

log = logging.getLogger("ztgateway.websocket")
POLICY_VIOLATION = 1008
GOING_AWAY = 1001
MESSAGE_TOO_BIG = 1009
MAX_MESSAGE = 4 * 1024 * 1024
PING_INTERVAL = 20.0
"""Seconds of silence on a leg before it is pinged; as long again without an answer closes."""
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_NO_SEND_CODES = frozenset({1005, 1006, 1015})


def accept_key(key: str) -> str:
    """RFC 6455 §4.2.2: base64(SHA-1(key + GUID))."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()  # noqa: S324


def _tokens(values: list[str]) -> list[str]:
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


def _header(name: str, params: str | bool) -> str:
    """An extension as a header value: wsproto's offer()/accept() give only the parameters."""
    return f"{name}; {params}" if isinstance(params, str) and params else name


class Watch:
    """Lets the outside (revocations, reloads, shutdown) wake an open relay at once."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.going_away = False

    def wake(self) -> None:
        self.event.set()


class _Leg(asyncio.Protocol):
    """One side's socket; `relay` receives what arrives once the handshake is done."""

    def __init__(self, relay: Relay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.ws: WSConnection | None = None
        self.last_heard = 0.0
        self.pinged = False
        self.message = 0
        self.closed = False

    def data_received(self, data: bytes) -> None:
        self.relay.received(self, data)

    def eof_received(self) -> bool | None:
        self.relay.received(self, None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay.lost(self)

    def pause_writing(self) -> None:
        self.relay.pause_other(self, True)

    def resume_writing(self) -> None:
        self.relay.pause_other(self, False)

    def send(self, event: Any) -> None:
        ws, t = self.ws, self.transport
        if ws is None or t is None or self.closed:
            return
        try:
            data = ws.send(event)
        except LocalProtocolError:
            return
        if data:
            t.write(data)


class _UpstreamHandshake(_Leg):
    """The upstream leg before its 101: parses the answer with llhttp."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay, "upstream")
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes]] = (
            asyncio.get_running_loop().create_future()
        )
        self.headers: list[tuple[bytes, bytes]] = []
        self.upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.headers = []

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            super().data_received(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as up:
            self.upgraded = True
            if not self.head.done():
                self.head.set_result((101, self.headers, bytes(data[int(up.args[0]) :])))
            return
        except httptools.HttpParserError as exc:
            self._fail(f"malformed handshake answer: {exc}")
            return
        status = self.parser.get_status_code()
        if status and status != 101 and not self.head.done() and self.headers:
            self.head.set_result((status, self.headers, b""))

    def eof_received(self) -> bool | None:
        if not self.upgraded:
            self._fail("closed before the handshake answer")
            return False
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded:
            self._fail("closed before the handshake answer")
        super().connection_lost(exc)

    def _fail(self, detail: str) -> None:
        if not self.head.done():
            self.head.set_exception(UpstreamFailure(Reason.UPSTREAM_UNAVAILABLE, "reset", detail))


class _ClientLeg(_Leg):
    """The client's side: the data plane connection hands its transport over to it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover
        self.transport = cast(asyncio.Transport, transport)

    def going_away(self) -> None:
        self.relay.finish(GOING_AWAY, "gateway shutting down")


class Relay:
    """Both legs, their frames, heartbeats and the re-verification."""

    def __init__(
        self,
        *,
        recheck: Callable[[], Awaitable[Decision]],
        interval: float,
        watch: Watch,
        max_message: int = MAX_MESSAGE,
        ping_interval: float = PING_INTERVAL,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.recheck = recheck
        self.interval = interval
        self.watch = watch
        self.max_message = max_message
        self.ping_interval = ping_interval
        self.client = _ClientLeg(self, "client")
        self.upstream = _UpstreamHandshake(self)
        self.done: asyncio.Future[None] = self.loop.create_future()
        self._finishing = False
        self._timer: asyncio.TimerHandle | None = None

    # --- frames --------------------------------------------------------------------------------
    def _other(self, leg: _Leg) -> _Leg:
        return self.upstream if leg is self.client else self.client

    def received(self, leg: _Leg, data: bytes | None) -> None:
        ws = leg.ws
        if ws is None or ws.state is ConnectionState.CLOSED:
            return
        leg.last_heard = self.loop.time()
        leg.pinged = False
        try:
            ws.receive_data(data)
        except LocalProtocolError:
            return
        other = self._other(leg)
        for event in ws.events():
            if isinstance(event, Message):
                size = len(event.data)
                leg.message += size
                if leg.message > self.max_message:
                    self._close_leg(leg, MESSAGE_TOO_BIG, "message too big")
                    self._close_leg(other, GOING_AWAY, "peer sent a message too big")
                    return
                if event.message_finished:
                    leg.message = 0
                cls = TextMessage if isinstance(event, TextMessage) else BytesMessage
                other.send(cls(data=event.data, message_finished=event.message_finished))
            elif isinstance(event, Ping):
                leg.send(event.response())
            elif isinstance(event, Pong):
                pass
            elif isinstance(event, CloseConnection):
                if ws.state is ConnectionState.REMOTE_CLOSING:
                    # The peer closed: confirm, and pass its code on to the other side.
                    leg.send(event.response())
                    code = 1000 if event.code in _NO_SEND_CODES else event.code
                    self._close_leg(other, code, event.reason or "")
                else:
                    # A protocol error wsproto found in this leg's frames (1002, 1007).
                    self._close_leg(leg, event.code, event.reason or "")
                    self._close_leg(other, GOING_AWAY, "peer broke the protocol")
                self._after_close()
                return

    def _close_leg(self, leg: _Leg, code: int, reason: str) -> None:
        ws = leg.ws
        if ws is not None and ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            leg.send(CloseConnection(code=code, reason=reason[:120]))
        self._after_close()

    def _after_close(self) -> None:
        # Both sides get a moment for the closing handshake, then the sockets go.
        if not self._finishing:
            self._finishing = True
            self.loop.call_later(1.0, self._teardown)
        for leg in (self.client, self.upstream):
            ws = leg.ws
            if ws is not None and ws.state is ConnectionState.CLOSED and leg.transport:
                leg.transport.close()
        if all(
            leg.closed or (leg.ws and leg.ws.state is ConnectionState.CLOSED)
            for leg in (self.client, self.upstream)
        ):
            self._teardown()

    def _teardown(self) -> None:
        for leg in (self.client, self.upstream):
            if leg.transport is not None and not leg.closed:
                leg.transport.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.done.done():
            self.done.set_result(None)

    def lost(self, leg: _Leg) -> None:
        other = self._other(leg)
        self._close_leg(other, GOING_AWAY, f"{leg.name} went away")
        if other.closed:
            self._teardown()

    def pause_other(self, leg: _Leg, paused: bool) -> None:
        # The socket `leg` writes to is full: stop reading what would be written to it.
        t = self._other(leg).transport
        if t is None or self._other(leg).closed:
            return
        if paused:
            t.pause_reading()
        else:
            t.resume_reading()

    def finish(self, code: int, reason: str) -> None:
        self._close_leg(self.client, code, reason)
        self._close_leg(self.upstream, code, reason)

    # --- heartbeats ------------------------------------------------------------------------------
    def _tick(self) -> None:
        self._timer = None
        if self.done.done():
            return
        now = self.loop.time()
        for leg in (self.client, self.upstream):
            quiet = now - leg.last_heard
            if quiet < self.ping_interval:
                continue
            if leg.pinged:
                # Pinged a whole interval ago and silent since: a dead peer.
                log.info("websocket %s did not answer a ping: closing", leg.name)
                if leg.transport is not None:
                    leg.transport.abort()
                self._close_leg(self._other(leg), GOING_AWAY, f"{leg.name} stopped answering")
                return
            leg.pinged = True
            leg.send(Ping(payload=b"ztgw"))
        self._timer = self.loop.call_later(self.ping_interval / 2, self._tick)

    # --- re-verification -------------------------------------------------------------------------
    async def reverify(self) -> None:
        while not self.done.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken(), self.interval)
            if self.done.done():
                return
            self.watch.event.clear()
            if self.watch.going_away:
                self.finish(GOING_AWAY, "gateway shutting down")
                return
            decision = await self.recheck()
            if not decision.allowed:
                reason = decision.reason.value[:120]
                log.info("closing websocket: %s", reason)
                self.finish(POLICY_VIOLATION, reason)
                return

    async def _woken(self) -> None:
        waiter: asyncio.Future[Any] = asyncio.ensure_future(self.watch.event.wait())
        try:
            await asyncio.wait({waiter, self.done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()

    # --- set-up ----------------------------------------------------------------------------------
    def start(
        self, client_transport: asyncio.Transport, upstream_tail: bytes, client_tail: bytes
    ) -> None:
        now = self.loop.time()
        self.client.transport = client_transport
        self.client.last_heard = self.upstream.last_heard = now
        self._timer = self.loop.call_later(self.ping_interval / 2, self._tick)
        if client_tail:
            self.received(self.client, client_tail)
        if upstream_tail:
            self.received(self.upstream, upstream_tail)


async def bridge_websocket(
    request: Request,
    upstream: UpstreamConfig,
    ssl_context: ssl.SSLContext | None,
    target: str,
    headers: CIMultiDict[str],
    *,
    decision_id: str,
    recheck: Callable[[], Awaitable[Decision]],
    interval: float,
    watch: Watch,
    max_message: int = MAX_MESSAGE,
    ping_interval: float = PING_INTERVAL,
) -> None:
    """Open the upstream's WebSocket first (a refusal there is still a 502), then upgrade the
    client with what the upstream selected, then relay until either side ends."""
    loop = asyncio.get_running_loop()
    relay = Relay(
        recheck=recheck,
        interval=interval,
        watch=watch,
        max_message=max_message,
        ping_interval=ping_interval,
    )
    offered_protocols = _tokens(request.headers.getall("Sec-WebSocket-Protocol", []))
    offered_ext = _tokens(request.headers.getall("Sec-WebSocket-Extensions", []))
    wants_deflate = any(e.split(";")[0].strip() == "permessage-deflate" for e in offered_ext)
    url = upstream.url
    host = url.raw_host or "127.0.0.1"
    port = url.port or (443 if url.scheme == "https" else 80)
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    fields = list(headers.items())
    fields += [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", "13"),
    ]
    if offered_protocols:
        fields.append(("Sec-WebSocket-Protocol", ", ".join(offered_protocols)))
    up_deflate = PerMessageDeflate()
    if wants_deflate:
        fields.append(("Sec-WebSocket-Extensions", _header(up_deflate.name, up_deflate.offer())))
    host_header = (f"[{host}]" if ":" in host else host) + (
        "" if url.is_default_port() else f":{port}"
    )
    head = encode_head("GET", target, host_header, fields)
    leg = relay.upstream
    try:
        await asyncio.wait_for(
            loop.create_connection(
                lambda: leg,
                host,
                port,
                ssl=ssl_context,
                server_hostname=host if ssl_context else None,
            ),
            upstream.connect_timeout,
        )
    except TimeoutError:
        raise UpstreamFailure(Reason.UPSTREAM_TIMEOUT, "timeout", "connect timed out") from None
    except ssl.SSLError as exc:
        raise UpstreamFailure(Reason.UPSTREAM_UNAVAILABLE, "tls", type(exc).__name__) from exc
    except OSError as exc:
        raise UpstreamFailure(Reason.UPSTREAM_UNAVAILABLE, "connect", type(exc).__name__) from exc
    try:
        assert leg.transport is not None
        leg.transport.write(head)
        try:
            status, raw, tail = await asyncio.wait_for(leg.head, upstream.read_timeout)
        except TimeoutError:
            raise UpstreamFailure(
                Reason.UPSTREAM_TIMEOUT, "timeout", "no handshake answer"
            ) from None
        answer = CIMultiDict((n.decode("latin-1"), v.decode("latin-1")) for n, v in raw)
        if status != 101:
            raise UpstreamFailure(
                Reason.UPSTREAM_UNAVAILABLE, "reset", f"upstream refused the upgrade: {status}"
            )
        if answer.get("Sec-WebSocket-Accept", "") != accept_key(key):
            raise UpstreamFailure(
                Reason.UPSTREAM_UNAVAILABLE, "reset", "bad Sec-WebSocket-Accept from upstream"
            )
        protocol = answer.get("Sec-WebSocket-Protocol", "").strip()
        if protocol and protocol not in offered_protocols:
            raise UpstreamFailure(
                Reason.UPSTREAM_UNAVAILABLE, "reset", "upstream chose a subprotocol not offered"
            )
        up_exts: list[Extension] = []
        client_exts: list[Extension] = []
        client_ext_header = ""
        selected = _tokens(answer.getall("Sec-WebSocket-Extensions", []))
        for ext in selected:
            if ext.split(";")[0].strip() != "permessage-deflate" or not wants_deflate:
                raise UpstreamFailure(
                    Reason.UPSTREAM_UNAVAILABLE, "reset", "upstream chose an extension not offered"
                )
            up_deflate.finalize(ext)
            up_exts = [up_deflate]
            client_offer = next(
                e for e in offered_ext if e.split(";")[0].strip() == "permessage-deflate"
            )
            client_deflate = PerMessageDeflate()
            accepted = client_deflate.accept(client_offer)
            if accepted is not None and accepted is not False:
                client_exts = [client_deflate]
                client_ext_header = _header(client_deflate.name, accepted)
    except BaseException:
        if leg.transport is not None:
            leg.transport.abort()
        raise
    leg.ws = WSConnection(ConnectionType.CLIENT, extensions=up_exts)
    relay.client.ws = WSConnection(ConnectionType.SERVER, extensions=client_exts)
    out = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept_key(request.headers["Sec-WebSocket-Key"].strip())),
        ("Server", SERVER_BANNER),
        (DECISION_HEADER, decision_id),
    ]
    if protocol:
        out.append(("Sec-WebSocket-Protocol", protocol))
    if client_ext_header:
        out.append(("Sec-WebSocket-Extensions", client_ext_header))
    conn = request.conn
    conn.switch_protocols(request, out, relay.client)
    assert conn.transport is not None
    relay.start(conn.transport, tail, request.upgrade_tail)
    checker = loop.create_task(relay.reverify())
    try:
        await relay.done
    finally:
        checker.cancel()
        await asyncio.gather(checker, return_exceptions=True)
        relay._teardown()
