"""`ztgateway dev-idp`: serve the DEVELOPMENT-ONLY OpenID Provider, or make a password hash
for its users file.

It refuses any listen address but loopback unless told `--i-know-this-is-insecure`, and says
DEVELOPMENT ONLY on start-up; the provider itself is `ztgateway.dev.idp`.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import signal
import sys
from pathlib import Path

from ..configreader import ConfigError
from ..dev.idp import (
    BANNER,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_USERS_FILE,
    is_loopback_host,
    start_devidp,
)
from ..dev.idp_shapes import SHAPES
from ..dev.idp_users import hash_password

logger = logging.getLogger("ztgateway.dev.idp")


async def _serve(args: argparse.Namespace) -> None:
    runner, port, issuer = await start_devidp(
        args.host,
        args.port,
        Path(args.users),
        issuer=args.issuer,
        key_file=Path(args.key) if args.key else None,
        allow_insecure_bind=args.i_know_this_is_insecure,
        shape=SHAPES[args.shape],
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"dev-idp: {BANNER}", file=sys.stderr)
    print(f"dev-idp: issuer {issuer} listening on {args.host}:{port}", file=sys.stderr)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def _cmd_serve(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    if not is_loopback_host(args.host) and not args.i_know_this_is_insecure:
        print(
            f"error: refusing to serve the development IdP on {args.host!r}: it is not a "
            "loopback address (add --i-know-this-is-insecure to do it anyway)",
            file=sys.stderr,
        )
        return 2
    if args.i_know_this_is_insecure and not is_loopback_host(args.host):
        logger.warning("dev-idp: listening on non-loopback %s: %s", args.host, BANNER)
    try:
        asyncio.run(_serve(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_hash_password(args: argparse.Namespace) -> int:
    """Print a hash for the users file; the password comes from a prompt or one stdin line."""
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("error: the passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("error: empty password", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST, help="listen address (loopback only)")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"listen port (default {DEFAULT_PORT}; 0 picks a free one)",
    )
    parser.add_argument("--users", default=DEFAULT_USERS_FILE, help="users and clients file")
    parser.add_argument(
        "--issuer", help="issuer URL (default http://HOST:PORT); must be how clients reach us"
    )
    parser.add_argument("--key", help="EC P-256 PKCS#8 PEM signing key (default: a new one)")
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="generic",
        help="look like this provider: its paths, claims, groups and logout (docs/oidc.md)",
    )
    parser.add_argument(
        "--i-know-this-is-insecure",
        action="store_true",
        help="allow a non-loopback listen address",
    )
    parser.set_defaults(func=_cmd_serve)
    sub = parser.add_subparsers(dest="devidp_command", metavar="SUBCOMMAND")
    hp = sub.add_parser(
        "hash-password", help="print a scrypt hash for the users file (reads the password)"
    )
    hp.set_defaults(func=_cmd_hash_password)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `ztgateway dev-idp [options]` (serve) and `ztgateway dev-idp hash-password`."""
    parser = subparsers.add_parser(
        "dev-idp",
        help="run the DEVELOPMENT-ONLY OpenID Provider",
        description=f"{BANNER}. Serves OpenID Connect for the browser sign-in demo.",
    )
    _configure(parser)
