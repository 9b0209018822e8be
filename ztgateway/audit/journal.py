"""The write-ahead journal: an event is in a file before the gateway acts on its decision.

The writer commits events to SQLite in batches (one transaction per `flush_interval`), which is
what keeps auditing cheap; but an event that waits in memory for its batch dies with the
process. Issue 19 D2: after a worker was SIGKILLed, two requests already answered 200 were in
neither the database nor the JSON lines. So `AuditLog.record()` first appends the event to this
journal with one `write(2)`: once that returns, the bytes belong to the kernel, and a crash of
the process (SIGKILL, OOM kill, a segfault) cannot lose them. The request is answered or
forwarded only after that. With `durability = "fsync"` the journal is also `fdatasync`ed before
the request goes on, in groups (every request waiting at that moment shares one `fdatasync`),
so a power loss or kernel panic cannot lose it either.

Each process owns its files in the journal directory: `<owner>.lock`, held with an exclusive
`flock` for the process's lifetime (the kernel drops it when the process dies, however it
dies), and segments `<owner>-<n>.jsonl`, one event per line. A segment is deleted once every
event in it is in the database and a newer segment has taken over. Any writer on the same
database that can take the lock of another owner knows that owner is dead, and moves the
owner's events into the chain — those not already there, matched by decision id — before it
deletes the files: a restarted worker at start-up, a running one every `recover_interval`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("ztgateway.audit")

SEGMENT_BYTES = 8 << 20
"""A segment is closed for new events past this size; it is deleted once they are written."""


@dataclass(slots=True)
class _Segment:
    number: int
    path: Path
    fd: int
    size: int = 0
    pending: int = 0
    dirty: bool = False
    """fsync mode: appended to since the last fdatasync began."""
    syncing: bool = False
    """fsync mode: an fdatasync of this segment is running (its fd must stay open)."""

    @property
    def done(self) -> bool:
        return self.pending <= 0 and not self.dirty and not self.syncing


class Journal:
    """One process's journal. `append()` runs on the event loop's thread and blocks only for
    one `write(2)` to the page cache; `sync()` is the `fsync` mode's group commit."""

    def __init__(
        self, directory: Path, *, fsync: bool = False, segment_bytes: int = SEGMENT_BYTES
    ) -> None:
        self.directory = directory
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.owner = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._lock_fd: int | None = None
        self._segments: dict[int, _Segment] = {}
        self._current: _Segment | None = None
        self._appended = 0
        self._synced = 0
        self._sync_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._sync_wake: asyncio.Event | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.sync_failures = 0

    # ------------------------------------------------------------------ lifecycle (blocking)

    def open(self) -> None:
        """Create the directory (0700) and this process's lock and first segment."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Locked under a name no scanner looks at, then renamed: a lock file that exists is
        # always held, so a scanner that can take it knows its owner is gone.
        claiming = self.directory / f"{self.owner}.claim"
        fd = os.open(claiming, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(claiming, self.directory / f"{self.owner}.lock")
        self._lock_fd = fd
        self._new_segment()

    def close(self, *, everything_written: bool) -> None:
        """Close the files; delete them when every event in them is in the database.

        Otherwise they stay, and the next writer to start (or a running one) recovers them.
        """
        for seg in list(self._segments.values()):
            os.close(seg.fd)
            if everything_written:
                with contextlib.suppress(FileNotFoundError):
                    seg.path.unlink()
        self._segments.clear()
        self._current = None
        if self._lock_fd is not None:
            if everything_written:
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / f"{self.owner}.lock").unlink()
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._sync_task is not None:
            self._sync_task.cancel()

    def _new_segment(self) -> None:
        number = (self._current.number + 1) if self._current is not None else 1
        path = self.directory / f"{self.owner}-{number:06d}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        if self.fsync:
            # The new name must survive a power loss too, not only the bytes in it.
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        seg = _Segment(number, path, fd)
        self._segments[number] = seg
        self._current = seg

    # ------------------------------------------------------------------ request path

    def append(self, line: bytes) -> int:
        """Append one event (one line, no newline); returns its segment number.

        Raises OSError (disk full, I/O error): the caller refuses the request. A partial write
        is cut back, so the journal never holds a torn line followed by a whole one.
        """
        seg = self._current
        if seg is None:
            raise OSError("audit journal is closed")
        if seg.size >= self.segment_bytes:
            if seg.done:
                os.ftruncate(seg.fd, 0)  # every event in it is in the database already
                seg.size = 0
            else:
                self._new_segment()
                seg = self._current
                assert seg is not None
        data = line + b"\n"
        written = os.write(seg.fd, data)
        if written != len(data):
            # Only a full disk or a signal makes a regular-file write short; never leave half.
            with contextlib.suppress(OSError):
                os.ftruncate(seg.fd, seg.size)
            raise OSError(f"audit journal: short write ({written} of {len(data)} bytes)")
        seg.size += written
        seg.pending += 1
        seg.dirty = self.fsync
        self._appended += 1
        return seg.number

    def written(self, segments: Iterable[int]) -> None:
        """These events (by segment) are in the database: drop the segments that are done."""
        for number in segments:
            seg = self._segments.get(number)
            if seg is not None:
                seg.pending -= 1
        self._collect()

    def _collect(self) -> None:
        for seg in list(self._segments.values()):
            if seg is not self._current and seg.done:
                os.close(seg.fd)
                with contextlib.suppress(FileNotFoundError):
                    seg.path.unlink()
                del self._segments[seg.number]

    # ------------------------------------------------------------------ fsync: group commit

    @property
    def unsynced(self) -> bool:
        return self.fsync and self._synced < self._appended

    async def sync(self) -> None:
        """Return once every event appended before the call is on stable storage.

        Requests waiting at the same time share one `fdatasync` per dirty segment; requests
        arriving while it runs wait for the next one. Raises OSError if the sync failed (the
        caller refuses: after a failed fsync the kernel may have dropped the pages).
        """
        target = self._appended
        if self._synced >= target:
            return
        loop = asyncio.get_running_loop()
        if self._sync_wake is None:
            self._sync_wake = asyncio.Event()
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = loop.create_task(self._syncer(), name="ztgw-audit-journal-sync")
        waiter: asyncio.Future[None] = loop.create_future()
        self._sync_waiters.append((target, waiter))
        self._sync_wake.set()
        await waiter

    async def settle(self) -> None:
        """Before closing: let a running `fdatasync` finish (its fds must stay open)."""
        if not self.fsync:
            return
        with contextlib.suppress(OSError):
            await self.sync()
        await self._idle.wait()

    async def _syncer(self) -> None:
        wake = self._sync_wake
        assert wake is not None
        while True:
            await wake.wait()
            wake.clear()
            target = self._appended
            dirty = [seg for seg in self._segments.values() if seg.dirty]
            for seg in dirty:
                seg.dirty, seg.syncing = False, True
            self._idle.clear()
            try:
                await asyncio.to_thread(_datasync, [seg.fd for seg in dirty])
            except OSError as exc:
                self._idle.set()
                self.sync_failures += 1
                for seg in dirty:
                    seg.dirty = True
                    seg.syncing = False
                logger.error("audit journal fdatasync failed: %s", exc)
                waiters, self._sync_waiters = self._sync_waiters, []
                for _, waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(OSError(f"audit journal fdatasync failed: {exc}"))
                continue
            for seg in dirty:
                seg.syncing = False
            self._idle.set()
            self._collect()
            self._synced = max(self._synced, target)
            keep: list[tuple[int, asyncio.Future[None]]] = []
            for wanted, waiter in self._sync_waiters:
                if wanted <= self._synced:
                    if not waiter.done():
                        waiter.set_result(None)
                else:
                    keep.append((wanted, waiter))
            self._sync_waiters = keep
            if keep:
                wake.set()


def _datasync(fds: list[int]) -> None:
    for fd in fds:
        os.fdatasync(fd)


# --------------------------------------------------------------------------- recovery


@dataclass
class Orphan:
    """The journal of a process that died; its lock is held until `discard()` or `release()`."""

    owner: str
    directory: Path
    lock_fd: int
    segments: list[Path] = field(default_factory=list)

    def lines(self) -> list[bytes]:
        """Every complete line, in order; a line torn by the crash was never acknowledged
        (its `write(2)` had not returned), so it is dropped."""
        out: list[bytes] = []
        for path in self.segments:
            with contextlib.suppress(FileNotFoundError):
                data = path.read_bytes()
                whole, _, torn = data.rpartition(b"\n")
                if torn:
                    logger.warning("audit journal %s ends with a torn line; dropping it", path)
                out.extend(line for line in whole.split(b"\n") if line)
        return out

    def discard(self) -> None:
        """Every event is in the database: delete the files, then let go of the lock."""
        for path in self.segments:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"{self.owner}.lock").unlink()
        self.release()

    def release(self) -> None:
        """Give up for now (the database is busy): the next scan tries again."""
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def find_orphans(directory: Path, own: str) -> list[Orphan]:
    """Journals whose owner is gone: their lock could be taken without waiting."""
    try:
        locks = sorted(directory.glob("*.lock"))
    except OSError:
        return []
    found: list[Orphan] = []
    for lock in locks:
        owner = lock.name[: -len(".lock")]
        if owner == own:
            continue
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # recovered by someone else a moment ago
        except OSError as exc:
            # Not ours to recover (another user's gateway, a read-only copy): leave it.
            logger.warning("audit journal lock %s cannot be opened: %s", lock, exc)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # alive (or being recovered by another writer)
        if not lock.exists():
            os.close(fd)  # recovered and deleted between our open and our lock
            continue
        segments = sorted(directory.glob(f"{owner}-*.jsonl"))
        found.append(Orphan(owner, directory, fd, segments))
    return found


def pending_lines(directory: Path) -> int:
    """Events in journals of processes that are gone (for `audit verify` to mention)."""
    total = 0
    for orphan in find_orphans(directory, own=""):
        try:
            total += len(orphan.lines())
        finally:
            orphan.release()
    return total
