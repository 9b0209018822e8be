"""Workers die with their supervisor, and a supervisor never starts beside another gateway.

Issue 19 D3: after a SIGKILL of the supervisor its workers went on serving (ppid 1), a new
`ztgateway run` started two more beside them on the same SO_REUSEPORT port, and reloads never
reached the orphans: 9 of 20 requests were judged by the old policy. Two mechanisms, each
enough on its own, so that one failing (a kernel without the prctl, a pipe inherited by
accident) does not bring the orphans back:

- the parent-death signal: each worker asks the kernel (`prctl(PR_SET_PDEATHSIG, SIGTERM)`) to
  be sent SIGTERM when its parent dies, then checks that its parent is still the supervisor
  that started it (the supervisor may have died before the prctl);
- a lifeline pipe: the supervisor keeps the write end of a pipe whose read end each worker
  watches; the kernel closes the write end when the supervisor dies, however it dies, and the
  worker sees end-of-file.

Either way the worker shuts down as on SIGTERM: it stops accepting at once (the port is
free within milliseconds), finishes what is in flight and closes the audit log.

And the supervisor checks the port before it starts any worker (`claim_port`): if anything
listens on it, another gateway (or orphans) is serving there, and starting more workers beside
it would split traffic between two configurations. It then keeps a bound, non-listening
SO_REUSEPORT socket on the port for its whole life, so a second supervisor's check fails even
while this one's workers are restarting.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import signal
import socket
from collections.abc import Callable

log = logging.getLogger("ztgateway.workers")

PR_SET_PDEATHSIG = 1


def die_with_parent(supervisor_pid: int, sig: int = signal.SIGTERM) -> bool:
    """Ask for `sig` when the parent dies; False if it is already gone (then stop at once)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            log.warning(
                "prctl(PR_SET_PDEATHSIG) failed: %s; the lifeline pipe alone ties this worker "
                "to its supervisor",
                os.strerror(ctypes.get_errno()),
            )
    except (OSError, AttributeError) as exc:  # not Linux/glibc
        log.warning("no parent-death signal on this platform (%s); using the pipe only", exc)
    # The supervisor may have died between starting us and the prctl above.
    return os.getppid() == supervisor_pid


def watch_lifeline(fd: int, on_lost: Callable[[], None]) -> None:
    """Call `on_lost` once the supervisor's end of the lifeline pipe is closed."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            os.close(fd)
            log.error("supervisor is gone (lifeline closed): shutting down this worker")
            on_lost()

    loop.add_reader(fd, readable)


class PortInUse(OSError):
    """Another process listens on the gateway's port."""


def claim_port(host: str, port: int) -> socket.socket:
    """Refuse if anything holds host:port; else hold it (SO_REUSEPORT, not listening).

    The probe binds *without* SO_REUSEPORT, which fails while any socket is bound there —
    another gateway's, its orphaned workers' (they bind with SO_REUSEPORT), or a stranger's.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.bind((host, port))
    except OSError as exc:
        probe.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(
                errno.EADDRINUSE,
                f"{host}:{port} is already in use (another ztgateway, workers left behind by "
                "one, or another server listens there); refusing to start workers beside it",
            ) from exc
        raise
    probe.close()
    guard = socket.socket(family, socket.SOCK_STREAM)
    guard.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    guard.set_inheritable(False)
    guard.bind((host, port))
    return guard
