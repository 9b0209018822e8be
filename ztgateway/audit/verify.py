"""`ztgateway audit verify`: the database (with its archives) and the JSON-lines mirror."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import sqlite3
from pathlib import Path

from .chain import PROBLEM_MALFORMED, ChainChecker, VerifyResult
from .store import SELECT_ROWS, read_only, row_problem


async def verify_db(db_path: Path, *, archives: bool = True) -> VerifyResult:
    """Check the whole chain in one read transaction (safe while the gateway is writing).

    After a rotation the database starts mid-chain; it must then continue exactly from the
    newest checkpoint, and (with `archives`) every archive file must still be there, unchanged
    (its SHA-256 was recorded), and chain from genesis through each checkpoint.
    """
    checker = ChainChecker(require_genesis=True)
    async with read_only(db_path) as db:
        try:
            async with db.execute(
                "SELECT through_seq, last_hash, archive, archive_sha256 FROM audit_checkpoints "
                "ORDER BY through_seq"
            ) as cur:
                checkpoints = [tuple(r) for r in await cur.fetchall()]
        except sqlite3.OperationalError:
            checkpoints = []
        for through_seq, last_hash, archive, digest in checkpoints:
            if archives:
                path = Path(archive)
                if not await asyncio.to_thread(path.is_file):
                    return checker.result(f"archive {archive} is missing", int(through_seq))
                actual = await asyncio.to_thread(_file_sha256, path)
                if actual != digest:
                    return checker.result(f"archive {archive} was modified", int(through_seq))
                problem = await asyncio.to_thread(_check_archive, checker, path)
                if problem is not None:
                    return checker.result(f"{archive}: {problem}")
            else:
                checker.prev_seq, checker.prev_hash = int(through_seq), str(last_hash)
            if checker.prev_seq != int(through_seq) or checker.prev_hash != last_hash:
                return checker.result(
                    f"checkpoint at seq {through_seq} does not match its archive", int(through_seq)
                )
        cur = await db.execute(SELECT_ROWS)
        async for row in cur:
            seq, decision_id, text = row[0], row[1], row[9]
            try:
                event = json.loads(text)
            except (ValueError, TypeError):
                return checker.result(PROBLEM_MALFORMED, seq, decision_id)
            problem = checker.check(event, row_check=functools.partial(row_problem, tuple(row)))
            if problem is not None:
                await cur.close()
                return checker.result(problem, seq, decision_id)
        await cur.close()
    return checker.result()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_archive(checker: ChainChecker, path: Path) -> str | None:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                event = json.loads(raw)
            except ValueError:
                return f"line {number} is not valid JSON"
            problem = checker.check(event)
            if problem is not None:
                return f"line {number}: {problem}"
    return None


def verify_jsonl(path: Path, *, require_genesis: bool = True) -> VerifyResult:
    """Verify a JSON-lines mirror on its own, without the database.

    A file that begins mid-chain (rotated, or a sink added to an existing log) cannot prove
    its first link; pass require_genesis=False to accept its first prev_hash as the anchor.
    """
    checker = ChainChecker(require_genesis=require_genesis)
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                return checker.result(f"line {number} is incomplete (torn write)")
            try:
                event = json.loads(raw)
            except ValueError:
                return checker.result(f"line {number} is not valid JSON")
            problem = checker.check(event)
            if problem is not None:
                seq = event.get("seq") if isinstance(event, dict) else None
                did = event.get("decision_id") if isinstance(event, dict) else None
                return checker.result(
                    f"line {number}: {problem}",
                    seq if isinstance(seq, int) else None,
                    did if isinstance(did, str) else None,
                )
    return checker.result()
