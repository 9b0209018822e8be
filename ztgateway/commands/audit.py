"""`ztgateway audit`: read, search, verify, rotate and recover the audit log (docs/audit.md).

Reading needs only the configuration's database path, so it works while the gateway runs and
after it stopped; `verify` exits non-zero on a broken chain or on events left unanchored by a
signed checkpoint for too long, so it can gate a backup or an alert.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from ..clock import SYSTEM_CLOCK
from ..config import load_config
from .common import add_config, add_json, duration_arg, fmt_time, instant_arg, table


def _audit_rows(events: list[dict[str, Any]]) -> str:
    rows = []
    for event in events:
        r = event.get("result", {})
        i = event.get("input", {})
        kind = event.get("type")
        if kind == "ztgw.checkpoint":
            # A signature over the chain (docs/audit.md): who signed, through which event.
            cp = event.get("checkpoint", {})
            r = {"verdict": "signed", "reason": f"checkpoint ({cp.get('reason')})"}
            i = {"path": f"through seq {cp.get('through_seq')}", "user": cp.get("key_id")}
        elif kind == "ztgw.upstream":
            # What the upstream did with an allowed request (its decision's id + /upstream).
            up = event.get("upstream", {})
            r = {
                "verdict": f"up:{up.get('answered')}",
                "reason": r.get("reason") or f"{up.get('outcome')} {up.get('seconds')}s",
            }
        rows.append(
            (
                fmt_time(event.get("timestamp")),
                r.get("verdict", ""),
                r.get("reason", ""),
                event.get("route") or "-",
                i.get("method") or "-",
                i.get("path") or "-",
                i.get("user") or "-",
                i.get("device") or "-",
                event.get("decision_id", ""),
            )
        )
    headers = ("TIME", "VERDICT", "REASON", "ROUTE", "METHOD", "PATH", "USER", "DEVICE", "ID")
    return table(headers, rows, empty="no matching decisions")


def cmd_audit_tail(args: argparse.Namespace) -> int:
    from ..audit import tail

    config = load_config(args.config)
    events = asyncio.run(tail(config.audit.db, args.n))
    if args.json:
        for event in events:
            print(json.dumps(event))
    else:
        print(_audit_rows(events))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from ..audit.verify import (
        describe,
        trusted_keys_for,
        unanchored_problem,
        verify_db,
        verify_jsonl,
    )

    config = load_config(args.config)
    keys = trusted_keys_for(config.audit, Path(args.public_keys) if args.public_keys else None)
    result = (
        verify_jsonl(Path(args.jsonl), trusted_keys=keys)
        if args.jsonl
        else asyncio.run(
            verify_db(config.audit.db, archives=not args.no_archives, trusted_keys=keys)
        )
    )
    if not result.ok:
        print(
            f"TAMPERED: first bad event seq={result.first_bad_seq} "
            f"decision_id={result.first_bad_decision_id}: {result.problem} "
            f"({result.checked} events checked)",
            file=sys.stderr,
        )
        return 1
    for line in describe(result, config.audit, journal=not args.jsonl):
        print(line, file=sys.stderr)
    problem = unanchored_problem(result, config.audit, keys, args.max_unanchored)
    if problem is not None:
        print(f"UNANCHORED: {problem}", file=sys.stderr)
        return 1
    print(f"ok: {result.checked} events, chain intact")
    return 0


def cmd_audit_recover(args: argparse.Namespace) -> int:
    """Move the journals of gateway processes that ended without closing their log into the
    chain now (the next start would do it too); journals of running processes are left alone."""
    from .common import operator_audit_log

    config = load_config(args.config)

    async def recover() -> int:
        log = operator_audit_log(config.audit)
        async with log:
            pass
        return log.stats.recovered

    print(f"recovered {asyncio.run(recover())} events from journals")
    return 0


def cmd_audit_rotate_key(args: argparse.Namespace) -> int:
    from ..audit.keys import rotate_checkpoint_key, rotate_mask_key

    a = load_config(args.config).audit
    if args.kind == "mask":
        if a.mask_key_file is None:
            print("error: no [audit] mask_key_file configured", file=sys.stderr)
            return 2
        print(f"new mask key {rotate_mask_key(a.mask_key_file)} in {a.mask_key_file}")
    else:
        if a.checkpoint_key_file is None or a.checkpoint_public_keys is None:
            print("error: no [audit] checkpoint_key_file configured", file=sys.stderr)
            return 2
        kid = rotate_checkpoint_key(a.checkpoint_key_file, a.checkpoint_public_keys)
        print(
            f"new checkpoint key {kid} in {a.checkpoint_key_file}; the old public key stays "
            f"trusted in {a.checkpoint_public_keys}"
        )
    print("run `ztgateway reload` (or send SIGHUP) for the running gateway to use it")
    return 0


def cmd_audit_rotate(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from ..audit import rotate
    from ..audit.checkpoint import CheckpointSigner
    from ..audit.keys import load_checkpoint_signing
    from ..clock import SYSTEM_CLOCK
    from .common import fmt_duration

    config = load_config(args.config)
    archive_dir = (
        Path(args.archive_dir) if args.archive_dir else config.audit.db.parent / "audit-archive"
    )
    before = SYSTEM_CLOCK.now() - timedelta(seconds=args.older_than)
    a = config.audit
    key = load_checkpoint_signing(a.checkpoint_key_file, a.checkpoint_public_keys, create=False)
    signer = CheckpointSigner(key) if key is not None else None
    result = asyncio.run(rotate(a.db, archive_dir, before=before, signer=signer))
    if result.archived == 0:
        print(f"nothing older than {fmt_duration(args.older_than)}")
    else:
        print(
            f"archived {result.archived} events through seq {result.through_seq} to {result.archive}"
        )
    return 0


def cmd_audit_search(args: argparse.Namespace) -> int:
    from ..audit import search

    config = load_config(args.config)
    events = asyncio.run(
        search(
            config.audit.db,
            user=args.user,
            device=args.device,
            route=args.route,
            reason=args.reason,
            decision_id=args.decision_id,
            session=args.session,
            since=args.since,
            until=args.until,
            limit=args.limit,
        )
    )
    if args.json:
        for e in events:
            print(json.dumps(e))
    else:
        print(_audit_rows(events))
    return 0


def register(sub: Any) -> None:
    audit = sub.add_parser("audit", help="read and verify the audit log")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    at = add_json(add_config(asub.add_parser("tail", help="the last decisions")))
    at.add_argument("-n", type=int, default=20, metavar="N", help="how many decisions (default 20)")
    at.set_defaults(func=cmd_audit_tail)
    av = add_config(asub.add_parser("verify", help="verify the hash chain"))
    av.add_argument(
        "--jsonl", metavar="FILE", help="verify a JSON-lines audit file instead of the database"
    )
    av.add_argument(
        "--no-archives", action="store_true", help="trust the checkpoints, skip archive files"
    )
    av.add_argument(
        "--public-keys",
        metavar="PEM",
        help="PEM bundle of trusted checkpoint keys (default: [audit] checkpoint_public_keys)",
    )
    av.add_argument(
        "--max-unanchored",
        type=duration_arg("s"),
        default=None,
        metavar="DURATION",
        help="fail when events after the last signed checkpoint are older than this (default: "
        "2 x checkpoint_interval + 60 s when checkpoint keys are configured)",
    )
    av.set_defaults(func=cmd_audit_verify)
    ar = add_config(
        asub.add_parser("rotate", help="archive old events (the chain stays verifiable)")
    )
    age = ar.add_mutually_exclusive_group(required=True)
    age.add_argument(
        "--older-than",
        type=duration_arg("d"),
        metavar="DURATION",
        help="archive events older than this, like 90d or 12w (a bare number is days)",
    )
    age.add_argument(
        "--days",
        dest="older_than",
        type=duration_arg("d"),
        metavar="DAYS",
        help="the same as --older-than, in days",
    )
    ar.add_argument(
        "--archive-dir", metavar="DIR", help="default: audit-archive/ beside the database"
    )
    ar.set_defaults(func=cmd_audit_rotate)
    arc = add_config(
        asub.add_parser("recover", help="write journals left by crashed processes into the log")
    )
    arc.set_defaults(func=cmd_audit_recover)
    ark = add_config(
        asub.add_parser("rotate-key", help="replace the mask or checkpoint key (then reload)")
    )
    ark.add_argument("kind", choices=("mask", "checkpoint"), help="which key to replace")
    ark.set_defaults(func=cmd_audit_rotate_key)
    asr = add_json(add_config(asub.add_parser("search", help="find decisions")))
    for flag, what in (
        ("user", "decisions about this user"),
        ("device", "decisions about this device id"),
        ("route", "decisions on this route"),
        ("reason", "decisions with this reason, e.g. group-required"),
        ("decision-id", "one decision by its id (X-ZT-Decision-Id)"),
        ("session", "decisions in this session (its stored id)"),
    ):
        asr.add_argument(f"--{flag}", help=what)
    now = SYSTEM_CLOCK.now
    asr.add_argument(
        "--since",
        type=instant_arg(now),
        metavar="WHEN",
        help="from this time: a duration ago (30m, 1h, 7d) or ISO 8601 (2026-11-22T09:30Z)",
    )
    asr.add_argument(
        "--until", type=instant_arg(now), metavar="WHEN", help="up to this time (as --since)"
    )
    asr.add_argument(
        "--limit", type=int, default=100, metavar="N", help="at most N decisions (default 100)"
    )
    asr.set_defaults(func=cmd_audit_search)
