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
from typing import Any

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


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # aiohttp's access log duplicates our audit trail; keep its errors only.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
