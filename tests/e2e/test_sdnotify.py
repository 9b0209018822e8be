"""`Type=notify`: the gateway tells its service manager READY=1 only once it serves, RELOADING=1
and READY=1 around a SIGHUP, STOPPING=1 at shutdown; with `workers = 2` the supervisor says so
for the whole gateway and the workers' own messages never reach the service manager.

The service manager is played by a real datagram socket given as NOTIFY_SOCKET, as systemd
does (sd_notify(3))."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import base_config
from tests.support import Certs, client_ssl, deep_merge, free_ports, to_toml
from ztgateway.process import sdnotify

pytestmark = pytest.mark.replicas


class ServiceManager:
    """The receiving end of NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(60)

    async def next(self) -> dict[str, str]:
        data = await asyncio.to_thread(self.sock.recv, 4096)
        return sdnotify.parse(data)

    async def until(self, key: str) -> list[dict[str, str]]:
        """Every message up to and including the first that carries `key`."""
        seen = []
        while True:
            fields = await self.next()
            seen.append(fields)
            if key in fields:
                return seen


@contextmanager
def gateway(
    certs: Certs, upstream: int, tmp_path: Path, manager: ServiceManager, **sections: Any
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port, ops = free_ports(2)
    cfg = base_config(certs, upstream, tmp_path)
    cfg["server"].update({"port": port})
    cfg["ops"]["port"] = ops
    path = tmp_path / "gw.toml"
    path.write_text(to_toml(deep_merge(cfg, sections)))
    env = {**os.environ, sdnotify.ENV: str(manager.path)}
    proc = subprocess.Popen([sys.executable, "-m", "ztgateway", "run", "-c", str(path)], env=env)
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        manager.sock.close()


async def answers(certs: Certs, port: int) -> int:
    """A request through the gateway right now: no retry, so READY=1 must mean it serves."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl(certs))) as s,
        s.get(f"https://127.0.0.1:{port}/echo") as r,
    ):
        return r.status


async def test_one_process_says_ready_once_it_serves_and_reloading_and_stopping(
    certs: Certs, upstream: int, tmp_path: Path
) -> None:
    manager = ServiceManager(tmp_path / "notify.sock")
    with gateway(certs, upstream, tmp_path, manager) as (proc, port):
        ready = await manager.next()
        assert ready["READY"] == "1"
        assert f"serving https://127.0.0.1:{port}" in ready["STATUS"]
        assert await answers(certs, port) == 200

        proc.send_signal(signal.SIGHUP)
        reloading = await manager.next()
        assert reloading["RELOADING"] == "1"
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert (await manager.next())["READY"] == "1"

        # A reload the configuration refuses keeps the old revision serving, and says so.
        (tmp_path / "gw.toml").write_text("[server\nbroken")
        proc.send_signal(signal.SIGHUP)
        assert "RELOADING" in await manager.next()
        after = await manager.next()
        assert after["READY"] == "1" and after["STATUS"].startswith("reload refused")
        assert await answers(certs, port) == 200

        proc.send_signal(signal.SIGTERM)
        assert (await manager.next())["STOPPING"] == "1"
        assert proc.wait(timeout=40) == 0


async def test_supervisor_says_ready_for_its_workers_and_keeps_their_messages(
    certs: Certs, upstream: int, tmp_path: Path
) -> None:
    manager = ServiceManager(tmp_path / "notify.sock")
    sections = {"server": {"workers": 2, "min_ready_workers": 2}}
    with gateway(certs, upstream, tmp_path, manager, **sections) as (proc, port):
        ready = await manager.next()
        assert ready["READY"] == "1"
        assert ready["STATUS"].startswith("2 of 2 workers serving")
        assert sdnotify.WORKER_FIELD not in ready  # the workers spoke to the supervisor only
        for _ in range(4):  # new connections: the kernel spreads them over both workers
            assert await answers(certs, port) == 200

        proc.send_signal(signal.SIGHUP)
        assert "RELOADING" in await manager.next()
        again = await manager.next()  # only once both workers have reloaded
        assert again["READY"] == "1" and sdnotify.WORKER_FIELD not in again

        proc.send_signal(signal.SIGTERM)
        assert (await manager.next())["STOPPING"] == "1"
        assert proc.wait(timeout=40) == 0


def test_no_notify_socket_is_no_message_and_an_abstract_one_is_reached() -> None:
    assert sdnotify.notify("READY=1", environ={}) is False
    assert sdnotify.notify("READY=1", environ={sdnotify.ENV: "vsock:2:1234"}) is False
    name = f"ztgw-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert sdnotify.notify("READY=1", "STATUS=x", environ={sdnotify.ENV: "@" + name})
        assert sdnotify.parse(sock.recv(4096)) == {"READY": "1", "STATUS": "x"}


def test_a_gone_service_manager_is_logged_not_raised(tmp_path: Path) -> None:
    assert sdnotify.notify("READY=1", environ={sdnotify.ENV: str(tmp_path / "nobody")}) is False
