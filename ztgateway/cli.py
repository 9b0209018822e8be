"""The `ztgateway` command line: the parser, wired to the commands in `commands/` (one module
each); nothing here does a command's work."""

from __future__ import annotations

from typing import Any

from . import __version__
from .commands.common import Parser, run_command_line


def build_parser() -> Parser:
    from .agent import cli as agent_cli
    from .commands import (
        audit,
        certs,
        check_config,
        dev_idp,
        dev_ssf,
        devices,
        policy,
        reload,
        run,
        token,
        users,
    )

    p = Parser(
        prog="ztgateway",
        description="Zero-trust enforcement gateway: mTLS, identity, device posture, risk, "
        "continuous sessions and per-route policy in front of legacy web apps.",
        epilog="Durations are written like 90s, 30m, 1h, 7d or 1h30m; times are printed in UTC. "
        "Every listing takes --json for scripts.",
    )
    p.add_argument("--version", action="version", version=f"ztgateway {__version__}")
    sub: Any = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for command in (run, reload, check_config, certs, token, audit, policy, devices, users):
        command.register(sub)
    dev_idp.register(sub)
    dev_ssf.register(sub)
    agent_cli.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command_line(build_parser(), argv)
