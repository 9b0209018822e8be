"""Code that needs a current Task, on a data plane that runs requests without one.

The HTTP/1.1 protocol steps each request's coroutine inline, from `data_received`
(`http1.Connection._run`): a request decided from memory and forwarded over an idle pooled
connection never needs a Task. Whatever really waits moves the rest of the request into a Task
the first time it awaits. Two things must not run before that move, because they ask for the
current Task as soon as they are entered, before any await: `asyncio.timeout()` (used by the
upstream pool and the Redis store) and aiohttp's client timers (JWKS, OIDC, the WebSocket
upstream). `await in_task()` in front of them yields once when there is no current Task, so
they always find one.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Generator


@types.coroutine
def _step_later() -> Generator[None, None, None]:
    # A bare yield: asyncio's Task reschedules itself with call_soon (and our inline stepper
    # hands the coroutine to a new Task).
    yield


async def in_task() -> None:
    """Make sure the caller runs inside a Task (a no-op when it already does)."""
    if asyncio.current_task() is None:
        await _step_later()
