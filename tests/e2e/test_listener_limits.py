"""The listener's budgets (issue 19): a reload applies `[server]` limits or names what needs a
restart (D4); pending handshakes are budgeted apart and per source, so one host's raw sockets
do not keep other clients out; a file-descriptor limit below `max_connections` is raised or
warned about, and the excess is refused and counted instead of reset silently."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import GatewayFactory, base_config
from tests.support import (
    ADMIN_TOKEN,
    Certs,
    client_ssl,
    deep_merge,
    free_port,
    free_ports,
    metric,
    scrape,
    session,
    to_toml,
)
from ztgateway.app import Gateway


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


async def admin_reload(gw: Gateway) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"http://127.0.0.1:{gw.ops_port}/admin/reload",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as r,
    ):
        assert r.status == 200
        return dict(await r.json())


def rewrite(gw: Gateway, certs: Certs, upstream: int, tmp_path: Path, **server: Any) -> None:
    """The gateway's configuration file as the fixture wrote it, with `server` changed."""
    cfg = base_config(certs, upstream, tmp_path)
    cfg = deep_merge(cfg, {"server": server})
    gw.config.file.write_text(to_toml(cfg))


async def open_tls(port: int, certs: Certs) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ssl(certs), server_hostname="localhost"
    )


async def served(port: int, certs: Certs) -> bool:
    """One request on a new connection from 127.0.0.1; True when answered 200."""
    try:
        async with session(certs, force_close=True) as s:
            async with s.get(f"https://127.0.0.1:{port}/echo") as r:
                return r.status == 200
    except (aiohttp.ClientError, OSError):
        return False


# ----------------------------------------------------------------------------- D4: reload


