"""`ztgateway run`: start the gateway (one process, or a supervisor and its workers).

Start-up errors are one line on stderr with exit status 2 for a configuration the gateway refuses
and 1 for what the host refuses (a port in use, the audit log or the store unreachable), so a
service manager and an operator both know what to fix.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from ..config import load_config
from ..configreader import ConfigError
from .common import add_config


def cmd_run(args: argparse.Namespace) -> int:
    from ..app import serve

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ..logs import setup_logging

    log_limit = setup_logging(args.log_level or config.logging.level, config.logging.format)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    from ..audit import AuditKeyError, AuditUnavailable
    from ..store import StoreUnavailable

    if config.server.workers > 1 and args.worker is None:
        from ..process.workers import Supervisor

        try:
            asyncio.run(
                Supervisor(config, Path(args.config).resolve(), config.server.workers).run()
            )
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.supervisor_pid is not None:
        from ..process.lifeline import die_with_parent

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


def register(sub: Any) -> None:
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
