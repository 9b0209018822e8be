"""TOTP step-up for the gateway: enrolment, verification with replay and brute-force guards.

The TOTP mechanics live in `credentials/totp.py`; this module binds them to the store (the
per-user replay counter, failure windows, MFA lock-out) and to the configured secret key, so
the CLI, the `/.ztgw/mfa/*` endpoints and the tests all go through one place.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

from .clock import SYSTEM_CLOCK, Clock
from .config import MFAConfig
from .credentials.totp import (
    Enrollment,
    SecretBox,
    TOTPError,
    Verifier,
    check_backup_code,
    hash_backup_code,
    new_enrollment,
)
from .store.base import Store, UserRecord


class MFAUnavailable(Exception):
    """No MFA key is configured: step-up cannot be completed, so it fails closed."""


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
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(SecretBox.generate_key_b64() + "\n")
    return SecretBox.from_b64(path.read_text().strip())


class MFA:
    def __init__(
        self, cfg: MFAConfig, store: Store, *, create_key: bool = False, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.store = store
        self.box = load_box(cfg, create=create_key)
        self.verifier = Verifier(
            claim_step=self._claim_step,
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

    # --- store callbacks ----------------------------------------------------------------
    async def _claim_step(self, user: str, step: int) -> bool:
        return await self.store.advance(f"totp-step:{user}", step)

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

    # --- operations ---------------------------------------------------------------------
    async def enroll(self, user: str) -> Enrollment:
        """A new secret (replacing any old one) and fresh backup codes; shown once."""
        if self.box is None:
            raise MFAUnavailable(
                "no MFA key configured ([mfa] key_file or the key environment variable)"
            )
        enrollment = new_enrollment(user, issuer=self.cfg.issuer)
        hashes = await asyncio.to_thread(
            lambda: tuple(hash_backup_code(c) for c in enrollment.backup_codes)
        )
        u = self.store.user(user) or UserRecord(user=user)
        await self.store.save_user(
            replace(
                u,
                mfa_secret=self.box.seal(enrollment.secret, user=user),
                mfa_enrolled_at=self.clock.time(),
                backup_codes=hashes,
                mfa_locked_until=None,
            )
        )
        await self.store.reset_counter(f"totp-step:{user}")
        return enrollment

    async def reset(self, user: str) -> bool:
        u = self.store.user(user)
        if u is None or not u.mfa_secret:
            return False
        await self.store.save_user(
            replace(
                u, mfa_secret=None, mfa_enrolled_at=None, backup_codes=(), mfa_locked_until=None
            )
        )
        await self.store.reset_failures_async(f"mfa:{user}")
        return True

    async def verify(self, user: str, code: object, *, now: float | None = None) -> str:
        """'totp' or 'backup' on success; TOTPError(reason) otherwise."""
        now = self.clock.time() if now is None else now
        if self.box is None:
            raise MFAUnavailable("no MFA key configured")
        u = self.store.user(user)
        secret = self.box.open(u.mfa_secret, user=user) if u and u.mfa_secret else None
        if isinstance(code, str) and "-" in code and u is not None and u.backup_codes:
            return await self._verify_backup(u, code, now)
        await self.verifier.verify(user, secret, code, now=now)
        return "totp"

    async def _verify_backup(self, u: UserRecord, code: str, now: float) -> str:
        locked = u.mfa_locked_until
        if locked is not None and locked > now:
            raise TOTPError("mfa-locked", locked_until=locked)
        await self._record_failure(u.user, now)
        index = await asyncio.to_thread(check_backup_code, code, u.backup_codes)
        if index is None:
            if await self._failures(u.user, now - self.cfg.find_time) >= self.cfg.max_failures:
                until = now + self.cfg.ban_time
                await self._lock(u.user, until)
                raise TOTPError("mfa-locked", locked_until=until)
            raise TOTPError("mfa-invalid")
        await self._reset_failures(u.user)
        codes = tuple(c for i, c in enumerate(u.backup_codes) if i != index)
        await self.store.save_user(replace(u, backup_codes=codes))
        return "backup"
