"""A deliberately insecure "legacy" web app for the gateway to protect.

`make run` puts it behind the gateway and every end-to-end test proxies to it. It has no
authentication, no CSRF protection and no input limits of its own: the gateway is supposed to
supply all of that, so anything the upstream does on its own would hide gateway bugs.

What it does instead is report, as faithfully as aiohttp allows, what actually reached it
(method, raw path, every header in order with duplicates, body hash) and misbehave on request
(slow answers, huge or compressed bodies, odd statuses, abrupt resets). That is what a proxy test
needs to observe on the far side of the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hashlib
import html
import http
import json
import math
import signal
import socket
import ssl
import struct
import sys
from collections.abc import Iterator
from typing import Final

from aiohttp import WSMsgType, hdrs, web

__all__ = [
    "DOWNLOAD_CHUNK_SIZE",
    "DOWNLOAD_DEFAULT_SIZE",
    "DOWNLOAD_MAX_SIZE",
    "GZIP_PLAINTEXT",
    "IDENTITY_HEADERS",
    "create_demo_app",
    "expected_download_sha256",
    "main",
    "start_demo_app",
]

IDENTITY_HEADERS: Final[tuple[str, ...]] = (
    "X-Forwarded-User",
    "X-Forwarded-Email",
    "X-Forwarded-Groups",
    "X-ZT-Device-Id",
)

DOWNLOAD_CHUNK_SIZE: Final = 64 * 1024
DOWNLOAD_DEFAULT_SIZE: Final = 1024 * 1024
DOWNLOAD_MAX_SIZE: Final = 1024 * 1024 * 1024

GZIP_PLAINTEXT: Final = b"hello gzip\n" * 100

_MAX_DELAY: Final = 60.0
_MAX_BIG_HEADERS: Final = 10_000
_WS_MAX_MSG_SIZE: Final = 16 * 1024 * 1024
# A legacy app that takes a minute to drain would make every test teardown that slow; in-flight
# requests of a test upstream are not worth waiting for.
_SHUTDOWN_TIMEOUT: Final = 1.0
_TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})

# 256 repetitions of 0..255: every full chunk is identical, so the stream needs no state and
# expected_download_sha256 can rebuild it exactly.
_PATTERN_CHUNK: Final = bytes(range(256)) * (DOWNLOAD_CHUNK_SIZE // 256)
# mtime=0 keeps the compressed bytes identical across runs, so tests may compare them verbatim.
_GZIP_BODY: Final = gzip.compress(GZIP_PLAINTEXT, mtime=0)


def _pattern_chunks(size: int) -> Iterator[bytes]:
    for offset in range(0, size, DOWNLOAD_CHUNK_SIZE):
        yield _PATTERN_CHUNK[: min(DOWNLOAD_CHUNK_SIZE, size - offset)]


def expected_download_sha256(size: int) -> str:
    """The hex sha256 that `GET /download?size=<size>` streams.

    A digest header cannot be sent ahead of a streamed gigabyte, so tests recompute it here.
    """
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    digest = hashlib.sha256()
    for chunk in _pattern_chunks(size):
        digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# helpers


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer\n") from None
    if not low <= value <= high:
        raise web.HTTPBadRequest(text=f"{name} must be between {low} and {high}\n")
    return value


def _delay_query(request: web.Request) -> float:
    raw = request.query.get("delay", "1")
    try:
        delay = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text="delay must be a number of seconds\n") from None
    if not math.isfinite(delay) or not 0.0 <= delay <= _MAX_DELAY:
        raise web.HTTPBadRequest(text=f"delay must be between 0 and {_MAX_DELAY:g}\n")
    return delay


def _flag_query(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in _TRUE_WORDS


async def _consume_body(request: web.Request) -> tuple[int, str]:
    """Hash the body chunk by chunk so a 200 MB upload costs a few buffers, not 200 MB."""
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_chunked(DOWNLOAD_CHUNK_SIZE):
        digest.update(chunk)
        length += len(chunk)
    return length, digest.hexdigest()


def _decode(raw: bytes) -> str:
    # Same decoding aiohttp uses for request.headers, so both views agree and bytes survive.
    return raw.decode("utf-8", "surrogateescape")


def _header_report(request: web.Request) -> dict[str, object]:
    pairs = [[_decode(name), _decode(value)] for name, value in request.raw_headers]
    headers_map = {name.lower(): value for name, value in pairs}
    return {"headers": pairs, "headers_map": headers_map}


def _tls_report(request: web.Request) -> dict[str, object] | None:
    transport = request.transport
    if transport is None:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None
    cipher = ssl_object.cipher()
    return {
        "version": ssl_object.version(),
        "cipher": cipher[0] if cipher else None,
        "peer_subject": _peer_subject(ssl_object.getpeercert()),
    }


def _peer_subject(peer: object) -> str | None:
    """Flatten getpeercert()'s nested RDN tuples; None when no verified client certificate."""
    if not isinstance(peer, dict):
        return None
    subject = peer.get("subject")
    if not isinstance(subject, tuple):
        return None
    parts = [
        f"{attr[0]}={attr[1]}"
        for rdn in subject
        if isinstance(rdn, tuple)
        for attr in rdn
        if isinstance(attr, tuple) and len(attr) == 2
    ]
    return ",".join(parts)


