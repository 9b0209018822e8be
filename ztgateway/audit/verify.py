"""`ztgateway audit verify`: the database (with its archives) and the JSON-lines mirror."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import sqlite3
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..clock import SYSTEM_CLOCK, Clock
from ..config import AuditConfig
from .chain import PROBLEM_MALFORMED, ChainChecker, VerifyResult
from .checkpoint import CheckpointChecker
from .journal import pending_lines
from .keys import key_id, load_checkpoint_key, load_public_keys
from .store import SELECT_ROWS, read_only, row_problem
from .writer import default_journal_dir


async def verify_db(
    db_path: Path,
    *,
    archives: bool = True,
    trusted_keys: dict[str, Ed25519PublicKey] | None = None,
) -> VerifyResult:
    """Check the whole chain in one read transaction (safe while the gateway is writing).

    After a rotation the database starts mid-chain; it must then continue exactly from the
    newest checkpoint, and (with `archives`) every archive file must still be there, unchanged
    (its SHA-256 was recorded), and chain from genesis through each checkpoint.

    Signed checkpoints (checkpoint.py) are checked against `trusted_keys`; without them only
    their positions are, and `result.anchors.signatures_checked` is False.
    """
    checker = ChainChecker(require_genesis=True, anchors=CheckpointChecker(trusted_keys))
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


def verify_jsonl(
    path: Path,
    *,
    require_genesis: bool = True,
    trusted_keys: dict[str, Ed25519PublicKey] | None = None,
) -> VerifyResult:
    """Verify a JSON-lines mirror on its own, without the database.

    A file that begins mid-chain (rotated, or a sink added to an existing log) cannot prove
    its first link; pass require_genesis=False to accept its first prev_hash as the anchor.
    """
    checker = ChainChecker(require_genesis=require_genesis, anchors=CheckpointChecker(trusted_keys))
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


# --------------------------------------------------------------------------- the CLI's reading


def trusted_keys_for(
    audit: AuditConfig, bundle: Path | None = None
) -> dict[str, Ed25519PublicKey] | None:
    """The checkpoint keys `audit verify` trusts: `bundle` if given, else the configured bundle
    plus the configured key's public half. None when nothing is configured (signatures then
    cannot be checked, and `describe` says so)."""
    if bundle is not None:
        return load_public_keys(bundle)
    if audit.checkpoint_key_file is None and audit.checkpoint_public_keys is None:
        return None
    keys = load_public_keys(audit.checkpoint_public_keys) if audit.checkpoint_public_keys else {}
    if audit.checkpoint_key_file is not None and audit.checkpoint_key_file.exists():
        public = load_checkpoint_key(audit.checkpoint_key_file, create=False).public_key()
        keys[key_id(public)] = public
    return keys


def describe(result: VerifyResult, audit: AuditConfig, *, journal: bool) -> list[str]:
    """What a verified chain does and does not prove, for the operator."""
    lines: list[str] = []
    a = result.anchors
    if a is not None and a.checkpoints:
        how = "signatures verified" if a.signatures_checked else "SIGNATURES NOT CHECKED"
        lines.append(
            f"checkpoints: {a.checkpoints} signed (Ed25519, {how}), the last at "
            f"{a.last_checkpoint_at}, vouching for seq 1..{a.anchored_seq}"
        )
        if not a.signatures_checked:
            lines.append(
                "  no trusted public key given: pass --public-keys or configure "
                "[audit] checkpoint_public_keys to check them"
            )
    elif audit.checkpoint_key_file is None and audit.checkpoint_public_keys is None:
        lines.append(
            "not anchored: no [audit] checkpoint_key_file, so an event deleted and the rest "
            "re-hashed would still verify"
        )
    if a is not None and a.unanchored:
        lines.append(
            f"unanchored: {a.unanchored} events after the last checkpoint (oldest at "
            f"{a.unanchored_since}); only the chain vouches for them until the next checkpoint"
        )
    if journal:
        directory = audit.journal_dir or default_journal_dir(audit.db)
        pending = pending_lines(directory) if directory.is_dir() else 0
        if pending:
            lines.append(
                f"journal: {pending} events of processes that ended without closing the log "
                f"are in {directory}, not yet in the database (`ztgateway audit recover` or "
                "the next start writes them)"
            )
    return lines


def unanchored_problem(
    result: VerifyResult,
    audit: AuditConfig,
    keys: dict[str, Ed25519PublicKey] | None,
    max_unanchored: float | None,
    *,
    clock: Clock = SYSTEM_CLOCK,
) -> str | None:
    """Events no checkpoint vouches for, older than a running writer would have left them.

    A writer signs a checkpoint every `checkpoint_interval` while events arrive and when it
    stops, so an old unanchored tail means a writer that died and never restarted, or
    checkpoints that were deleted along with the events they vouched for.
    """
    a = result.anchors
    if keys is None or a is None or not a.unanchored or a.unanchored_since is None:
        return None
    limit = max_unanchored if max_unanchored is not None else 2 * audit.checkpoint_interval + 60
    try:
        since = datetime.fromisoformat(a.unanchored_since)
    except ValueError:
        return f"unanchored events carry an unreadable timestamp {a.unanchored_since!r}"
    age = (clock.now() - since).total_seconds()
    if age <= limit:
        return None
    return (
        f"{a.unanchored} events after the last signed checkpoint, the oldest {age:.0f} s old "
        f"(more than {limit:.0f} s): checkpoints were removed with the events they vouched "
        "for, or a writer died and was never restarted (start the gateway or run `ztgateway "
        "audit recover`, then verify again)"
    )
