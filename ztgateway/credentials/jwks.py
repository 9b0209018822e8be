"""Each issuer's signing keys, held in memory so that verifying a token never waits on the network.

A key set comes from a static file (a JWKS document or one PEM public key) or from the issuer's
JWKS URL. Fetched keys are refreshed in the background, on an unknown `kid` at most once per
`refresh_interval`, and served while the issuer is unreachable for at most `max_age` seconds after
the last good fetch; after that the issuer's tokens are refused (fail closed).

Only public signature keys that fit one of the asymmetric algorithms we verify are kept: a
symmetric (`oct`) key, an encryption key or a key carrying private material is never usable, so
no token can be verified with it whatever its header claims.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import aiohttp
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ztgateway.edge.inline import in_task

logger = logging.getLogger(__name__)

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | Ed25519PublicKey

RSA_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
# SECURITY: RFC 7518 §3.4 binds each ES algorithm to one curve; a P-384 key must never verify
# an ES256 signature.
EC_ALGORITHM_CURVES: Final[Mapping[str, str]] = MappingProxyType(
    {"ES256": "P-256", "ES384": "P-384"}
)
# RFC 8037 §3.1: EdDSA with Ed25519 only; Ed448 is not accepted.
SUPPORTED_ALGORITHMS: Final = RSA_ALGORITHMS | frozenset(EC_ALGORITHM_CURVES) | {"EdDSA"}

MAX_JWKS_BYTES: Final = 1 << 20
MAX_KEYS: Final = 64
MIN_RSA_BITS: Final = 2048
# When no usable keys are held, a request may retry the fetch this often (bounded by
# refresh_interval), so an issuer that was down at start-up is picked up quickly without every
# request hammering it.
UNUSABLE_RETRY_SECONDS: Final = 5.0
# Keys older than this (or half of max_age, if smaller) are revalidated in the background.
REVALIDATE_AFTER_SECONDS: Final = 300.0

_EC_CURVES: Final[Mapping[str, tuple[type[ec.EllipticCurve], int]]] = MappingProxyType(
    {"P-256": (ec.SECP256R1, 32), "P-384": (ec.SECP384R1, 48)}
)
_CURVE_NAMES: Final[Mapping[str, str]] = MappingProxyType(
    {"secp256r1": "P-256", "secp384r1": "P-384"}
)
# RFC 7518 §6.2.2, §6.3.2, §6.4.1 and RFC 8037 §2: members that only a private key has.
_PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*")


class JwksError(Exception):
    """A key set could not be loaded or fetched: a fault of configuration or of the issuer."""


# RFC 7638 §3.2: the members that identify a key, per key type (RFC 8037 §2 for OKP).
_THUMBPRINT_MEMBERS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "EC": ("crv", "kty", "x", "y"),
        "RSA": ("e", "kty", "n"),
        "OKP": ("crv", "kty", "x"),
        "oct": ("k", "kty"),
    }
)


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638: base64url(SHA-256(the required members, sorted, no whitespace)).

    The one thumbprint in the code base: the dev PKI's and the dev token issuer's `kid`s are
    this, so a JWKS built from the same key names it the same on every machine."""
    kty = jwk.get("kty")
    members = _THUMBPRINT_MEMBERS.get(str(kty))
    if members is None:
        raise JwksError(f"cannot compute a thumbprint for key type {kty!r}")
    missing = [m for m in members if m not in jwk]
    if missing:
        raise JwksError(f"JWK lacks required member(s) {', '.join(missing)}")
    canonical = json.dumps(
        {m: jwk[m] for m in members}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class KeyNotFound(Exception):
    """No held key matches the token's `kid`, even after the refresh we allowed ourselves."""


class JwksUnavailable(Exception):
    """The issuer's keys cannot be trusted now: never fetched, or older than `max_age`."""


def key_fits_algorithm(kty: str, crv: str | None, alg: str) -> bool:
    """Whether a key of this type may verify `alg`, so that one key never serves two families.

    # SECURITY: RFC 8725 §3.1 / §2.1: the algorithm must match the key; a token naming RS256
    # must not be checked with an EC key (nor HS256 with an RSA public key as an HMAC secret).
    """
    if alg in RSA_ALGORITHMS:
        return kty == "RSA"
    curve = EC_ALGORITHM_CURVES.get(alg)
    if curve is not None:
        return kty == "EC" and crv == curve
    if alg == "EdDSA":
        return kty == "OKP" and crv == "Ed25519"
    return False


@dataclass(frozen=True, slots=True)
class JwkEntry:
    """One usable public key, with the one algorithm family it may serve."""

    kid: str | None
    key: PublicKey
    kty: str
    crv: str | None
    alg: str | None

    def fits(self, alg: str) -> bool:
        # SECURITY: RFC 7517 §4.4: a JWK that names its "alg" is used with that algorithm only.
        if self.alg is not None and self.alg != alg:
            return False
        return key_fits_algorithm(self.kty, self.crv, alg)


@dataclass(frozen=True, slots=True)
class KeySet:
    """An immutable snapshot of an issuer's keys, swapped whole on refresh."""

    keys: Mapping[str | None, JwkEntry]

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, kid: str | None) -> JwkEntry | None:
        """Find the key for a token's `kid`, only ever as a dictionary key (never a path or query).

        A kid-less key (a PEM file, or a JWKS of one key without `kid`) is the issuer's only key,
        so it serves any token; a token without `kid` is served only when the choice is unambiguous.
        """
        if kid is not None:
            entry = self.keys.get(kid)
            if entry is not None:
                return entry
            if len(self.keys) == 1:
                return self.keys.get(None)
            return None
        entry = self.keys.get(None)
        if entry is not None:
            return entry
        if len(self.keys) == 1:
            return next(iter(self.keys.values()))
        return None


