"""`workers = 2`: two processes on one port, merged metrics, a killed worker restarted, the
admin API, reload and forward-auth answered through the supervisor's one ops port."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import base_config
from tests.support import ADMIN_TOKEN, Certs, client_ssl, deep_merge, free_ports, to_toml

pytestmark = pytest.mark.replicas


@dataclass
class Supervised:
    proc: subprocess.Popen[bytes]
    port: int  # the mTLS port the workers share
    ops: int  # the supervisor's ops port

    def socket_dir(self) -> Path:
        """The supervisor's private directory of worker ops sockets (from a worker's argv)."""
        argv = Path(f"/proc/{self.workers()[0]}/cmdline").read_bytes().split(b"\0")
        return Path(argv[argv.index(b"--ops-socket") + 1].decode()).parent

    def workers(self) -> list[int]:
        found = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert len(found) == 2
        return [int(pid) for pid in found]


@contextlib.asynccontextmanager
async def supervised(
    certs: Certs, upstream: int, tmp_path: Path, **sections: Any
) -> AsyncIterator[Supervised]:
    """`ztgateway run` with `workers = 2`, once both workers answer; stopped cleanly after."""
    port, ops = free_ports(2)
    cfg = base_config(certs, upstream, tmp_path)
    cfg["server"].update({"port": port, "workers": 2})
    cfg["ops"]["port"] = ops
    cfg = deep_merge(cfg, sections)
    path = tmp_path / "gw.toml"
    path.write_text(to_toml(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "ztgateway", "run", "-c", str(path)])
    try:
        await wait_for(lambda: _up(ops, 2))
        yield Supervised(proc, port, ops)
    finally:
        if proc.poll() is None:  # a test may have killed it
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=40) == 0


async def ops_metric(ops: int, name: str) -> float:
    """A sample from a supervisor's ops port (another process: no registry to read)."""
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{ops}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def wait_for(predicate_coro, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await predicate_coro():
                return
        except (aiohttp.ClientError, OSError):
            pass
        await asyncio.sleep(0.2)
    raise AssertionError("condition not reached")


async def _up(ops: int, n: int) -> bool:
    return await ops_metric(ops, "ztgw_workers_up") == n


async def _restarted(ops: int) -> bool:
    return await ops_metric(ops, "ztgw_worker_restarts_total") >= 1


async def _all_ok(certs: Certs, port: int, n: int) -> None:
    """`n` requests, each on a new connection so the kernel spreads them over the workers."""
    connector = aiohttp.TCPConnector(ssl=client_ssl(certs), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        for _ in range(n):
            async with s.get(f"https://127.0.0.1:{port}/echo") as r:
                assert r.status == 200


async def test_two_workers_share_the_port_and_a_killed_worker_is_restarted(
    certs: Certs, upstream: int, tmp_path: Path
) -> None:
    async with supervised(certs, upstream, tmp_path) as sup:
        await _all_ok(certs, sup.port, 20)
        assert await ops_metric(sup.ops, "ztgw_requests_total") == 20.0
        # Workers once listened on the ops port + 1 + i, which anything on the host may hold
        # (CI found one taken): a worker that could not bind it died and was restarted forever.
        for pid in sup.workers():  # each listens on the shared mTLS port and nothing else
            assert listening_ports(pid) == {sup.port}, pid
        os.kill(sup.workers()[0], signal.SIGKILL)
        await wait_for(lambda: _restarted(sup.ops))
        await wait_for(lambda: _up(sup.ops, 2))
        await _all_ok(certs, sup.port, 10)


def listening_ports(pid: int) -> set[int]:
    """TCP ports `pid` listens on: its socket inodes matched in /proc/net/tcp{,6} (state 0A)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def test_admin_reload_and_forward_auth_go_through_the_supervisor(
    certs: Certs, upstream: int, tmp_path: Path
) -> None:
    forward_auth = {"enabled": True, "trusted_proxies": ["127.0.0.1/32"]}
    async with supervised(certs, upstream, tmp_path, forward_auth=forward_auth) as sup:
        base = f"http://127.0.0.1:{sup.ops}"
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/admin/sessions") as r:
                assert r.status == 401
                assert r.content_type == "application/problem+json"
            async with s.get(f"{base}/admin/sessions", headers=admin) as r:
                assert r.status == 200
            async with s.post(f"{base}/admin/reload") as r:
                assert r.status == 401
            async with s.post(f"{base}/admin/reload", headers=admin) as r:
                body = await r.json()
                assert r.status == 200, body
                assert body["reloaded"] is True
                assert sorted(body["workers"]) == ["0", "1"]
            # The worker judges the supervisor's caller, not the supervisor: 127.0.0.1 is
            # trusted, and a caller-supplied relay header is overwritten.
            for _ in range(2):  # both workers, round-robin
                async with s.get(
                    f"{base}/forward-auth",
                    headers={"X-Original-URI": "/echo", "X-Ztgw-Relay-Peer": "10.0.0.1"},
                ) as r:
                    assert r.status in (401, 403)
                    # The supervisor's own relay header is not taken for a client's spoofing.
                    assert r.headers["X-ZT-Reason"] == "client-cert-required"
            # What the supervisor cannot relay is refused by it, clearly, and counted.
            async with s.post(f"{base}/decide", data=io.BytesIO(b"x" * (2 << 20))) as r:
                assert r.status == 413
                assert r.content_type == "application/problem+json"
            assert await ops_metric(sup.ops, "ztgw_ops_relay_failures_total") == 1
        other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with (
            aiohttp.ClientSession(connector=other) as s,
            s.get(
                f"{base}/forward-auth",
                headers={"X-Original-URI": "/echo", "X-Ztgw-Relay-Peer": "127.0.0.1"},
            ) as r,
        ):
            assert r.status == 403
            assert (await r.json(content_type=None))["reason"] == "request-invalid"
