"""`ztgateway devices list | show | approve | revoke | rebind | set-owner`.

The commands write to the same store the running gateway reads; it picks the change up within
its sync interval (0.25 s for SQLite), so a revocation holds at once without a restart.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..clock import SYSTEM_CLOCK
from ..config import load_config
from ..risk.posture import PostureEvaluation, PosturePolicy, evaluate
from ..store import Store, store_from_url
from .common import add_config, add_json, fmt_time, key_values, print_json, table


async def _with_store(args: argparse.Namespace, work: Callable[[Store], Awaitable[int]]) -> int:
    config = load_config(args.config)
    store = store_from_url(config.store.url, base=config.store.base)
    await store.open()
    try:
        return await work(store)
    finally:
        await store.close()


# A check's name where it differs from the report field whose evidence explains it.
_REPORT_FIELD = {"patch_age": "last_patch"}


def _evaluate(store: Store, policy: PosturePolicy, device_id: str) -> PostureEvaluation:
    p = store.posture(device_id)
    return evaluate(
        p.report if p else None,
        p.received_at if p else None,
        policy,
        now=SYSTEM_CLOCK.time(),
        signed=p.signed if p else False,
    )


def cmd_list(args: argparse.Namespace) -> int:
    async def work(store: Store) -> int:
        devices = store.devices()
        policy = load_config(args.config).posture
        if args.json:
            print_json([d.to_json() for d in devices])
            return 0
        rows = []
        for d in devices:
            p = store.posture(d.device_id)
            if p is None:
                posture = "no report"
            else:
                ev = _evaluate(store, policy, d.device_id)
                posture = "compliant" if ev.compliant else "non-compliant"
                if not ev.compliant:
                    posture += f" ({', '.join(ev.failed)})"
            rows.append(
                (
                    d.device_id,
                    d.state,
                    d.owner or "-",
                    fmt_time(d.last_seen),
                    d.last_ip or "-",
                    fmt_time(p.received_at) if p else "-",
                    posture,
                )
            )
        headers = ("DEVICE", "STATE", "OWNER", "LAST SEEN", "LAST IP", "REPORTED", "POSTURE")
        print(table(headers, rows, empty="no devices yet"))
        return 0

    return asyncio.run(_with_store(args, work))


def cmd_show(args: argparse.Namespace) -> int:
    async def work(store: Store) -> int:
        d = store.device(args.device)
        if d is None:
            print(f"error: no device {args.device!r}", file=sys.stderr)
            return 1
        p = store.posture(d.device_id)
        evaluation = _evaluate(store, load_config(args.config).posture, d.device_id)
        if args.json:
            out: dict[str, Any] = {**d.to_json(), "posture": evaluation.to_json()}
            if p:
                out["last_report"] = p.report
            print_json(out)
            return 0
        print(
            key_values(
                [
                    ("device", d.device_id),
                    ("state", d.state),
                    ("owner", d.owner),
                    ("first seen", fmt_time(d.first_seen)),
                    ("last seen", fmt_time(d.last_seen)),
                    ("last ip", d.last_ip),
                    ("posture", "compliant" if evaluation.compliant else "non-compliant"),
                    ("reported", fmt_time(p.received_at) if p else "never"),
                    ("signed report", ("yes" if p.signed else "no") if p else "-"),
                ]
            )
        )
        evidence = p.report.get("evidence", {}) if p else {}
        if p and p.report.get("source"):
            print(f"reported by: {p.report['source']}")
        print("checks:")
        for c in evaluation.checks:
            mark = "ok  " if c.passed else "FAIL"
            detail = f" ({c.detail})" if c.detail else ""
            print(f"  {mark} {c.name}{detail}")
            seen = (
                evidence.get(_REPORT_FIELD.get(c.name, c.name))
                if isinstance(evidence, dict)
                else None
            )
            if seen:
                print(f"       seen: {seen}")
            if not c.passed and c.remediation:
                print(f"       -> {c.remediation}")
        return 0

    return asyncio.run(_with_store(args, work))


def _setter(field: str) -> Callable[[argparse.Namespace], int]:
    def cmd(args: argparse.Namespace) -> int:
        async def work(store: Store) -> int:
            if field == "owner":
                d = await store.set_device_owner(args.device, args.owner)
            else:
                d = await store.set_device_state(args.device, field)  # type: ignore[arg-type]
            if d is None:
                print(f"error: no device {args.device!r}", file=sys.stderr)
                return 1
            print(f"{d.device_id}: state={d.state} owner={d.owner or '-'}")
            return 0

        return asyncio.run(_with_store(args, work))

    return cmd


def cmd_rebind(args: argparse.Namespace) -> int:
    from ..admin import rebind_device
    from ..edge.certverify import ClientCertVerifier
    from ..edge.tls import RevocationList, load_crl

    config = load_config(args.config)
    crl = load_crl(config.tls.crl) if config.tls.crl else RevocationList()
    verifier = ClientCertVerifier(config.tls.client_ca, crl)
    pem = Path(args.cert).read_bytes() if args.cert else None

    async def work(store: Store) -> int:
        try:
            d = await rebind_device(store, args.device, pem, verifier, SYSTEM_CLOCK.time())
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if d is None:
            print(f"error: no device {args.device!r}", file=sys.stderr)
            return 1
        key = "the next certificate it presents" if pem is None else f"key {d.spki}"
        print(f"{d.device_id}: bound to {key}")
        return 0

    return asyncio.run(_with_store(args, work))


def register(sub: Any) -> None:
    p = sub.add_parser("devices", help="the device registry")
    dsub = p.add_subparsers(dest="devices_command", required=True, metavar="SUBCOMMAND")

    def add(
        name: str, help_text: str, func: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = add_config(dsub.add_parser(name, help=help_text))
        sp.set_defaults(func=func)
        return sp

    device_help = "device id (the certificate's urn:ztgw:device:<id>)"
    add_json(add("list", "all devices with their state and posture", cmd_list))
    add_json(add("show", "one device with its posture checks", cmd_show)).add_argument(
        "device", help=device_help
    )
    add("approve", "approve a pending device", _setter("approved")).add_argument(
        "device", help=device_help
    )
    add("revoke", "refuse a device everywhere", _setter("revoked")).add_argument(
        "device", help=device_help
    )
    rb = add(
        "rebind",
        "pin the device to a new key: its new certificate's (--cert), else the next one it shows",
        cmd_rebind,
    )
    rb.add_argument("device", help=device_help)
    rb.add_argument("--cert", help="the device's new certificate (PEM), verified against the CA")
    so = add("set-owner", "change the device's owner", _setter("owner"))
    so.add_argument("device", help=device_help)
    so.add_argument("owner", help="the user the device belongs to")