class _UnusableKey(ValueError):
    """A JWK we skip; the message says why, for the log."""


def _b64url_decode(value: object, member: str) -> bytes:
    """Strict base64url without padding (RFC 7515 §2), so one key has exactly one encoding."""
    if not isinstance(value, str) or not value or _B64URL.fullmatch(value) is None:
        raise _UnusableKey(f"{member!r} is not base64url")
    if len(value) % 4 == 1:
        raise _UnusableKey(f"{member!r} has an impossible length")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError) as exc:
        raise _UnusableKey(f"{member!r} is not base64url") from exc
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != value:
        raise _UnusableKey(f"{member!r} is not canonical base64url")
    return raw


def _rsa_entry(jwk: Mapping[str, Any]) -> tuple[PublicKey, str | None]:
    n = int.from_bytes(_b64url_decode(jwk.get("n"), "n"), "big")
    e = int.from_bytes(_b64url_decode(jwk.get("e"), "e"), "big")
    try:
        key = rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError as exc:
        raise _UnusableKey(f"invalid RSA key: {exc}") from exc
    # SECURITY: RFC 7518 §3.3: RSA keys of 2048 bits or more.
    if key.key_size < MIN_RSA_BITS:
        raise _UnusableKey(f"RSA key of {key.key_size} bits is too short")
    return key, None


def _ec_entry(jwk: Mapping[str, Any]) -> tuple[PublicKey, str | None]:
    crv = jwk.get("crv")
    if not isinstance(crv, str) or crv not in _EC_CURVES:
        raise _UnusableKey(f"unsupported EC curve {crv!r}")
    curve_type, size = _EC_CURVES[crv]
    x = _b64url_decode(jwk.get("x"), "x")
    y = _b64url_decode(jwk.get("y"), "y")
    # RFC 7518 §6.2.1.2: coordinates are the full octet length of the curve.
    if len(x) != size or len(y) != size:
        raise _UnusableKey(f"EC coordinates are not {size} bytes")
    try:
        # from_encoded_point checks the point lies on the curve (invalid-curve attacks).
        key = ec.EllipticCurvePublicKey.from_encoded_point(curve_type(), b"\x04" + x + y)
    except ValueError as exc:
        raise _UnusableKey(f"invalid EC point: {exc}") from exc
    return key, crv


