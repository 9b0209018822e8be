"""The raw upstream client: keep-alive pooling, framing and failures, against a scripted upstream.

The demo app is too polite to show what a pool must survive, so these tests put a raw asyncio
server behind the gateway that answers by script: a body delimited by the connection's close,
an interim 103, a Latin-1 header, a connection dropped just as it is reused, garbage after a
response. Every request still crosses real TLS to the gateway and real TCP to the upstream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import aiohttp
import pytest

from tests.conftest import GatewayFactory
from tests.support import Certs, session
from ztgateway.app import Gateway
from ztgateway.forward.upstream import encode_head

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Scripted:
    """Answers by request path; counts connections and the requests each one carried."""

    port: int = 0
    connections: int = 0
    requests: list[tuple[int, str, str]] = field(default_factory=list)  # (conn, method, path)
    drop_reused: bool = False  # close without answering a connection's second request
    hung_up: int = 0  # connections the gateway closed while we were still writing


# path -> (what the upstream writes, whether it then closes the connection)
ANSWERS: dict[str, tuple[bytes, bool]] = {
    "/ok": (OK, False),
    "/head": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", False),
    "/close-delimited": (b"HTTP/1.1 200 OK\r\nX-Framing: eof\r\n\r\nall of this, until close", True),
    "/early-hints": (b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n" + OK, False),
    "/latin1": (b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9\r\nContent-Length: 2\r\n\r\nok", False),
    "/connection-close": (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", True),
    "/malformed": (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\nok", False),
    "/trailing-garbage": (OK + b"HTTP/1.1 418 Unasked\r\n\r\n", False),
    "/slow": (OK, False),  # after 0.2 s
    "/truncated": (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nonly", True),
    # Too big to be taken whole, so its head is forwarded before the body breaks off.
    "/cut-mid-body": (b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 200_000, True),
    "/endless": (b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n", False),  # then 64 KB / 10 ms
}  # fmt: skip
NOT_FOUND = (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", False)


async def _serve(script: Scripted, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    script.connections += 1
    conn = script.connections
    served = 0
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *fields = head.decode("latin-1").split("\r\n")
            method, path, _ = line.split(" ")
            headers = {k.lower(): v for k, v in (f.split(": ", 1) for f in fields if f)}
            if "content-length" in headers:
                await reader.readexactly(int(headers["content-length"]))
            script.requests.append((conn, method, path))
            served += 1
            if script.drop_reused and served == 2:
                return
            if path == "/slow":
                await asyncio.sleep(0.2)
            answer, then_close = ANSWERS.get(path, NOT_FOUND)
            w.write(answer)
            await w.drain()
            while path == "/endless":  # until the gateway gives up on this connection
                w.write(b"y" * 65536)
                await w.drain()
                await asyncio.sleep(0.01)
            if then_close:
                return
    except asyncio.IncompleteReadError:
        pass
    except ConnectionError:
        script.hung_up += 1
    finally:
        w.close()


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    script = Scripted()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _serve(script, r, w)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    script.port = server.sockets[0].getsockname()[1]
    yield script
    server.close()


@pytest.fixture
def forward_log() -> Iterator[list[str]]:
    """What the forwarding code logs (info and up) during the test, as it is logged."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger, handler = logging.getLogger("ztgateway.forward"), Keep(logging.INFO)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


async def _gateway(factory: GatewayFactory, script: Scripted, **upstream: object) -> Gateway:
    return await factory(
        {"upstreams": {"demo": {"url": f"http://127.0.0.1:{script.port}", **upstream}}}
    )


@pytest.fixture
async def gw(gateway_factory: GatewayFactory, scripted: Scripted) -> Gateway:
    """The gateway with the scripted upstream behind it, default pool settings."""
    return await _gateway(gateway_factory, scripted)


def _url(gw: Gateway, path: str) -> str:
    return f"https://127.0.0.1:{gw.port}{path}"


async def get_ok(s: aiohttp.ClientSession, gw: Gateway) -> None:
    """GET /ok on the pooled session: the scripted upstream's plain 200 "ok"."""
    async with s.get(_url(gw, "/ok")) as r:
        assert (r.status, await r.read()) == (200, b"ok")


async def test_sequential_requests_share_one_keep_alive_connection(
    gw: Gateway, certs: Certs, scripted: Scripted
) -> None:
    async with session(certs) as s:
        for _ in range(20):
            await get_ok(s, gw)
    assert scripted.connections == 1
    assert len(scripted.requests) == 20


async def test_head_answer_without_body_leaves_the_connection_reusable(
    gw: Gateway, certs: Certs, scripted: Scripted
) -> None:
    async with session(certs) as s:
        async with s.head(_url(gw, "/head")) as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == "100"
        await get_ok(s, gw)
    assert scripted.connections == 1


async def test_body_delimited_by_close_arrives_whole_and_the_socket_is_not_reused(
    gw: Gateway, certs: Certs, scripted: Scripted
) -> None:
    async with session(certs) as s:
        async with s.get(_url(gw, "/close-delimited")) as r:
            assert r.status == 200
            assert await r.read() == b"all of this, until close"
        async with s.get(_url(gw, "/ok")) as r:
            assert r.status == 200
    assert scripted.connections == 2


async def test_upstream_connection_close_is_honoured(
    gw: Gateway, certs: Certs, scripted: Scripted
) -> None:
    async with session(certs) as s:
        for _ in range(3):
            async with s.get(_url(gw, "/connection-close")) as r:
                assert (r.status, await r.read()) == (200, b"ok")
                # Connection is hop-by-hop: the client's own connection stays open.
                assert "Connection" not in r.headers or r.headers["Connection"] != "close"
    assert scripted.connections == 3