def _page(title: str, body: str) -> web.Response:
    document = (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title></head>\n"
        f"<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )
    return web.Response(text=document, content_type="text/html", charset="utf-8")


# ---------------------------------------------------------------------------------------------
# handlers


async def _home(request: web.Request) -> web.Response:
    rows = []
    for name in IDENTITY_HEADERS:
        # getall, not get: a spoofed duplicate that slipped through must be visible.
        values = request.headers.getall(name, [])
        shown = (
            "<br>".join(f"<code>{html.escape(v)}</code>" for v in values)
            if values
            else "<em>(not set)</em>"
        )
        rows.append(f"<tr><th>{html.escape(name)}</th><td>{shown}</td></tr>")
    links = [
        ("/form", "Expense form"),
        ("/echo", "Request echo (JSON)"),
        ("/download?size=1024", "Download 1 KiB"),
        ("/cookie", "Set a cookie"),
        ("/gzip", "Gzip body"),
        ("/slow?delay=1", "Slow answer (1 s)"),
        ("/status/503", "Status 503"),
        ("/big-headers?n=10", "Ten extra headers"),
    ]
    link_items = "\n".join(
        f'<li><a href="{html.escape(href)}">{html.escape(text)}</a></li>' for href, text in links
    )
    body = (
        "<p>Internal payroll system. Trusts whatever identity headers it is given.</p>\n"
        f'<table id="identity">\n{"".join(rows)}\n</table>\n'
        f"<ul>\n{link_items}\n</ul>"
    )
    return _page("Acme Payroll (legacy)", body)


async def _form_get(request: web.Request) -> web.Response:
    body = (
        '<form method="post" action="/form">\n'
        '<label>Employee <input name="employee"></label><br>\n'
        '<label>Amount <input name="amount" type="number"></label><br>\n'
        '<label>Note <textarea name="note"></textarea></label><br>\n'
        '<button type="submit">Submit</button>\n'
        "</form>"
    )
    return _page("Acme Payroll: expense claim", body)


async def _form_post(request: web.Request) -> web.Response:
    fields = await request.post()
    rows = []
    for name, value in fields.items():
        if isinstance(value, str):
            shown = value
        elif isinstance(value, bytes | bytearray):
            shown = bytes(value).decode("utf-8", "replace")
        else:
            shown = f"(file {value.filename})"
        rows.append(f"<tr><th>{html.escape(name)}</th><td>{html.escape(shown)}</td></tr>")
    body = f'<p>Received {len(rows)} field(s).</p>\n<table id="fields">\n{"".join(rows)}\n</table>'
    return _page("Acme Payroll: claim received", body)


async def _echo(request: web.Request) -> web.Response:
    length, sha256 = await _consume_body(request)
    # raw_path is the request target exactly as sent; request.path would be decoded and
    # possibly dot-normalised, hiding what the proxy really forwarded.
    raw_path = request.raw_path
    path, _, query = raw_path.partition("?")
    report: dict[str, object] = {
        "method": request.method,
        "path": path,
        "raw_path": raw_path,
        "query": query,
        **_header_report(request),
        "body_sha256": sha256,
        "body_length": length,
        "remote": request.remote,
        "scheme": request.scheme,
        "http_version": f"{request.version.major}.{request.version.minor}",
        "tls": _tls_report(request),
    }
    return web.json_response(report)


async def _websocket(request: web.Request) -> web.WebSocketResponse:
    offered = [
        proto.strip()
        for proto in request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").split(",")
        if proto.strip()
    ]
    # Accepting the first offered subprotocol lets tests see whether the proxy relays it.
    ws = web.WebSocketResponse(protocols=offered[:1], max_msg_size=_WS_MAX_MSG_SIZE)
    await ws.prepare(request)
    handshake = {"path": request.raw_path, **_header_report(request)}
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            if msg.data == "headers":
                await ws.send_str(json.dumps(handshake))
            elif msg.data == "close":
                await ws.close(code=1000, message=b"bye")
                break
            else:
                await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def _download(request: web.Request) -> web.StreamResponse:
    size = _int_query(request, "size", DOWNLOAD_DEFAULT_SIZE, 0, DOWNLOAD_MAX_SIZE)
    response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "application/octet-stream"})
    if _flag_query(request, "chunked"):
        # HTTP/1.0 has no chunking; leaving the length unset makes aiohttp delimit by close.
        if request.version >= (1, 1):
            response.enable_chunked_encoding()
    else:
        response.content_length = size
    await response.prepare(request)
    if request.method != hdrs.METH_HEAD:
        for chunk in _pattern_chunks(size):
            await response.write(chunk)
    await response.write_eof()
    return response


