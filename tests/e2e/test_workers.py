"""`workers = 2`: two processes on one port, merged metrics, a killed worker restarted."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import base_config
from tests.support import Certs, client_ssl, to_toml

pytestmark = pytest.mark.replicas


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def metric(ops: int, name: str) -> float:
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


async def test_two_workers_share_the_port_and_a_killed_worker_is_restarted(
    certs: Certs, upstream: int, tmp_path: Path
) -> None:
    port, ops = free_port(), free_port()
    cfg = base_config(certs, upstream, tmp_path)
    cfg["server"].update({"port": port, "workers": 2})
    cfg["ops"]["port"] = ops
    path = tmp_path / "gw.toml"
    path.write_text(to_toml(cfg))
    sup = subprocess.Popen([sys.executable, "-m", "ztgateway", "run", "-c", str(path)])
    try:
        await wait_for(lambda: _up(ops, 2))
        ctx = client_ssl(certs)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx, force_close=True)
        ) as s:
            for _ in range(20):
                async with s.get(f"https://127.0.0.1:{port}/echo") as r:
                    assert r.status == 200
        assert await metric(ops, "ztgw_requests_total") == 20.0
        children = subprocess.run(
            ["pgrep", "-P", str(sup.pid)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert len(children) == 2
        subprocess.run(["kill", "-9", children[0]], check=True)
        await wait_for(lambda: _restarted(ops))
        await wait_for(lambda: _up(ops, 2))
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx, force_close=True)
        ) as s:
            for _ in range(10):
                async with s.get(f"https://127.0.0.1:{port}/echo") as r:
                    assert r.status == 200
    finally:
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=40) == 0


async def _up(ops: int, n: int) -> bool:
    return await metric(ops, "ztgw_workers_up") == n


async def _restarted(ops: int) -> bool:
    return await metric(ops, "ztgw_worker_restarts_total") >= 1
