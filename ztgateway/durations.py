"""Durations as people write them: `90s`, `30m`, `1h`, `7d`, `2w`, `1h30m`.

One parser for the command line and the configuration files, so `30m` means the same in
`ztgateway users lock --for 30m` and in `idle_timeout = "30m"`.
"""

from __future__ import annotations

import math
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str, *, default_unit: str = "s") -> float:
    """Seconds in `text`: `45s`, `30m`, `1h30m`, `7d`, `2w`, or a bare number in `default_unit`.

    Raises ValueError with a message fit for a person (negative and empty values too).
    """
    value = text.strip().lower()
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if number < 0 or math.isnan(number) or math.isinf(number):
            raise ValueError(f"not a usable duration: {text!r}")
        return number * _UNITS[default_unit]
    if not value or _DURATION.fullmatch(value) is None:
        raise ValueError(f"expected a duration like 90s, 30m, 1h, 7d or 1h30m, not {text!r}")
    return sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(value))


def fmt_duration(seconds: float) -> str:
    """`2h05m`, `45s`, `3d04h`: the two largest units, for a person."""
    s = round(max(0.0, seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"
