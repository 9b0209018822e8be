"""TOTP step-up: RFC 6238 vectors, window, replay, lock-out, sealed secrets, backup codes, QR."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass, field

import pyotp
import pytest

from ztgateway.credentials.totp import (
    Enrollment,
    SealedSecretError,
    SecretBox,
    TOTPError,
    Verifier,
    check_backup_code,
    hash_backup_code,
    new_enrollment,
    normalise_backup_code,
    normalise_code,
    qr_svg,
    qr_terminal,
    totp_code,
    verify_totp,
)

# RFC 6238 Appendix B: the SHA1 key is the 20-byte ASCII string "12345678901234567890".
RFC_SECRET = base64.b32encode(b"12345678901234567890").decode()
RFC_VECTORS = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]
NOW = 1_700_000_000.0


def code_at(secret: str, t: float) -> str:
    """Independent oracle: pyotp, not the module under test."""
    return str(pyotp.TOTP(secret).at(t))


def wrong_code(secret: str, t: float) -> str:
    """A well-formed code that matches no step of a ±1 window at t."""
    window = {code_at(secret, t + d) for d in (-30, 0, 30)}
    return next(c for c in (f"{n:06d}" for n in range(1_000_000)) if c not in window)


# --- RFC 6238 and the window ----------------------------------------------------------------


@pytest.mark.parametrize(("t", "expected"), RFC_VECTORS)
def test_rfc6238_appendix_b_sha1_vectors_8_digits(t: int, expected: str) -> None:
    assert totp_code(RFC_SECRET, now=t, digits=8) == expected
    assert pyotp.TOTP(RFC_SECRET, digits=8).at(t) == expected


@pytest.mark.parametrize(("t", "expected"), RFC_VECTORS)
def test_rfc6238_vectors_truncated_to_6_digits_verify_at_their_step(t: int, expected: str) -> None:
    # Dynamic truncation mod 10^6 of the same 31-bit value is the last six of the 8-digit code.
    six = expected[-6:]
    assert totp_code(RFC_SECRET, now=t) == six == pyotp.TOTP(RFC_SECRET).at(t)
    assert verify_totp(RFC_SECRET, six, now=t) == t // 30


def test_code_one_step_either_side_is_accepted_and_returns_its_step() -> None:
    step = int(NOW // 30)
    assert verify_totp(RFC_SECRET, code_at(RFC_SECRET, NOW - 30), now=NOW) == step - 1
    assert verify_totp(RFC_SECRET, code_at(RFC_SECRET, NOW), now=NOW) == step
    assert verify_totp(RFC_SECRET, code_at(RFC_SECRET, NOW + 30), now=NOW) == step + 1


@pytest.mark.parametrize("offset", [-60, 60, -3600, 3600])
def test_code_two_or_more_steps_away_is_refused(offset: int) -> None:
    code = code_at(RFC_SECRET, NOW + offset)
    assert code not in {code_at(RFC_SECRET, NOW + d) for d in (-30, 0, 30)}
    with pytest.raises(TOTPError) as err:
        verify_totp(RFC_SECRET, code, now=NOW)
    assert err.value.reason == "mfa-invalid"


def test_window_zero_refuses_the_previous_step() -> None:
    with pytest.raises(TOTPError) as err:
        verify_totp(RFC_SECRET, code_at(RFC_SECRET, NOW - 30), now=NOW, window=0)
    assert err.value.reason == "mfa-invalid"


def test_secret_is_accepted_lowercase_with_spaces_and_no_padding() -> None:
    secret = new_enrollment("alice").secret
    spaced = " ".join(secret[i : i + 4] for i in range(0, len(secret), 4)).lower()
    assert verify_totp(spaced, code_at(secret, NOW), now=NOW) == int(NOW // 30)


@pytest.mark.parametrize(
    "secret",
    ["not base32!", base64.b32encode(b"0123456789").decode()],  # junk, 80-bit
    ids=["junk", "80-bit"],
)
def test_corrupt_or_short_secret_is_a_fault_not_a_bad_code(secret: str) -> None:
    with pytest.raises(ValueError) as err:
        verify_totp(secret, "123456", now=NOW)
    assert not isinstance(err.value, TOTPError)


@pytest.mark.parametrize("now", [-1.0, float("nan"), float("inf")])
def test_impossible_clock_is_a_fault(now: float) -> None:
    with pytest.raises(ValueError):
        verify_totp(RFC_SECRET, "123456", now=now)


@pytest.mark.parametrize("window", [-1, 11])
def test_window_out_of_bounds_is_refused(window: int) -> None:
    with pytest.raises(ValueError):
        verify_totp(RFC_SECRET, "123456", now=NOW, window=window)


# --- malformed codes ------------------------------------------------------------------------

MALFORMED: list[object] = [
    "12345",
    "1234567",
    "12a456",
    "1" * 10_000,
    None,
    123456,
    "１２３４５６",  # full-width digits: str.isdigit() says yes, no authenticator sends them
    "١٢٣٤٥٦",  # Arabic-Indic digits
    "",
    "123456\x00",
    b"123456",
    "12-3456",
]


@pytest.mark.parametrize("code", MALFORMED, ids=repr)
def test_malformed_code_is_refused_as_malformed(code: object) -> None:
    with pytest.raises(TOTPError) as err:
        normalise_code(code)
    assert err.value.reason == "mfa-malformed"


@pytest.mark.parametrize("code", ["12345", "12a456", "１２３４５６"])
def test_verify_totp_refuses_malformed_code_as_malformed(code: str) -> None:
    with pytest.raises(TOTPError) as err:
        verify_totp(RFC_SECRET, code, now=NOW)
    assert err.value.reason == "mfa-malformed"


@pytest.mark.parametrize("code", ["123456", "123 456", " 123456\n", "\t123 456 "])
def test_spaces_around_and_inside_the_code_are_ignored(code: str) -> None:
    assert normalise_code(code) == "123456"


# --- Verifier: state in a dict behind an asyncio.Lock, as a store would keep it -------------


@dataclass
class FakeStore:
    """The callbacks' contract in memory; each mutation is atomic under one lock.

    Every callback yields to the loop first so concurrent verifies really interleave.
    """

    lock_: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_step: dict[str, int] = field(default_factory=dict)
    failure_times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    bans: dict[str, float] = field(default_factory=dict)
    claims: list[tuple[str, int]] = field(default_factory=list)

    async def claim_step(self, user: str, step: int) -> bool:
        await asyncio.sleep(0)
        async with self.lock_:
            self.claims.append((user, step))
            last = self.last_step.get(user)
            if last is not None and step <= last:
                return False
            await asyncio.sleep(0)  # a slow store: the check and the write are still one unit
            self.last_step[user] = step
            return True

    async def failures(self, user: str, since: float) -> int:
        await asyncio.sleep(0)
        async with self.lock_:
            return sum(1 for t in self.failure_times[user] if t >= since)

    async def record_failure(self, user: str, now: float) -> None:
        await asyncio.sleep(0)
        async with self.lock_:
            self.failure_times[user].append(now)

    async def locked_until(self, user: str) -> float | None:
        await asyncio.sleep(0)
        async with self.lock_:
            return self.bans.get(user)

    async def lock(self, user: str, until: float) -> None:
        await asyncio.sleep(0)
        async with self.lock_:
            self.bans[user] = max(until, self.bans.get(user, until))

    async def reset_failures(self, user: str) -> None:
        await asyncio.sleep(0)
        async with self.lock_:
            self.failure_times[user].clear()

    def verifier(self, **kw: float) -> Verifier:
        return Verifier(
            claim_step=self.claim_step,
            failures=self.failures,
            record_failure=self.record_failure,
            locked_until=self.locked_until,
            lock=self.lock,
            reset_failures=self.reset_failures,
            **kw,  # type: ignore[arg-type]
        )


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def secret() -> str:
    return new_enrollment("alice").secret


async def test_valid_code_passes_and_returns_its_step(store: FakeStore, secret: str) -> None:
    step = await store.verifier().verify("alice", secret, code_at(secret, NOW), now=NOW)
    assert step == int(NOW // 30)
    assert store.last_step == {"alice": step}


async def test_same_code_twice_is_refused_as_replayed(store: FakeStore, secret: str) -> None:
    v = store.verifier()
    code = code_at(secret, NOW)
    await v.verify("alice", secret, code, now=NOW)
    with pytest.raises(TOTPError) as err:
        await v.verify("alice", secret, code, now=NOW + 5)
    assert err.value.reason == "mfa-replayed"


async def test_code_from_a_step_before_the_last_used_one_is_refused(
    store: FakeStore, secret: str
) -> None:
    v = store.verifier()
    await v.verify("alice", secret, code_at(secret, NOW + 30), now=NOW)
    earlier = code_at(secret, NOW)
    assert verify_totp(secret, earlier, now=NOW) == int(NOW // 30)  # inside the window
    with pytest.raises(TOTPError) as err:
        await v.verify("alice", secret, earlier, now=NOW)
    assert err.value.reason == "mfa-replayed"


async def test_two_concurrent_verifies_with_one_code_exactly_one_succeeds(
    store: FakeStore, secret: str
) -> None:
    v = store.verifier()
    code = code_at(secret, NOW)
    results = await asyncio.gather(
        v.verify("alice", secret, code, now=NOW),
        v.verify("alice", secret, code, now=NOW),
        return_exceptions=True,
    )
    ok = [r for r in results if isinstance(r, int)]
    refused = [r for r in results if isinstance(r, TOTPError)]
    assert ok == [int(NOW // 30)]
    assert [e.reason for e in refused] == ["mfa-replayed"]
    assert len(store.claims) == 2  # both really reached the guard


async def test_replay_guard_is_per_user(store: FakeStore) -> None:
    # Two users who happen to share a secret (a copied row) still each get one use per step.
    shared = new_enrollment("alice").secret
    v = store.verifier()
    code = code_at(shared, NOW)
    await v.verify("alice", shared, code, now=NOW)
    assert await v.verify("bob", shared, code, now=NOW) == int(NOW // 30)


async def test_lockout_after_max_failures_and_release_after_ban_time(
    store: FakeStore, secret: str
) -> None:
    v = store.verifier(max_failures=5, find_time=300, ban_time=900)
    bad = wrong_code(secret, NOW)
    for i in range(4):
        with pytest.raises(TOTPError) as err:
            await v.verify("alice", secret, bad, now=NOW + i)
        assert err.value.reason == "mfa-invalid"
        assert err.value.locked_until is None
    with pytest.raises(TOTPError) as err:
        await v.verify("alice", secret, bad, now=NOW + 4)
    assert err.value.reason == "mfa-invalid"
    assert err.value.locked_until == NOW + 4 + 900

    # While locked even the right code is refused, unchecked.
    later = NOW + 500
    with pytest.raises(TOTPError) as err:
        await v.verify("alice", secret, code_at(secret, later), now=later)
    assert err.value.reason == "mfa-locked"
    assert err.value.locked_until == NOW + 4 + 900
    assert store.claims == []

    released = NOW + 4 + 900
    assert await v.verify("alice", secret, code_at(secret, released), now=released) == int(
        released // 30
    )


async def test_lockout_is_per_user(store: FakeStore, secret: str) -> None:
    v = store.verifier(max_failures=2)
    for i in range(2):
        with pytest.raises(TOTPError):
            await v.verify("alice", secret, wrong_code(secret, NOW), now=NOW + i)
    assert "alice" in store.bans
    assert await v.verify("bob", secret, code_at(secret, NOW), now=NOW) == int(NOW // 30)


async def test_failures_older_than_find_time_do_not_count(store: FakeStore, secret: str) -> None:
    v = store.verifier(max_failures=5, find_time=300)
    bad = wrong_code(secret, NOW)
    for i in range(4):
        with pytest.raises(TOTPError):
            await v.verify("alice", secret, bad, now=NOW + i)
    later = NOW + 400
    bad_later = wrong_code(secret, later)
    for i in range(4):
        with pytest.raises(TOTPError) as err:
            await v.verify("alice", secret, bad_later, now=later + i)
        assert err.value.locked_until is None
    assert store.bans == {}


async def test_success_clears_earlier_failures(store: FakeStore, secret: str) -> None:
    v = store.verifier(max_failures=3)
    for i in range(2):
        with pytest.raises(TOTPError):
            await v.verify("alice", secret, wrong_code(secret, NOW), now=NOW + i)
    await v.verify("alice", secret, code_at(secret, NOW), now=NOW + 2)
    for i in range(2):
        with pytest.raises(TOTPError) as err:
            await v.verify("alice", secret, wrong_code(secret, NOW), now=NOW + 3 + i)
        assert err.value.reason != "mfa-locked"
    assert store.bans == {}


@pytest.mark.parametrize("code", [None, "12a456", "1" * 10_000, 123456], ids=repr)
async def test_malformed_codes_count_towards_the_lockout(
    store: FakeStore, secret: str, code: object
) -> None:
    v = store.verifier(max_failures=3)
    reasons = []
    for i in range(3):
        with pytest.raises(TOTPError) as err:
            await v.verify("alice", secret, code, now=NOW + i)
        reasons.append(err.value.reason)
    assert reasons == ["mfa-malformed"] * 3
    with pytest.raises(TOTPError) as err:
        await v.verify("alice", secret, code_at(secret, NOW), now=NOW + 3)
    assert err.value.reason == "mfa-locked"


async def test_replayed_codes_count_towards_the_lockout(store: FakeStore, secret: str) -> None:
    v = store.verifier(max_failures=2)
    code = code_at(secret, NOW)
    await v.verify("alice", secret, code, now=NOW)
    for i in range(2):
        with pytest.raises(TOTPError) as err:
            await v.verify("alice", secret, code, now=NOW + 1 + i)
        assert err.value.reason == "mfa-replayed"
    assert store.bans["alice"] == NOW + 2 + 900


async def test_concurrent_burst_of_guesses_gets_only_max_failures_checks(
    store: FakeStore, secret: str
) -> None:
    # 50 parallel guesses all pass the lock check before any of them fails; the right code is
    # the last one. Counting each attempt before checking it means it is refused unchecked.
    v = store.verifier(max_failures=5)
    bad = wrong_code(secret, NOW)
    codes = [bad] * 49 + [code_at(secret, NOW)]
    results = await asyncio.gather(
        *(v.verify("alice", secret, c, now=NOW) for c in codes), return_exceptions=True
    )
    assert all(isinstance(r, TOTPError) for r in results)
    reasons = [r.reason for r in results if isinstance(r, TOTPError)]
    # How many reach the code check depends on interleaving; never more than max_failures.
    assert reasons.count("mfa-invalid") <= 5
    assert reasons[-1] == "mfa-locked"
    assert len(store.failure_times["alice"]) == 50
    assert store.claims == []
    assert store.bans["alice"] == NOW + 900


async def test_ban_shorter_than_find_time_still_ends(store: FakeStore, secret: str) -> None:
    v = store.verifier(max_failures=3, find_time=300, ban_time=60)
    for i in range(3):
        with pytest.raises(TOTPError):
            await v.verify("alice", secret, wrong_code(secret, NOW), now=NOW + i)
    released = NOW + 2 + 60
    assert await v.verify("alice", secret, code_at(secret, released), now=released) == int(
        released // 30
    )


async def test_not_enrolled_is_refused_and_not_counted(store: FakeStore) -> None:
    v = store.verifier()
    with pytest.raises(TOTPError) as err:
        await v.verify("alice", None, "123456", now=NOW)
    assert err.value.reason == "mfa-not-enrolled"
    assert store.failure_times["alice"] == []


async def test_corrupt_secret_is_a_fault_and_touches_no_state(store: FakeStore) -> None:
    with pytest.raises(ValueError) as err:
        await store.verifier().verify("alice", "not base32!", "123456", now=NOW)
    assert not isinstance(err.value, TOTPError)
    assert store.failure_times["alice"] == []


@pytest.mark.parametrize(
    "kw",
    [{"max_failures": 0}, {"find_time": 0}, {"ban_time": -1}, {"ban_time": float("inf")}],
    ids=repr,
)
def test_verifier_refuses_nonsense_limits(store: FakeStore, kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        store.verifier(**kw)


# --- SecretBox ------------------------------------------------------------------------------


def test_sealed_secret_round_trips() -> None:
    box = SecretBox.from_b64(SecretBox.generate_key_b64())
    secret = new_enrollment("alice").secret
    sealed = box.seal(secret, user="alice")
    assert secret not in sealed
    assert box.open(sealed, user="alice") == secret
    assert box.seal(secret, user="alice") != sealed  # fresh nonce each time


def test_sealed_secret_copied_to_another_user_does_not_open() -> None:
    box = SecretBox(bytes(range(32)))
    sealed = box.seal("JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", user="alice")
    with pytest.raises(SealedSecretError):
        box.open(sealed, user="mallory")


@pytest.mark.parametrize("position", [0, 12, -1], ids=["nonce", "ciphertext", "tag"])
def test_tampered_sealed_secret_does_not_open(position: int) -> None:
    box = SecretBox(bytes(range(32)))
    raw = bytearray(base64.b64decode(box.seal("JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", user="alice")))
    raw[position] ^= 0x01
    with pytest.raises(SealedSecretError):
        box.open(base64.b64encode(bytes(raw)).decode(), user="alice")


@pytest.mark.parametrize("sealed", ["", "not base64!", base64.b64encode(b"x" * 20).decode()])
def test_garbage_sealed_secret_does_not_open(sealed: str) -> None:
    with pytest.raises(SealedSecretError):
        SecretBox(bytes(32)).open(sealed, user="alice")


def test_sealed_secret_does_not_open_with_another_key() -> None:
    sealed = SecretBox(bytes(32)).seal("JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", user="alice")
    with pytest.raises(SealedSecretError):
        SecretBox(bytes([1] * 32)).open(sealed, user="alice")


def test_open_failure_is_a_value_error_not_a_user_outcome() -> None:
    assert issubclass(SealedSecretError, ValueError)
    assert not issubclass(SealedSecretError, TOTPError)


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_key_of_wrong_length_is_refused(length: int) -> None:
    with pytest.raises(ValueError):
        SecretBox(bytes(length))
    with pytest.raises(ValueError):
        SecretBox.from_b64(base64.b64encode(bytes(length)).decode())


def test_key_text_is_never_echoed() -> None:
    text = "c2VjcmV0LWtleS1tYXRlcmlhbA!!"
    with pytest.raises(ValueError) as err:
        SecretBox.from_b64(text)
    assert "c2VjcmV0" not in str(err.value)
    key_b64 = SecretBox.generate_key_b64()
    assert len(base64.b64decode(key_b64)) == 32
    assert key_b64 not in repr(SecretBox.from_b64(key_b64))


# --- enrolment, URI and QR ------------------------------------------------------------------


def test_enrollment_has_a_160_bit_secret_and_ten_distinct_backup_codes() -> None:
    e = new_enrollment("alice")
    assert len(base64.b32decode(e.secret)) == 20
    assert len(e.backup_codes) == 10
    assert len(set(e.backup_codes)) == 10
    for code in e.backup_codes:
        assert re.fullmatch(r"[a-z2-9]{4}-[a-z2-9]{4}-[a-z2-9]{4}", code)
    assert new_enrollment("alice").secret != e.secret
    assert e.secret not in repr(e)
    assert e.backup_codes[0] not in repr(e)


def test_otpauth_uri_parses_back_with_pyotp() -> None:
    e = new_enrollment("alice smith@example.com", issuer="Acme Gateway")
    assert e.uri.startswith("otpauth://totp/Acme%20Gateway:alice%20smith%40example.com?")
    for param in ("algorithm=SHA1", "digits=6", "period=30", "issuer=Acme%20Gateway"):
        assert param in e.uri
    otp = pyotp.parse_uri(e.uri)
    assert isinstance(otp, pyotp.TOTP)
    assert otp.secret == e.secret
    assert otp.name == "alice smith@example.com"
    assert otp.issuer == "Acme Gateway"
    assert (otp.digits, otp.interval, otp.digest) == (6, 30, hashlib.sha1)
    # What the app computes from the URI is what the verifier accepts.
    assert verify_totp(e.secret, otp.at(NOW), now=NOW) == int(NOW // 30)


@pytest.mark.parametrize(("user", "issuer"), [("", "x"), ("a:b", "x"), ("alice", "Ac:me")])
def test_label_that_would_not_parse_is_refused(user: str, issuer: str) -> None:
    with pytest.raises(ValueError):
        new_enrollment(user, issuer=issuer)


def test_qr_svg_is_inline_svg_without_external_references() -> None:
    svg = qr_svg(new_enrollment("alice").uri)
    assert svg.startswith("<svg ")
    assert svg.rstrip().endswith("</svg>")
    for forbidden in ("href", "<image", "url(", "<script", "http:", "https:", "<?xml"):
        assert forbidden not in svg


def test_qr_terminal_is_a_rectangle_of_block_characters() -> None:
    text = qr_terminal(new_enrollment("alice").uri)
    lines = text.splitlines()
    assert len(lines) > 10
    assert len({len(line) for line in lines}) == 1
    assert set(text) <= {" ", "\n", "\u2580", "\u2584", "\u2588"}
    assert "\x1b" not in text


# --- backup codes ---------------------------------------------------------------------------


def test_backup_code_hash_is_salted_scrypt() -> None:
    h1 = hash_backup_code("abcd-efgh-jkmn")
    h2 = hash_backup_code("abcd-efgh-jkmn")
    assert h1.startswith("scrypt$")
    assert len(h1.split("$")) == 3
    assert h1 != h2
    assert "abcd" not in h1
    salt = b"0123456789abcdef"
    assert hash_backup_code("abcd-efgh-jkmn", salt=salt) == hash_backup_code(
        "ABCDEFGHJKMN", salt=salt
    )


def test_backup_code_matches_its_index_after_normalisation_and_works_once() -> None:
    codes = new_enrollment("alice", backup_codes=3).backup_codes
    hashed = [hash_backup_code(c) for c in codes]
    typed = " " + codes[1].upper().replace("-", " ") + " "
    index = check_backup_code(typed, hashed)
    assert index == 1
    del hashed[index]  # the caller removes the used code
    assert check_backup_code(codes[1], hashed) is None
    assert check_backup_code(codes[2], hashed) == 1


def test_unknown_backup_code_matches_nothing() -> None:
    hashed = [hash_backup_code("abcd-efgh-jkmn")]
    assert check_backup_code("abcd-efgh-jkmp", hashed) is None
    assert check_backup_code("abcd-efgh-jkmn", []) is None


@pytest.mark.parametrize(
    "code", [None, 123, "", "abcd-efgh", "abcd-efgh-jkmn-pqrs", "x" * 10_000, "abcd-efgh-jkm0"]
)
def test_malformed_backup_code_is_refused_before_hashing(code: object) -> None:
    with pytest.raises(TOTPError) as err:
        normalise_backup_code(code)
    assert err.value.reason == "mfa-malformed"
    with pytest.raises(TOTPError):
        check_backup_code(code, [hash_backup_code("abcd-efgh-jkmn")])  # type: ignore[arg-type]


@pytest.mark.parametrize("stored", ["plain", "bcrypt$abc$def", "scrypt$!!$!!", "scrypt$YQ==$YQ=="])
def test_corrupt_stored_backup_hash_is_a_fault(stored: str) -> None:
    with pytest.raises(ValueError) as err:
        check_backup_code("abcd-efgh-jkmn", [stored])
    assert not isinstance(err.value, TOTPError)


def test_enrollment_is_frozen() -> None:
    e = new_enrollment("alice")
    with pytest.raises(AttributeError):
        e.secret = "x"  # type: ignore[misc]
    assert isinstance(e, Enrollment)
