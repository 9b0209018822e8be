"""The `ztgateway` command line: run, check-config, certs, token, audit, policy."""

from __future__ import annotations

import argparse
import asyncio
import json
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

    setup_logging(args.log_level or config.logging.level, config.logging.format)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    from .audit import AuditUnavailable
    from .store import StoreUnavailable

    if config.server.workers > 1 and args.worker is None:
        from .workers import Supervisor

        asyncio.run(Supervisor(config, Path(args.config).resolve(), config.server.workers).run())
        return 0
    try:
        ops_socket = Path(args.ops_socket) if args.ops_socket else None
        asyncio.run(serve(config, worker=args.worker, ops_socket=ops_socket))
    except (OSError, AuditUnavailable, StoreUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = _load(args.config)
        from .tls import build_material

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
            print(r.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        print(f"error: reload refused ({exc.code}): {exc.read().decode()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot reach the gateway at {url}: {exc}", file=sys.stderr)
        return 1


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
    from .audit import verify_db, verify_jsonl

    config = _load(args.config)
    result = (
        verify_jsonl(Path(args.jsonl))
        if args.jsonl
        else asyncio.run(verify_db(config.audit.db, archives=not args.no_archives))
    )
    if result.ok:
        print(f"ok: {result.checked} events, chain intact")
        return 0
    print(
        f"TAMPERED: first bad event seq={result.first_bad_seq} "
        f"decision_id={result.first_bad_decision_id}: {result.problem} "
        f"({result.checked} events checked)",
        file=sys.stderr,
    )
    return 1


def cmd_audit_rotate(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from .audit import rotate
    from .clock import SYSTEM_CLOCK
    from .commands.common import fmt_duration

    config = _load(args.config)
    archive_dir = (
        Path(args.archive_dir) if args.archive_dir else config.audit.db.parent / "audit-archive"
    )
    age = args.older_than
    before = SYSTEM_CLOCK.now() - timedelta(seconds=age)
    result = asyncio.run(rotate(config.audit.db, archive_dir, before=before))
    if result.archived == 0:
        print(f"nothing older than {fmt_duration(age)}")
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

    from . import devidp
    from .agent import cli as agent_cli
    from .commands import devices, users
    from .policycli import register as register_policy

    register_policy(sub)
    devices.register(sub)
    users.register(sub)
    devidp.register(sub)
    agent_cli.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command_line(build_parser(), argv)