async def test_interim_103_is_skipped_and_the_final_answer_forwarded(
    gw: Gateway, certs: Certs, scripted: Scripted
) -> None:
    async with session(certs) as s, s.get(_url(gw, "/early-hints")) as r:
        assert (r.status, await r.read()) == (200, b"ok")
        assert "Link" not in r.headers


async def test_latin1_header_value_is_passed_on_as_its_characters(
    gw: Gateway, certs: Certs, scripted: Scripted
) -> None:
    async with session(certs) as s, s.get(_url(gw, "/latin1")) as r:
        assert r.status == 200
        assert r.headers["X-Name"] == "café"


@pytest.mark.parametrize("path", ["/malformed", "/truncated"])
async def test_malformed_or_truncated_answer_is_502_reset(
    gw: Gateway, certs: Certs, scripted: Scripted, path: str
) -> None:
    # A small answer is taken whole before its head is forwarded, so even a body cut short
    # still gets the client an honest 502 rather than a truncated 200.
    async with session(certs) as s, s.get(_url(gw, path)) as r:
        assert r.status == 502
        assert (await r.json(content_type=None))["reason"] == "upstream-unavailable"
    rendered = gw.metrics.render().decode()
    assert 'ztgw_upstream_errors_total{kind="reset",route="app"} 1.0' in rendered


async def test_a_body_broken_off_upstream_resets_the_client_and_is_logged_as_the_upstreams(
    gw: Gateway, certs: Certs, scripted: Scripted, forward_log: list[str]
) -> None:
    async with session(certs) as s, s.get(_url(gw, "/cut-mid-body")) as r:
        assert r.status == 200  # the head was out before the body broke off
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    assert any("upstream demo failed mid-response" in m for m in forward_log), forward_log


async def test_a_client_leaving_mid_body_frees_the_upstream_and_blames_nobody(
    gw: Gateway, certs: Certs, scripted: Scripted, forward_log: list[str]
) -> None:
    async with session(certs) as s:
        r = await s.get(_url(gw, "/endless"))
        assert r.status == 200
        await r.content.readexactly(65536)
        r.close()  # hangs up with most of the 100 MB still to come
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    # The gateway stops reading the upstream and closes that connection (not kept, not leaked).
    while scripted.hung_up == 0 or (gw.listener is not None and gw.listener.open_connections):
        assert loop.time() < deadline, (scripted, gw.listener and gw.listener.open_connections)
        await asyncio.sleep(0.05)
    assert not any("upstream demo failed" in m for m in forward_log), forward_log


async def test_bytes_after_an_answer_retire_the_connection(
    gw: Gateway, certs: Certs, scripted: Scripted
) -> None:
    async with session(certs) as s:
        async with s.get(_url(gw, "/trailing-garbage")) as r:
            assert (r.status, await r.read()) == (200, b"ok")
        # The unasked 418 must never be taken for the next request's answer.
        for _ in range(2):
            await get_ok(s, gw)
    assert scripted.connections == 2


async def test_reused_connection_dropped_unanswered_is_retried_once_for_a_get(
    gw: Gateway, certs: Certs, scripted: Scripted
) -> None:
    scripted.drop_reused = True
    async with session(certs) as s:
        async with s.get(_url(gw, "/ok")) as r:
            assert r.status == 200
        await get_ok(s, gw)
    # Request 2 reached connection 1 (dropped) and was repeated on connection 2.
    assert [(c, p) for c, _, p in scripted.requests] == [(1, "/ok"), (1, "/ok"), (2, "/ok")]


async def test_reused_connection_dropped_unanswered_is_not_retried_for_a_post(
    gw: Gateway, certs: Certs, scripted: Scripted
) -> None:
    scripted.drop_reused = True
    async with session(certs) as s:
        async with s.get(_url(gw, "/ok")) as r:
            assert r.status == 200
        async with s.post(_url(gw, "/ok"), data=b"pay once") as r:
            assert r.status == 502
    assert [(c, m) for c, m, _ in scripted.requests] == [(1, "GET"), (1, "POST")]


async def test_pool_limit_queues_requests_instead_of_opening_more_connections(
    gateway_factory: GatewayFactory, certs: Certs, scripted: Scripted
) -> None:
    gw = await _gateway(gateway_factory, scripted, max_connections=1)
    async with session(certs) as s:

        async def one() -> int:
            async with s.get(_url(gw, "/slow")) as r:
                await r.read()
                return r.status

        assert await asyncio.gather(*(one() for _ in range(4))) == [200] * 4
    assert scripted.connections == 1


async def test_pool_wait_longer_than_read_timeout_is_504(
    gateway_factory: GatewayFactory, certs: Certs, scripted: Scripted
) -> None:
    gw = await _gateway(gateway_factory, scripted, max_connections=1, read_timeout=0.3)
    async with session(certs) as s:

        async def one() -> int:
            async with s.get(_url(gw, "/slow")) as r:
                await r.read()
                return r.status

        statuses = sorted(await asyncio.gather(*(one() for _ in range(4))))
    # 0.2 s per answer on one connection: the first answers, the last waits > 0.3 s.
    assert statuses[0] == 200 and statuses[-1] == 504


def test_request_head_is_exact_and_refuses_injected_lines() -> None:
    head = encode_head("GET", "/a?b=1", "up:8080", [("X-User", "alice"), ("Accept", "*/*")])
    assert head == b"GET /a?b=1 HTTP/1.1\r\nHost: up:8080\r\nX-User: alice\r\nAccept: */*\r\n\r\n"
    for bad in ("alice\r\nX-Admin: yes", "alice\nX", "alice\rX", "a\x00"):
        with pytest.raises(ValueError):
            encode_head("GET", "/", "up", [("X-User", bad)])
    with pytest.raises(ValueError):
        encode_head("GET", "/ HTTP/1.1\r\nX: y", "up", [])
