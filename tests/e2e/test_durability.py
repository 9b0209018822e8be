"""Issue 19 with real processes: `workers = 2` under load keeps one verifiable audit chain in the
database and in the JSON-lines sink (D1), and every decision a client got an answer for is in
the audit after a worker is SIGKILLed mid-load (D2)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.test_workers import _restarted, _up, supervised, wait_for
from tests.support import Certs, client_ssl, free_port, to_toml

pytestmark = pytest.mark.replicas


@dataclass
class Load:
    """What the clients saw: the decision id of every answer, by status."""

    answered: dict[str, int] = field(default_factory=dict)
    io_errors: int = 0

    def ids(self, low: int, high: int) -> set[str]:
        return {d for d, status in self.answered.items() if low <= status < high}


async def run_load(certs: Certs, port: int, seconds: float, load: Load, clients: int = 12) -> None:
    """Each client: a keep-alive connection recycled every 10 requests (so the kernel spreads
    them over the workers); 3 of 4 requests are allowed (200), 1 refused (401, no token)."""
    deadline = time.monotonic() + seconds

    async def client(n: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            connector = aiohttp.TCPConnector(ssl=client_ssl(certs))
            async with aiohttp.ClientSession(connector=connector) as s:
                for _ in range(10):
                    i += 1
                    path = "/api/echo" if (i + n) % 4 == 0 else "/echo"
                    try:
                        async with s.get(f"https://127.0.0.1:{port}{path}") as r:
                            await r.read()
                            load.answered[r.headers["X-ZT-Decision-Id"]] = r.status
                    except (TimeoutError, aiohttp.ClientError, OSError):
                        load.io_errors += 1  # the killed worker's connections
                        break
                    if time.monotonic() >= deadline:
                        break

    await asyncio.gather(*(client(n) for n in range(clients)))


def audit_ids(db: Path) -> list[str]:
    with closing(sqlite3.connect(db)) as conn:
        return [r[0] for r in conn.execute("SELECT decision_id FROM audit_events ORDER BY seq")]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ztgateway", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_two_workers_under_load_keep_one_chain_in_the_database_and_the_sink(
    certs: Certs, upstream: int, tmp_path: Path
) -> None:
    load = Load()
    async with supervised(certs, upstream, tmp_path) as sup:
        await run_load(certs, sup.port, 4.0, load)
    config = str(tmp_path / "gw.toml")
    db, sink = tmp_path / "audit.db", tmp_path / "audit.jsonl"
    assert load.io_errors == 0
    assert len(load.ids(200, 300)) > 100 and len(load.ids(400, 500)) > 20
    verified = cli("audit", "verify", "-c", config)
    assert verified.returncode == 0, verified.stderr
    verified = cli("audit", "verify", "-c", config, "--jsonl", str(sink))
    assert verified.returncode == 0, verified.stderr  # D1: the old sink said TAMPERED
    lines = [json.loads(line) for line in sink.read_text().splitlines()]
    mirrored = [e["decision_id"] for e in lines]
    assert len(mirrored) == len(set(mirrored))  # no event twice
    assert [e["seq"] for e in lines] == list(range(1, len(lines) + 1))  # in chain order
    assert mirrored == audit_ids(db)
    assert set(load.answered) <= set(mirrored)


async def test_a_worker_killed_under_load_loses_no_answered_decision(
    certs: Certs, upstream: int, tmp_path: Path
) -> None:
    load = Load()
    async with supervised(certs, upstream, tmp_path) as sup:
        victim = sup.workers()[0]
        traffic = asyncio.ensure_future(run_load(certs, sup.port, 5.0, load))
        await asyncio.sleep(2.0)
        answered_before_kill = len(load.answered)
        os.kill(victim, signal.SIGKILL)
        await traffic
        await wait_for(lambda: _restarted(sup.ops))
        await wait_for(lambda: _up(sup.ops, 2))
    db = tmp_path / "audit.db"
    assert answered_before_kill > 50
    answered = load.ids(200, 300) | load.ids(400, 500)
    assert len(answered) == len(load.answered)  # nothing but 2xx and 4xx was answered
    missing = answered - set(audit_ids(db))
    assert not missing, f"{len(missing)} answered decisions are not in the audit: {missing}"
    verified = cli("audit", "verify", "-c", str(tmp_path / "gw.toml"))
    assert verified.returncode == 0, verified.stderr
    verified = cli(
        "audit", "verify", "-c", str(tmp_path / "gw.toml"), "--jsonl", str(tmp_path / "audit.jsonl")
    )
    assert verified.returncode == 0, verified.stderr
    journal = tmp_path / "audit.db.journal"
    assert list(journal.iterdir()) == []  # the killed worker's journal was recovered, then removed


# ----------------------------------------------------------------------------- D3: orphans


def alive(pid: int) -> bool:
    """Running or stopped, not a zombie and not gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


