"""Taking turns at one audit database: the writers of several processes, one at a time.

With `workers = N` (or replicas on one host) every process's writer appends to the same chain.
SQLite's own write lock keeps that correct but not fast: a writer that finds the file locked
sleeps in SQLite's busy handler on a fixed schedule (1, 2, 5, 10, 15, 20, 25 ms ...), however
soon the lock comes free, and the one holding it kept it across several turns of a busy event
loop. Measured with two saturated workers, the writers then fell 12,000-20,000 events behind in
six seconds; kept up, that backlog fills a worker's queue and it refuses requests.

So writers first take an exclusive `flock` on `.<database>.head` beside the database: the
kernel wakes a waiting writer the moment the other lets go. The same file holds a hint of where
the chain ends, written by whoever appended last while still holding the lock, so the next
writer can chain its batch onto the new head without reading it from SQLite first. The hint is
only a hint: the append is conditioned on the head in the database (store.insert_on_head), and
a wrong or stale hint (a crash between the commit and the hint, `audit rotate`, an edit) only
sends the writer down the locked path, which reads the head SQLite really has.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
from pathlib import Path
from typing import Final

from .chain import GENESIS_HASH

_HINT_BYTES: Final = 96
_HINT: Final = re.compile(rb"(\d{1,19}) ([0-9a-f]{64})\n")


def turn_path(db_path: Path) -> Path:
    return db_path.with_name(f".{db_path.name}.head")


class WriterTurn:
    """An exclusive turn at appending to one database, shared by every process's writer."""

    def __init__(self, db_path: Path) -> None:
        self.path = turn_path(db_path)
        self._fd = -1
        self._held = False
        self.waits = 0
        """Turns this writer had to wait for (another process held the lock)."""

    def open(self) -> None:
        """Blocking (run it in a thread): create or open the lock file, owner-only."""
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # drops the lock with the last descriptor
            self._fd = -1
            self._held = False

    async def __aenter__(self) -> WriterTurn:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    async def acquire(self) -> None:
        """Take the turn; waits in a thread (not SQLite's sleep loop) while another has it."""
        if self._fd < 0:
            raise OSError("audit writer turn is closed")
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.waits += 1
            fd = self._fd
            taking = asyncio.get_running_loop().run_in_executor(
                None, fcntl.flock, fd, fcntl.LOCK_EX
            )
            try:
                await asyncio.shield(taking)
            except asyncio.CancelledError:
                # The thread may still get the lock after we stopped waiting for it: give it
                # back then, or every other process's writer would wait for us forever.
                taking.add_done_callback(lambda f: self._unlock_if_taken(f, fd))
                raise
        self._held = True

    def _unlock_if_taken(self, taking: asyncio.Future[None], fd: int) -> None:
        # Only while the descriptor is still ours: closing it already dropped the lock, and
        # its number may since belong to another file.
        taken = not taking.cancelled() and taking.exception() is None
        if taken and fd == self._fd and not self._held:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)

    def release(self) -> None:
        if self._held:
            self._held = False
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def head(self) -> tuple[int, str] | None:
        """Where the last writer said the chain ends (seq, hash), or None if it said nothing
        readable. Only to be trusted as far as insert_on_head checks it."""
        try:
            raw = os.pread(self._fd, _HINT_BYTES, 0)
        except OSError:
            return None
        found = _HINT.match(raw)
        if found is None:
            return None
        return int(found[1]), found[2].decode()

    def moved_to(self, seq: int, last_hash: str) -> None:
        """Say where the chain now ends; call while holding the turn, after the commit."""
        if last_hash == GENESIS_HASH and seq == 0:
            return
        data = b"%d %s\n" % (seq, last_hash.encode())
        if _HINT.fullmatch(data) is None:
            return  # a head edited behind our back: say nothing rather than something odd
        with contextlib.suppress(OSError):
            os.pwrite(self._fd, data.ljust(_HINT_BYTES, b"\0"), 0)
