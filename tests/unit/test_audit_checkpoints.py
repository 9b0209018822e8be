"""Signed checkpoints (issue 18 L7): deleting an event and re-hashing the rest is detected.

The attack is the review's proof of concept: with plain sqlite3, delete one event and re-link
every later one from genesis with the module's own canonical form, so that every hash and
every link is right again. Before checkpoints, `audit verify` passed.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ztgateway.audit import AuditLog, canonical_json, rotate, verify_db, verify_jsonl
from ztgateway.audit.chain import (
    CHAIN_FIELDS,
    GENESIS_HASH,
    index_columns,
    link_hash,
    normalize_ts,
)
from ztgateway.audit.checkpoint import CHECKPOINT_TYPE, CheckpointSigner
from ztgateway.audit.keys import (
    key_id,
    load_checkpoint_signing,
    load_public_keys,
    rotate_checkpoint_key,
)
from ztgateway.audit.verify import unanchored_problem
from ztgateway.clock import ManualClock
from ztgateway.config import AuditConfig

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def event(n: int, user: str = "alice") -> dict[str, Any]:
    return {
        "decision_id": f"dec-{n}",
        "input": {"user": user},
        "result": {"verdict": "allow", "reason": "policy-allowed"},
    }


def rows(db: Path) -> list[tuple[int, str, str]]:
    with closing(sqlite3.connect(db)) as conn:
        return list(conn.execute("SELECT seq, decision_id, event FROM audit_events ORDER BY seq"))


def delete_and_rehash(
    db: Path,
    decision_id: str,
    *,
    drop_checkpoints_after: bool = False,
    fix_checkpoints: bool = False,
) -> None:
    """The attacker: remove one event, then re-link everything from genesis (and, without the
    key, at best rewrite what the checkpoints claim or drop them)."""
    kept = []
    gone = False
    for _seq, did, text in rows(db):
        ev = json.loads(text)
        if did == decision_id:
            gone = True
            continue
        if gone and drop_checkpoints_after and ev.get("type") == CHECKPOINT_TYPE:
            continue
        kept.append({k: v for k, v in ev.items() if k not in CHAIN_FIELDS})
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DELETE FROM audit_events")
        prev = GENESIS_HASH
        for seq, body in enumerate(kept, start=1):
            if fix_checkpoints and body.get("type") == CHECKPOINT_TYPE:
                body["checkpoint"].update(through_seq=seq - 1, through_hash=prev)
            link = link_hash(prev, canonical_json(body))
            stored = canonical_json({**body, "seq": seq, "prev_hash": prev, "hash": link})
            conn.execute(
                'INSERT INTO audit_events (seq, decision_id, ts, "user", device, route, verdict, '
                "reason, client_ip, event, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    seq,
                    body["decision_id"],
                    normalize_ts(body["timestamp"]),
                    *index_columns(body),
                    stored,
                    prev,
                    link,
                ),
            )
            prev = link


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def trusted(key: Ed25519PrivateKey) -> dict[str, Any]:
    return {key_id(key.public_key()): key.public_key()}


async def write(db: Path, key: Ed25519PrivateKey, count: int, *, jsonl: Path | None = None) -> None:
    async with AuditLog(db, jsonl_path=jsonl, checkpoint_signer=CheckpointSigner(key)) as log:
        for n in range(1, count + 1):
            log.record(event(n, user="mallory" if n == 2 else "alice"))


async def test_deleting_an_event_and_rehashing_the_chain_is_detected(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    db = tmp_path / "audit.db"
    await write(db, key, 3)
    before = await verify_db(db, trusted_keys=trusted(key))
    assert before.ok, before.problem
    assert before.anchors is not None and before.anchors.checkpoints == 1  # at shutdown
    assert before.anchors.unanchored == 0

    delete_and_rehash(db, "dec-2")
    after = await verify_db(db, trusted_keys=trusted(key))
    assert not after.ok
    assert "re-hashed" in after.problem
    assert after.first_bad_decision_id is not None
    assert after.first_bad_decision_id.startswith("checkpoint-")


async def test_rewriting_the_checkpoints_after_a_rehash_breaks_their_signatures(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    db = tmp_path / "audit.db"
    await write(db, key, 3)
    delete_and_rehash(db, "dec-2", fix_checkpoints=True)
    blind = await verify_db(db)  # no key: every hash, link and position is consistent again
    assert blind.ok
    assert blind.anchors is not None and not blind.anchors.signatures_checked
    result = await verify_db(db, trusted_keys=trusted(key))
    assert not result.ok
    assert "signature is invalid" in result.problem


async def test_deleting_the_checkpoints_too_leaves_an_unanchored_tail_that_is_reported(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    db = tmp_path / "audit.db"
    clock = ManualClock(T0)
    async with AuditLog(db, checkpoint_signer=CheckpointSigner(key), clock=clock) as log:
        for n in range(1, 4):
            log.record(event(n))
        await log.flush()
        clock.advance(61)
        log.record(event(4))  # its batch is due a checkpoint: vouches for 1..4
        await log.flush()
        for n in range(5, 8):
            log.record(event(n))
    delete_and_rehash(db, "dec-6", drop_checkpoints_after=True)
    result = await verify_db(db, trusted_keys=trusted(key))
    assert result.ok  # what is left is consistent, and the first checkpoint still matches
    assert result.anchors is not None
    assert (result.anchors.anchored_seq, result.anchors.unanchored) == (4, 2)
    cfg = AuditConfig(db=db, checkpoint_interval=60.0)
    later = ManualClock(T0 + timedelta(minutes=10))
    problem = unanchored_problem(result, cfg, trusted(key), None, clock=later)
    assert problem is not None and "2 events after the last signed checkpoint" in problem
    fresh = ManualClock(T0 + timedelta(seconds=90))
    assert unanchored_problem(result, cfg, trusted(key), None, clock=fresh) is None


async def test_a_checkpoint_signed_with_another_key_is_not_trusted(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    db = tmp_path / "audit.db"
    forger = Ed25519PrivateKey.generate()
    await write(db, forger, 2)
    result = await verify_db(db, trusted_keys=trusted(key))
    assert not result.ok
    assert "not trusted" in result.problem


async def test_an_edited_checkpoint_signature_is_refused(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    db = tmp_path / "audit.db"
    await write(db, key, 2)
    seq, _, text = rows(db)[-1]
    ev = json.loads(text)
    ev["checkpoint"]["through_seq"] = 1  # claim less, then fix the row's own hash
    body = {k: v for k, v in ev.items() if k not in CHAIN_FIELDS}
    ev["hash"] = link_hash(ev["prev_hash"], canonical_json(body))
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(
            "UPDATE audit_events SET event = ?, hash = ? WHERE seq = ?",
            (canonical_json(ev), ev["hash"], seq),
        )
    result = await verify_db(db, trusted_keys=trusted(key))
    assert not result.ok
    assert "signature is invalid" in result.problem


async def test_checkpoints_reach_the_jsonl_mirror_and_verify_there(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    db, sink = tmp_path / "audit.db", tmp_path / "audit.jsonl"
    await write(db, key, 3, jsonl=sink)
    types = [json.loads(line)["type"] for line in sink.read_text().splitlines()]
    assert types[-1] == CHECKPOINT_TYPE
    result = verify_jsonl(sink, trusted_keys=trusted(key))
    assert result.ok, result.problem
    assert result.anchors is not None and result.anchors.unanchored == 0


async def test_a_restarted_writer_vouches_for_what_it_found(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    db = tmp_path / "audit.db"
    async with AuditLog(db) as unsigned:  # a log written before checkpoints existed
        unsigned.record(event(1))
    async with AuditLog(db, checkpoint_signer=CheckpointSigner(key)) as log:
        assert log.checkpoints == 1  # "start": nothing new needed
    (_, _, text) = rows(db)[-1]
    assert json.loads(text)["checkpoint"]["reason"] == "start"
    assert (await verify_db(db, trusted_keys=trusted(key))).ok


async def test_rotation_archives_and_signs_where_the_database_continues(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    db = tmp_path / "audit.db"
    clock = ManualClock(T0)
    async with AuditLog(db, checkpoint_signer=CheckpointSigner(key), clock=clock) as log:
        for n in range(1, 5):
            log.record(event(n))
    clock.advance(3600)
    result = await rotate(
        db,
        tmp_path / "archive",
        before=T0 + timedelta(minutes=30),
        clock=clock,
        signer=CheckpointSigner(key),
    )
    assert result.archived == 5  # four events and the shutdown checkpoint
    (_, _, text) = rows(db)[-1]
    assert json.loads(text)["checkpoint"]["reason"] == "rotation"
    verified = await verify_db(db, trusted_keys=trusted(key))
    assert verified.ok, verified.problem
    assert verified.anchors is not None and verified.anchors.checkpoints == 2


def test_rotating_the_checkpoint_key_keeps_the_old_public_key_trusted(tmp_path: Path) -> None:
    path, bundle = tmp_path / "keys" / "checkpoint.key", tmp_path / "keys" / "checkpoint.pub"
    first = load_checkpoint_signing(path, bundle, create=True)
    assert first is not None
    assert (path.stat().st_mode & 0o777) == 0o600
    new_id = rotate_checkpoint_key(path, bundle)
    second = load_checkpoint_signing(path, bundle, create=False)
    assert second is not None and key_id(second.public_key()) == new_id
    assert set(load_public_keys(bundle)) == {key_id(first.public_key()), new_id}
