"""A moment said in the person's terms: their clock time in their time zone, and how long from
now ("until 14:35 (Europe/Paris), in 25 minutes").

`now` is the request's instant from the injectable clock (`ctx.now`), never the wall clock, so
a test moves time by moving the clock. The zone is the user's (`ztgateway users set --timezone`)
or `[risk] default_timezone`.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


def zone(name: str | None, default: str = "UTC") -> ZoneInfo:
    for candidate in (name, default, "UTC"):
        if candidate:
            try:
                return ZoneInfo(candidate)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return ZoneInfo("UTC")


def duration_words(seconds: float) -> str:
    """Rounded up to the minute: a lock that ends in 20 s ends "in 1 minute", not "in 0"."""
    minutes = max(1, int(-(-seconds // 60)))
    if minutes < 60:
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    hours, rest = divmod(minutes, 60)
    if hours < 48:
        text = f"{hours} hour{'s' if hours != 1 else ''}"
        return text + (f" {rest} minute{'s' if rest != 1 else ''}" if rest else "")
    days = round(minutes / 1440)
    return f"{days} days"


def clock_time(at: float, now: float, tz: ZoneInfo) -> str:
    """ "14:35 (Europe/Paris)" today; "Tue 8 Dec 14:35 (Europe/Paris)" on another day."""
    moment = dt.datetime.fromtimestamp(at, tz)
    today = dt.datetime.fromtimestamp(now, tz).date()
    label = tz.key
    if moment.date() == today:
        return f"{moment:%H:%M} ({label})"
    day = f"{moment:%a} {moment.day} {moment:%b}"
    if moment.year != today.year:
        day += f" {moment.year}"
    return f"{day} {moment:%H:%M} ({label})"


def until(at: float, now: float, tz: ZoneInfo) -> str:
    """ "14:35 (UTC), in 25 minutes"."""
    return f"{clock_time(at, now, tz)}, in {duration_words(at - now)}"


def moment(at: float | None, now: float, tz: ZoneInfo) -> str | None:
    """A past or future moment for a table row ("14:35 (UTC), 3 minutes ago")."""
    if at is None:
        return None
    delta = at - now
    if abs(delta) < 60:
        rel = "just now"
    elif delta > 0:
        rel = "in " + duration_words(delta)
    else:
        rel = duration_words(-delta) + " ago"
    return f"{clock_time(at, now, tz)}, {rel}"
