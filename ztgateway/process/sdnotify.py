"""systemd's readiness protocol (sd_notify(3)), both ends of it.

Why: with `Type=exec` systemd calls the gateway started the moment the process is, before the
certificates are loaded, the audit opened and the port bound; units ordered after it (and
`systemctl start`, and a rolling restart script waiting on it) then race a gateway that does
not answer yet. With `Type=notify` the gateway says READY=1 once it serves, RELOADING=1 /
READY=1 around a SIGHUP and STOPPING=1 at shutdown.

The supervisor of `workers = N` speaks the same protocol to its workers: it hands each worker a
private datagram socket as NOTIFY_SOCKET and tells systemd READY=1 only once
`min_ready_workers` of them have said so themselves. One protocol, one reader, no polling.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path

from ..clock import SYSTEM_CLOCK, Clock

log = logging.getLogger("ztgateway")

ENV = "NOTIFY_SOCKET"
WORKER_FIELD = "X_ZTGW_WORKER"  # sd_notify(3) leaves X_-prefixed fields to applications
_MAX_DATAGRAM = 4096


def _address(raw: str) -> str | None:
    if raw.startswith("@"):  # a Linux abstract socket, as systemd writes it
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None  # vsock and other forms: not ours to speak


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `KEY=value` fields to whoever started us; False when nobody listens.

    A failure is logged, never raised: readiness is information for the service manager, and a
    gateway that serves must not stop because systemd went away."""
    raw = (os.environ if environ is None else environ).get(ENV, "")
    address = _address(raw) if raw else None
    if address is None:
        return False
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("could not notify the service manager at %s: %s", raw, exc)
        return False
    return True


def ready(status: str, worker: int | None = None) -> bool:
    """READY=1; a worker names itself so that its supervisor counts each worker once."""
    fields = ["READY=1", f"STATUS={status}"]
    if worker is not None:
        fields.append(f"{WORKER_FIELD}={worker}")
    return notify(*fields)


def reloading(clock: Clock = SYSTEM_CLOCK) -> bool:
    # sd_notify(3): RELOADING=1 must carry the CLOCK_MONOTONIC time of the reload's start, so
    # that a Type=notify-reload manager can tell this reload from an earlier one.
    return notify("RELOADING=1", f"MONOTONIC_USEC={int(clock.monotonic() * 1_000_000)}")


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=finishing in-flight requests")


def parse(message: bytes) -> dict[str, str]:
    """`KEY=value` lines; anything else in a datagram is ignored, as systemd does."""
    fields: dict[str, str] = {}
    for line in message.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key] = value
    return fields


class WorkerReadiness:
    """The supervisor's end: a datagram socket in its private directory that the workers'
    `notify()` calls reach, and the count of workers that are ready now."""

    def __init__(self, directory: Path, on_message: Callable[[dict[str, str]], None]) -> None:
        self.path = directory / "notify.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind(str(self.path))
        os.chmod(self.path, 0o600)  # the workers run as the supervisor's user
        self._sock.setblocking(False)
        self._on_message = on_message
        self._loop: asyncio.AbstractEventLoop | None = None

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """A worker's environment: our socket, never the service manager's."""
        return {**base, ENV: str(self.path)}

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data = self._sock.recv(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # never let the reader die with the supervisor's loop
                log.warning("worker readiness socket: %s", exc)
                return
            self._on_message(parse(data))

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self.path.unlink(missing_ok=True)