async def gone_within(pids: list[int], seconds: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if not any(alive(p) for p in pids):
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"still running after {seconds} s: {[p for p in pids if alive(p)]}")


def second_supervisor(config: Path) -> subprocess.CompletedProcess[str]:
    """`ztgateway run` on the same mTLS port, with an ops port of its own (so what it refuses
    is the mTLS port)."""
    data = tomllib.loads(config.read_text())
    data["ops"]["port"] = free_port()
    other = config.with_name("second.toml")
    other.write_text(to_toml(data))
    return cli("run", "-c", str(other))


async def test_workers_die_with_their_supervisor_and_no_second_one_starts_beside_them(
    certs: Certs, upstream: int, tmp_path: Path
) -> None:
    config = tmp_path / "gw.toml"
    killed = False
    async with supervised(certs, upstream, tmp_path) as sup:
        first, second = sup.workers()
        stale = sup.socket_dir()
        # Another supervisor on the same port refuses to start while this one serves.
        refused = second_supervisor(config)
        assert refused.returncode == 1
        assert f"127.0.0.1:{sup.port} is already in use" in refused.stderr
        load = Load()
        await run_load(certs, sup.port, 0.5, load, clients=2)
        assert load.io_errors == 0 and set(load.answered.values()) <= {200, 401}

        # Let both workers finish their write-behind (store, every 1 s) and audit batches: a
        # worker frozen inside a SQLite write transaction would hold the lock the other one's
        # final flush needs, and the other would wait for its busy timeout before exiting.
        await asyncio.sleep(1.5)
        os.kill(first, signal.SIGSTOP)  # this one cannot act on its supervisor's death yet
        try:
            sup.proc.send_signal(signal.SIGKILL)
            sup.proc.wait()
            killed = True
            took = await gone_within([second], 1.0)  # SIGTERM from the kernel, or the pipe
            assert took < 1.0
            # While any worker of the dead supervisor remains, a new one refuses the port.
            refused = second_supervisor(config)
            assert refused.returncode == 1, refused.stdout
            assert f"127.0.0.1:{sup.port} is already in use" in refused.stderr
        finally:
            os.kill(first, signal.SIGCONT)
        await gone_within([first], 1.0)
    assert killed
    # Nothing of the old generation is left: a new supervisor starts on the port and serves,
    # and it removed the private directory its SIGKILLed predecessor could not.
    proc = subprocess.Popen([sys.executable, "-m", "ztgateway", "run", "-c", str(config)])
    try:
        await wait_for(lambda: _up(sup.ops, 2))
        load = Load()
        await run_load(certs, sup.port, 0.5, load, clients=2)
        assert load.io_errors == 0 and load.answered
        assert not stale.exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0


# ----------------------------------------------------------------------------- readiness, reload


async def readyz(ops: int) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{ops}/readyz") as r:
        return r.status, dict(await r.json())


async def test_the_host_stays_ready_while_one_worker_restarts(
    certs: Certs, upstream: int, tmp_path: Path
) -> None:
    async with supervised(certs, upstream, tmp_path) as sup:
        assert (await readyz(sup.ops))[0] == 200
        os.kill(sup.workers()[0], signal.SIGKILL)
        seen: list[tuple[int, str]] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status, body = await readyz(sup.ops)
            seen.append((status, body["status"]))
            if await _restarted(sup.ops) and body["workers_ok"] == 2:
                break
            await asyncio.sleep(0.05)
        assert (200, "degraded") in seen  # one worker down, and the host still ready
        assert all(status == 200 for status, _ in seen), seen


async def test_min_ready_workers_makes_a_restart_unready(
    certs: Certs, upstream: int, tmp_path: Path
) -> None:
    async with supervised(certs, upstream, tmp_path, server={"min_ready_workers": 2}) as sup:
        os.kill(sup.workers()[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        statuses = set()
        while time.monotonic() < deadline and 503 not in statuses:
            statuses.add((await readyz(sup.ops))[0])
            await asyncio.sleep(0.05)
        assert 503 in statuses
        await wait_for(lambda: _up(sup.ops, 2))
        assert (await readyz(sup.ops))[0] == 200


async def test_reload_through_the_supervisor_reports_what_needs_a_restart(
    certs: Certs, upstream: int, tmp_path: Path
) -> None:
    async with supervised(certs, upstream, tmp_path):
        config = tmp_path / "gw.toml"
        data = tomllib.loads(config.read_text())
        data["server"].update(workers=3, idle_timeout=30.0)
        config.write_text(to_toml(data))
        done = cli("reload", "-c", str(config))
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        for worker in ("0", "1"):
            assert answer["workers"][worker]["restart_required"] == ["server.workers"]
            assert answer["workers"][worker]["applied"] == ["server.idle_timeout"]
        assert "take effect only after a restart: server.workers" in done.stderr
