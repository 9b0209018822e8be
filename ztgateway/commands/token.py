"""`ztgateway token issue`: print a bearer token the demo configuration trusts.

Development only: it signs with the dev issuer's key (`certs/issuer.key`, made by `certs init`),
so whoever holds that key can mint any identity; the signing lives in `ztgateway.dev.tokens`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .common import duration_arg


def cmd_token_issue(args: argparse.Namespace) -> int:
    from ..dev.tokens import issue_token

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


def register(sub: Any) -> None:
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
