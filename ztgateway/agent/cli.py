"""`ztgateway agent report` (and the standalone `ztgateway-agent report`).

Settings come from a small TOML file (default /etc/ztgateway/agent.toml, see
deploy/agent.example.toml), each overridable by a flag:

    gateway = "https://gateway.example.com"   # the gateway's public URL
    cert = "/etc/ztgateway/device.pem"        # the device certificate (PEM, chain allowed)
    key = "/etc/ztgateway/device.key"         # its private key: signs the report too
    ca = "/etc/ztgateway/gateway-ca.pem"      # CA for the gateway's server certificate
    signed = true                             # sign reports with the device key (JWS)
    timeout = "30s"
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..commands.common import Parser, duration_arg, run_command_line
from ..configreader import ConfigError, Table
from ..risk.posture import PostureError

DEFAULT_CONFIG = "/etc/ztgateway/agent.toml"
EXIT_REFUSED = 1
EXIT_USAGE = 2


@dataclass(frozen=True, slots=True)
class AgentSettings:
    gateway: str | None
    cert: Path | None
    key: Path | None
    ca: Path | None
    signed: bool
    timeout: float


def load_settings(path: Path | None) -> AgentSettings:
    """The agent's TOML file; a missing default file is fine (flags may say everything)."""
    if path is None:
        default = Path(DEFAULT_CONFIG)
        if not default.exists():
            return AgentSettings(None, None, None, None, True, 30.0)
        path = default
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from exc
    t = Table(data, path.resolve())
    settings = AgentSettings(
        gateway=t.text("gateway"),
        cert=t.path("cert", must_exist=False),
        key=t.path("key", must_exist=False),
        ca=t.path("ca", must_exist=False),
        signed=t.flag("signed", True),
        timeout=t.duration("timeout", 30.0, min=1.0),
    )
    t.done()
    if settings.gateway is not None and not settings.gateway.startswith("https://"):
        t.fail("gateway", f"must be the gateway's https:// URL, not {settings.gateway!r}")
    return settings


def _merged(args: argparse.Namespace) -> AgentSettings:
    base = load_settings(Path(args.config) if args.config else None)
    return AgentSettings(
        gateway=args.gateway or base.gateway,
        cert=Path(args.cert) if args.cert else base.cert,
        key=Path(args.key) if args.key else base.key,
        ca=Path(args.ca) if args.ca else base.ca,
        signed=base.signed and not args.unsigned,
        timeout=args.timeout if args.timeout is not None else base.timeout,
    )


def _warn_if_readable(key: Path) -> None:
    try:
        mode = key.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(
            f"warning: {key} is readable by other users (chmod 600 it): whoever reads it can "
            "speak for this device",
            file=sys.stderr,
        )


def cmd_report(args: argparse.Namespace) -> int:
    from .report import collect_report, device_id_of, send_report

    settings = _merged(args)
    device_id = None
    if settings.cert is not None and settings.cert.exists():
        device_id = device_id_of(settings.cert.read_bytes())
    try:
        report = collect_report(args.platform, device_id=device_id)
    except PostureError as exc:
        print(f"error: the collected report is not valid: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if args.dry_run:
        print(json.dumps(report, indent=2))
        return 0
    missing = [
        name
        for name, value in (
            ("gateway", settings.gateway),
            ("cert", settings.cert),
            ("key", settings.key),
        )
        if value is None
    ]
    if missing:
        print(
            f"error: no {', '.join(missing)}: set them in {args.config or DEFAULT_CONFIG} or "
            f"pass --{' --'.join(missing)} (or use --dry-run to only print the report)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    assert settings.gateway and settings.cert and settings.key
    for path in (settings.cert, settings.key, settings.ca):
        if path is not None and not path.exists():
            print(f"error: {path}: no such file", file=sys.stderr)
            return EXIT_USAGE
    _warn_if_readable(settings.key)
    try:
        answer = send_report(
            settings.gateway,
            report,
            cert=settings.cert,
            key=settings.key,
            ca=settings.ca,
            signed=settings.signed,
            timeout=settings.timeout,
        )
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        print(f"error: cannot reach {settings.gateway}: {reason}", file=sys.stderr)
        return EXIT_REFUSED
    if args.json:
        print(json.dumps({"status": answer.status, **answer.body}, indent=2))
    else:
        print(_describe(answer.status, answer.body, device_id))
    return 0 if answer.accepted else EXIT_REFUSED


def _describe(status: int, body: dict[str, Any], device_id: str | None) -> str:
    who = body.get("device_id") or device_id or "this device"
    if status != 200:
        reason = body.get("reason") or body.get("title") or f"HTTP {status}"
        detail = f": {body['detail']}" if body.get("detail") else ""
        decision = f" (decision {body['decision_id']})" if body.get("decision_id") else ""
        return f"{who}: report refused, {reason}{detail}{decision}"
    signed = "signed" if body.get("signed") else "unsigned"
    if body.get("compliant"):
        return f"{who}: {signed} report accepted; the device is compliant"
    lines = [f"{who}: {signed} report accepted; the device is NOT compliant"]
    for check in body.get("checks", []):
        if isinstance(check, dict) and not check.get("passed"):
            lines.append(f"  - {check.get('check')}: {check.get('remediation', '')}")
    return "\n".join(lines)


def _configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="agent_command", required=True, metavar="SUBCOMMAND")
    rp = sub.add_parser(
        "report",
        help="collect this device's posture and send it to the gateway",
        description="Collect this device's posture (disk encryption, firewall, screen lock, "
        "patches, OS) and POST it, signed with the device key, to the gateway over mTLS.",
    )
    rp.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=os.environ.get("ZTGW_AGENT_CONFIG"),
        help=f"agent settings (default: {DEFAULT_CONFIG} when it exists)",
    )
    rp.add_argument("--gateway", metavar="URL", help="the gateway's https:// URL")
    rp.add_argument("--cert", metavar="PEM", help="the device certificate")
    rp.add_argument("--key", metavar="PEM", help="the device certificate's private key")
    rp.add_argument(
        "--ca", metavar="PEM", help="CA of the gateway's server certificate (default: system)"
    )
    rp.add_argument(
        "--dry-run", action="store_true", help="print the report (with evidence), send nothing"
    )
    rp.add_argument(
        "--unsigned", action="store_true", help="send plain JSON instead of a signed JWS"
    )
    rp.add_argument(
        "--timeout",
        type=duration_arg("s"),
        default=None,
        metavar="DURATION",
        help="give up after this long, like 30s (default 30s)",
    )
    rp.add_argument(
        "--platform",
        choices=("linux", "macos", "windows"),
        default=None,
        help="read as this platform (default: the one it runs on)",
    )
    rp.add_argument("--json", action="store_true", help="print the gateway's answer as JSON")
    rp.set_defaults(func=cmd_report)


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "agent",
        help="the device agent: report this device's posture",
        description="The device agent. Runs on devices, not on the gateway host.",
    )
    _configure(parser)


def main(argv: list[str] | None = None) -> int:
    """`ztgateway-agent report …`: the agent alone, for devices."""
    from .. import __version__

    parser = Parser(prog="ztgateway-agent", description="ztgateway device agent")
    parser.add_argument("--version", action="version", version=f"ztgateway-agent {__version__}")
    _configure(parser)
    return run_command_line(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
