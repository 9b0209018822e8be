"""The protocol's inline stepping: a request coroutine that never waits needs no Task, and one
that waits is resumed in a Task exactly where it stopped (ztgateway.edge.http1._Resume)."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from ztgateway.edge.http1 import _Resume, _resumed
from ztgateway.edge.inline import in_task

step_var: contextvars.ContextVar[str] = contextvars.ContextVar("step_var", default="")


async def test_a_coroutine_that_waits_is_resumed_in_a_task_where_it_stopped() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[int] = loop.create_future()
    seen: list[str] = []

    async def request() -> None:
        seen.append("inline")
        step_var.set("set inline")
        value = await gate
        seen.append(f"resumed with {value}, {step_var.get()}")

    coro = request()
    context = contextvars.copy_context()
    waiting = context.run(coro.send, None)
    assert seen == ["inline"]
    assert step_var.get() == ""  # the request's context, not the caller's
    task = loop.create_task(_resumed(_Resume(coro, waiting)), context=context)
    gate.set_result(7)
    await task
    assert seen == ["inline", "resumed with 7, set inline"]


async def test_cancelling_the_task_reaches_the_coroutine_where_it_waits() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()
    cleaned: list[bool] = []

    async def request() -> None:
        try:
            await gate
        finally:
            cleaned.append(True)

    coro = request()
    task = loop.create_task(_resumed(_Resume(coro, coro.send(None))))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True]
    assert gate.cancelled()


async def test_in_task_yields_once_when_stepped_inline_and_never_inside_a_task() -> None:
    async def needs_task() -> asyncio.Task[object] | None:
        await in_task()
        return asyncio.current_task()

    coro = needs_task()
    # Stepped from a callback (no current Task) it yields a bare step...
    context = contextvars.copy_context()
    loop = asyncio.get_running_loop()
    inline_result: list[object] = []

    def callback() -> None:
        inline_result.append(coro.send(None))

    handle = loop.call_soon(callback, context=context)
    await asyncio.sleep(0)
    assert not handle.cancelled()
    assert inline_result == [None]
    # ...and, resumed in a Task, it runs in that Task.
    task = loop.create_task(_resumed(_Resume(coro, None)))
    await task
    assert await needs_task() is asyncio.current_task()
