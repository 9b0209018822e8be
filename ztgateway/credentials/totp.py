"""TOTP second factor: enrolment, secrets sealed at rest, backup codes and a guarded verifier.

This module works on values only. Where state is needed (which time step a user last used, how
many failures they made, whether they are locked out) it calls back into the caller, so the
lead can back it with SQLite or Redis and every replica sees the same state; time always comes in
as an argument so tests and replicas agree on "now".

The codes follow RFC 6238 with the parameters every authenticator app understands (HMAC-SHA1,
6 digits, 30 s steps). HOTP (RFC 4226 §5.3) is computed here rather than through pyotp because
the replay guard needs the *matched time step*, not a bool, and every step of the window must
be compared in constant time without stopping at the first hit.

Outcomes a person causes (a wrong, reused or malformed code, a locked account) are `TOTPError`s
with a closed reason the endpoints map to a response. Faults (a corrupt stored secret, a wrong
encryption key, a negative clock) are `ValueError`s, so they surface as errors rather than
being mistaken for a user's bad code.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import math
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, NoReturn
from urllib.parse import quote

import segno
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "BACKUP_CODE_COUNT",
    "DIGITS",
    "PERIOD",
    "Enrollment",
    "SealedSecretError",
    "SecretBox",
    "TOTPError",
    "TOTPReason",
    "Verifier",
    "check_backup_code",
    "hash_backup_code",
    "new_backup_codes",
    "new_enrollment",
    "new_secret",
    "normalise_backup_code",
    "normalise_code",
    "otpauth_uri",
    "qr_svg",
    "qr_terminal",
    "totp_code",
    "verify_totp",
]

TOTPReason = Literal[
    "mfa-invalid", "mfa-replayed", "mfa-locked", "mfa-not-enrolled", "mfa-malformed"
]

# RFC 6238 §4.1/§5.2 defaults; the only combination Google Authenticator and most apps honour.
DIGITS: Final = 6
PERIOD: Final = 30
ALGORITHM: Final = "SHA1"
# RFC 4226 §4 R6 requires at least 128 bits and recommends 160; we issue 160.
SECRET_BYTES: Final = 20
MIN_SECRET_BYTES: Final = 16
# RFC 6238 §5.2 recommends at most one step of tolerated delay; a wide window multiplies the
# codes an attacker may guess per attempt, so it is bounded.
MAX_WINDOW: Final = 10
# Anything longer than this is refused before any work (a 10 MB "code" must cost nothing).
MAX_CODE_CHARS: Final = 32

BACKUP_CODE_COUNT: Final = 10
# Lowercase letters and digits without the look-alikes 0/o, 1/l/i: 31 symbols, 12 of them per
# code, about 59 bits, far out of reach of online guessing and costly offline behind scrypt.
_BACKUP_ALPHABET: Final = "abcdefghjkmnpqrstuvwxyz23456789"
_BACKUP_GROUPS: Final = 3
_BACKUP_GROUP_LEN: Final = 4
_BACKUP_LEN: Final = _BACKUP_GROUPS * _BACKUP_GROUP_LEN
_BACKUP_RE: Final = re.compile(f"[{_BACKUP_ALPHABET}]{{{_BACKUP_LEN}}}")
# scrypt with the interactive-login cost of RFC 7914 §2 (N=2^14, r=8, p=1: 16 MiB, tens of ms).
_SCRYPT_N: Final = 2**14
_SCRYPT_R: Final = 8
_SCRYPT_P: Final = 1
_SCRYPT_LEN: Final = 32
_SALT_BYTES: Final = 16
_HASH_SCHEME: Final = "scrypt"

_CODE_RE: Final = re.compile(r"[0-9]{6}")
_CODE_SPACES: Final = str.maketrans("", "", " \t\r\n")
_BACKUP_SEPARATORS: Final = str.maketrans("", "", " \t\r\n-")

_NONCE_BYTES: Final = 12
_KEY_BYTES: Final = 32
# Domain separation: a ciphertext made with the same key for another purpose never opens here.
_AAD_PREFIX: Final = b"ztgateway/totp-secret/v1\x00"


class TOTPError(Exception):
    """A second-factor attempt that failed for a reason the person can be told.

    `locked_until` is set when the user is (or has just become) locked out, so the endpoint can
    send `Retry-After`.
    """

    def __init__(self, reason: TOTPReason, *, locked_until: float | None = None) -> None:
        super().__init__(reason)
        self.reason: TOTPReason = reason
        self.locked_until = locked_until


class SealedSecretError(ValueError):
    """A sealed secret did not open: wrong key, tampered bytes, or a row moved to another user.

    This is a fault, deliberately not `TOTPError("mfa-not-enrolled")`: treating it as "not
    enrolled" would let someone who can corrupt a store row send the user back through
    enrolment, replacing the second factor instead of failing closed.
    """


# --- HOTP / TOTP (RFC 4226, RFC 6238) -------------------------------------------------------


def _decode_secret(secret: str) -> bytes:
    """Base32 as apps display it: case and spaces do not matter, padding is optional."""
    text = secret.translate(_CODE_SPACES).upper()
    text += "=" * (-len(text) % 8)
    try:
        key = base64.b32decode(text, casefold=False)
    except (binascii.Error, ValueError):
        raise ValueError("TOTP secret is not valid base32") from None
    if len(key) < MIN_SECRET_BYTES:
        # RFC 4226 §4 R6: shared secrets shorter than 128 bits MUST NOT be used.
        raise ValueError("TOTP secret is shorter than 128 bits")
    return key


def _hotp(key: bytes, counter: int, digits: int) -> str:
    # RFC 4226 §5.3: HMAC-SHA1 over the 8-byte big-endian counter, dynamic truncation.
    mac = hmac.new(key, counter.to_bytes(8, "big"), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    binary = int.from_bytes(mac[offset : offset + 4], "big") & 0x7FFFFFFF
    return str(binary % 10**digits).zfill(digits)


def _time_step(now: float) -> int:
    if not math.isfinite(now) or now < 0:
        raise ValueError("now must be a finite, non-negative POSIX time")
    # RFC 6238 §4.2: T = floor((Current Unix time - T0) / X) with T0 = 0, X = 30.
    return int(now // PERIOD)


def totp_code(secret: str, *, now: float, digits: int = DIGITS) -> str:
    """The code an authenticator shows at `now`; for the demo, the CLI and tests."""
    if not 6 <= digits <= 8:
        # RFC 4226 §5.3: at least 6 digits; 8 is the most RFC 6238 Appendix B uses.
        raise ValueError("digits must be 6, 7 or 8")
    return _hotp(_decode_secret(secret), _time_step(now), digits)


def normalise_code(code: object) -> str:
    """The six ASCII digits of a submitted code, or `TOTPError("mfa-malformed")`.

    Length is checked before anything else so oversized input costs nothing. Only ASCII
    `0-9` count as digits: `str.isdigit` would let full-width or other scripts' digits through,
    which no authenticator produces.
    """
    if not isinstance(code, str) or len(code) > MAX_CODE_CHARS:
        raise TOTPError("mfa-malformed")
    digits = code.translate(_CODE_SPACES)
    if _CODE_RE.fullmatch(digits) is None:
        raise TOTPError("mfa-malformed")
    return digits


def _check_window(window: int) -> None:
    if not 0 <= window <= MAX_WINDOW:
        raise ValueError(f"window must be between 0 and {MAX_WINDOW}")


def verify_totp(secret: str, code: str, *, now: float, window: int = 1) -> int:
    """Returns the matched time step (counter) or raises TOTPError("mfa-invalid").

    Accepts codes from `window` steps either side of `now` (RFC 6238 §5.2 tolerates clock drift
    and network delay). Every step of the window is computed and compared with
    `hmac.compare_digest`, with no early exit, so timing tells nothing about which step (if
    any) matched. A malformed code raises `mfa-malformed`; a bad secret or clock is a
    `ValueError` (a fault, not the person's mistake).
    """
    _check_window(window)
    submitted = normalise_code(code).encode("ascii")
    key = _decode_secret(secret)
    current = _time_step(now)
    matched: int | None = None
    for step in range(max(0, current - window), current + window + 1):
        if hmac.compare_digest(_hotp(key, step, DIGITS).encode("ascii"), submitted):
            # If a code happens to repeat inside the window, the latest step wins: it is the
            # stricter mark for the replay guard (RFC 6238 §5.2).
            matched = step
    if matched is None:
        raise TOTPError("mfa-invalid")
    return matched


# --- enrolment ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What a new enrolment shows the person once; only `secret` (sealed) and the hashed backup
    codes are stored."""

    secret: str
    uri: str
    backup_codes: tuple[str, ...]

    def __repr__(self) -> str:
        # Keeps the secret and the codes out of logs and tracebacks that print locals.
        return f"Enrollment(uri=<redacted>, backup_codes=<{len(self.backup_codes)} redacted>)"


def _check_label_part(what: str, value: str) -> None:
    # Key URI Format (google-authenticator wiki): neither issuer nor account name may contain a
    # colon, which separates them in the label.
    if not value or ":" in value or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError(f"{what} must be non-empty, without ':' or control characters")


def _new_backup_code() -> str:
    chars = "".join(secrets.choice(_BACKUP_ALPHABET) for _ in range(_BACKUP_LEN))
    return "-".join(
        chars[i : i + _BACKUP_GROUP_LEN] for i in range(0, _BACKUP_LEN, _BACKUP_GROUP_LEN)
    )


def otpauth_uri(user: str, secret: str, *, issuer: str = "ztgateway") -> str:
    """The Key URI Format that authenticator apps scan.

    The URI spells out algorithm, digits and period even though they are the defaults, so an
    app that guesses differently still agrees with the verifier.
    """
    _check_label_part("user", user)
    _check_label_part("issuer", issuer)
    label = f"{quote(issuer, safe='')}:{quote(user, safe='')}"
    return (
        f"otpauth://totp/{label}?secret={secret}&issuer={quote(issuer, safe='')}"
        f"&algorithm={ALGORITHM}&digits={DIGITS}&period={PERIOD}"
    )


def new_backup_codes(count: int = BACKUP_CODE_COUNT) -> tuple[str, ...]:
    if not 0 <= count <= 100:
        raise ValueError("backup_codes must be between 0 and 100")
    return tuple(_new_backup_code() for _ in range(count))


def new_secret() -> str:
    # RFC 4226 §4 R7: keys from a cryptographically strong random source.
    return base64.b32encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def new_enrollment(
    user: str, *, issuer: str = "ztgateway", backup_codes: int = BACKUP_CODE_COUNT
) -> Enrollment:
    """A fresh 160-bit secret, its `otpauth://` URI and one-time backup codes."""
    secret = new_secret()
    uri = otpauth_uri(user, secret, issuer=issuer)
    return Enrollment(secret=secret, uri=uri, backup_codes=new_backup_codes(backup_codes))


def qr_svg(uri: str) -> str:
    """The URI as inline SVG for the browser enrolment page.

    Inline, with no XML declaration, namespace or external reference, so the page needs no
    image endpoint (which would have to be protected too) and stays within a strict CSP.
    """
    return segno.make_qr(uri, error="m").svg_inline(scale=4, title="TOTP enrolment QR code")


def qr_terminal(uri: str) -> str:
    """The URI as a compact text QR code (Unicode half blocks) for `ztgateway users mfa enroll`.

    segno draws light modules as blocks, which suits the usual dark terminal background; the
    otpauth URI is printed beside it for terminals where scanning fails.
    """
    out = io.StringIO()
    segno.make_qr(uri, error="m").terminal(out=out, compact=True)
    return out.getvalue()


# --- secrets at rest ------------------------------------------------------------------------


class SecretBox:
    """AES-256-GCM encryption of TOTP secrets at rest; the key comes from configuration or the
    environment (e.g. ZTGW_MFA_KEY, base64 32 bytes) and is never logged.

    Sealed form: base64(nonce(12) || ciphertext || tag(16)). The user name is bound as
    associated data, so a sealed secret copied into another user's row does not open: a store
    writer cannot give Mallory Alice's authenticator, nor Alice Mallory's.
    """

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != _KEY_BYTES:
            raise ValueError("MFA key must be exactly 32 bytes (AES-256)")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "SecretBox(<key redacted>)"

    @classmethod
    def from_b64(cls, text: str) -> SecretBox:
        """From the base64 text of configuration or ZTGW_MFA_KEY; errors never echo the key."""
        try:
            key = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("MFA key is not valid base64") from None
        return cls(key)

    @staticmethod
    def generate_key_b64() -> str:
        return base64.b64encode(secrets.token_bytes(_KEY_BYTES)).decode("ascii")

    @staticmethod
    def _aad(user: str) -> bytes:
        return _AAD_PREFIX + user.encode("utf-8")

    def seal(self, secret: str, *, user: str) -> str:
        # NIST SP 800-38D §8.2.2: random 96-bit nonces; far below the 2^32 seals per key limit.
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, secret.encode("utf-8"), self._aad(user))
        return base64.b64encode(nonce + sealed).decode("ascii")

    def open(self, sealed: str, *, user: str) -> str:
        """The secret, or `SealedSecretError` (a `ValueError`) if it cannot be authenticated."""
        try:
            raw = base64.b64decode(sealed, validate=True)
        except (binascii.Error, ValueError):
            raise SealedSecretError("sealed TOTP secret is not valid base64") from None
        if len(raw) <= _NONCE_BYTES + 16:
            raise SealedSecretError("sealed TOTP secret is too short")
        try:
            plain = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], self._aad(user))
        except InvalidTag:
            raise SealedSecretError(
                "sealed TOTP secret does not open: wrong key, tampered, or another user's"
            ) from None
        return plain.decode("utf-8")


