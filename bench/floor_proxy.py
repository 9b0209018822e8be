"""The transport floor: ztgateway's own data plane with every check taken out.

The same listener (TLS handshake run by us, certificate parsed once per connection), the same
HTTP/1.1 protocol (`ztgateway.edge.http1`, llhttp) and the same raw keep-alive upstream pool and
forwarding code (`ztgateway.forward.http`) as the gateway, but a handler that forwards every
request without a decision, audit, metrics or identity headers. What ztgateway costs above this
row is the price of its checks; what this row costs above nginx is the price of Python.

    python -m bench.floor_proxy --port 9443 --upstream http://127.0.0.1:18080 \
        --cert server.pem --key server.key --ca ca.pem --crl ca.crl
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

from multidict import CIMultiDict
from yarl import URL

from bench.naive_proxy import mtls_context, proxy_args
from ztgateway.app import tune_gc
from ztgateway.clock import SYSTEM_CLOCK
from ztgateway.config import RouteConfig, UpstreamConfig
from ztgateway.decision import new_decision_id
from ztgateway.edge.http1 import Connection, Limits, Refusal, Request
from ztgateway.edge.listener import Listener
from ztgateway.forward.exchange import start_exchange
from ztgateway.forward.http import Upstreams, forward_http, request_head
from ztgateway.forward.upstream import UpstreamFailure
from ztgateway.responses import problem_parts

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
)


class Floor:
    def __init__(self, upstream: str) -> None:
        up = UpstreamConfig(name="up", url=URL(upstream))
        self.route = RouteConfig(name="floor", prefix="/", upstream=up)
        self.upstreams = Upstreams()

    def handle(self, request: Request) -> Coroutine[Any, Any, None]:
        return self._forward(request)

    async def _forward(self, request: Request) -> None:
        headers = CIMultiDict(
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, v in request.raw_headers
            if n.lower().decode("latin-1") not in HOP_BY_HOP and n.lower() != b"host"
        )
        route = self.route
        pool = self.upstreams.pool(route.upstream)

        def answered(status: int | None, exc: BaseException | None) -> None:
            if isinstance(exc, UpstreamFailure):
                request.respond(*problem_parts(exc.reason, "-"))
            elif exc is not None:
                raise exc

        async def forward() -> None:
            try:
                await forward_http(request, route, pool, request.target, headers, decision_id="-")
            except UpstreamFailure as fail:
                request.respond(*problem_parts(fail.reason, "-"))

        # The gateway's own fast path (no Task, no Future), as in ztgateway.edge.request_path.
        if not request.body_exists:
            head = request_head(request.method, request.target, pool, headers, body=False)
            if start_exchange(
                request,
                route,
                pool,
                head,
                decision_id="-",
                on_head=None,
                done=answered,
                fallback=forward,
                clock=SYSTEM_CLOCK,
            ):
                return
        await forward()

    def refuse(
        self, conn: Connection, request: Request | None, refusal: Refusal
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        return problem_parts(refusal.reason, new_decision_id())

    def on_event(self, name: str) -> None:
        pass


async def serve(args: argparse.Namespace) -> None:
    ctx = mtls_context(args)
    loop = asyncio.get_running_loop()
    listener = Listener(
        handler=Floor(args.upstream),
        context=lambda: ctx,
        limits=Limits(),
        handshake_timeout=10.0,
        max_connections=20000,
        clock=SYSTEM_CLOCK.time,
        on_handshake=lambda version, failure: None,
        on_connection_change=lambda n: None,
        on_rejected=lambda reason: None,
    )
    await listener.start(args.host, args.port)
    tune_gc()  # as the gateway does after start-up (ztgateway.app.serve)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await listener.close(1.0)


def main() -> None:
    args = proxy_args("python -m bench.floor_proxy")
    import uvloop

    uvloop.run(serve(args))


if __name__ == "__main__":
    main()
