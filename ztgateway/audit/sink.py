"""The JSON-lines mirror of the chain, for a SIEM: one file, in chain order, every event once.

Every process that writes the database (`workers = N`, or replicas on one host) also keeps the
mirror, so the file has many writers. What keeps it one chain is that the file, not the
process, says where it stands: each append happens under an exclusive `flock` on a lock file
beside it, starts by reading the seq of the file's last line, and continues from there,
reading whatever another process committed in between from the database. A process that finds
its batch already mirrored (another one got there first) appends nothing. Before this, each
process continued from what *it* had last mirrored, and with two workers every event reached
the file twice, out of order, and `audit verify --jsonl` reported tampering (issue 19, D1).

The lock file (`.<name>.pos`, hidden so a `*.jsonl` rotation glob leaves it alone) also holds
the position of the last exported event. A file that is empty — new, or just moved away by
logrotate — continues from that position, so rotation neither loses nor repeats an event.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
from pathlib import Path

logger = logging.getLogger("ztgateway.audit")

_TAIL_STEP = 65536
_FETCH_ROWS = 500

Batch = tuple[int, list[bytes], str]
"""A batch this process just committed: first seq, its stored lines, the hash of its last."""


def append_lines(path: Path, data: bytes) -> None:
    """Append whole lines or nothing (opened per call: a rotated file is followed)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _append_fd(fd, data)
    finally:
        os.close(fd)


def _append_fd(fd: int, data: bytes) -> None:
    """A failed write is cut back so a retry leaves no torn line."""
    start = os.fstat(fd).st_size
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        raise


def _tail_of(fd: int, path: Path) -> tuple[int, str] | None:
    """(seq, hash) of the file's last complete line, dropping a line torn by a crash.

    The torn line's event is in the database (the file is only written after the commit), so
    it is exported again; keeping the fragment would make the file unverifiable forever.
    """
    size = os.fstat(fd).st_size
    pos, tail = size, b""
    while pos > 0 and tail.count(b"\n") < 2:
        step = min(_TAIL_STEP, pos)
        pos -= step
        tail = os.pread(fd, step, pos) + tail
    if tail and not tail.endswith(b"\n"):
        cut = tail.rfind(b"\n") + 1
        logger.warning("audit sink %s ends with a torn line; truncating it", path)
        os.ftruncate(fd, pos + cut)
        tail = tail[:cut]
    if not tail:
        return None
    return _chain_position(tail[:-1].rsplit(b"\n", 1)[-1])