# --- backup codes ---------------------------------------------------------------------------


def normalise_backup_code(code: object) -> str:
    """Lowercase, without dashes or spaces; `TOTPError("mfa-malformed")` if it cannot be one of
    ours, so no scrypt work is spent on garbage."""
    if not isinstance(code, str) or len(code) > MAX_CODE_CHARS:
        raise TOTPError("mfa-malformed")
    text = code.translate(_BACKUP_SEPARATORS).lower()
    if _BACKUP_RE.fullmatch(text) is None:
        raise TOTPError("mfa-malformed")
    return text


def _scrypt(normalised: str, salt: bytes) -> bytes:
    return hashlib.scrypt(
        normalised.encode("ascii"),
        salt=salt,
        n=_SCRYPT_N,
        r=_SCRYPT_R,
        p=_SCRYPT_P,
        dklen=_SCRYPT_LEN,
    )


def hash_backup_code(code: str, *, salt: bytes | None = None) -> str:
    """`scrypt$<salt b64>$<hash b64>` of the normalised code, each with its own random salt.

    scrypt keeps a leaked table of hashes from being searched cheaply. It costs tens of
    milliseconds: call it from a thread (`asyncio.to_thread`) on the event loop.
    """
    normalised = normalise_backup_code(code)
    if salt is None:
        salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(normalised, salt)
    return "$".join(
        (
            _HASH_SCHEME,
            base64.b64encode(salt).decode("ascii"),
            base64.b64encode(digest).decode("ascii"),
        )
    )


