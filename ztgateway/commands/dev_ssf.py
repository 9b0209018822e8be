"""`ztgateway dev-ssf send`: make the DEVELOPMENT-ONLY IdP send one Shared Signals event.

The command asks the dev IdP's control endpoint (`POST {issuer}/ssf/send`, with its control
token) to sign a Security Event Token and push it to the gateway or queue it for the gateway's
poll; the transmitter itself is `ztgateway.dev.ssf`. It exits non-zero when the IdP refuses or
the gateway did not accept the push (202), so a script can tell.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import aiohttp

from ..dev.ssf import EVENT_TYPES, SUBJECT_FORMATS, TIMEOUT, subject_id


async def _send(args: argparse.Namespace) -> int:
    issuer = args.idp.rstrip("/")
    token = args.control_token or os.environ.get(args.control_token_env, "")
    if not token:
        print(f"error: give --control-token or set {args.control_token_env}", file=sys.stderr)
        return 2
    subject: dict[str, Any] = subject_id(args.format, args.sub, issuer=issuer, email=args.sub)
    if args.device or args.sid:
        subject = {"format": "complex", "user": subject}
        if args.device:
            subject["device"] = {"format": "opaque", "id": args.device}
        if args.sid:
            subject["session"] = {"format": "opaque", "id": args.sid}
    body: dict[str, Any] = {"event": args.event, "subject": subject}
    if args.delivery:
        body["delivery"] = args.delivery
    if args.status:
        body["status"] = args.status
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            issuer + "/ssf/send",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=TIMEOUT * 2),
        ) as resp,
    ):
        text = await resp.text()
    print(text)
    if resp.status != 200:
        return 1
    answer = json.loads(text)
    status = answer.get("receiver_status")
    return 0 if status in (None, 202) else 1


def _cmd_send(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_send(args))
    except (aiohttp.ClientError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`ztgateway dev-ssf send --event session-revoked --sub alice`."""
    parser = subparsers.add_parser(
        "dev-ssf",
        help="make the DEVELOPMENT-ONLY IdP send a Shared Signals event",
        description="DEVELOPMENT ONLY: the dev IdP signs a Security Event Token and pushes it "
        "to the gateway (or queues it for the gateway's poll).",
    )
    sub = parser.add_subparsers(dest="devssf_command", metavar="SUBCOMMAND", required=True)
    send = sub.add_parser("send", help="send one event about one subject")
    send.add_argument("--idp", default="http://127.0.0.1:9200", help="the dev IdP's issuer URL")
    send.add_argument(
        "--event", required=True, choices=sorted(EVENT_TYPES), help="the CAEP/RISC/SSF event"
    )
    send.add_argument("--sub", required=True, help="the user (its sub, e-mail or opaque id)")
    send.add_argument(
        "--format",
        choices=SUBJECT_FORMATS,
        default="iss_sub",
        help="the subject's RFC 9493 format (default iss_sub, with the dev IdP as iss)",
    )
    send.add_argument("--device", help="a device id (complex subject: user and device)")
    send.add_argument("--sid", help="the IdP session id (complex subject: user and session)")
    send.add_argument(
        "--status",
        choices=("compliant", "not-compliant"),
        help="device-compliance-change: the new status (default not-compliant)",
    )
    send.add_argument(
        "--delivery",
        choices=("push", "poll"),
        help="push to the gateway now, or queue for its poll (default: push if configured)",
    )
    send.add_argument("--control-token", help="the [ssf] control_token of the dev IdP")
    send.add_argument(
        "--control-token-env",
        default="ZTGW_DEV_SSF_TOKEN",
        help="or the variable holding it (default ZTGW_DEV_SSF_TOKEN)",
    )
    send.set_defaults(func=_cmd_send)
