"""The benchmark's upstream: a raw asyncio (uvloop) HTTP/1.1 server with one fixed response.

Every scenario (direct, nginx, ztgateway) proxies to this same process. It is deliberately not
the demo app: an aiohttp application spends ~100 µs of CPU per request, which on a 2-core
machine would steal CPU from the proxy under test and cap nginx long before nginx is the
limit. This server only frames requests (head up to the blank line, then Content-Length or
chunked body, which it discards) and answers every one with the same small 200 response, with
keep-alive and pipelining, so its cost per request is a few microseconds of Python.

    python -m bench.upstream --port 18080
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

BODY = b'{"ok":true,"upstream":"bench"}\n'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n"
    b"\r\n" + BODY
)
RESPONSE_CLOSE = RESPONSE.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
MAX_HEAD = 64 * 1024


class _Http(asyncio.Protocol):
    __slots__ = ("_body_left", "_buf", "_chunked", "_transport")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._body_left = 0
        self._chunked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        close = False
        while True:
            if self._body_left:
                take = min(self._body_left, len(buf))
                del buf[:take]
                self._body_left -= take
                if self._body_left:
                    break
            if self._chunked:
                end = buf.find(b"\r\n0\r\n\r\n")
                if end < 0 and not buf.startswith(b"0\r\n\r\n"):
                    # Keep the tail: the terminator may straddle two reads.
                    if len(buf) > 8:
                        del buf[: len(buf) - 8]
                    break
                del buf[: (end + 7) if end >= 0 else 5]
                self._chunked = False
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    close = True
                break
            head = bytes(buf[:end]).lower()
            del buf[: end + 4]
            if b"content-length:" in head:
                value = head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]
                self._body_left = int(value.strip() or b"0")
            elif b"transfer-encoding:" in head and b"chunked" in head:
                self._chunked = True
            if b"connection: close" in head or head.split(b"\r\n", 1)[0].endswith(b"http/1.0"):
                out.append(RESPONSE_CLOSE)
                close = True
                break
            out.append(RESPONSE)
        t = self._transport
        if t is None:
            return
        if out:
            t.write(b"".join(out))
        if close:
            t.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Http, host, port, backlog=4096, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    print(f"bench upstream listening on http://{host}:{bound} pid {os.getpid()}", flush=True)
    await stopped()
    server.close()


async def stopped() -> None:
    """Return on SIGTERM or SIGINT (the bench stops its processes with SIGTERM)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.upstream")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18080)
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
