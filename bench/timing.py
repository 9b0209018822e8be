"""What the micro-benchmarks share: how a batch of operations is sized before it is timed."""

from __future__ import annotations

import gc
import time
from collections.abc import Awaitable, Callable

Body = Callable[[int], Awaitable[None]]
Setup = Callable[[int], Awaitable[Body]]


async def batch_size(setup: Setup, target: float) -> int:
    """How many operations take about `target` seconds (grown 4-fold or 2-fold from 1, then scaled)."""
    n = 1
    while True:
        body = await setup(n)
        gc.collect()
        t0 = time.perf_counter()
        await body(n)
        elapsed = time.perf_counter() - t0
        if elapsed >= target / 4 or n >= 10_000_000:
            break
        n *= 4 if elapsed < target / 40 else 2
    return max(1, int(n * target / max(elapsed, 1e-9)))
