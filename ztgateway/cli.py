"""The `ztgateway` command line: run, check-config, certs, token, audit, policy."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .commands.common import (
    Parser,
    add_config,
    add_json,
    duration_arg,
    fmt_time,
    instant_arg,
    run_command_line,
    table,
)
from .configreader import ConfigError


def _load(path: str):  # type: ignore[no-untyped-def]
    from .config import load_config

    return load_config(path)


def cmd_run(args: argparse.Namespace) -> int:
    from .app import serve

    try:
        config = _load(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .logs import setup_logging

    log_limit = setup_logging(args.log_level or config.logging.level, config.logging.format)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    from .audit import AuditKeyError, AuditUnavailable
    from .store import StoreUnavailable

    if config.server.workers > 1 and args.worker is None:
        from .workers import Supervisor

        try:
            asyncio.run(
                Supervisor(config, Path(args.config).resolve(), config.server.workers).run()
            )
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.supervisor_pid is not None:
        from .lifeline import die_with_parent

        if not die_with_parent(args.supervisor_pid):
            print("error: the supervisor is gone; not starting this worker", file=sys.stderr)
            return 1
    try:
        ops_socket = Path(args.ops_socket) if args.ops_socket else None
        asyncio.run(
            serve(
                config,
                worker=args.worker,
                ops_socket=ops_socket,
                lifeline=args.lifeline_fd,
                log_limit=log_limit,
            )
        )
    except (OSError, AuditUnavailable, AuditKeyError, StoreUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = _load(args.config)
        from .tlsmaterial import build_material

        build_material(config.tls, config.server.client_cert)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: {args.config}: tls: {exc}", file=sys.stderr)
        return 2
    print(
        f"{config.file}: ok (revision {config.revision}, {len(config.routes)} routes, "
        f"{len(config.issuers)} issuers)"
    )
    from .audit.keys import placement_warnings

    a = config.audit
    for warning in placement_warnings(
        a.db,
        a.jsonl,
        a.mask_key_file,
        a.checkpoint_key_file,
        mask_env=bool(os.environ.get(a.mask_key_env)),
    ):
        print(f"  warning: {warning}")
    for r in config.routes:
        hosts = ",".join(sorted(r.hosts)) or "*"
        print(f"  route {r.name}: {hosts}{r.prefix} -> {r.upstream.url} [{r.mode}]")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running gateway to reload (the admin API's /admin/reload on its ops listener)."""
    import urllib.error
    import urllib.request

    from .admin import load_admin_token

    config = _load(args.config)
    token = load_admin_token(config.ops)
    if token is None:
        print("error: no admin token ([ops] admin_token_file or ZTGW_ADMIN_TOKEN)", file=sys.stderr)
        return 2
    url = f"http://{config.ops.host}:{config.ops.port}/admin/reload"
    request = urllib.request.Request(
        url, method="POST", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:  # noqa: S310 - the configured ops URL
            text = r.read().decode()
            print(text)
            pending = _restart_required(json.loads(text))
            if pending:
                print(
                    "warning: reloaded, but these settings take effect only after a restart: "
                    + ", ".join(pending),
                    file=sys.stderr,
                )
            return 0
    except urllib.error.HTTPError as exc:
        print(f"error: reload refused ({exc.code}): {exc.read().decode()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot reach the gateway at {url}: {exc}", file=sys.stderr)
        return 1


def _restart_required(answer: object) -> list[str]:
    """`restart_required` of a gateway's reload answer, or of every worker's (supervisor)."""
    if not isinstance(answer, dict):
        return []
    found = set(answer.get("restart_required") or ())
    for worker in (answer.get("workers") or {}).values():
        if isinstance(worker, dict):
            found.update(worker.get("restart_required") or ())
    return sorted(found)


def cmd_token_issue(args: argparse.Namespace) -> int:
    from .credentials.devtoken import issue_token

    key = Path(args.key)
    if not key.exists():
        print(f"error: {key}: issuer key not found (run `ztgateway certs init`)", file=sys.stderr)
        return 2
    token = issue_token(
        key,
        sub=args.sub,
        groups=[g for g in args.groups.split(",") if g] if args.groups else [],
        scope=args.scope or "",
        roles=[r for r in args.roles.split(",") if r] if args.roles else [],
        email=args.email,
        ttl=int(args.ttl),
        bind_cert=Path(args.bind_cert) if args.bind_cert else None,
    )
    print(token)
    return 0


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
    from .audit import tail

    config = _load(args.config)
    events = asyncio.run(tail(config.audit.db, args.n))
    if args.json:
        for event in events:
            print(json.dumps(event))
    else:
        print(_audit_rows(events))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from .audit.verify import (
        describe,
        trusted_keys_for,
        unanchored_problem,
        verify_db,
        verify_jsonl,
    )

    config = _load(args.config)
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
    from .commands.common import operator_audit_log

    config = _load(args.config)

    async def recover() -> int:
        log = operator_audit_log(config.audit)
        async with log:
            pass
        return log.stats.recovered

    print(f"recovered {asyncio.run(recover())} events from journals")
    return 0


def cmd_audit_rotate_key(args: argparse.Namespace) -> int:
    from .audit.keys import rotate_checkpoint_key, rotate_mask_key

    a = _load(args.config).audit
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

    from .audit import rotate
    from .audit.checkpoint import CheckpointSigner
    from .audit.keys import load_checkpoint_signing
    from .clock import SYSTEM_CLOCK
    from .commands.common import fmt_duration

    config = _load(args.config)
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
    from .audit import search

    config = _load(args.config)
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


def build_parser() -> argparse.ArgumentParser:
    from .clock import SYSTEM_CLOCK
    from .commands import certs

    p = Parser(
        prog="ztgateway",
        description="Zero-trust enforcement gateway: mTLS, identity, device posture, risk, "
        "continuous sessions and per-route policy in front of legacy web apps.",
        epilog="Durations are written like 90s, 30m, 1h, 7d or 1h30m; times are printed in UTC. "
        "Every listing takes --json for scripts.",
    )
    p.add_argument("--version", action="version", version=f"ztgateway {__version__}")
    sub: Any = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = add_config(sub.add_parser("run", help="run the gateway"))
    run.add_argument(
        "--log-level",
        default=None,
        choices=("debug", "info", "warning", "error"),
        help="overrides [logging] level",
    )
    run.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--ops-socket", default=None, help=argparse.SUPPRESS)
    run.add_argument("--supervisor-pid", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--lifeline-fd", type=int, default=None, help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    rl = add_config(sub.add_parser("reload", help="reload a running gateway's configuration"))
    rl.set_defaults(func=cmd_reload)

    check = add_config(sub.add_parser("check-config", help="validate a configuration"))
    check.set_defaults(func=cmd_check_config)

    certs.register(sub)

    token = sub.add_parser("token", help="development bearer tokens")
    tsub = token.add_subparsers(dest="token_command", required=True, metavar="SUBCOMMAND")
    issue = tsub.add_parser("issue", help="print a token the demo configuration trusts")
    issue.add_argument("--sub", required=True, metavar="USER", help="the token's subject (user)")
    issue.add_argument("--groups", default="", metavar="G1,G2", help="comma-separated groups claim")
    issue.add_argument("--roles", default="", metavar="R1,R2", help="comma-separated roles claim")
    issue.add_argument("--scope", default="", help="space-separated scopes (quote them)")
    issue.add_argument("--email", help="email claim")
    issue.add_argument(
        "--ttl",
        type=duration_arg("s"),
        default=300.0,
        metavar="DURATION",
        help="lifetime, like 5m or 1h (a bare number is seconds; default 5m)",
    )
    issue.add_argument(
        "--bind-cert", metavar="PEM", help="client certificate to bind the token to (RFC 8705)"
    )
    issue.add_argument(
        "--key",
        default="certs/issuer.key",
        metavar="FILE",
        help="dev issuer signing key (default: certs/issuer.key)",
    )
    issue.set_defaults(func=cmd_token_issue)

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

    from . import devidp, devssf
    from .agent import cli as agent_cli
    from .commands import devices, users
    from .policycli import register as register_policy

    register_policy(sub)
    devices.register(sub)
    users.register(sub)
    devidp.register(sub)
    devssf.register(sub)
    agent_cli.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command_line(build_parser(), argv)
