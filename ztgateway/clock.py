"""The one clock the gateway reads.

Time is an input. Sessions, tokens, TOTP windows, posture ages, audit timestamps, certificate
checks and rate windows all take "now" from a `Clock` they are handed (normally the gateway's),
so a test, a replay or `policy test --at` runs the same code at any instant, and nothing depends
on the day it runs. This is the only module that reads the system's clocks;
`tests/unit/test_clock.py` fails if another one does.

OpenSSL's handshake checks (certificate validity, CRL next-update) read the system clock
themselves; `make test-future` runs the suite under libfaketime to cover those.
"""

from __future__ import annotations

import datetime as dt
import time as _time


class Clock:
    """Wall time (`time`, `now`) and elapsed time (`monotonic`), from the system."""

    __slots__ = ()

    def time(self) -> float:
        """Seconds since the epoch (what expiries, `iat`/`exp` and audit times are in)."""
        return _time.time()

    def time_ns(self) -> int:
        return _time.time_ns()

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (durations and deadlines only)."""
        return _time.monotonic()

    def now(self) -> dt.datetime:
        """The wall time as an aware UTC datetime."""
        return dt.datetime.fromtimestamp(self.time(), dt.UTC)


SYSTEM_CLOCK = Clock()
"""The default for production code; everything that reads time takes a clock argument."""


class ManualClock(Clock):
    """A clock that stands still until it is moved: for tests and for judging a past instant.

    Wall and monotonic time advance together, so a deadline computed from one and an expiry
    computed from the other agree.
    """

    __slots__ = ("_mono", "_wall")

    def __init__(self, at: float | dt.datetime, *, monotonic: float = 1000.0) -> None:
        self._wall = at.timestamp() if isinstance(at, dt.datetime) else float(at)
        self._mono = monotonic

    def time(self) -> float:
        return self._wall

    def time_ns(self) -> int:
        return round(self._wall * 1_000_000_000)

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back; use set() to jump")
        self._wall += seconds
        self._mono += seconds

    def set(self, at: float | dt.datetime) -> None:
        """Jump the wall time (a clock correction); monotonic time is unaffected."""
        self._wall = at.timestamp() if isinstance(at, dt.datetime) else float(at)