async def test_reload_applies_listener_limits_to_new_connections(
    gateway_factory: GatewayFactory, certs: Certs, upstream: int, tmp_path: Path
) -> None:
    gw = await gateway_factory()
    rewrite(
        gw, certs, upstream, tmp_path, max_connections=3, idle_timeout=0.5, max_header_bytes=1024
    )
    answer = await admin_reload(gw)
    assert answer["reloaded"] is True
    assert set(answer["applied"]) == {
        "server.max_connections",
        "server.idle_timeout",
        "server.max_header_bytes",
    }
    assert answer["restart_required"] == []

    # max_connections: three established, the fourth refused and counted.
    held = [await open_tls(gw.port, certs) for _ in range(3)]
    await until(lambda: gw.listener is not None and gw.listener.established == 3)
    with pytest.raises((ConnectionError, ssl.SSLError, OSError, asyncio.IncompleteReadError)):
        reader, writer = await open_tls(gw.port, certs)
        writer.write(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await writer.drain()
        if not await reader.read(1):
            raise ConnectionResetError("closed without an answer")
    assert metric(gw, "ztgw_connections_rejected_total", reason="max_connections") >= 1

    # idle_timeout: a connection that sends nothing is closed after 0.5 s, not 60.
    started = time.monotonic()
    reader, _writer = held[0]
    assert await asyncio.wait_for(reader.read(1), 5) == b""
    assert time.monotonic() - started < 3
    for _, writer in held:
        writer.close()
    await until(lambda: gw.listener is not None and gw.listener.established == 0)

    # max_header_bytes: a 2 KB header is now too large.
    async with session(certs) as s:
        async with s.get(f"https://127.0.0.1:{gw.port}/echo", headers={"X-Big": "a" * 2000}) as r:
            assert r.status == 431


async def test_reload_names_the_settings_that_need_a_restart(
    gateway_factory: GatewayFactory,
    certs: Certs,
    upstream: int,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await gateway_factory()
    cfg = deep_merge(
        base_config(certs, upstream, tmp_path),
        {"server": {"port": free_port(), "workers": 2}, "audit": {"durability": "fsync"}},
    )
    gw.config.file.write_text(to_toml(cfg))
    with caplog.at_level(logging.WARNING, logger="ztgateway"):
        answer = await admin_reload(gw)
    assert answer["reloaded"] is True
    assert answer["restart_required"] == ["server.port", "server.workers", "audit.durability"]
    assert "take effect only after a restart: server.port" in caplog.text
    assert metric(gw, "ztgw_config_restart_required", setting="server.port") == 1.0
    assert metric(gw, "ztgw_config_restart_required", setting="store.url") == 0.0
    # Still pending on the next reload (compared with start-up, not with the last reload).
    assert (await admin_reload(gw))["restart_required"] == answer["restart_required"]


# ----------------------------------------------------------------------------- handshakes


async def test_raw_sockets_from_one_host_do_not_keep_other_clients_out(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    # The soak's O1: 700 raw sockets that never sent a ClientHello filled max_connections (300
    # per worker) and every legitimate client was refused for 7.6 s.
    gw = await gateway_factory({"server": {"max_connections": 50, "handshake_timeout": 30}})
    raw: list[socket.socket] = []
    try:
        for _ in range(300):
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", gw.port))
            raw.append(sock)
        limit = gw.config.server.max_pending_handshakes_per_source
        await until(
            lambda: (
                metric(gw, "ztgw_connections_rejected_total", reason="pending_per_source")
                == 300 - limit
            )
        )
        assert metric(gw, "ztgw_handshakes_pending") == limit
        results = [await served(gw.port, certs) for _ in range(10)]
        assert all(results), results
    finally:
        for sock in raw:
            sock.close()


async def test_pending_handshakes_have_a_budget_of_their_own(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory(
        {"server": {"max_pending_handshakes": 20, "max_pending_handshakes_per_source": 100}}
    )
    raw = []
    try:
        for _ in range(30):
            sock = socket.create_connection(("127.0.0.1", gw.port), source_address=("127.0.0.2", 0))
            raw.append(sock)
        await until(
            lambda: metric(gw, "ztgw_connections_rejected_total", reason="pending_handshakes") == 10
        )
        for sock in raw:
            sock.close()
        await until(lambda: metric(gw, "ztgw_handshakes_pending") == 0)
        assert await served(gw.port, certs)
    finally:
        for sock in raw:
            sock.close()


# ----------------------------------------------------------------------------- fd limit


def run_gateway(
    certs: Certs, upstream: int, tmp_path: Path, *, nofile: tuple[int, int], **server: Any
) -> tuple[subprocess.Popen[bytes], int, int]:
    port, ops = free_ports(2)
    cfg = deep_merge(
        base_config(certs, upstream, tmp_path),
        {"server": {"port": port, **server}, "ops": {"port": ops}},
    )
    path = tmp_path / "fd.toml"
    path.write_text(to_toml(cfg))
    log = (tmp_path / "fd.log").open("wb")

    proc = subprocess.Popen(
        [
            "prlimit",
            f"--nofile={nofile[0]}:{nofile[1]}",
            sys.executable,
            "-m",
            "ztgateway",
            "run",
            "-c",
            str(path),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return proc, port, ops


def sample(text: str, wanted: str) -> float:
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def wait_up(ops: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            await scrape(ops)
            return
        await asyncio.sleep(0.1)
    raise AssertionError("gateway did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=40) == 0


async def test_fd_limit_below_max_connections_is_warned_and_excess_refused_and_counted(
    certs: Certs, upstream: int, tmp_path: Path
) -> None:
    proc, port, ops = run_gateway(certs, upstream, tmp_path, nofile=(256, 256))
    try:
        await wait_up(ops)
        text = (tmp_path / "fd.log").read_text()
        assert "file-descriptor limit 256 (hard 256) is below" in text
        assert "at most 96 client connections" in text
        assert sample(await scrape(ops), "ztgw_fd_limit") == 256
        held, failed = [], 0
        for _ in range(130):
            try:
                reader, writer = await open_tls(port, certs)
                writer.write(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
                await writer.drain()
                if not (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200"):
                    raise ConnectionResetError
                held.append(writer)
            except (ConnectionError, ssl.SSLError, OSError, asyncio.IncompleteReadError):
                failed += 1
        assert len(held) == 96
        counted = sample(await scrape(ops), 'ztgw_connections_rejected_total{reason="fd_limit"}')
        assert counted == failed == 130 - 96  # every refusal is counted, none is silent
        for writer in held:
            writer.close()
    finally:
        stop(proc)


async def test_fd_soft_limit_is_raised_towards_what_max_connections_needs(
    certs: Certs, upstream: int, tmp_path: Path
) -> None:
    proc, _port, ops = run_gateway(certs, upstream, tmp_path, nofile=(256, 4096))
    try:
        await wait_up(ops)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        soft = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert soft.split()[3:5] == ["4096", "4096"]
        assert (
            "raised the file-descriptor limit from 256 to 4096" in (tmp_path / "fd.log").read_text()
        )
        assert sample(await scrape(ops), "ztgw_fd_limit") == 4096
    finally:
        stop(proc)
    assert os.path.exists(tmp_path / "audit.db")
