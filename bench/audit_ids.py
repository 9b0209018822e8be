"""What the decision-id format costs the audit database (exploration tool, not part of `make test`).

    python -m bench.audit_ids [ROWS]      # default 600000

Writes ROWS realistic audit rows into a fresh database twice, with the audit writer's own schema,
WAL, `synchronous=NORMAL`, transactions of 300 rows and the real chain encoding: once under ids
with no order (128 random bits, the format before December 2026) and once under the gateway's
time-ordered ids (`decision.new_decision_id`, UUIDv7). It prints, for the last 30,000 rows, the
CPU per row of the inserts and the bytes the process wrote per row (the WAL and its
checkpoints): a unique index on ids in no order takes each row into a different page of the
whole index, which grows with the database, where time-ordered ids append to the same few pages.
"""

from __future__ import annotations

import base64
import secrets
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ztgateway.audit.chain import link_rows, prepare_entry
from ztgateway.audit.store import SCHEMA, insert_statements
from ztgateway.decision import new_decision_id

BATCH = 300
MEASURED = 30_000
START_NS = 1_765_000_000_000_000_000


def unordered_ids(n: int) -> list[str]:
    return [
        base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode() for _ in range(n)
    ]


def time_ordered_ids(n: int) -> list[str]:
    # 3 decisions per millisecond, about the rate of one saturated worker.
    return [new_decision_id((START_NS / 1e9) + i / 3000) for i in range(n)]


def _written_bytes() -> int:
    """Bytes this process has handed to write(2)/pwrite(2) so far (/proc/self/io wchar)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar")


def measure(name: str, make_ids: Callable[[int], list[str]], rows: int) -> tuple[float, float]:
    """(µs of CPU per row, bytes written per row) over the last MEASURED rows."""
    work = Path(tempfile.mkdtemp(prefix="audit-ids-"))
    try:
        db = sqlite3.connect(work / "audit.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        for statement in SCHEMA:
            db.execute(statement)
        entries = [
            prepare_entry(
                {
                    "decision_id": decision_id,
                    "route": "ztgw_cert",
                    "input": {
                        "user": "CN=bench-client",
                        "device": "dev-1",
                        "client_ip": "127.0.0.1",
                    },
                    "result": {"verdict": "allow", "reason": "policy-allowed"},
                },
                START_NS + i * 333_333,
            )
            for i, decision_id in enumerate(make_ids(rows))
        ]
        seq, prev = 0, "0" * 64
        cpu = 0.0
        written = 0
        counted = 0
        for start in range(0, rows, BATCH):
            batch_rows: list[tuple[object, ...]] = []
            seq, prev = link_rows(entries[start : start + BATCH], seq, prev, batch_rows, [])
            c0, w0 = time.thread_time(), _written_bytes()
            db.execute("BEGIN")
            for sql, params in insert_statements(batch_rows):
                db.execute(sql, params)
            db.execute("COMMIT")
            if start >= rows - MEASURED:
                cpu += time.thread_time() - c0
                written += _written_bytes() - w0
                counted += len(batch_rows)
        db.close()
    finally:
        shutil.rmtree(work)
    per_row = (cpu / counted * 1e6, written / counted)
    print(
        f"{name:>13}: {per_row[0]:5.1f} µs CPU and {per_row[1] / 1024:5.1f} KiB written per row "
        f"(last {counted:,} of {rows:,} rows)"
    )
    return per_row


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 600_000
    if rows < MEASURED + BATCH:
        raise SystemExit(f"ROWS must be at least {MEASURED + BATCH}")
    measure("no order", unordered_ids, rows)
    measure("time-ordered", time_ordered_ids, rows)


if __name__ == "__main__":
    main()
