"""Reading the log: the newest events and search by indexed columns."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .chain import format_ts
from .events import UPSTREAM_SUFFIX
from .store import read_only


async def tail(db_path: Path, n: int = 20) -> list[dict[str, Any]]:
    """The newest n events, oldest first, as a terminal reads a log."""
    if n <= 0:
        return []
    async with (
        read_only(db_path) as db,
        db.execute("SELECT event FROM audit_events ORDER BY seq DESC LIMIT ?", (n,)) as cur,
    ):
        rows = await cur.fetchall()
    return [json.loads(row[0]) for row in reversed(list(rows))]


def query_ts(moment: datetime) -> str:
    # Naive times are taken as UTC, the zone every stored timestamp is in.
    return format_ts(moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC))


async def search(
    db_path: Path,
    *,
    user: str | None = None,
    device: str | None = None,
    route: str | None = None,
    reason: str | None = None,
    decision_id: str | None = None,
    session: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The newest `limit` events matching every given filter, oldest first.

    `since` is inclusive and `until` exclusive, so consecutive windows never count an event twice.
    `session` has no index of its own (it is read from the event, so logs written before it was
    recorded need no migration): give `user` or `since` with it on a large log.
    """
    if limit <= 0:
        return []
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (
        ('"user"', user),
        ("device", device),
        ("route", route),
        ("reason", reason),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if decision_id is not None:
        # The decision and what followed it: its upstream outcome (events.py).
        clauses.append("decision_id IN (?, ?)")
        params.extend((decision_id, decision_id + UPSTREAM_SUFFIX))
    if session is not None:
        clauses.append("json_extract(event, '$.input.session') = ?")
        params.append(session)
    if since is not None:
        clauses.append("ts >= ?")
        params.append(query_ts(since))
    if until is not None:
        clauses.append("ts < ?")
        params.append(query_ts(until))
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    params.append(limit)
    # Only the column names above are interpolated; every value is a bound parameter.
    sql = f"SELECT event FROM audit_events {where} ORDER BY seq DESC LIMIT ?"  # noqa: S608
    async with read_only(db_path) as db, db.execute(sql, params) as cur:
        rows = await cur.fetchall()
    return [json.loads(row[0]) for row in reversed(list(rows))]