def _chain_position(line: bytes) -> tuple[int, str] | None:
    try:
        event = json.loads(line)
        seq, link = event["seq"], event["hash"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(link, str):
        return None
    return seq, link


def read_sink_tail(path: Path) -> tuple[int, str] | None:
    """(seq, hash) of a mirror file's last complete line (a torn last line is cut off)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return _tail_of(fd, path)
    finally:
        os.close(fd)


class JsonlSink:
    """The mirror of one database in one file; every method blocks (call it in a thread).

    One instance per process, used by one writer task at a time; the file lock makes the
    processes take turns.
    """

    def __init__(self, path: Path, db_path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(f".{path.name}.pos")
        self._db_path = db_path
        self._db: sqlite3.Connection | None = None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def start(self, head: tuple[int, str]) -> int:
        """Where the file stands, fixing what a crash or a foreign file left; returns its seq.

        A file (or, for an empty file, a recorded position) that does not belong to this
        database's chain is moved aside, never appended to: both files then verify. A sink
        added to an existing log starts at the present (`head`), not at the log's beginning.
        """
        with self._locked() as (fd, lock_fd):
            tail = _tail_of(fd, self.path)
            position = tail if tail is not None else _read_position(lock_fd)
            if position is not None and not self._in_chain(*position):
                aside = self.path.with_name(f"{self.path.name}.foreign-{position[0]}")
                logger.error(
                    "audit sink %s ends at seq %d, which is not in %s; moved it to %s and "
                    "continuing from seq %d",
                    self.path,
                    position[0],
                    self._db_path,
                    aside,
                    head[0] + 1,
                )
                if tail is not None:
                    os.replace(self.path, aside)
                position = None
            if position is None:
                position = head
            _write_position(lock_fd, *position)
            return position[0]

    def sync(self, batch: Batch | None, through: int, known: int) -> int:
        """Bring the file up to `through` (committed), appending `batch` where it follows.

        What the file lacks before the batch (written by another process, or left behind by a
        fault) is read from the database; what it already has is not written again. `known` is
        where this process last saw the file end: the position when the file and its lock file
        are both gone (a lost volume). Returns the seq the file ends at.
        """
        with self._locked() as (fd, lock_fd):
            tail = _tail_of(fd, self.path)
            position = tail if tail is not None else _read_position(lock_fd)
            if position is None:
                position = (known, "")
            cursor, link = position
            end = through if batch is None else max(through, batch[0] + len(batch[1]) - 1)
            parts: list[bytes] = []
            db_until = end if batch is None else batch[0] - 1
            while cursor < db_until:
                rows = self._rows_after(cursor, db_until)
                if not rows:
                    logger.warning(
                        "audit rows %d..%d vanished from %s before reaching the sink",
                        cursor + 1,
                        db_until,
                        self._db_path,
                    )
                    cursor = db_until
                    break
                parts.extend(r[1].encode("utf-8") for r in rows)
                cursor, link = int(rows[-1][0]), str(rows[-1][2])
            if batch is not None and cursor < end:
                first, lines, last_hash = batch
                parts.extend(lines[max(0, cursor - first + 1) :])
                cursor, link = end, last_hash
            if parts:
                _append_fd(fd, b"\n".join(parts) + b"\n")
                _write_position(lock_fd, cursor, link)
            return cursor

    @contextlib.contextmanager
    def _locked(self):  # type: ignore[no-untyped-def]  # yields (file fd, lock fd)
        lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            # Opened per call, under the lock: a file moved away by logrotate is followed by a
            # fresh one, and a broken directory is noticed instead of writing into the void.
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                yield fd, lock_fd
            finally:
                os.close(fd)
        finally:
            os.close(lock_fd)  # releases the lock

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            # Read-only and used from whichever worker thread runs the call; the writer task
            # makes the calls one at a time.
            self._db = sqlite3.connect(
                self._db_path.resolve().as_uri() + "?mode=ro",
                uri=True,
                check_same_thread=False,
                timeout=5.0,
            )
        return self._db

    def _rows_after(self, seq: int, until: int) -> list[tuple[int, str, str]]:
        cur = self._conn().execute(
            "SELECT seq, event, hash FROM audit_events WHERE seq > ? AND seq <= ? "
            "ORDER BY seq LIMIT ?",
            (seq, until, _FETCH_ROWS),
        )
        try:
            return [(int(r[0]), str(r[1]), str(r[2])) for r in cur.fetchall()]
        finally:
            cur.close()

    def _one(self, sql: str, params: tuple[int, ...] = ()) -> tuple[object, ...] | None:
        cur = self._conn().execute(sql, params)
        try:
            row: tuple[object, ...] | None = cur.fetchone()
            return row
        finally:
            cur.close()

    def _in_chain(self, seq: int, link: str) -> bool:
        if seq == 0:
            return True
        row = self._one("SELECT hash FROM audit_events WHERE seq = ?", (seq,))
        if row is None:
            # Rotated out of the database: the checkpoints still name the archive's last hash.
            row = self._one("SELECT last_hash FROM audit_checkpoints WHERE through_seq = ?", (seq,))
        if row is not None:
            return bool(row[0] == link)
        # Older than anything the database holds (archived mid-batch): cannot be disproved.
        low = self._one("SELECT MIN(seq) FROM audit_events")
        return low is not None and isinstance(low[0], int) and seq < low[0]


def _read_position(fd: int) -> tuple[int, str] | None:
    raw = os.pread(fd, 256, 0)
    seq, _, link = raw.decode("ascii", "replace").strip().partition(" ")
    try:
        return int(seq), link
    except ValueError:
        return None


def _write_position(fd: int, seq: int, link: str) -> None:
    record = f"{seq} {link}\n".encode("ascii")
    os.pwrite(fd, record, 0)
    os.ftruncate(fd, len(record))
