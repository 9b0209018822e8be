"""The WebSocket bridge: decided before the upgrade, re-verified while open.

None of Pomerium, oauth2-proxy or Oathkeeper re-checks an open WebSocket; we re-run the
decision on an interval (and whenever `wake()` is called, e.g. on a revocation) and close both
sides with 1008 (policy violation, RFC 6455 §7.4.1) as soon as the verdict is no longer ALLOW.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from ..decision import Decision

log = logging.getLogger("ztgateway.websocket")
POLICY_VIOLATION = 1008
MAX_MESSAGE = 4 * 1024 * 1024


async def _pump_client_to_upstream(
    ws: web.WebSocketResponse, up: aiohttp.ClientWebSocketResponse
) -> None:
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await up.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await up.send_bytes(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            break


async def _pump_upstream_to_client(
    ws: web.WebSocketResponse, up: aiohttp.ClientWebSocketResponse
) -> None:
    async for msg in up:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
        elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            break


class Watch:
    """Lets the outside (revocations) wake the re-verification loop at once."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def wake(self) -> None:
        self.event.set()


async def bridge_websocket(
    request: web.BaseRequest,
    session: aiohttp.ClientSession,
    url: URL,
    headers: CIMultiDict[str],
    *,
    recheck: Callable[[], Awaitable[Decision]],
    interval: float,
    watch: Watch,
) -> web.WebSocketResponse:
    """Connect upstream first (a refusal there is still a 502), then upgrade the client."""
    protocols = [
        p.strip()
        for v in request.headers.getall("Sec-WebSocket-Protocol", ())
        for p in v.split(",")
        if p.strip()
    ]
    up = await session.ws_connect(
        url.with_scheme("wss" if url.scheme == "https" else "ws"),
        headers=headers,
        protocols=protocols,
        autoclose=False,
        autoping=True,
        max_msg_size=MAX_MESSAGE,
    )
    ws = web.WebSocketResponse(
        protocols=[up.protocol] if up.protocol else (),
        autoclose=False,
        autoping=True,
        max_msg_size=MAX_MESSAGE,
    )
    ws.headers["Server"] = "ztgateway"
    try:
        await ws.prepare(request)
    except Exception:
        await up.close()
        raise
    a = asyncio.ensure_future(_pump_client_to_upstream(ws, up))
    b = asyncio.ensure_future(_pump_upstream_to_client(ws, up))

    async def reverify() -> Decision:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(watch.event.wait(), interval)
            watch.event.clear()
            decision = await recheck()
            if not decision.allowed:
                return decision

    c = asyncio.ensure_future(reverify())
    try:
        done, _ = await asyncio.wait({a, b, c}, return_when=asyncio.FIRST_COMPLETED)
        if c in done and not c.cancelled() and c.exception() is None:
            reason = c.result().reason.value.encode()[:120]
            log.info("closing websocket %s: %s", request.path, reason.decode())
            await ws.close(code=POLICY_VIOLATION, message=reason)
            await up.close(code=POLICY_VIOLATION, message=reason)
        else:
            code = up.close_code if b in done and up.close_code else 1000
            if not ws.closed:
                await ws.close(code=code)
            if not up.closed:
                await up.close(code=ws.close_code or 1000)
    finally:
        for t in (a, b, c):
            t.cancel()
        await asyncio.gather(a, b, c, return_exceptions=True)
        if not up.closed:
            await up.close()
    return ws
