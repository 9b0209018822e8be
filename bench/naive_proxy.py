"""A reference point, not a product: the simplest aiohttp reverse proxy terminating the same mTLS.

No checks, no audit, no metrics, no header hygiene: one aiohttp server (uvloop, the same
`ssl_verify_client`-style context as ztgateway) and one pooled aiohttp client session. Issue 9
quotes such a proxy at 2,700-3,600 req/s on this machine; measuring it in the same run shows
how much of ztgateway's cost per request is the aiohttp server + client it is built on, and how
much is its own work.

    python -m bench.naive_proxy --port 9443 --upstream http://127.0.0.1:18080 \
        --cert server.pem --key server.key --ca ca.pem
"""

from __future__ import annotations

import argparse
import ssl

import aiohttp
from aiohttp import web

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"}
)


def make_app(upstream: str) -> web.Application:
    app = web.Application()

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=30)
        app["session"] = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        )
        yield
        await app["session"].close()

    async def proxy(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with request.app["session"].request(
            request.method,
            upstream + request.raw_path,
            headers=headers,
            data=await request.read() if request.body_exists else None,
            allow_redirects=False,
        ) as up:
            body = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP}
            out.pop("Content-Length", None)
            return web.Response(status=up.status, body=body, headers=out)

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def proxy_args(prog: str) -> argparse.Namespace:
    """The command line of the reference proxies (this one and bench.floor_proxy)."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--crl")
    return p.parse_args()


def mtls_context(args: argparse.Namespace) -> ssl.SSLContext:
    """The same client-certificate verification as nginx's `ssl_verify_client on` + CRL."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(args.cert, args.key)
    ctx.load_verify_locations(cafile=args.ca)
    if args.crl:
        ctx.load_verify_locations(cafile=args.crl)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def main() -> None:
    args = proxy_args("python -m bench.naive_proxy")
    ctx = mtls_context(args)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    web.run_app(
        make_app(args.upstream.rstrip("/")),
        host=args.host,
        port=args.port,
        ssl_context=ctx,
        access_log=None,
        print=lambda *_: print(f"naive proxy on https://{args.host}:{args.port}", flush=True),
    )


if __name__ == "__main__":
    main()
