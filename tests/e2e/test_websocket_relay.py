"""The frame-aware WebSocket relay on the data plane, against a real gateway and upstream.

Raw frames over real TLS where a well-behaved client library would never send them (unmasked
frames, a silent peer); aiohttp's client where negotiation is the point.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct

import aiohttp
import pytest

from tests.conftest import GatewayFactory
from tests.e2e.test_proxy import closed_by_peer, raw_tls
from tests.support import Certs, session

KEY = base64.b64encode(b"0123456789abcdef").decode()


def upgrade(path: str = "/ws", *extra: str) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        f"Sec-WebSocket-Key: {KEY}",
        *extra,
        "",
        "",
    ]
    return "\r\n".join(lines).encode()


def frame(opcode: int, payload: bytes, *, masked: bool = True) -> bytes:
    head = bytes([0x80 | opcode])
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b1, b2 = await asyncio.wait_for(reader.readexactly(2), 5.0)
    n = b2 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    assert not b2 & 0x80, "server frames are never masked"
    return b1 & 0x0F, await reader.readexactly(n)


async def switched(reader: asyncio.StreamReader) -> dict[str, str]:
    status = await asyncio.wait_for(reader.readline(), 5.0)
    assert status.startswith(b"HTTP/1.1 101 "), status
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


async def test_unmasked_client_frame_is_closed_with_1002(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory()
    async with raw_tls(certs, gw) as (reader, writer):
        writer.write(upgrade())
        await writer.drain()
        headers = await switched(reader)
        assert headers["x-zt-decision-id"]
        writer.write(frame(0x1, b"hello"))  # masked: relayed and echoed
        assert await read_frame(reader) == (0x1, b"hello")
        writer.write(frame(0x1, b"naked", masked=False))  # RFC 6455 §5.1: MUST be masked
        opcode, payload = await read_frame(reader)
        assert opcode == 0x8
        assert struct.unpack("!H", payload[:2])[0] == 1002
        assert await closed_by_peer(reader, 3.0)


async def test_message_over_the_cap_is_closed_with_1009(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory({"server": {"websocket_max_message": 64 * 1024}})
    async with session(certs) as s, s.ws_connect(f"https://127.0.0.1:{gw.port}/ws") as ws:
        await ws.send_bytes(b"a" * 1000)
        assert await ws.receive_bytes(timeout=5) == b"a" * 1000
        await ws.send_bytes(b"b" * (65 * 1024))
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 1009


async def test_only_the_subprotocol_the_upstream_chose_is_confirmed(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory()
    url = f"https://127.0.0.1:{gw.port}/ws"
    async with session(certs) as s:
        async with s.ws_connect(url, protocols=("chat.v2", "chat.v1")) as ws:
            # The demo upstream accepts the first one offered; the relay confirms exactly it.
            assert ws.protocol == "chat.v2"
            await ws.send_str("ping?")
            assert await ws.receive_str(timeout=5) == "ping?"
        async with s.ws_connect(url) as ws:
            assert ws.protocol is None


@pytest.mark.parametrize("compress", [15, 0], ids=["deflate-offered", "not-offered"])
async def test_permessage_deflate_only_when_both_sides_accept(
    gateway_factory: GatewayFactory, certs: Certs, compress: int
) -> None:
    gw = await gateway_factory()
    async with session(certs) as s:
        resp_headers: dict[str, str] = {}
        async with s.ws_connect(f"https://127.0.0.1:{gw.port}/ws", compress=compress) as ws:
            resp_headers = dict(ws._response.headers)
            payload = "z" * 5000
            await ws.send_str(payload)
            assert await ws.receive_str(timeout=5) == payload
    negotiated = resp_headers.get("Sec-WebSocket-Extensions", "")
    assert ("permessage-deflate" in negotiated) is bool(compress)


async def test_silent_peer_is_closed_after_an_unanswered_ping(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory({"server": {"websocket_ping_interval": 0.3}})
    async with raw_tls(certs, gw) as (reader, writer):
        writer.write(upgrade())
        await writer.drain()
        await switched(reader)
        # Never answer: the relay pings after 0.3 s of silence and gives up 0.3 s later.
        opcode, _ = await read_frame(reader)
        assert opcode == 0x9
        assert await closed_by_peer(reader, 3.0)


async def test_answered_pings_keep_a_quiet_websocket_open(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory({"server": {"websocket_ping_interval": 0.3}})
    async with session(certs) as s, s.ws_connect(f"https://127.0.0.1:{gw.port}/ws") as ws:
        # aiohttp's client answers pings while it is receiving: wait by receiving (each ping
        # restarts its own receive timeout, hence the outer one).
        with contextlib.suppress(TimeoutError):
            msg = await asyncio.wait_for(ws.receive(), 1.5)
            pytest.fail(f"nothing was sent, yet received {msg}")
        await ws.send_str("still here")
        assert await ws.receive_str(timeout=5) == "still here"


async def test_shutdown_closes_open_websockets_with_1001(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory()
    async with session(certs) as s, s.ws_connect(f"https://127.0.0.1:{gw.port}/ws") as ws:
        await ws.send_str("before")
        assert await ws.receive_str(timeout=5) == "before"
        assert gw.listener is not None
        stopping = asyncio.ensure_future(gw.listener.close(3.0))
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 1001
        await stopping


async def test_refused_upgrade_is_problem_json_with_a_decision_id_and_audited(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory(
        {"routes": [{"name": "app", "prefix": "/", "upstream": "demo", "websocket": False}]}
    )
    async with raw_tls(certs, gw) as (reader, writer):
        writer.write(upgrade() + b"")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5.0)
        assert status.startswith(b"HTTP/1.1 400 ")
        head = b""
        while (line := await reader.readline()) not in (b"\r\n", b""):
            head += line
        assert b"application/problem+json" in head and b"X-ZT-Decision-Id" in head
        assert await closed_by_peer(reader, 2.0)
    await gw.audit.flush()
    assert (
        gw.metrics.registry.get_sample_value(
            "ztgw_requests_total", {"route": "app", "verdict": "deny", "reason": "request-invalid"}
        )
        == 1
    )