def _okp_entry(jwk: Mapping[str, Any]) -> tuple[PublicKey, str | None]:
    crv = jwk.get("crv")
    if crv != "Ed25519":
        raise _UnusableKey(f"unsupported OKP curve {crv!r}")
    x = _b64url_decode(jwk.get("x"), "x")
    if len(x) != 32:
        raise _UnusableKey("Ed25519 key is not 32 bytes")
    try:
        return Ed25519PublicKey.from_public_bytes(x), "Ed25519"
    except ValueError as exc:
        raise _UnusableKey(f"invalid Ed25519 key: {exc}") from exc


_KTY_PARSERS: Final[Mapping[str, Callable[[Mapping[str, Any]], tuple[PublicKey, str | None]]]] = (
    MappingProxyType({"RSA": _rsa_entry, "EC": _ec_entry, "OKP": _okp_entry})
)


def parse_jwk(jwk: object) -> JwkEntry:
    """Turn one JWK into a usable verification key, or raise ValueError saying why it is skipped."""
    if not isinstance(jwk, Mapping):
        raise _UnusableKey("not a JSON object")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise _UnusableKey("'kid' is not a string")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise _UnusableKey(f"'use' is {use!r}, not 'sig'")
    key_ops = jwk.get("key_ops")
    # RFC 7517 §4.3: a key whose operations exclude "verify" must not verify.
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise _UnusableKey("'key_ops' does not allow 'verify'")
    if _PRIVATE_MEMBERS.intersection(jwk):
        raise _UnusableKey("the key carries private or symmetric key material")
    kty = jwk.get("kty")
    parser = _KTY_PARSERS.get(kty) if isinstance(kty, str) else None
    if parser is None or not isinstance(kty, str):
        raise _UnusableKey(f"unsupported key type {kty!r}")
    alg = jwk.get("alg")
    if alg is not None and (not isinstance(alg, str) or alg not in SUPPORTED_ALGORITHMS):
        raise _UnusableKey(f"unsupported 'alg' {alg!r}")
    key, crv = parser(jwk)
    if alg is not None and not key_fits_algorithm(kty, crv, alg):
        raise _UnusableKey(f"'alg' {alg!r} does not fit a {kty} key")
    return JwkEntry(kid=kid, key=key, kty=kty, crv=crv, alg=alg)


def parse_jwks(document: object, *, source: str = "JWKS") -> KeySet:
    """Parse a JWK Set (RFC 7517 §5), keeping only keys we can use; none usable is an error.

    An empty result is refused rather than installed, so an issuer that briefly publishes a broken
    document does not wipe the keys we hold.
    """
    if not isinstance(document, Mapping):
        raise JwksError(f"{source}: not a JSON object")
    raw_keys = document.get("keys")
    if not isinstance(raw_keys, list):
        raise JwksError(f"{source}: 'keys' is not a list")
    keys: dict[str | None, JwkEntry] = {}
    for index, raw in enumerate(raw_keys[:MAX_KEYS]):
        try:
            entry = parse_jwk(raw)
        except ValueError as exc:
            logger.info("%s: skipping key #%d: %s", source, index, exc)
            continue
        if entry.kid in keys:
            # RFC 7517 §4.5: kids should be distinct; an ambiguous kid would let the token choose.
            logger.warning("%s: skipping key #%d: duplicate kid %r", source, index, entry.kid)
            continue
        keys[entry.kid] = entry
    if len(raw_keys) > MAX_KEYS:
        logger.warning("%s: only the first %d keys are used", source, MAX_KEYS)
    if not keys:
        raise JwksError(f"{source}: no usable signature key")
    return KeySet(MappingProxyType(keys))


def _pem_entry(data: bytes, source: str) -> KeySet:
    try:
        key = load_pem_public_key(data)
    except ValueError as exc:
        raise JwksError(f"{source}: not a PEM public key: {exc}") from exc
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise JwksError(f"{source}: RSA key of {key.key_size} bits is too short")
        entry = JwkEntry(kid=None, key=key, kty="RSA", crv=None, alg=None)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        crv = _CURVE_NAMES.get(key.curve.name)
        if crv is None:
            raise JwksError(f"{source}: unsupported EC curve {key.curve.name}")
        entry = JwkEntry(kid=None, key=key, kty="EC", crv=crv, alg=None)
    elif isinstance(key, Ed25519PublicKey):
        entry = JwkEntry(kid=None, key=key, kty="OKP", crv="Ed25519", alg=None)
    else:
        raise JwksError(f"{source}: unsupported public key type {type(key).__name__}")
    return KeySet(MappingProxyType({None: entry}))


