"""Time is an input: only `ztgateway/clock.py` reads the system's clocks.

Everything else takes a `Clock` (or a callable from one), so tests run the gateway at any instant
and nothing in the package depends on the day it runs.
"""

from __future__ import annotations

import ast
import datetime as dt
from pathlib import Path

import pytest

from ztgateway.clock import SYSTEM_CLOCK, ManualClock

PACKAGE = Path(__file__).resolve().parents[2] / "ztgateway"
CLOCK_MODULE = PACKAGE / "clock.py"
_TIME_READS = {"time", "time_ns", "monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns"}
_DATE_READS = {"now", "utcnow", "today"}


def _clock_reads(source: str) -> list[tuple[int, str]]:
    """(line, expression) of every direct read of a system clock in one module."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "time":
            found += [
                (node.lineno, f"from time import {a.name}")
                for a in node.names
                if a.name in _TIME_READS
            ]
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        name = (
            base.id
            if isinstance(base, ast.Name)
            else base.attr
            if isinstance(base, ast.Attribute)
            else ""
        )
        if (name == "time" and node.attr in _TIME_READS) or (
            name in {"datetime", "date"} and node.attr in _DATE_READS
        ):
            found.append((node.lineno, f"{name}.{node.attr}"))
    return found


def test_no_module_but_clock_reads_the_system_clock() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {expr}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != CLOCK_MODULE
        for line, expr in _clock_reads(path.read_text())
    ]
    assert offenders == []


@pytest.mark.parametrize(
    "source",
    [
        "import time\nx = time.time()",
        "import time\nf = time.monotonic",
        "from time import time_ns",
        "import datetime as dt\nx = dt.datetime.now(dt.UTC)",
        "from datetime import datetime\nx = datetime.utcnow()",
        "from datetime import date\nx = date.today()",
    ],
)
def test_the_guard_sees_each_way_of_reading_the_clock(source: str) -> None:
    assert _clock_reads(source)


def test_the_guard_lets_time_arithmetic_through() -> None:
    assert not _clock_reads("import time\nx = time.gmtime(0)\ny = time.strftime('%Y')")


def test_manual_clock_moves_only_when_told() -> None:
    clock = ManualClock(dt.datetime(2030, 1, 7, 9, 0, tzinfo=dt.UTC))
    start, mono = clock.time(), clock.monotonic()
    assert clock.time() == start
    clock.advance(90)
    assert (clock.time() - start, clock.monotonic() - mono) == (90, 90)
    assert clock.now() == dt.datetime(2030, 1, 7, 9, 1, 30, tzinfo=dt.UTC)
    assert clock.time_ns() == round(clock.time() * 1e9)
    clock.set(start - 3600)  # a wall-clock correction backwards leaves elapsed time alone
    assert (clock.time(), clock.monotonic() - mono) == (start - 3600, 90)
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1)


def test_the_system_clock_agrees_with_itself() -> None:
    wall = SYSTEM_CLOCK.time()
    assert abs(SYSTEM_CLOCK.now().timestamp() - wall) < 5
    assert SYSTEM_CLOCK.now().tzinfo is dt.UTC
    assert SYSTEM_CLOCK.monotonic() <= SYSTEM_CLOCK.monotonic()
