"""The data plane's HTTP/1.1 protocol, fed raw request bytes over real TLS (http-garden style).

Each row: the bytes a client sends on one connection, the statuses it must get back in order,
the reason of the last answer, and whether the gateway then closes the connection. Every
refusal must be problem+json with its reason and decision id, an audit event and a metric, and
must never reach the upstream.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import pytest

from tests.conftest import GatewayFactory
from tests.e2e.test_proxy import RawResponse, closed_by_peer, raw_tls, read_response
from tests.support import Certs, audit_event
from ztgateway.app import Gateway

H = "Host: 127.0.0.1"


def req(
    target: str = "/echo",
    *lines: str,
    method: str = "GET",
    version: str = "HTTP/1.1",
    host: bool = True,
    body: bytes = b"",
) -> bytes:
    head = [f"{method} {target} {version}", *([H] if host else []), *lines, "", ""]
    return "\r\n".join(head).encode() + body


@dataclass(frozen=True)
class Case:
    data: bytes
    statuses: tuple[int, ...]
    reason: str | None  # of the last answer (a refusal's problem+json), None for a 2xx
    closes: bool


CASES: dict[str, Case] = {
    # --- framing and smuggling shapes (RFC 9112 §6) -----------------------------------------
    "cl-and-te": Case(
        req("/echo", "Content-Length: 4", "Transfer-Encoding: chunked", method="POST")
        + b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        (400,),
        "request-invalid",
        True,
    ),
    "te-in-http-1.0": Case(
        req("/echo", "Transfer-Encoding: chunked", method="POST", version="HTTP/1.0")
        + b"0\r\n\r\n",
        (400,),
        "request-invalid",
        True,
    ),
    "te-gzip-chunked": Case(
        req("/echo", "Transfer-Encoding: gzip, chunked", method="POST") + b"0\r\n\r\n",
        (400,),
        "request-invalid",
        True,
    ),
    "cl-plus-sign": Case(
        req("/echo", "Content-Length: +1", method="POST", body=b"a"),
        (400,),
        "request-invalid",
        True,
    ),
    "obs-fold": Case(req("/echo", "X-A: a", " folded"), (400,), "request-invalid", True),
    "bare-lf": Case(b"GET /echo HTTP/1.1\nHost: 127.0.0.1\n\n", (400,), "request-invalid", True),
    "nul-in-value": Case(req("/echo", "X-A: a\x00b"), (400,), "request-invalid", True),
    "space-before-colon": Case(req("/echo", "X-A : b"), (400,), "request-invalid", True),
    "upgrade-with-body": Case(
        req("/echo", "Upgrade: h2c", "Connection: Upgrade", "Content-Length: 5", body=b"GET /"),
        (400,),
        "request-invalid",
        True,
    ),
    # --- the request line ----------------------------------------------------------------------
    "absolute-form": Case(req("http://evil.example/echo"), (400,), "request-invalid", True),
    "asterisk-form": Case(req("*", method="OPTIONS"), (400,), "request-invalid", True),
    "http-2.0-line": Case(req(version="HTTP/2.0"), (505,), "version-unsupported", True),
    "lowercase-method": Case(req(method="get"), (400,), "request-invalid", True),
    "trace": Case(req(method="TRACE"), (405,), "method-not-allowed", True),
    "connect": Case(
        b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n",
        (405,),
        "method-not-allowed",
        True,
    ),
    # --- Host (RFC 9112 §3.2) ------------------------------------------------------------------
    "no-host": Case(req(host=False), (400,), "host-invalid", True),
    "two-hosts": Case(req("/echo", "Host: 127.0.0.1"), (400,), "host-invalid", True),
    "host-bad-port": Case(
        req("/echo", "Host: 127.0.0.1:8x", host=False), (400,), "host-invalid", True
    ),
    "host-with-userinfo": Case(
        req("/echo", "Host: a@127.0.0.1", host=False), (400,), "host-invalid", True
    ),
    "host-not-ours": Case(
        req("/echo", "Host: evil.example", host=False), (421,), "host-misdirected", True
    ),
    "host-with-port-is-ours": Case(
        req("/echo", "Host: localhost:8443", host=False), (200,), None, False
    ),
    # --- Expect (RFC 9110 §10.1.1) -------------------------------------------------------------
    "expect-other": Case(
        req("/echo", "Expect: 200-ok", "Content-Length: 1", method="POST", body=b"x"),
        (417,),
        "expectation-unsupported",
        True,
    ),
    # The body came with the head: RFC 9110 §10.1.1 lets the server skip the 100.
    "expect-100-continue-body-sent": Case(
        req("/upload", "Expect: 100-continue", "Content-Length: 5", method="POST", body=b"hello"),
        (200,),
        None,
        False,
    ),
    # --- limits answered before the work -------------------------------------------------------
    "target-too-long": Case(req("/echo?" + "a" * 9000), (414,), "target-too-long", True),
    "header-line-too-long": Case(
        req("/echo", "X-Big: " + "a" * 9000), (431,), "header-too-large", True
    ),
    "too-many-headers": Case(
        req("/echo", *(f"X-H{i}: v" for i in range(101))), (431,), "header-too-large", True
    ),
    "body-over-route-limit": Case(
        req("/upload", "Content-Length: 2000000", method="POST"),
        (413,),
        "body-too-large",
        True,
    ),
    # --- keep-alive and pipelining -------------------------------------------------------------
    "pipelined-in-order": Case(
        req("/echo?1") + req("/echo?2") + req("/echo?3"), (200, 200, 200), None, False
    ),
    "pipelined-invalid-after-valid": Case(
        req("/echo?1") + req("/echo?2") + b"GET /x HTTP/1.1\r\nHo st: a\r\n\r\n",
        (200, 200, 400),
        "request-invalid",
        True,
    ),
    "pipelined-smuggle-behind-valid": Case(
        req("/echo?1")
        + req("/echo", "Content-Length: 4", "Transfer-Encoding: chunked", method="POST")
        + b"0\r\n\r\n",
        (200, 400),
        "request-invalid",
        True,
    ),
    "pipelined-post-then-get": Case(
        req("/upload", "Content-Length: 3", method="POST", body=b"abc") + req("/echo?after"),
        (200, 200),
        None,
        False,
    ),
    "http-1.0-closes": Case(req(version="HTTP/1.0"), (200,), None, True),
    "connection-close": Case(req("/echo", "Connection: close"), (200,), None, True),
    "declined-h2c-upgrade-closes": Case(
        req("/echo", "Upgrade: h2c", "Connection: Upgrade, HTTP2-Settings", "HTTP2-Settings: x"),
        (200,),
        None,
        True,
    ),
    "chunked-upload": Case(
        req("/upload", "Transfer-Encoding: chunked", method="POST")
        + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        (200,),
        None,
        False,
    ),
    "head-has-no-body": Case(
        req("/download?size=10", method="HEAD") + req(), (200, 200), None, False
    ),
}


async def exchange_all(gw: Gateway, certs: Certs, case: Case) -> tuple[list[RawResponse], bool]:
    async with raw_tls(certs, gw) as (reader, writer):
        writer.write(case.data)
        await writer.drain()
        answers = []
        for status in case.statuses:
            head = b"HEAD" in case.data and status == 200 and not answers
            answers.append(await read_response(reader, head=head))
        closed = await closed_by_peer(reader, 1.0)
    return answers, closed


@pytest.mark.parametrize("name", list(CASES))
async def test_raw_request_bytes(gateway_factory: GatewayFactory, certs: Certs, name: str) -> None:
    app = {"name": "app", "prefix": "/", "upstream": "demo", "client_max_size": 1_000_000}
    gw = await gateway_factory({"routes": [app]})
    case = CASES[name]
    answers, closed = await exchange_all(gw, certs, case)
    assert tuple(a.status for a in answers) == case.statuses, [a.body[:200] for a in answers]
    last = answers[-1]
    assert last.headers["Server"] == "ztgateway"
    assert last.headers.get("X-ZT-Decision-Id")
    if case.reason is not None:
        problem = last.problem()
        assert problem["reason"] == case.reason
        assert problem["decision_id"] == last.headers["X-ZT-Decision-Id"]
        event = await audit_event(gw, problem["decision_id"])
        assert event["result"]["reason"] == case.reason
        assert event["result"]["verdict"] == "deny"
        assert b"/smuggled" not in json.dumps(event).encode()
    assert closed is case.closes, "connection closed" if closed else "connection kept open"


async def test_slow_body_is_answered_408_and_closed(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory({"server": {"body_timeout": 0.5}})
    async with raw_tls(certs, gw) as (reader, writer):
        writer.write(req("/upload", "Content-Length: 10", method="POST", body=b"ab"))
        await writer.drain()
        started = time.monotonic()
        r = await read_response(reader)
        assert await closed_by_peer(reader, 2.0)
    assert time.monotonic() - started < 3.0
    assert (r.status, r.problem()["reason"]) == (408, "request-timeout")
    assert (
        gw.metrics.registry.get_sample_value("ztgw_connection_timeouts_total", {"timer": "body"})
        == 1
    )


async def test_slow_reader_is_cut_off_with_a_bounded_buffer(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory({"server": {"send_timeout": 0.5}})
    async with raw_tls(certs, gw) as (reader, writer):
        # 200 MB the client never reads: the gateway's buffer fills, then it gives up.
        writer.write(req("/download?size=200000000"))
        await writer.drain()
        await asyncio.sleep(2.5)
        assert await closed_by_peer(reader, 3.0)
    assert (
        gw.metrics.registry.get_sample_value(
            "ztgw_connection_timeouts_total", {"timer": "slow_reader"}
        )
        == 1
    )


async def test_idle_keep_alive_is_closed_after_idle_timeout(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory({"server": {"idle_timeout": 0.5}})
    async with raw_tls(certs, gw) as (reader, writer):
        writer.write(req())
        await writer.drain()
        assert (await read_response(reader)).status == 200
        assert await closed_by_peer(reader, 3.0)


async def test_shutdown_finishes_the_request_in_progress_and_closes(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory()
    async with raw_tls(certs, gw) as (reader, writer):
        writer.write(req("/slow?delay=0.5"))
        await writer.drain()
        await asyncio.sleep(0.1)
        stopping = asyncio.ensure_future(gw.listener.close(5.0))  # type: ignore[union-attr]
        r = await read_response(reader)
        assert r.status == 200
        assert r.headers.get("Connection") == "close"
        assert await closed_by_peer(reader, 2.0)
        await stopping
