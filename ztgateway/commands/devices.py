"""`ztgateway devices list | show | approve | revoke | rebind | set-owner`.

The commands write to the same store the running gateway reads; it picks the change up within
its sync interval (0.25 s for SQLite), so a revocation holds at once without a restart.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..clock import SYSTEM_CLOCK
from ..config import load_config
from ..store import Store, store_from_url


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts else "-"


async def _with_store(args: argparse.Namespace, work: Callable[[Store], Awaitable[int]]) -> int:
    config = load_config(args.config)
    store = store_from_url(config.store.url, base=config.store.base)
    await store.open()
    try:
        return await work(store)
    finally:
        await store.close()


def cmd_list(args: argparse.Namespace) -> int:
    async def work(store: Store) -> int:
        devices = store.devices()
        if args.json:
            print(json.dumps([d.to_json() for d in devices], indent=2))
            return 0
        print(
            f"{'DEVICE':<28} {'STATE':<9} {'OWNER':<12} {'LAST SEEN':<21} {'LAST IP':<16} POSTURE"
        )
        for d in devices:
            p = store.posture(d.device_id)
            posture = _when(p.received_at) if p else "none"
            print(
                f"{d.device_id:<28} {d.state:<9} {d.owner or '-':<12} {_when(d.last_seen):<21} "
                f"{d.last_ip or '-':<16} {posture}"
            )
        return 0

    return asyncio.run(_with_store(args, work))


def cmd_show(args: argparse.Namespace) -> int:
    async def work(store: Store) -> int:
        from ..posture import evaluate

        d = store.device(args.device)
        if d is None:
            print(f"error: no device {args.device!r}", file=sys.stderr)
            return 1
        p = store.posture(d.device_id)
        config = load_config(args.config)

        evaluation = evaluate(
            p.report if p else None,
            p.received_at if p else None,
            config.posture,
            now=SYSTEM_CLOCK.time(),
        )
        out: dict[str, Any] = {**d.to_json(), "posture": evaluation.to_json()}
        if p:
            out["last_report"] = p.report
        print(json.dumps(out, indent=2, default=str))
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
    from ..certverify import ClientCertVerifier
    from ..tls import RevocationList, load_crl

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
    dsub = p.add_subparsers(dest="devices_command", required=True)

    def add(
        name: str, help_text: str, func: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = dsub.add_parser(name, help=help_text)
        sp.add_argument("-c", "--config", default="config/gateway.toml")
        sp.set_defaults(func=func)
        return sp

    add("list", "all devices", cmd_list).add_argument("--json", action="store_true")
    add("show", "one device with its posture", cmd_show).add_argument("device")
    add("approve", "approve a pending device", _setter("approved")).add_argument("device")
    add("revoke", "refuse a device everywhere", _setter("revoked")).add_argument("device")
    rb = add(
        "rebind",
        "pin the device to a new key: its new certificate's (--cert), else the next one it shows",
        cmd_rebind,
    )
    rb.add_argument("device")
    rb.add_argument("--cert", help="the device's new certificate (PEM), verified against the CA")
    so = add("set-owner", "change the device's owner", _setter("owner"))
    so.add_argument("device")
    so.add_argument("owner")
