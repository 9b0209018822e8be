"""The fast path of forwarding: one request, no Task, no Future.

A request without a body, sent over an idle keep-alive connection of the pool, is the common
case of a gateway in front of legacy web apps (issue 14). Here it is driven entirely by the two
protocols' callbacks: the request head is written from the client connection's
`data_received` (where the decision was taken inline), and the upstream connection's
`data_received` writes the client's answer, head and body in one `transport.write`, then puts
the connection back in the pool. Nothing here awaits, so nothing needs a Task.

Everything else keeps the coroutine path of `forward.http` and its flow control, started from
here when it is needed: a response too large to buffer, or of unknown length, is streamed by
`relay()` in a Task (backpressure both ways); a kept-alive connection the upstream had closed
as we picked it is retried over `forward_http()` (RFC 9110 §9.2.2); a request with a body,
or no idle connection, never comes here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from ..clock import Clock
from ..config import RouteConfig
from ..edge.http1 import Request
from .http import client_head, fault, relay, small_answer
from .upstream import IDEMPOTENT, UpstreamConnection, UpstreamFailure, UpstreamPool

Done = Callable[[int | None, BaseException | None], None]
"""Called once with the upstream's status, or the fault that ended the exchange: it records
the outcome and answers a fault the client has no answer for yet (it raises what it cannot
answer). The protocol is then told the request is over (`Connection.finish`)."""


class Exchange:
    """One request forwarded over one pooled connection, stepped by the upstream's callbacks."""

    __slots__ = (
        "clock",
        "conn",
        "decision_id",
        "done",
        "extra_headers",
        "fallback",
        "on_head",
        "out",
        "pool",
        "request",
        "response",
        "route",
        "started",
    )

    def __init__(
        self,
        request: Request,
        route: RouteConfig,
        pool: UpstreamPool,
        conn: UpstreamConnection,
        *,
        decision_id: str,
        extra_headers: dict[str, str] | None,
        on_head: Callable[[float], None] | None,
        done: Done,
        fallback: Callable[[], Coroutine[Any, Any, None]],
        clock: Clock,
    ) -> None:
        self.request = request
        self.route = route
        self.pool = pool
        self.conn = conn
        self.decision_id = decision_id
        self.extra_headers = extra_headers
        self.on_head = on_head
        self.done = done
        self.fallback = fallback
        self.clock = clock
        self.started = clock.monotonic()
        self.out: tuple[list[tuple[str, str]], int | None] | None = None
        self.response = conn.start(head_only=request.method == "HEAD")

    def step(self) -> None:
        """The upstream connection made progress (head, body bytes, end, or a fault)."""
        conn, response = self.conn, self.response
        error = conn._error
        if error is not None:
            self._failed(error)
            return
        if not response.headers_done:
            return
        if self.out is None:
            if self.on_head is not None:
                self.on_head(self.clock.monotonic() - self.started)
            self.out = client_head(response, self.decision_id, self.extra_headers)
            if not small_answer(response, self.out[1]):
                # Large or of unknown length: streamed with backpressure, which awaits.
                conn.sink = None
                self._in_task(self._stream())
                return
        out = self.out[0]
        if not response.complete:
            return
        conn.sink = None
        request = self.request
        try:
            if response.head_only or response.status in (204, 304):
                # The upstream's Content-Length is kept (RFC 9110 §9.3.2), with no body.
                request.start(
                    response.status, out, reason=response.reason, content_length=self.out[1]
                ).end()
            else:
                data = b"".join(response.chunks)
                response.chunks.clear()
                response.buffered = 0
                request.respond(response.status, out, data, reason=response.reason)
        finally:
            self.pool.release(conn, reuse=True)
        self._end(response.status, None)

    def _end(self, status: int | None, error: BaseException | None) -> None:
        request = self.request
        try:
            self.done(status, error)
        except Exception as unexpected:  # the protocol answers a stage error
            request.conn.finish(request, unexpected)
            return
        request.conn.finish(request)

    def _failed(self, error: BaseException) -> None:
        conn, response, request = self.conn, self.response, self.request
        conn.sink = None
        self.pool.release(conn, reuse=False)
        if (
            isinstance(error, UpstreamFailure)
            and error.kind == "reset"
            and conn.reused
            and not response.received_any
            and request.method in IDEMPOTENT
        ):
            # The kept-alive connection was closed by the upstream as we picked it: nothing
            # was received, so repeating the request is harmless (RFC 9110 §9.2.2).
            self._in_task(self._retry())
            return
        if isinstance(error, Exception):
            try:
                fault(request, self.route, error)
            except Exception as exc:  # the request path answers it
                self._end(None, exc)
                return
        self._end(None, error)

    async def _retry(self) -> None:
        request = self.request
        try:
            await self.fallback()
        except Exception as exc:  # the protocol answers a stage error
            request.conn.finish(request, exc)
            return
        request.conn.finish(request)

    async def _stream(self) -> None:
        try:
            status = await relay(
                self.request,
                self.route,
                self.pool,
                self.conn,
                self.response,
                decision_id=self.decision_id,
                extra_headers=self.extra_headers,
            )
        except Exception as exc:  # the request path answers it
            self._end(None, exc)
            return
        self._end(status, None)

    def _in_task(self, coro: Coroutine[Any, Any, None]) -> None:
        self.request.conn.adopt(asyncio.get_running_loop().create_task(coro))


def start_exchange(
    request: Request,
    route: RouteConfig,
    pool: UpstreamPool,
    head: bytes,
    *,
    decision_id: str,
    extra_headers: dict[str, str] | None = None,
    on_head: Callable[[float], None] | None,
    done: Done,
    fallback: Callable[[], Coroutine[Any, Any, None]],
    clock: Clock,
) -> bool:
    """Send a request without a body over an idle pooled connection; `done` is called when it
    has been answered. False when no connection is idle (the caller awaits `forward_http`)."""
    conn = pool.take_idle()
    if conn is None:
        return False
    exchange = Exchange(
        request,
        route,
        pool,
        conn,
        decision_id=decision_id,
        extra_headers=extra_headers,
        on_head=on_head,
        done=done,
        fallback=fallback,
        clock=clock,
    )
    conn.sink = exchange.step
    request.deferred = True
    try:
        conn.write(head)
    except UpstreamFailure as fail:
        conn.fail(fail)
        return True
    conn.arm_timeout(route.upstream.read_timeout)
    return True
