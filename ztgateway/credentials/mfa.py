"""TOTP step-up for the gateway: enrolment, verification with replay and brute-force guards.

The TOTP mechanics live in `credentials/totp.py`; this module binds them to the store (the
per-user replay counter, failure windows, MFA lock-out, used backup codes) and to the configured
secret key, so the CLI, the admin API, the `/.ztgw/mfa*` endpoints and the tests all go through
one place.

Enrolment in the browser is two steps (issue 18, M1): `start_enrolment` keeps a new secret
*pending* (sealed, in the user's record) and shows it as often as the person reloads;
`confirm_enrolment` makes it the user's factor only after a correct code from it, and only then
are backup codes made. A pending secret never replaces the active one until confirmed, so
replacing a factor needs the current one (checked by the caller) or an operator's reset.

Backup codes (issue 18, M7) are scrypt hashes: checking one costs ~0.4 CPU-s for ten codes. An
attempt is therefore counted and refused over the limit *before* any scrypt runs, at most
`EXPENSIVE_CONCURRENCY` checks run at once in a dedicated thread pool (never the default
executor the audit writer uses), a burst beyond `EXPENSIVE_QUEUE` waiting ones is refused as
busy, and a matched code is spent by an atomic mark in the store, so of many concurrent requests
on any number of processes or replicas exactly one gets in.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from ..clock import SYSTEM_CLOCK, Clock
from ..config import MFAConfig
from ..store.base import Store, UserRecord
from .totp import (
    Enrollment,
    SecretBox,
    TOTPError,
    Verifier,
    check_backup_code,
    hash_backup_code,
    new_backup_codes,
    new_enrollment,
    new_secret,
    normalise_backup_code,
    otpauth_uri,
)

EXPENSIVE_CONCURRENCY = 2
"""Backup-code checks (scrypt) running at once, gateway-wide: the rest wait."""
EXPENSIVE_QUEUE = 16
"""Checks allowed to wait for a slot; beyond that an attempt is refused as busy (429)."""


class MFAUnavailable(Exception):
    """No MFA key is configured: step-up cannot be completed, so it fails closed."""


class MFABusy(Exception):
    """Too many expensive checks are waiting: refused before any work (429, Retry-After)."""


@dataclass(frozen=True, slots=True)
class PendingEnrolment:
    """A started enrolment as the person sees it again on every reload until it is confirmed."""

    secret: str
    uri: str
    started_at: float
    expires_at: float

    def __repr__(self) -> str:
        return f"PendingEnrolment(expires_at={self.expires_at}, <secret redacted>)"


def load_box(cfg: MFAConfig, *, create: bool = False) -> SecretBox | None:
    """The key from the environment, else from key_file (created 0600 when asked)."""
    env = os.environ.get(cfg.key_env)
    if env:
        return SecretBox.from_b64(env)
    path: Path | None = cfg.key_file
    if path is None:
        return None
    if not path.exists():
        if not create:
            return None
        from ..keys import create_private_file

        # Linked into place whole: a worker starting at the same moment never reads half a key.
        create_private_file(path, (SecretBox.generate_key_b64() + "\n").encode("ascii"))
    return SecretBox.from_b64(path.read_text().strip())


def _pending_owner(user: str) -> str:
    # Sealed for "<user> NUL pending": a store writer cannot move a pending secret, which
    # nobody has confirmed, into the active field (it would not open there).
    return f"{user}\x00pending"


class ExpensiveChecks:
    """A gateway-wide cap on concurrent scrypt work, with a bounded queue."""

    def __init__(self, concurrency: int = EXPENSIVE_CONCURRENCY, queue: int = EXPENSIVE_QUEUE):
        self._slots = asyncio.Semaphore(concurrency)
        self.concurrency = concurrency
        self.queue = queue
        self._waiting = 0
        self.running = 0
        self.peak = 0
        self._executor: ThreadPoolExecutor | None = None

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._waiting >= self.queue:
            raise MFABusy("too many backup-code checks waiting")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()

    async def run(self, fn: Callable[[], int | None]) -> int | None:
        async with self.slot():
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self.concurrency, thread_name_prefix="ztgw-scrypt"
                )
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


class MFA:
    def __init__(
        self,
        cfg: MFAConfig,
        store: Store,
        *,
        create_key: bool = False,
        clock: Clock = SYSTEM_CLOCK,
        on_backup_check: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.store = store
        self.box = load_box(cfg, create=create_key)
        self.expensive = ExpensiveChecks()
        self._on_backup_check = on_backup_check
        self.verifier = self._verifier("totp-step")
        # A pending secret's codes have their own replay counter: confirming a replacement
        # right after giving the current factor's code (the same 30 s step) must not be taken
        # for a replay of that code.
        self.pending_verifier = self._verifier("totp-step-pending")

    def _verifier(self, counter: str) -> Verifier:
        async def claim_step(user: str, step: int) -> bool:
            return await self.store.advance(f"{counter}:{user}", step)

        cfg = self.cfg
        return Verifier(
            claim_step=claim_step,
            failures=self._failures,
            record_failure=self._record_failure,
            locked_until=self._locked_until,
            lock=self._lock,
            reset_failures=self._reset_failures,
            max_failures=cfg.max_failures,
            find_time=cfg.find_time,
            ban_time=cfg.ban_time,
            window=cfg.window,
        )

    @property
    def available(self) -> bool:
        return self.box is not None

    def enrolled(self, user: str) -> bool:
        u = self.store.user(user)
        return bool(u and u.mfa_secret)

    def close(self) -> None:
        self.expensive.close()

    # --- store callbacks ----------------------------------------------------------------
    async def _failures(self, user: str, since: float) -> int:
        now = self.clock.time()
        return await self.store.failures_async(f"mfa:{user}", now, max(0.0, now - since))

    async def _record_failure(self, user: str, now: float) -> None:
        await self.store.record_failure_async(f"mfa:{user}", now)

    async def _reset_failures(self, user: str) -> None:
        await self.store.reset_failures_async(f"mfa:{user}")

    async def _locked_until(self, user: str) -> float | None:
        u = self.store.user(user)
        return u.mfa_locked_until if u else None

    async def _lock(self, user: str, until: float) -> None:
        u = self.store.user(user) or UserRecord(user=user)
        await self.store.save_user(replace(u, mfa_locked_until=until))

    def _require_box(self) -> SecretBox:
        if self.box is None:
            raise MFAUnavailable(
                "no MFA key configured ([mfa] key_file or the key environment variable)"
            )
        return self.box

    # --- enrolment ------------------------------------------------------------------------
    async def enroll(self, user: str) -> Enrollment:
        """At once, for an operator (`ztgateway users mfa enroll`): a new secret replacing any
        old one, and fresh backup codes; shown once. People enrol with start/confirm."""
        box = self._require_box()
        enrollment = new_enrollment(user, issuer=self.cfg.issuer)
        hashes = await self._hash_codes(enrollment.backup_codes)
        u = self.store.user(user) or UserRecord(user=user)
        await self.store.save_user(
            replace(
                u,
                mfa_secret=box.seal(enrollment.secret, user=user),
                mfa_enrolled_at=self.clock.time(),
                backup_codes=hashes,
                mfa_locked_until=None,
                mfa_pending_secret=None,
                mfa_pending_at=None,
            )
        )
        await self.store.reset_counter(f"totp-step:{user}")
        return enrollment

    async def _hash_codes(self, codes: tuple[str, ...]) -> tuple[str, ...]:
        return await asyncio.to_thread(lambda: tuple(hash_backup_code(c) for c in codes))

    def pending(self, user: str, now: float) -> PendingEnrolment | None:
        """The user's started, unexpired enrolment (the same secret on every reload)."""
        u = self.store.user(user)
        if u is None or not u.mfa_pending_secret or u.mfa_pending_at is None:
            return None
        expires = u.mfa_pending_at + self.cfg.enrolment_ttl
        if now >= expires:
            return None
        secret = self._require_box().open(u.mfa_pending_secret, user=_pending_owner(user))
        uri = otpauth_uri(user, secret, issuer=self.cfg.issuer)
        return PendingEnrolment(secret, uri, u.mfa_pending_at, expires)

    async def start_enrolment(self, user: str, now: float) -> PendingEnrolment:
        """A pending secret for `user`: the one already waiting if it has not expired, else a
        new one. The caller has checked who may do this (signed in; the current factor for a
        replacement)."""
        box = self._require_box()
        waiting = self.pending(user, now)
        if waiting is not None:
            return waiting
        otpauth_uri(user, "", issuer=self.cfg.issuer)  # a name the URI cannot carry: refuse now
        secret = new_secret()
        u = self.store.user(user) or UserRecord(user=user)
        await self.store.save_user(
            replace(
                u,
                mfa_pending_secret=box.seal(secret, user=_pending_owner(user)),
                mfa_pending_at=now,
            )
        )
        await self.store.reset_counter(f"totp-step-pending:{user}")
        started = self.pending(user, now)
        assert started is not None
        return started

    async def confirm_enrolment(self, user: str, code: object, now: float) -> Enrollment:
        """Make the pending secret the user's factor once `code` is one of its codes.

        Returns the enrolment with its backup codes (shown once). Raises LookupError when no
        enrolment is pending (none started, expired, or confirmed by a concurrent request),
        TOTPError for a wrong, reused or malformed code (counted like any MFA failure).
        """
        box = self._require_box()
        pending = self.pending(user, now)
        if pending is None:
            raise LookupError("no enrolment is waiting for a code")
        step = await self.pending_verifier.verify(user, pending.secret, code, now=now)
        u = self.store.user(user)
        if u is None or u.mfa_pending_at != pending.started_at:
            raise LookupError("the enrolment changed while it was being confirmed")
        backup = new_backup_codes()
        hashes = await self._hash_codes(backup)
        await self.store.save_user(
            replace(
                u,
                mfa_secret=box.seal(pending.secret, user=user),
                mfa_enrolled_at=now,
                backup_codes=hashes,
                mfa_locked_until=None,
                mfa_pending_secret=None,
                mfa_pending_at=None,
            )
        )
        # The code just given may not be given again as a step-up.
        await self.store.reset_counter(f"totp-step:{user}")
        await self.store.advance(f"totp-step:{user}", step)
        return Enrollment(secret=pending.secret, uri=pending.uri, backup_codes=backup)

    async def reset(self, user: str) -> bool:
        """An operator's reset: no factor, nothing pending, no MFA lock."""
        u = self.store.user(user)
        if u is None or not (u.mfa_secret or u.mfa_pending_secret):
            return False
        await self.store.save_user(
            replace(
                u,
                mfa_secret=None,
                mfa_enrolled_at=None,
                backup_codes=(),
                mfa_locked_until=None,
                mfa_pending_secret=None,
                mfa_pending_at=None,
            )
        )
        await self.store.reset_failures_async(f"mfa:{user}")
        return True

    # --- verification ---------------------------------------------------------------------
    async def verify(self, user: str, code: object, *, now: float | None = None) -> str:
        """'totp' or 'backup' on success; TOTPError(reason) otherwise, MFABusy when saturated."""
        now = self.clock.time() if now is None else now
        box = self._require_box()
        u = self.store.user(user)
        if u is None or not u.mfa_secret:
            # Perhaps set up a moment ago by another process (`ztgateway users mfa enroll`,
            # another worker or replica): read the store rather than refuse until its change
            # feed arrives. Only ever for a user without a factor in memory: one row read.
            u = await self.store.find_user(user)
        secret = box.open(u.mfa_secret, user=user) if u and u.mfa_secret else None
        if isinstance(code, str) and "-" in code and u is not None and u.backup_codes:
            return await self._verify_backup(u.user, code, now)
        await self.verifier.verify(user, secret, code, now=now)
        return "totp"

    async def _verify_backup(self, user: str, code: str, now: float) -> str:
        # Counted first (as the TOTP path does): at most max_failures attempts per window
        # ever reach scrypt, however many arrive at once.
        attempts = await self.verifier.admit(user, now)
        try:
            normalise_backup_code(code)  # mfa-malformed costs nothing more
        except TOTPError as failure:
            await self.verifier.failed(user, now, attempts, failure)
        u = self.store.user(user)
        hashes = u.backup_codes if u is not None else ()
        index = await self.expensive.run(lambda: check_backup_code(code, hashes))
        if index is None:
            self._count_check("invalid")
            await self.verifier.failed(user, now, attempts, TOTPError("mfa-invalid"))
        used = hashes[index]
        if not await self.store.consume_backup_code(user, used):
            self._count_check("replayed")
            await self.verifier.failed(user, now, attempts, TOTPError("mfa-replayed"))
        self._count_check("used")
        await self._reset_failures(user)
        # Tidy the record (the count shown; fewer hashes to check next time). The mark in the
        # store is what makes the code single-use, whatever a stale copy of the record says.
        fresh = self.store.user(user)
        if fresh is not None and used in fresh.backup_codes:
            left = tuple(h for h in fresh.backup_codes if h != used)
            await self.store.save_user(replace(fresh, backup_codes=left))
        return "backup"

    def _count_check(self, result: str) -> None:
        if self._on_backup_check is not None:
            self._on_backup_check(result)