def _parse_hash(encoded: str) -> tuple[bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 3 or parts[0] != _HASH_SCHEME:
        raise ValueError("stored backup code hash has an unknown format")
    try:
        salt = base64.b64decode(parts[1], validate=True)
        digest = base64.b64decode(parts[2], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("stored backup code hash is not valid base64") from None
    if len(digest) != _SCRYPT_LEN or not salt:
        raise ValueError("stored backup code hash has the wrong length")
    return salt, digest


def check_backup_code(code: str, hashed: Sequence[str]) -> int | None:
    """The index of the hash `code` matches, or None; the caller deletes that entry so each
    code works once.

    Every entry is hashed and compared in constant time, with no early exit, so timing does
    not tell which entry matched. A corrupt stored hash is a `ValueError` (a fault); a code that
    cannot be a backup code is `TOTPError("mfa-malformed")`. Costs one scrypt per entry: run
    it in a thread.
    """
    normalised = normalise_backup_code(code)
    parsed = [_parse_hash(entry) for entry in hashed]
    found: int | None = None
    for index, (salt, digest) in enumerate(parsed):
        if hmac.compare_digest(_scrypt(normalised, salt), digest) and found is None:
            found = index
    return found


# --- the guarded verifier -------------------------------------------------------------------

ClaimStep = Callable[[str, int], Awaitable[bool]]
CountFailures = Callable[[str, float], Awaitable[int]]
RecordFailure = Callable[[str, float], Awaitable[None]]
LockedUntil = Callable[[str], Awaitable[float | None]]
Lock = Callable[[str, float], Awaitable[None]]
ResetFailures = Callable[[str], Awaitable[None]]


class Verifier:
    """The full check: format, lock-out, replay, window.

    State lives behind callbacks, each of which the store must make atomic:

    - `claim_step(user, step) -> bool`: compare-and-set on the user's last used time step.
      Returns True and records `step` only if it is *greater* than the step last recorded for
      the user (or none is recorded); otherwise returns False. One integer per user covers both
      halves of RFC 6238 §5.2 ("MUST NOT accept the second attempt of the same OTP") and "no
      code from a step at or before the last used one", and two concurrent requests with one
      code can never both succeed. SQL: `UPDATE … SET last_step=? WHERE user=? AND
      (last_step IS NULL OR last_step < ?)` and check the row count.
    - `failures(user, since) -> int`: failures recorded for the user at times `>= since`. The
      verifier passes `since` (it owns `find_time`), so the store need not know the policy.
    - `record_failure(user, now)`, `reset_failures(user)`.
    - `locked_until(user) -> float | None`, `lock(user, until)`.

    Brute force (Authelia's regulation): after `max_failures` failures within `find_time`
    seconds, MFA is locked for `ban_time` seconds. Each attempt is recorded *before* the code
    is checked and the success path clears it: otherwise a burst of concurrent guesses would all
    pass the lock check before any failure was counted, and a thousand parallel requests would
    get a thousand guesses. Counted first, at most `max_failures` attempts per window ever reach
    the code check. Failures from before the end of the last ban are not counted again, so a
    ban shorter than `find_time` still ends.
    """

    def __init__(
        self,
        *,
        claim_step: ClaimStep,
        failures: CountFailures,
        record_failure: RecordFailure,
        locked_until: LockedUntil,
        lock: Lock,
        reset_failures: ResetFailures,
        max_failures: int = 5,
        find_time: float = 300,
        ban_time: float = 900,
        window: int = 1,
    ) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        if not (math.isfinite(find_time) and find_time > 0):
            raise ValueError("find_time must be a positive number of seconds")
        if not (math.isfinite(ban_time) and ban_time > 0):
            raise ValueError("ban_time must be a positive number of seconds")
        _check_window(window)
        self._claim_step = claim_step
        self._failures = failures
        self._record_failure = record_failure
        self._locked_until = locked_until
        self._lock = lock
        self._reset_failures = reset_failures
        self.max_failures = max_failures
        self.find_time = find_time
        self.ban_time = ban_time
        self.window = window

    async def verify(self, user: str, secret: str | None, code: object, *, now: float) -> int:
        """The accepted time step, or TOTPError with the reason.

        `secret` is the opened secret, or None when the user has no enrolment
        (`mfa-not-enrolled`, not counted as a failure). Malformed, wrong and replayed codes all
        count as failures.
        """
        # Faults (a bad clock, a corrupt secret) are refused before any state is touched.
        _time_step(now)
        if secret is not None:
            _decode_secret(secret)
        until = await self._locked_until(user)
        if until is not None and now < until:
            raise TOTPError("mfa-locked", locked_until=until)
        if secret is None:
            raise TOTPError("mfa-not-enrolled")
        attempts = await self._count(user, now, until)
        try:
            step = verify_totp(secret, normalise_code(code), now=now, window=self.window)
            if not await self._claim_step(user, step):
                raise TOTPError("mfa-replayed")
        except TOTPError as failure:
            await self.failed(user, now, attempts, failure)
        await self._reset_failures(user)
        return step

    async def admit(self, user: str, now: float) -> int:
        """Count an attempt at another kind of code (a backup code) before it is checked, under
        the same lock-out: refused over the limit, else the attempts in the window so far."""
        until = await self._locked_until(user)
        if until is not None and now < until:
            raise TOTPError("mfa-locked", locked_until=until)
        return await self._count(user, now, until)

    async def _count(self, user: str, now: float, until: float | None) -> int:
        await self._record_failure(user, now)
        since = now - self.find_time
        if until is not None:
            since = max(since, until)
        attempts = await self._failures(user, since)
        if attempts > self.max_failures:
            # Only reachable by attempts racing the one that set the lock: refuse unchecked.
            ban = now + self.ban_time
            await self._lock(user, ban)
            raise TOTPError("mfa-locked", locked_until=ban)
        return attempts

    async def failed(self, user: str, now: float, attempts: int, failure: TOTPError) -> NoReturn:
        """Raise `failure`, locking the user out if it was the last attempt the window allows."""
        if attempts >= self.max_failures:
            failure.locked_until = now + self.ban_time
            await self._lock(user, failure.locked_until)
        raise failure