def load_key_file(path: Path) -> KeySet:
    """Load a static JWKS JSON file or one PEM public key. Blocking: call it off the event loop."""
    source = str(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_JWKS_BYTES + 1)
    except OSError as exc:
        raise JwksError(f"{source}: {exc.strerror or exc}") from exc
    if len(data) > MAX_JWKS_BYTES:
        raise JwksError(f"{source}: larger than {MAX_JWKS_BYTES} bytes")
    if b"-----BEGIN" in data:
        return _pem_entry(data, source)
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise JwksError(f"{source}: neither a PEM public key nor JSON: {exc}") from exc
    return parse_jwks(document, source=source)


def _make_ssl_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


class JwksCache:
    """One issuer's keys: loaded from a file once, or fetched and kept fresh from a JWKS URL.

    Concurrent requests that need a fetch share it: the fetch runs under one lock and a caller
    that waited finds `last_attempt` recent and reads the keys the other fetched, so the issuer
    sees at most one request per `refresh_interval` however many unknown `kid`s arrive.
    """

    def __init__(
        self,
        *,
        name: str,
        url: str | None,
        file: Path | None,
        ca_file: Path | None,
        refresh_interval: float,
        max_age: float,
        timeout: float,
        clock: Callable[[], float],
        session: Callable[[], aiohttp.ClientSession | None],
        max_bytes: int = MAX_JWKS_BYTES,
    ) -> None:
        if (url is None) == (file is None):
            raise ValueError(f"issuer {name!r}: exactly one of jwks_url and jwks_file is needed")
        self.name = name
        self._url = url
        self._file = file
        self._ca_file = ca_file
        self._refresh_interval = refresh_interval
        self._max_age = max_age
        self._timeout = timeout
        self._clock = clock
        self._session = session
        self._max_bytes = max_bytes
        self._keys: KeySet | None = None
        self._last_success: float | None = None
        self._last_attempt: float | None = None
        self._last_error: str | None = None
        self._fetches = 0
        self._failures = 0
        self._lock = asyncio.Lock()
        self._ssl: ssl.SSLContext | None = None
        self._background: asyncio.Task[None] | None = None

    @property
    def fetches(self) -> int:
        """HTTP fetch attempts made so far; lets tests and metrics see the refresh rate limit."""
        return self._fetches

    async def start(self) -> None:
        """Load a static file (a bad one is a configuration error) or prefetch the URL.

        A failed prefetch is only logged: the issuer may come up later and keys are fetched on
        demand, while its tokens are refused until then.
        """
        if self._file is not None:
            self._keys = await asyncio.to_thread(load_key_file, self._file)
            self._last_success = self._clock()
            return
        if self._ca_file is not None and self._ssl is None:
            self._ssl = await asyncio.to_thread(_make_ssl_context, self._ca_file)
        await self._refresh(spacing=0.0)
        if self._last_error is not None:
            logger.warning(
                "issuer %s: JWKS prefetch failed, will retry on demand: %s",
                self.name,
                self._last_error,
            )

    async def close(self) -> None:
        task, self._background = self._background, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _usable(self, now: float) -> bool:
        if self._keys is None or self._last_success is None:
            return False
        if self._url is None:
            return True
        return now - self._last_success <= self._max_age

    async def get_key(self, kid: str | None) -> JwkEntry:
        """The key for `kid`, refreshing when it is unknown (rate-limited) or the set is too old."""
        if self._url is None:
            if self._keys is None:
                raise JwksUnavailable("the static key file has not been loaded")
            entry = self._keys.lookup(kid)
            if entry is None:
                raise KeyNotFound("no key with this kid in the static key file")
            return entry
        now = self._clock()
        if self._usable(now):
            self._maybe_revalidate(now)
        else:
            await self._refresh(spacing=min(self._refresh_interval, UNUSABLE_RETRY_SECONDS))
            if not self._usable(self._clock()):
                raise JwksUnavailable(self._unavailable_detail())
        assert self._keys is not None
        entry = self._keys.lookup(kid)
        if entry is None:
            await self._refresh(spacing=self._refresh_interval)
            if not self._usable(self._clock()):
                raise JwksUnavailable(self._unavailable_detail())
            assert self._keys is not None
            entry = self._keys.lookup(kid)
        if entry is None:
            raise KeyNotFound("no key with this kid in the issuer's JWKS")
        return entry

    def _unavailable_detail(self) -> str:
        if self._last_success is None:
            return f"JWKS never fetched: {self._last_error or 'no attempt yet'}"
        return (
            f"JWKS older than {self._max_age:g}s and the issuer is unreachable: "
            f"{self._last_error or 'refresh not yet allowed'}"
        )

    def _maybe_revalidate(self, now: float) -> None:
        assert self._last_success is not None
        revalidate_after = min(REVALIDATE_AFTER_SECONDS, self._max_age / 2)
        if now - self._last_success < revalidate_after:
            return
        if self._last_attempt is not None and now - self._last_attempt < self._refresh_interval:
            return
        if self._background is not None and not self._background.done():
            return
        self._background = asyncio.create_task(
            self._refresh(spacing=self._refresh_interval), name=f"jwks-refresh-{self.name}"
        )

    async def _refresh(self, *, spacing: float) -> None:
        """Fetch once unless another fetch happened within `spacing` seconds; never raises."""
        async with self._lock:
            now = self._clock()
            if self._last_attempt is not None and now - self._last_attempt < spacing:
                return
            self._last_attempt = now
            self._fetches += 1
            try:
                keys = await self._fetch()
            except JwksError as exc:
                self._failures += 1
                self._last_error = str(exc)
                logger.warning("issuer %s: JWKS fetch failed: %s", self.name, exc)
                return
            except Exception as exc:
                # Fail closed on anything unforeseen: the old keys age out as usual.
                self._failures += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                logger.exception("issuer %s: JWKS fetch failed unexpectedly", self.name)
                return
            self._keys = keys
            self._last_success = self._clock()
            self._last_error = None

    async def _fetch(self) -> KeySet:
        assert self._url is not None
        session = self._session()
        if session is None:
            raise JwksError("no HTTP client session: the verifier has not been started")
        if self._ca_file is not None and self._ssl is None:
            self._ssl = await asyncio.to_thread(_make_ssl_context, self._ca_file)
        ssl_arg: ssl.SSLContext | bool = self._ssl if self._ssl is not None else True
        await in_task()  # aiohttp's timers need one
        try:
            # SECURITY: no redirects: the configured URL is the trust anchor for keys, and a
            # redirect would let whoever controls that response point us anywhere.
            async with session.get(
                self._url,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                allow_redirects=False,
                ssl=ssl_arg,
                headers={"Accept": "application/jwk-set+json, application/json"},
            ) as response:
                if response.status != 200:
                    raise JwksError(f"{self._url}: HTTP {response.status}")
                length = response.content_length
                if length is not None and length > self._max_bytes:
                    raise JwksError(f"{self._url}: response larger than {self._max_bytes} bytes")
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > self._max_bytes:
                        raise JwksError(
                            f"{self._url}: response larger than {self._max_bytes} bytes"
                        )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise JwksError(f"{self._url}: {type(exc).__name__}: {exc}") from exc
        try:
            document = json.loads(bytes(body))
        except (ValueError, RecursionError) as exc:
            raise JwksError(f"{self._url}: not JSON: {exc}") from exc
        return parse_jwks(document, source=self._url)

    def status(self) -> dict[str, Any]:
        """Health of this key set for /readyz: `stale` means tokens of this issuer are refused."""
        now = self._clock()
        return {
            "source": "url" if self._url is not None else "file",
            "keys": len(self._keys) if self._keys is not None else 0,
            "last_fetch": self._last_success,
            "age": None if self._last_success is None else max(0.0, now - self._last_success),
            "last_error": self._last_error,
            "stale": not self._usable(now),
            "fetches": self._fetches,
            "fetch_failures": self._failures,
        }
