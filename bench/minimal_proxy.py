"""A reference, not a product: the least Python that can proxy over the same mTLS.

Issue 14 measured such a server at 1.04 x nginx's CPU per request: an `asyncio.Protocol` with
httptools on uvloop, terminating the same mTLS (`create_server(ssl=...)`), forwarding each
request over pooled keep-alive upstream connections and writing the upstream's answer (head
and body) to the client in one `transport.write` from the upstream protocol's callback. No
Task, no limits, no timeouts, no header hygiene, no pipelining beyond one request at a time
per connection, no error handling: it shows what the transport costs in Python at the least,
so `floor` (ztgateway's own protocol, with everything this one leaves out) can be read against
it.

    python -m bench.minimal_proxy --port 9443 --upstream http://127.0.0.1:18080 \
        --cert server.pem --key server.key --ca ca.pem --crl ca.crl
"""

from __future__ import annotations

import asyncio

import httptools
from yarl import URL

from bench.naive_proxy import mtls_context, proxy_args
from bench.upstream import stopped

SKIP_UP = frozenset({b"connection", b"keep-alive", b"content-length", b"transfer-encoding"})
SKIP_DOWN = frozenset({b"connection", b"keep-alive", b"host"})


class _Parsed(asyncio.Protocol):
    """A socket whose bytes go straight into llhttp; the parser calls back on this object."""

    parser: httptools.HttpRequestParser | httptools.HttpResponseParser
    transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)


class Upstream(_Parsed):
    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool
        self.client: Client | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def on_message_begin(self) -> None:
        self.headers = []
        self.body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        assert isinstance(self.parser, httptools.HttpResponseParser)
        parts = [b"HTTP/1.1 %d OK\r\n" % self.parser.get_status_code()]
        parts += [n + b": " + v + b"\r\n" for n, v in self.headers if n.lower() not in SKIP_UP]
        parts.append(b"Content-Length: %d\r\n\r\n" % len(body))
        parts.append(body)
        client, self.client = self.client, None
        self.pool.append(self)
        if client is not None and client.transport is not None:
            client.transport.write(b"".join(parts))


class Client(_Parsed):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        assert isinstance(self.parser, httptools.HttpRequestParser)
        parts = [self.parser.get_method() + b" " + self.url + b" HTTP/1.1\r\n"]
        parts += [n + b": " + v + b"\r\n" for n, v in self.headers if n.lower() not in SKIP_DOWN]
        parts.append(b"Host: %s\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n" % self.proxy.host)
        self.proxy.send(self, b"".join(parts))


class Proxy:
    def __init__(self, upstream: str) -> None:
        url = URL(upstream)
        self.address = (url.host or "127.0.0.1", url.port or 80)
        self.host = f"{self.address[0]}:{self.address[1]}".encode()
        self.pool: list[Upstream] = []
        self.connecting: set[asyncio.Task[None]] = set()

    def send(self, client: Client, request: bytes) -> None:
        if self.pool:
            up = self.pool.pop()
            up.client = client
            assert up.transport is not None
            up.transport.write(request)
            return
        task = asyncio.get_running_loop().create_task(self.connect(client, request))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    async def connect(self, client: Client, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(lambda: Upstream(self.pool), *self.address)
        up.client = client
        assert up.transport is not None
        up.transport.write(request)


async def serve() -> None:
    args = proxy_args("python -m bench.minimal_proxy")
    proxy = Proxy(args.upstream)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Client(proxy), args.host, args.port, ssl=mtls_context(args), backlog=1024
    )
    await stopped()
    server.close()


def main() -> None:
    import uvloop

    uvloop.run(serve())


if __name__ == "__main__":
    main()
