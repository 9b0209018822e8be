"""Repeated log lines are rate-limited, and what was held back is counted (issue 19: an
upstream outage logged one WARNING per request)."""

from __future__ import annotations

import logging

from ztgateway.clock import ManualClock
from ztgateway.logs import RateLimit


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def logger_with(limit: RateLimit) -> tuple[logging.Logger, Collect]:
    handler = Collect()
    handler.addFilter(limit)
    log = logging.getLogger("ztgateway.test-rate-limit")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    return log, handler


def test_a_burst_passes_the_rest_is_counted_and_reported_when_the_window_ends() -> None:
    clock = ManualClock(1_000_000.0)
    limit = RateLimit(burst=5, window=10.0, clock=clock)
    suppressed: list[int] = []
    limit.on_suppressed = lambda: suppressed.append(1)
    log, out = logger_with(limit)
    for n in range(100):
        log.warning("upstream %s %s: %s", "demo", "connect", f"refused #{n}")
    assert len(out.lines) == 5
    assert len(suppressed) == 95
    clock.advance(10)
    log.warning("upstream %s %s: %s", "demo", "connect", "refused again")
    assert out.lines[-1] == (
        "upstream demo connect: refused again (95 similar lines suppressed in the previous 10s)"
    )


def test_another_upstream_is_not_hidden_by_the_first() -> None:
    limit = RateLimit(burst=1, window=10.0, clock=ManualClock(0.0))
    log, out = logger_with(limit)
    for _ in range(10):
        log.warning("upstream %s %s: %s", "billing", "timeout", "x")
    log.warning("upstream %s %s: %s", "wiki", "connect", "y")
    assert out.lines == ["upstream billing timeout: x", "upstream wiki connect: y"]


def test_a_kind_that_went_quiet_gets_a_closing_summary() -> None:
    clock = ManualClock(0.0)
    limit = RateLimit(burst=2, window=10.0, clock=clock)
    log, out = logger_with(limit)
    for _ in range(7):
        log.warning("TLS handshake refused from %s: %s", "192.0.2.1", "unknown_ca")
    limit.summaries()  # the window is still open: nothing yet
    assert len(out.lines) == 2
    clock.advance(11)
    limit.summaries()
    assert out.lines[-1] == (
        "5 lines like 'TLS handshake refused from %s: %s' suppressed in the last 10s"
    )
    limit.summaries()
    assert len(out.lines) == 3  # said once
