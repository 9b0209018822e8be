"""Structured logs: one JSON object per line, carrying the decision id of the request that
was being handled when the line was written (a context variable set by the request handler),
so a log line, an audit event and the client's X-ZT-Decision-Id can be joined.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .clock import SYSTEM_CLOCK, Clock

decision_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "decision_id", default=None
)

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        decision_id = decision_id_var.get()
        if decision_id:
            out["decision_id"] = decision_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = (
                    value if isinstance(value, str | int | float | bool | None) else str(value)
                )
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        decision_id = decision_id_var.get()
        return f"{text} [decision {decision_id}]" if decision_id else text


@dataclass(slots=True)
class _Window:
    started: float
    passed: int = 0
    suppressed: int = 0
    level: int = logging.INFO
    template: str = ""
    logger: str = ""


class RateLimit(logging.Filter):
    """At most `burst` lines of one kind per `window` seconds; the rest are counted, not written.

    Issue 19: an upstream outage logged one WARNING per request (100 lines/s in the soak, 2,500/s
    at the benchmark's rate), which buries everything else and costs I/O exactly when the
    gateway is under stress. A kind is the logger, the level, the message template and its
    first argument (the upstream's name, a client's address), so one failing upstream does not
    hide another's first line. When a window ends, the next line of its kind says how many were
    held back, and `summaries()` (called by the gateway every window) writes a line for kinds
    that went quiet; `on_suppressed` counts them in `ztgw_log_lines_suppressed_total`.
    """

    def __init__(
        self,
        *,
        burst: int = 5,
        window: float = 10.0,
        max_kinds: int = 2048,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self.max_kinds = max_kinds
        self.clock = clock
        self.on_suppressed: Callable[[], None] | None = None
        self._kinds: OrderedDict[tuple[Any, ...], _Window] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "ratelimit_summary", False):
            return True
        args = record.args
        first = args[0] if isinstance(args, tuple) and args else None
        if not isinstance(first, str | int) or (isinstance(first, str) and len(first) > 100):
            first = None
        key = (record.name, record.levelno, str(record.msg), first)
        now = self.clock.monotonic()
        w = self._kinds.get(key)
        if w is None or now - w.started >= self.window:
            held = w.suppressed if w is not None else 0
            w = _Window(now, 1, 0, record.levelno, str(record.msg), record.name)
            self._kinds[key] = w
            self._kinds.move_to_end(key)
            while len(self._kinds) > self.max_kinds:
                self._kinds.popitem(last=False)
            if held:
                record.msg = f"{record.msg} (%d similar lines suppressed in the previous %gs)"
                record.args = (*(args if isinstance(args, tuple) else (args,)), held, self.window)
            return True
        if w.passed < self.burst:
            w.passed += 1
            return True
        w.suppressed += 1
        if self.on_suppressed is not None:
            self.on_suppressed()
        return False

    def summaries(self, *, final: bool = False) -> None:
        """A closing line for each kind whose window ended (every kind, when `final`: at
        shut-down) with lines held back."""
        now = self.clock.monotonic()
        for key, w in list(self._kinds.items()):
            if final or now - w.started >= self.window:
                del self._kinds[key]
                if w.suppressed:
                    logging.getLogger(w.logger).log(
                        w.level,
                        "%d lines like %r suppressed in the last %gs",
                        w.suppressed,
                        w.template,
                        round(min(now - w.started, self.window), 1),
                        extra={"ratelimit_summary": True},
                    )


def setup_logging(level: str = "info", fmt: str = "json") -> RateLimit:
    """Log to stderr, rate-limited (RateLimit); returns the filter for the gateway to drive."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    limit = RateLimit()
    handler.addFilter(limit)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # aiohttp's access log duplicates our audit trail; keep its errors only.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return limit