async def _upload(request: web.Request) -> web.Response:
    length, sha256 = await _consume_body(request)
    return web.json_response({"length": length, "sha256": sha256})


async def _slow(request: web.Request) -> web.Response:
    delay = _delay_query(request)
    await asyncio.sleep(delay)
    return web.Response(text=f"slept {delay:g}s\n")


async def _slow_body(request: web.Request) -> web.StreamResponse:
    delay = _delay_query(request)
    payload = f"body after {delay:g}s\n".encode()
    response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "text/plain; charset=utf-8"})
    response.content_length = len(payload)
    # StreamResponse.prepare flushes the status line and headers immediately.
    await response.prepare(request)
    if request.method != hdrs.METH_HEAD:
        await asyncio.sleep(delay)
        await response.write(payload)
    await response.write_eof()
    return response


async def _status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    # 1xx cannot be a final response and would desynchronise the connection.
    if not 200 <= code <= 599:
        raise web.HTTPBadRequest(text="status must be between 200 and 599\n")
    try:
        reason = http.HTTPStatus(code).phrase
    except ValueError:
        reason = "Unknown"
    # 205 is bodiless by RFC 9110 too, although aiohttp only enforces 204 and 304.
    if code in {204, 205, 304}:
        return web.Response(status=code, reason=reason)
    return web.Response(status=code, reason=reason, text=f"{code} {reason}\n")


async def _redirect(request: web.Request) -> web.Response:
    target = request.query.get("to", "/")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in target):
        raise web.HTTPBadRequest(text="to must not contain control characters\n")
    return web.Response(
        status=302, headers={hdrs.LOCATION: target}, text=f"redirecting to {target}\n"
    )


async def _gzip(request: web.Request) -> web.Response:
    return web.Response(
        body=_GZIP_BODY,
        headers={
            hdrs.CONTENT_TYPE: "text/plain; charset=utf-8",
            hdrs.CONTENT_ENCODING: "gzip",
        },
    )


async def _cookie(request: web.Request) -> web.Response:
    response = web.Response(text="cookie legacy=1 set\n")
    response.set_cookie("legacy", "1", path="/")
    return response


async def _big_headers(request: web.Request) -> web.Response:
    count = _int_query(request, "n", 10, 0, _MAX_BIG_HEADERS)
    headers = {f"X-Big-{i}": f"value-{i}" for i in range(count)}
    return web.Response(headers=headers, text=f"{count} extra headers\n")


async def _reset(request: web.Request) -> web.Response:
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0 turns close into a TCP RST: the proxy must see a reset, not a clean EOF.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    # Never delivered: the transport is gone and aiohttp drops writes to it quietly.
    return web.Response(status=500, text="connection was reset\n")


# ---------------------------------------------------------------------------------------------
# application and process entry points


def create_demo_app() -> web.Application:
    app = web.Application()
    router = app.router
    router.add_get("/", _home)
    router.add_get("/form", _form_get)
    router.add_post("/form", _form_post)
    router.add_get("/download", _download)
    router.add_post("/upload", _upload)
    router.add_get("/slow", _slow)
    router.add_get("/slow-body", _slow_body)
    router.add_get(r"/status/{code:\d{1,3}}", _status)
    router.add_get("/redirect", _redirect)
    router.add_get("/gzip", _gzip)
    router.add_get("/cookie", _cookie)
    router.add_get("/big-headers", _big_headers)
    router.add_get("/reset", _reset)
    # "/echo", "/api/echo", "/a/b/echo" but not "/xecho".
    router.add_route("*", "/{prefix:(?:.*/)?}echo", _echo)
    router.add_get("/{prefix:(?:.*/)?}ws", _websocket)
    return app


async def start_demo_app(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve the demo app in the running loop; port 0 picks a free port, returned to the caller.

    Handlers are cancelled when their client goes away, so an abandoned /slow does not keep
    the caller's runner.cleanup() waiting.
    """
    runner = web.AppRunner(
        create_demo_app(), handler_cancellation=True, shutdown_timeout=_SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound = runner.addresses[0][1]
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(bound)


async def _serve(host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
    runner, bound = await start_demo_app(host, port, ssl_context=ssl_context)
    try:
        scheme = "https" if ssl_context is not None else "http"
        shown_host = f"[{host}]" if ":" in host else host
        # Launchers (and the tests) read this line to learn the port when --port 0 was given.
        print(f"demo app listening on {scheme}://{shown_host}:{bound}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for signum in signals:
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ztgateway.dev.demo_app",
        description="Serve the insecure demo legacy app that the gateway protects.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate chain")
    parser.add_argument("--tls-key", metavar="KEY", help="private key for --tls-cert")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key must be given together")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")

    ssl_context: ssl.SSLContext | None = None
    if args.tls_cert is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            print(f"demo app: cannot load TLS certificate: {exc}", file=sys.stderr)
            return 2
    try:
        asyncio.run(_serve(args.host, args.port, ssl_context))
    except OSError as exc:
        print(f"demo app: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
