"""A real redis-server for tests: started on a free port on 127.0.0.1, stopped afterwards.

No fakes: the Redis store is tested against the Debian `redis-server` binary. Each server runs
in the foreground as a child process with persistence off (`--save '' --appendonly no`), in
its own temporary folder. `stop(save=True)` shuts it down with an explicit SAVE, so a later
`start()` on the same port and folder comes back with the same data (a Redis restart that
keeps state); `pause()`/`resume()` freeze it with SIGSTOP/SIGCONT (a hung Redis).

Reuse from any test module or conftest:

    pytest_plugins = ["tests.redis_server"]

    async def test_x(redis_server_factory: RedisServerFactory) -> None:
        server = redis_server_factory()
        url = server.url
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import free_port, real_time_env

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """One RESP command over a plain socket (no client library involved in the fixture)."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        return s.recv(4096)


class RedisServer:
    """One redis-server process; `start()` again after `stop()` reuses port and folder."""

    def __init__(self, workdir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.extra_args = extra_args
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):
            port = self.port or free_port()
            proc = subprocess.Popen(
                [
                    REDIS_SERVER,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--dir",
                    str(self.workdir),
                    "--logfile",
                    str(self.workdir / "redis.log"),
                    *self.extra_args,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=real_time_env(),
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(OSError):
                    if _command(port, "PING").startswith(b"+PONG"):
                        self.proc, self.port, self.paused = proc, port, False
                        return self
                time.sleep(0.02)
            # Lost the free-port race, or it never came up: clean up and try another port.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            if self.port:  # a restart must keep its port: clients reconnect to it
                time.sleep(0.2)
        raise RuntimeError(f"redis-server did not start; see {self.workdir / 'redis.log'}")

    def stop(self, *, save: bool = False) -> None:
        """Stop the server: with `save`, write the dataset first so `start()` restores it."""
        proc = self.proc
        if proc is None:
            return
        self.resume()
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                _command(self.port, "SHUTDOWN", "SAVE" if save else "NOSAVE", timeout=5.0)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proc = None

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections stay open but nothing is answered."""
        if self.proc is not None and not self.paused:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.proc is not None and self.paused:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.paused = False


RedisServerFactory = Callable[..., RedisServer]


@pytest.fixture
def redis_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServerFactory]:
    """Starts real redis-servers on demand; every one is stopped when the test ends."""
    servers: list[RedisServer] = []

    def make(*extra_args: str) -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis"), tuple(extra_args)).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def redis_server(redis_server_factory: RedisServerFactory) -> RedisServer:
    """One fresh redis-server for this test."""
    return redis_server_factory()
