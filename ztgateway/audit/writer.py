"""The decision log: one event per gateway decision, hash-chained, written off the request path.

The shape follows OPA's decision log (`decision_id`, `timestamp`, `input`, `result`) so the
tooling people already point at OPA reads ours. The request path only calls `AuditLog.record()`,
which snapshots the event and enqueues it; a single writer task batches the queue into SQLite
and then mirrors the committed rows to an optional JSON-lines file for a SIEM.

Integrity is a hash chain: every stored event carries `seq`, `prev_hash` and `hash`, where

    hash = sha256(prev_hash + canonical_json(event minus {"seq", "prev_hash", "hash"}))

and the first event's `prev_hash` is 64 zeros. Leaving `seq` out of the hashed body costs
nothing: order is protected by the links, and a renumbered row still breaks its neighbour's
`prev_hash`. A chain without a key detects editing, deleting, inserting and reordering, but not
someone who truncates the newest rows or re-hashes everything after an edit; anchor the last
hash elsewhere (`VerifyResult.last_hash`) if that matters.

Durability contract: an event `record()` accepted is written, or `close()` says loudly that it
was not (`AuditUnavailable`, `AuditStats.dropped`). On a write fault the writer keeps the
events, reports the fault and retries; `record()` refuses only when the queue is full, so a
gateway that cannot audit fails closed instead of forgetting. What survives a crash depends on
`durability` (docs/audit.md):

- "journal" (the default): `record()` appends the event to this process's write-ahead journal
  (journal.py) before it returns, so the caller acts only on an event the kernel holds; a
  process crash (SIGKILL, OOM) loses nothing, and the next writer moves the journal into the
  chain. A power loss or kernel panic can lose what the kernel had not written out.
- "fsync": as "journal", and the caller awaits `sync()` (one `fdatasync` shared by every
  request waiting at that moment) before it answers or forwards; SQLite commits with
  `synchronous=FULL`. Survives power loss on storage that honours flushes.
- "memory": no journal; an event waits up to `flush_interval` in memory, and a process crash
  loses it. For measurements and for deployments that accept that window.

Why one module of about seven hundred lines: the queue, the writer task, the journal hand-off
and the chain's head are one durability contract, and each of its guarantees (nothing accepted
is forgotten, the chain never forks, a fault is retried and reported) spans all four. The rest
of the log is apart: the chain's arithmetic (chain.py), the journal's file format (journal.py),
verification, rotation, queries, masking and the event shape (verify.py, rotate.py, query.py,
masking.py, events.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import sqlite3
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

import aiosqlite

from ..clock import SYSTEM_CLOCK, Clock
from .chain import CHAIN_FIELDS, GENESIS_HASH, Entry, link_rows, now_ts, prepare_entry
from .checkpoint import CHECKPOINT_TYPE, CheckpointSigner
from .journal import Journal, Orphan, find_orphans
from .sink import JsonlSink
from .store import (
    ROWS_ON_HEAD,
    SCHEMA,
    SCHEMA_VERSION,
    chain_head,
    create_private,
    insert_on_head,
    insert_statements,
    rollback,
)
from .turn import WriterTurn

logger = logging.getLogger("ztgateway.audit")

_RETRY_BASE: Final = 0.05
_LINK_CHUNK: Final = 128
"""Events chained per turn of the event loop (well under a millisecond): requests run between
chunks, so a large batch does not stall them."""


Durability = Literal["memory", "journal", "fsync"]
DURABILITY_MODES: Final = ("memory", "journal", "fsync")


class AuditUnavailable(Exception):
    """Raised by record() when the queue is full or the writer has failed.

    The caller fails closed (503): a decision that cannot be audited is not served.
    """


@dataclass(frozen=True, slots=True)
class AuditStats:
    queued: int
    written: int
    write_failures: int
    dropped: int
    """Only non-zero when close() was cut short (or the writer died) with events still queued;
    with a journal they are not lost: the next writer to start recovers them."""
    recovered: int = 0
    """Events this writer moved into the chain from the journal of a process that died."""


class AuditLog:
    """Queue in memory, one writer task, SQLite as the record and JSON lines as its mirror.

    `record()` must be called from the event loop's thread; it never awaits, and touches disk
    only for the journal's one `write(2)`.
    """

    def __init__(
        self,
        db_path: Path,
        *,
        jsonl_path: Path | None = None,
        max_queue: int = 100_000,
        batch_size: int = 500,
        flush_interval: float = 0.05,
        on_write_failure: Callable[[BaseException], None] | None = None,
        busy_timeout: float = 5.0,
        retry_max: float = 5.0,
        durability: Durability = "journal",
        journal_dir: Path | None = None,
        recover_interval: float = 2.0,
        checkpoint_signer: CheckpointSigner | None = None,
        checkpoint_interval: float = 60.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}")
        if max_queue < 1 or batch_size < 1:
            raise ValueError("max_queue and batch_size must be positive")
        if flush_interval < 0 or busy_timeout < 0 or retry_max <= 0:
            raise ValueError("flush_interval and busy_timeout must be >= 0, retry_max > 0")
        self._db_path = db_path
        self._jsonl_path = jsonl_path
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._on_write_failure = on_write_failure
        self._busy_timeout = busy_timeout
        self._retry_max = retry_max
        self._clock = clock
        self.durability: Durability = durability
        self.journal_dir = journal_dir or default_journal_dir(db_path)
        self._journal: Journal | None = None
        self._recover_interval = recover_interval
        self._next_recovery = 0.0
        self._recovered = 0
        self.checkpoint_signer = checkpoint_signer
        """Signs checkpoints; replaced on reload when the key file was rotated."""
        self._checkpoint_interval = checkpoint_interval
        self._next_checkpoint = 0.0
        self._checkpoint_reason: str | None = None
        """A checkpoint owed whatever the interval says (after start-up's recovery)."""
        self._unanchored = 0
        """Events this writer committed since its last checkpoint."""
        self.checkpoints = 0

        # (decision_id, what to write, its journal segment or 0)
        self._pending: deque[tuple[str, Entry, int]] = deque()
        self._pending_ids: set[str] = set()
        self._accepted = 0
        self._written = 0
        self._write_failures = 0
        self._failures_in_row = 0
        self._dropped = 0
        self._last_seq = 0
        self._last_hash = GENESIS_HASH
        self.on_head_misses = 0
        """Batches whose one-statement append found the head moved by another writer."""
        self._sink_seq = 0
        self._sink: JsonlSink | None = None
        self._turn: WriterTurn | None = None

        self._db: aiosqlite.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._fatal: BaseException | None = None
        self._stopping = False
        self._close_done = asyncio.Event()
        self._wake = asyncio.Event()
        self._kick = asyncio.Event()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    async def __aenter__(self) -> AuditLog:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open or create the log; AuditUnavailable here keeps a gateway that cannot audit down.

        The head loaded here is what the writer expects to extend; each batch re-reads it under
        the write lock, so a second process on the same file extends one chain, not a fork.
        """
        if self._db is not None or self._stopping:
            raise RuntimeError("AuditLog.start() may be called once")
        try:
            await asyncio.to_thread(create_private, self._db_path)
            db = await aiosqlite.connect(
                self._db_path, isolation_level=None, timeout=self._busy_timeout
            )
        except (sqlite3.Error, OSError) as exc:
            raise AuditUnavailable(f"cannot open audit database {self._db_path}: {exc}") from exc
        try:
            await self._prepare(db)
            self._db = db
            turn = WriterTurn(self._db_path)
            await asyncio.to_thread(turn.open)
            self._turn = turn
            self._last_seq, self._last_hash = await chain_head(db)
            if self._jsonl_path is not None:
                self._sink = JsonlSink(self._jsonl_path, self._db_path)
                self._sink_seq = await asyncio.to_thread(
                    self._sink.start, (self._last_seq, self._last_hash)
                )
            if self.durability != "memory":
                journal = Journal(self.journal_dir, fsync=self.durability == "fsync")
                await asyncio.to_thread(journal.open)
                self._journal = journal
            # What a process that died left in its journal goes into the chain before anything
            # this one decides.
            await self._recover()
            if self.checkpoint_signer is not None:
                self._next_checkpoint = self._clock.monotonic() + self._checkpoint_interval
                if not await _head_is_checkpoint(db):
                    # Vouch at once for what the last run (perhaps a crash) left unanchored.
                    await self._commit([], checkpoint="start")
        except (sqlite3.Error, OSError) as exc:
            await self._abandon_start(db)
            raise AuditUnavailable(f"cannot prepare audit log: {exc}") from exc
        except BaseException:
            await self._abandon_start(db)
            raise
        self._task = asyncio.create_task(self._run(), name="ztgw-audit-writer")

    async def _abandon_start(self, db: aiosqlite.Connection) -> None:
        self._db = None
        await db.close()
        if self._turn is not None:
            self._turn.close()
            self._turn = None
        if self._journal is not None:
            self._journal.close(everything_written=True)
            self._journal = None
        if self._sink is not None:
            self._sink.close()

    async def _prepare(self, db: aiosqlite.Connection) -> None:
        async with db.execute("PRAGMA journal_mode=WAL") as cur:
            row = await cur.fetchone()
        if row is None or str(row[0]).lower() != "wal":
            logger.warning("audit database %s is not in WAL mode: %s", self._db_path, row)
        # WAL with NORMAL: a commit survives a process crash; FULL: a power loss too, which
        # the fsync mode needs before it deletes the journal that held the batch.
        synchronous = "FULL" if self.durability == "fsync" else "NORMAL"
        await db.execute(f"PRAGMA synchronous={synchronous}")
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise AuditUnavailable(
                f"audit database schema {version} is newer than this gateway ({SCHEMA_VERSION})"
            )
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA:
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            await db.execute("COMMIT")
        except BaseException:
            await rollback(db)
            raise

    async def flush(self) -> None:
        """Return once every event recorded before the call is in SQLite and the sink."""
        if self._fatal is not None:
            raise AuditUnavailable("audit writer has failed") from self._fatal
        target = self._accepted
        if self._task is None or self._is_flushed(target):
            return
        if self._task.done():
            raise AuditUnavailable("audit writer is not running")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (target, waiter)
        self._waiters.append(entry)
        self._wake.set()
        self._kick.set()
        try:
            await waiter
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    async def close(self) -> None:
        """Flush, stop the writer and close the database; idempotent.

        This waits as long as a write fault lasts, because returning would lose acknowledged
        events. To bound shutdown, wrap it in `asyncio.timeout()`: on cancellation whatever is
        still queued is counted in `stats.dropped` and logged as an error, never dropped quietly.
        """
        if self._stopping:
            await self._close_done.wait()
            return
        self._stopping = True
        task = self._task
        try:
            if task is not None:
                self._wake.set()
                self._kick.set()
                await asyncio.wait({task})
        finally:
            # Also reached when close() is cancelled: never leave the writer running against a
            # closed connection.
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            lost = len(self._pending)
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.close()
            if self._turn is not None:
                self._turn.close()
            if self._sink is not None:
                with contextlib.suppress(sqlite3.Error):
                    await asyncio.to_thread(self._sink.close)
            journal = self._journal
            if journal is not None:
                self._journal = None
                await journal.settle()
                journal.close(everything_written=not lost)
            if lost and journal is not None:
                logger.error(
                    "audit log closed with %d acknowledged events not written to the database; "
                    "they stay in the journal %s and the next start recovers them",
                    lost,
                    journal.directory,
                )
            elif lost:
                logger.error("audit log closed with %d acknowledged events not written", lost)
            self._dropped += lost
            self._pending.clear()
            self._pending_ids.clear()
            self._fail_waiters(AuditUnavailable("audit log closed before the events were written"))
            self._close_done.set()
        if lost:
            raise AuditUnavailable(f"audit log closed with {lost} events not written")

    # ------------------------------------------------------------------ request path

    def record(self, event: dict[str, Any]) -> None:
        """Snapshot and enqueue one decision event; never blocks.

        Raises AuditUnavailable when the event cannot be promised to the log (not started,
        closed, writer failed, queue full) and ValueError/TypeError for a malformed event.
        """
        if self._fatal is not None:
            raise AuditUnavailable("audit writer has failed") from self._fatal
        if self._task is None or self._stopping:
            raise AuditUnavailable("audit log is not running")
        if len(self._pending) >= self._max_queue:
            raise AuditUnavailable(f"audit queue is full ({self._max_queue} events)")
        decision_id, entry = self._entry(event)
        if decision_id in self._pending_ids:
            raise ValueError(f"decision {decision_id} is already queued")
        segment = 0
        if self._journal is not None:
            try:
                segment = self._journal.append(entry[2])
            except OSError as exc:
                # SECURITY: not in the journal means not promised: the caller refuses (503).
                self._report_failure(exc)
                raise AuditUnavailable(f"audit journal write failed: {exc}") from exc
        self._pending.append((decision_id, entry, segment))
        self._pending_ids.add(decision_id)
        self._accepted += 1
        self._wake.set()
        if len(self._pending) == self._batch_size:
            self._kick.set()

    def _entry(self, event: dict[str, Any]) -> tuple[str, Entry]:
        return prepare_entry(event, self._clock.time_ns())

    @property
    def needs_sync(self) -> bool:
        """True when the caller must `await sync()` before acting ("fsync" mode only)."""
        journal = self._journal
        return journal is not None and journal.unsynced

    async def sync(self) -> None:
        """Return once every event recorded so far survives a power loss ("fsync" mode).

        Every caller waiting at the same moment shares one `fdatasync` (group commit); in the
        other modes this returns at once. Raises AuditUnavailable when the sync failed.
        """
        journal = self._journal
        if journal is None or not journal.unsynced:
            return
        try:
            await journal.sync()
        except OSError as exc:
            raise AuditUnavailable(str(exc)) from exc

    @property
    def stats(self) -> AuditStats:
        return AuditStats(
            queued=len(self._pending),
            written=self._written,
            write_failures=self._write_failures,
            dropped=self._dropped,
            recovered=self._recovered,
        )

    @property
    def healthy(self) -> bool:
        """False while writes are failing, so /readyz can drain traffic before the queue fills."""
        return (
            self._task is not None
            and not self._task.done()
            and not self._stopping
            and self._fatal is None
            and self._failures_in_row == 0
        )

    # ------------------------------------------------------------------ writer task

    def _sink_behind(self) -> bool:
        return self._jsonl_path is not None and self._sink_seq < self._last_seq

    def _is_flushed(self, target: int) -> bool:
        return self._written >= target and not self._sink_behind()

    def _settle_waiters(self) -> None:
        for target, waiter in self._waiters:
            if not waiter.done() and self._is_flushed(target):
                waiter.set_result(None)

    def _fail_waiters(self, exc: BaseException) -> None:
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(exc)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but let flush()/close() (and a full batch) cut it short."""
        if seconds > 0 and not self._kick.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._kick.wait()
        self._kick.clear()

    def _report_failure(self, exc: BaseException) -> None:
        self._write_failures += 1
        self._failures_in_row += 1
        logger.warning(
            "audit write failed (%d in a row, %d queued): %s",
            self._failures_in_row,
            len(self._pending),
            exc,
        )
        if self._on_write_failure is not None:
            try:
                self._on_write_failure(exc)
            except Exception:
                logger.exception("audit on_write_failure callback raised")

    async def _run(self) -> None:
        try:
            while True:
                self._settle_waiters()
                if self._journal is not None and self._clock.monotonic() >= self._next_recovery:
                    try:
                        await self._recover()
                    except (sqlite3.Error, OSError) as exc:
                        self._report_failure(exc)
                if not self._pending and not self._sink_behind():
                    reason = self._checkpoint_owed(idle=True)
                    if reason is not None:
                        try:
                            first_seq, lines = await self._commit([], checkpoint=reason)
                            await self._mirror(first_seq, lines)
                        except (sqlite3.Error, OSError) as exc:
                            self._report_failure(exc)
                            await self._pause(self._retry_max)
                        continue
                    if self._stopping:
                        return
                    self._wake.clear()
                    idle = self._idle_timeout()
                    if idle is None:
                        await self._wake.wait()
                    else:
                        # Idle, but still looking for journals of processes that died and
                        # owing the events since the last checkpoint a signature.
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(idle):
                                await self._wake.wait()
                    continue
                urgent = self._stopping or bool(self._waiters)
                if self._pending and not urgent and len(self._pending) < self._batch_size:
                    # Coalesce: one commit per flush_interval instead of one per request.
                    await self._pause(self._flush_interval)
                else:
                    # This commit answers every kick so far (a flush, a full batch): one left
                    # set would cut the next batch's coalescing window to nothing.
                    self._kick.clear()
                try:
                    if self._pending:
                        first_seq, lines = await self._commit_batch()
                        await self._mirror(first_seq, lines)
                    else:
                        await self._catch_up_sink()
                except (sqlite3.Error, OSError) as exc:
                    self._report_failure(exc)
                    exponent = min(self._failures_in_row - 1, 16)
                    await self._pause(min(_RETRY_BASE * 2**exponent, self._retry_max))
                else:
                    self._failures_in_row = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug, not a disk fault: retrying would spin, so stop and make record() refuse.
            logger.exception("audit writer stopped")
            self._fatal = exc
            self._report_failure(exc)
            self._fail_waiters(AuditUnavailable("audit writer has failed"))

    def _checkpoint_owed(self, *, idle: bool = False, adding: int = 0) -> str | None:
        """Why a checkpoint goes into the next commit, or None."""
        if self.checkpoint_signer is None:
            return None
        if self._checkpoint_reason is not None:
            return self._checkpoint_reason
        if self._unanchored + adding == 0:
            return None
        if idle and self._stopping:
            return "shutdown"
        if self._clock.monotonic() >= self._next_checkpoint:
            return "interval"
        return None

    def _idle_timeout(self) -> float | None:
        waits: list[float] = []
        if self._journal is not None:
            waits.append(self._recover_interval)
        if self.checkpoint_signer is not None and self._unanchored:
            waits.append(max(0.0, self._next_checkpoint - self._clock.monotonic()))
        return min(waits) if waits else None

    async def _commit_batch(self) -> tuple[int, list[bytes]]:
        batch = list(itertools.islice(self._pending, self._batch_size))
        reason = self._checkpoint_owed(adding=len(batch))
        first_seq, lines = await self._commit([(d, e) for d, e, _ in batch], checkpoint=reason)
        for _ in batch:
            decision_id, _entry, _segment = self._pending.popleft()
            self._pending_ids.discard(decision_id)
        self._written += len(batch)
        if self._journal is not None:
            self._journal.written(segment for _d, _e, segment in batch)
        return first_seq, lines

    async def _commit(
        self,
        batch: list[tuple[str, Entry]],
        *,
        skip_present: bool = False,
        checkpoint: str | None = None,
    ) -> tuple[int, list[bytes]]:
        """Chain `batch` onto the database's head in one transaction; (first seq, lines).

        `skip_present`: leave out events whose decision id is already stored (a journal being
        recovered may hold events its process had committed before it died). `checkpoint`:
        end the transaction with a signed checkpoint over the batch, for this reason.
        """
        db = self._db
        assert db is not None and self._turn is not None
        async with self._turn:
            done = await self._commit_locked(db, batch, skip_present, checkpoint)
            self._turn.moved_to(self._last_seq, self._last_hash)
        return done

    async def _commit_locked(
        self,
        db: aiosqlite.Connection,
        batch: list[tuple[str, Entry]],
        skip_present: bool,
        checkpoint: str | None,
    ) -> tuple[int, list[bytes]]:
        """`_commit` while holding the writers' turn (turn.py)."""
        assert self._turn is not None
        if batch and not skip_present and len(batch) < ROWS_ON_HEAD:
            head = (self._last_seq, self._last_hash)
            hint = self._turn.head()
            if hint is not None and hint[0] > head[0]:
                head = hint  # another process appended since our last batch
            done = await self._commit_on_head(db, batch, checkpoint, head)
            if done is not None:
                return done
            # Someone appended without taking the turn (`audit rotate`, an older gateway, an
            # edit), or the hint was stale: the locked path reads the real head, and the hint
            # it leaves puts the next batch back on the one statement.
            self.on_head_misses += 1
        # BEGIN IMMEDIATE takes the write lock before reading the head, so another process
        # appending to the same file cannot fork the chain between our read and our insert.
        await db.execute("BEGIN IMMEDIATE")
        try:
            seq, prev = await chain_head(db)
            if seq < self._last_seq or (seq == self._last_seq and prev != self._last_hash):
                # Not a reason to stop auditing, but the operator must hear that the newest
                # rows were deleted or replaced behind the writer's back.
                logger.error(
                    "audit chain head in %s moved from seq %d (%s) to seq %d (%s)",
                    self._db_path,
                    self._last_seq,
                    self._last_hash,
                    seq,
                    prev,
                )
            if skip_present:
                batch = await _not_stored(db, batch)
            first_seq = seq + 1
            rows, lines, (seq, prev), signed = await self._link(batch, seq, prev, checkpoint)
            for sql, params in insert_statements(rows):
                await db.execute(sql, params)
            await db.execute("COMMIT")
        except BaseException:
            await rollback(db)
            raise
        self._committed(seq, prev, checkpoint, signed, len(rows))
        return first_seq, lines

    async def _commit_on_head(
        self,
        db: aiosqlite.Connection,
        batch: list[tuple[str, Entry]],
        checkpoint: str | None,
        head: tuple[int, str],
    ) -> tuple[int, list[bytes]] | None:
        """The batch chained onto `head` in one statement that inserts nothing if the chain
        does not end there (store.insert_on_head); None then, and the caller takes the locked
        path, which reads the head it really has."""
        rows, lines, (seq, prev), signed = await self._link(batch, *head, checkpoint)
        sql, params = insert_on_head(rows, *head)
        cursor = await db.execute(sql, params)
        if cursor.rowcount != len(rows):
            return None
        self._committed(seq, prev, checkpoint, signed, len(rows))
        return head[0] + 1, lines

    async def _link(
        self, batch: list[tuple[str, Entry]], seq: int, prev: str, checkpoint: str | None
    ) -> tuple[list[tuple[Any, ...]], list[bytes], tuple[int, str], bool]:
        """Rows and sink lines of `batch` chained onto (seq, prev), ending with a signed
        checkpoint when one is owed; (rows, lines, the new head, whether it was signed)."""
        rows: list[tuple[Any, ...]] = []
        lines: list[bytes] = []
        for start in range(0, len(batch), _LINK_CHUNK):
            if start:
                await asyncio.sleep(0)  # requests run between chunks, not after the batch
            chunk = batch[start : start + _LINK_CHUNK]
            seq, prev = link_rows(chunk, seq, prev, rows, lines)
        signed = checkpoint is not None and self.checkpoint_signer is not None and seq > 0
        if signed:
            assert self.checkpoint_signer is not None and checkpoint is not None
            event = self.checkpoint_signer.event(
                seq, prev, reason=checkpoint, timestamp=now_ts(self._clock.time_ns())
            )
            seq, prev = link_rows([self._entry(event)], seq, prev, rows, lines)
        return rows, lines, (seq, prev), signed

    def _committed(
        self, seq: int, prev: str, checkpoint: str | None, signed: bool, count: int
    ) -> None:
        self._last_seq, self._last_hash = seq, prev
        if checkpoint is not None:
            self._checkpoint_reason = None
            self._unanchored = 0
            self._next_checkpoint = self._clock.monotonic() + self._checkpoint_interval
            self.checkpoints += int(signed)
        else:
            self._unanchored += count

    # ------------------------------------------------------------------ journal recovery

    async def _recover(self) -> None:
        """Move the journals of processes that died into the chain, then delete them."""
        self._next_recovery = self._clock.monotonic() + self._recover_interval
        if self._journal is None:
            return
        orphans = await asyncio.to_thread(find_orphans, self.journal_dir, self._journal.owner)
        try:
            while orphans:
                await self._recover_one(orphans[0])
                orphans.pop(0)
        finally:
            for orphan in orphans:
                orphan.release()  # the next scan tries again

    async def _recover_one(self, orphan: Orphan) -> None:
        lines = await asyncio.to_thread(orphan.lines)
        entries: list[tuple[str, Entry]] = []
        for line in lines:
            try:
                entries.append(self._entry(_journal_event(line)))
            except (ValueError, TypeError) as exc:
                logger.error("audit journal of %s holds a malformed event: %s", orphan.owner, exc)
        stored = 0
        for start in range(0, len(entries), self._batch_size):
            first_seq, out = await self._commit(
                entries[start : start + self._batch_size], skip_present=True
            )
            stored += len(out)
            if out:
                await self._mirror(first_seq, out)
        await asyncio.to_thread(orphan.discard)
        self._recovered += stored
        if entries:
            logger.warning(
                "audit: recovered the journal of process %s, which ended without closing its "
                "log: %d events, %d of them not yet in the database, now written",
                orphan.owner,
                len(entries),
                stored,
            )

    async def _mirror(self, first_seq: int, lines: list[bytes]) -> None:
        """Append a just-committed batch to the sink (see sink.py for who appends what)."""
        if self._sink is None:
            return
        batch = (first_seq, lines, self._last_hash)
        at = await asyncio.to_thread(self._sink.sync, batch, self._last_seq, self._sink_seq)
        self._sink_seq = max(self._sink_seq, at)

    async def _catch_up_sink(self) -> None:
        assert self._sink is not None
        at = await asyncio.to_thread(self._sink.sync, None, self._last_seq, self._sink_seq)
        self._sink_seq = max(self._sink_seq, at)


def default_journal_dir(db_path: Path) -> Path:
    """`<database>.journal/` beside the database (not SQLite's own `-journal` file)."""
    return db_path.with_name(db_path.name + ".journal")


def _journal_event(line: bytes) -> dict[str, Any]:
    """An event as record() journaled it, without the chain placeholders it was encoded with."""
    event = json.loads(line)
    if not isinstance(event, dict):
        raise ValueError("not a JSON object")
    for name in CHAIN_FIELDS:
        event.pop(name, None)
    return event


async def _not_stored(
    db: aiosqlite.Connection, batch: list[tuple[str, Entry]]
) -> list[tuple[str, Entry]]:
    present: set[str] = set()
    ids = [decision_id for decision_id, _ in batch]
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        # Only placeholders are interpolated; the ids are bound parameters.
        sql = f"SELECT decision_id FROM audit_events WHERE decision_id IN ({marks})"  # noqa: S608
        async with db.execute(sql, chunk) as cur:
            present.update(str(row[0]) for row in await cur.fetchall())
    seen: set[str] = set()
    out: list[tuple[str, Entry]] = []
    for decision_id, entry in batch:
        if decision_id not in present and decision_id not in seen:
            seen.add(decision_id)
            out.append((decision_id, entry))
    return out


async def _head_is_checkpoint(db: aiosqlite.Connection) -> bool:
    """Whether the newest event is a checkpoint (an empty chain needs none)."""
    async with db.execute("SELECT event FROM audit_events ORDER BY seq DESC LIMIT 1") as cur:
        row = await cur.fetchone()
    if row is None:
        return True
    try:
        return bool(json.loads(row[0]).get("type") == CHECKPOINT_TYPE)
    except (ValueError, AttributeError):
        return False
