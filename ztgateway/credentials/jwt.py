"""Strict verification of bearer JWTs sent beside a client certificate.

Everything that can go wrong with a presented token is a `TokenError` carrying a closed `Reason`,
so the identity stage can turn it into a 401 and a metric; nothing an attacker sends can make the
verifier raise anything else (a 500 would both leak and fail open in some proxies).

The algorithms come from configuration, never from the token (RFC 8725 §3.1); the key is found by
`kid` in the issuer's cached JWKS only, never through URLs or keys the token itself carries
(RFC 8725 §3.10); every time check uses the injected clock so tests and replicas agree on "now".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import jwt as pyjwt
from jwt import exceptions as jwt_errors
from jwt.types import Options

from ztgateway.clock import SYSTEM_CLOCK
from ztgateway.credentials.jwks import (
    SUPPORTED_ALGORITHMS,
    JwksCache,
    JwksUnavailable,
    KeyNotFound,
)
from ztgateway.decision import Reason

logger = logging.getLogger(__name__)

CORE_CLAIMS: Final = ("exp", "iat", "sub", "aud", "iss")
# SECURITY: RFC 8725 §3.10: these headers name keys or key locations chosen by whoever made the
# token (jku/x5u invite SSRF, jwk/x5c let the signer supply its own key, as in CVE-2018-0114); keys
# come only from the issuer's configured JWKS, so a token carrying them is refused, not ignored.
REFUSED_HEADERS: Final = frozenset({"jku", "x5u", "jwk", "x5c"})
_SEGMENT: Final = re.compile(r"[A-Za-z0-9_-]*")
_THUMBPRINT: Final = re.compile(r"[A-Za-z0-9_-]{43}")
# Most specific first: InvalidSignatureError is a DecodeError.
_PYJWT_REASONS: Final[tuple[tuple[type[Exception], Reason], ...]] = (
    (jwt_errors.InvalidSignatureError, Reason.TOKEN_SIGNATURE_INVALID),
    (jwt_errors.ExpiredSignatureError, Reason.TOKEN_EXPIRED),
    (jwt_errors.ImmatureSignatureError, Reason.TOKEN_NOT_YET_VALID),
    (jwt_errors.InvalidAudienceError, Reason.TOKEN_AUDIENCE_INVALID),
    (jwt_errors.InvalidIssuerError, Reason.TOKEN_ISSUER_UNKNOWN),
    (jwt_errors.MissingRequiredClaimError, Reason.TOKEN_CLAIMS_INVALID),
    (jwt_errors.InvalidSubjectError, Reason.TOKEN_CLAIMS_INVALID),
    (jwt_errors.InvalidJTIError, Reason.TOKEN_CLAIMS_INVALID),
    (jwt_errors.InvalidIssuedAtError, Reason.TOKEN_CLAIMS_INVALID),
    (jwt_errors.InvalidAlgorithmError, Reason.TOKEN_ALGORITHM_REFUSED),
    (jwt_errors.InvalidKeyError, Reason.TOKEN_ALGORITHM_REFUSED),
    (jwt_errors.DecodeError, Reason.TOKEN_INVALID),
    (jwt_errors.PyJWTError, Reason.TOKEN_INVALID),
)


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """One trusted token issuer. Validated at construction so a bad config never reaches a request.

    `required_claims` may add claims to the five core ones (exp, iat, sub, aud, iss) but never drop
    one: the verified token always has an expiry, an issue time and a subject, and is always
    checked for audience and issuer (RFC 8725 §3.8, §3.9).
    """

    name: str
    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...]
    jwks_url: str | None = None
    jwks_file: Path | None = None
    jwks_ca_file: Path | None = None
    leeway: float = 30.0
    max_token_age: float | None = None
    refresh_interval: float = 60.0
    jwks_max_age: float = 3600.0
    jwks_timeout: float = 5.0
    required_claims: tuple[str, ...] = CORE_CLAIMS
    max_token_bytes: int = 16384

    def __post_init__(self) -> None:
        where = f"issuer {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("issuer name must be a non-empty string")
        if not isinstance(self.issuer, str) or not self.issuer:
            raise ValueError(f"{where}: 'issuer' must be a non-empty string")
        _require_strings(self.audiences, f"{where}: 'audiences'")
        _require_strings(self.algorithms, f"{where}: 'algorithms'")
        for alg in self.algorithms:
            # SECURITY: RFC 8725 §3.1, §2.1: "none" and the HMAC family (which would accept a
            # public key as the shared secret) are never accepted, whatever the config says.
            if not isinstance(alg, str) or alg.lower() == "none" or alg.upper().startswith("HS"):
                raise ValueError(f"{where}: algorithm {alg!r} is refused")
            if alg not in SUPPORTED_ALGORITHMS:
                raise ValueError(
                    f"{where}: algorithm {alg!r} is not one of {sorted(SUPPORTED_ALGORITHMS)}"
                )
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError(f"{where}: exactly one of 'jwks_url' and 'jwks_file' is required")
        if self.jwks_url is not None:
            parts = urlsplit(self.jwks_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{where}: 'jwks_url' must be an http(s) URL")
            if self.jwks_ca_file is not None and parts.scheme != "https":
                raise ValueError(f"{where}: 'jwks_ca_file' needs an https 'jwks_url'")
        elif self.jwks_ca_file is not None:
            raise ValueError(f"{where}: 'jwks_ca_file' needs an https 'jwks_url'")
        missing = [c for c in CORE_CLAIMS if c not in self.required_claims]
        if missing:
            raise ValueError(f"{where}: 'required_claims' must include {missing}")
        if self.leeway < 0 or self.refresh_interval < 0:
            raise ValueError(f"{where}: 'leeway' and 'refresh_interval' must not be negative")
        if self.jwks_max_age <= 0 or self.jwks_timeout <= 0 or self.max_token_bytes <= 0:
            raise ValueError(
                f"{where}: 'jwks_max_age', 'jwks_timeout' and 'max_token_bytes' must be positive"
            )
        if self.max_token_age is not None and self.max_token_age <= 0:
            raise ValueError(f"{where}: 'max_token_age' must be positive")


def _require_strings(values: object, what: str) -> None:
    """A bare string would be iterated character by character: audiences="api" means "a","p","i"."""
    if not isinstance(values, tuple | list) or not values:
        raise ValueError(f"{what} must be a non-empty sequence of strings")
    if not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{what} must contain only non-empty strings")


class TokenError(Exception):
    """A presented token is refused. `detail` is for the audit log, never for the client."""

    def __init__(self, reason: Reason, detail: str, *, issuer: str | None = None) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.issuer = issuer


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token whose signature, issuer, audience and times were checked; never holds the token."""

    issuer: str
    claims: Mapping[str, Any]
    subject: str
    token_hash: str
    expires_at: float
    issued_at: float
    cnf_x5t_s256: str | None
    algorithm: str
    key_id: str | None


def cert_thumbprint_s256(cert_der: bytes) -> str:
    """RFC 8705 §3.1 `x5t#S256`: base64url (no padding) of SHA-256 over the DER certificate."""
    digest = hashlib.sha256(cert_der).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def check_binding(token: VerifiedToken, cert_der: bytes | None, *, required: bool) -> Reason | None:
    """Whether the token may be used over this TLS connection (RFC 8705 §3).

    A bound token is useless to whoever steals it without the client's private key; an unbound
    token is accepted only where the route does not require binding.
    """
    if token.cnf_x5t_s256 is not None:
        if cert_der is None:
            return Reason.TOKEN_BINDING_MISMATCH
        presented = cert_thumbprint_s256(cert_der)
        if not hmac.compare_digest(presented.encode("ascii"), token.cnf_x5t_s256.encode("ascii")):
            return Reason.TOKEN_BINDING_MISMATCH
        return None
    if required:
        return Reason.TOKEN_BINDING_REQUIRED
    return None


def _b64url_segment(segment: str) -> bytes:
    """Strict base64url without padding (RFC 7515 §2): one token has exactly one encoding."""
    if _SEGMENT.fullmatch(segment) is None or len(segment) % 4 == 1:
        raise ValueError("not base64url")
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != segment:
        raise ValueError("not canonical base64url")
    return raw


def _json_object(segment: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64url_segment(segment))
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise TokenError(Reason.TOKEN_INVALID, f"{what} is not base64url JSON") from exc
    if not isinstance(value, dict):
        raise TokenError(Reason.TOKEN_INVALID, f"{what} is not a JSON object")
    return value


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """RFC 7519 §2 NumericDate: a JSON number, so "exp": "9999999999" or true is refused."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError(Reason.TOKEN_CLAIMS_INVALID, f"{name!r} is not a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    # SECURITY: Python's json accepts NaN and Infinity; an infinite exp would never expire.
    if not math.isfinite(number):
        raise TokenError(Reason.TOKEN_CLAIMS_INVALID, f"{name!r} is not a finite number")
    return number


def _check_times(claims: Mapping[str, Any], config: IssuerConfig, now: float) -> None:
    """Time checks against the injected clock, on first verification and on every cache hit."""
    exp = _numeric_date(claims, "exp")
    nbf = _numeric_date(claims, "nbf")
    iat = _numeric_date(claims, "iat")
    if exp is None:
        raise TokenError(Reason.TOKEN_CLAIMS_INVALID, "'exp' is missing")
    # RFC 7519 §4.1.4: the token must not be accepted on or after exp (minus allowed skew).
    if exp <= now - config.leeway:
        raise TokenError(Reason.TOKEN_EXPIRED, f"expired at {exp}, now {now:.0f}")
    # RFC 7519 §4.1.5
    if nbf is not None and nbf > now + config.leeway:
        raise TokenError(Reason.TOKEN_NOT_YET_VALID, f"nbf {nbf:.0f} is after now {now:.0f}")
    # RFC 7519 §4.1.6: a token issued in the future was minted by a wrong clock or a forger.
    if iat is not None and iat > now + config.leeway:
        raise TokenError(Reason.TOKEN_NOT_YET_VALID, f"iat {iat:.0f} is after now {now:.0f}")
    if config.max_token_age is not None:
        if iat is None:
            raise TokenError(Reason.TOKEN_CLAIMS_INVALID, "'iat' is needed to bound token age")
        if now - iat > config.max_token_age:
            raise TokenError(
                Reason.TOKEN_TOO_OLD,
                f"issued {now - iat:.0f}s ago, limit {config.max_token_age:g}s",
            )


def _confirmation(claims: Mapping[str, Any]) -> str | None:
    """The RFC 8705 §3.1 certificate thumbprint the token is bound to, if any."""
    if "cnf" not in claims:
        return None
    cnf = claims["cnf"]
    if not isinstance(cnf, dict):
        raise TokenError(Reason.TOKEN_CLAIMS_INVALID, "'cnf' is not a JSON object")
    if "x5t#S256" not in cnf:
        return None
    thumbprint = cnf["x5t#S256"]
    if not isinstance(thumbprint, str) or _THUMBPRINT.fullmatch(thumbprint) is None:
        raise TokenError(Reason.TOKEN_CLAIMS_INVALID, "'cnf.x5t#S256' is not a SHA-256 thumbprint")
    try:
        _b64url_segment(thumbprint)
    except ValueError as exc:
        raise TokenError(
            Reason.TOKEN_CLAIMS_INVALID, "'cnf.x5t#S256' is not canonical base64url"
        ) from exc
    return thumbprint


def _pyjwt_reason(exc: jwt_errors.PyJWTError) -> Reason:
    for error_type, reason in _PYJWT_REASONS:
        if isinstance(exc, error_type):
            return reason
    return Reason.TOKEN_INVALID


class TokenVerifier:
    """Verifies bearer JWTs from the configured issuers and caches good ones until they expire.

    The verified-token cache is keyed by the token's SHA-256 so a repeated token costs a hash and a
    clock check; revocation is enforced elsewhere. When `session_factory` is given it returns the
    application's shared aiohttp session, which the verifier uses but never closes; otherwise the
    verifier opens and closes its own.
    """

    def __init__(
        self,
        issuers: Sequence[IssuerConfig],
        *,
        clock: Callable[[], float] = SYSTEM_CLOCK.time,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        cache_size: int = 10_000,
        on_result: Callable[[str, str], None] | None = None,
    ) -> None:
        if not issuers:
            raise ValueError("at least one token issuer is required")
        if cache_size < 0:
            raise ValueError("cache_size must not be negative")
        self._by_iss: dict[str, IssuerConfig] = {}
        self._by_name: dict[str, IssuerConfig] = {}
        for config in issuers:
            if config.name in self._by_name:
                raise ValueError(f"duplicate issuer name {config.name!r}")
            if config.issuer in self._by_iss:
                raise ValueError(f"duplicate issuer {config.issuer!r}")
            self._by_name[config.name] = config
            self._by_iss[config.issuer] = config
        self._clock = clock
        self._session_factory = session_factory
        self._own_session: aiohttp.ClientSession | None = None
        self._cache_size = cache_size
        self._cache: OrderedDict[str, VerifiedToken] = OrderedDict()
        self._on_result = on_result
        self._max_bytes = max(c.max_token_bytes for c in issuers)
        self._pyjwt = pyjwt.PyJWT()
        self._jwks: dict[str, JwksCache] = {
            c.name: JwksCache(
                name=c.name,
                url=c.jwks_url,
                file=c.jwks_file,
                ca_file=c.jwks_ca_file,
                refresh_interval=c.refresh_interval,
                max_age=c.jwks_max_age,
                timeout=c.jwks_timeout,
                clock=clock,
                session=self._session,
            )
            for c in issuers
        }

    def _session(self) -> aiohttp.ClientSession | None:
        if self._session_factory is not None:
            return self._session_factory()
        return self._own_session

    async def start(self) -> None:
        """Load static key files (a bad one raises); prefetch JWKS URLs (failures only logged)."""
        # Files first: a configuration error surfaces before any session is opened.
        for name, config in self._by_name.items():
            if config.jwks_file is not None:
                await self._jwks[name].start()
        fetched = [name for name, c in self._by_name.items() if c.jwks_url is not None]
        if fetched and self._session_factory is None and self._own_session is None:
            # RFC 8725 §3.10: no cookies on key fetches.
            self._own_session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        for name in fetched:
            await self._jwks[name].start()

    async def close(self) -> None:
        for cache in self._jwks.values():
            await cache.close()
        session, self._own_session = self._own_session, None
        if session is not None:
            await session.close()
        self._cache.clear()

    def jwks_status(self) -> dict[str, dict[str, Any]]:
        return {name: cache.status() for name, cache in self._jwks.items()}

    def jwks_fetches(self, issuer_name: str) -> int:
        """Fetch attempts made for one issuer: exposes the refresh rate limit to tests and ops."""
        return self._jwks[issuer_name].fetches

    def _report(self, issuer: str, result: str) -> None:
        if self._on_result is None:
            return
        try:
            self._on_result(issuer, result)
        except Exception:
            # A broken metrics hook must not turn a verdict into an error.
            logger.exception("token result hook failed")

    def remembered(self, token: str, now: float) -> VerifiedToken | None:
        """`token`'s earlier verification, its times judged again at `now`; None: not
        remembered (then `verify` it, behind the credential throttle). Synchronous, and one
        hash per request: the data plane's every-request path for a client's token. Raises
        TokenError when the remembered token has expired since (and forgets it)."""
        if len(token) > self._max_bytes or not token.isascii():
            return None
        token_hash = hashlib.sha256(token.encode("ascii")).hexdigest()
        cached = self._cache.get(token_hash)
        if cached is None:
            return None
        try:
            verified = self._cached(token_hash, cached, now)
        except TokenError as exc:
            self._report(exc.issuer or "unknown", exc.reason.value)
            raise
        self._report(verified.issuer, "cached")
        return verified

    async def verify(self, token: str, *, now: float | None = None) -> VerifiedToken:
        """Verify a bearer token or raise TokenError; no other exception escapes for any input.

        Times are judged at `now` (the request's instant) when given, else at the clock's.
        """
        try:
            verified, label = await self._verify(token, self._clock() if now is None else now)
        except TokenError as exc:
            self._report(exc.issuer or "unknown", exc.reason.value)
            raise
        except Exception as exc:
            error = TokenError(
                Reason.TOKEN_INVALID, f"unexpected {type(exc).__name__} while verifying"
            )
            self._report("unknown", error.reason.value)
            raise error from exc
        self._report(verified.issuer, label)
        return verified

    async def _verify(self, token: str, now: float) -> tuple[VerifiedToken, str]:
        # Size first, before hashing or parsing anything an attacker chose.
        if len(token) > self._max_bytes:
            raise TokenError(Reason.TOKEN_INVALID, f"token longer than {self._max_bytes} bytes")
        if not token.isascii():
            raise TokenError(Reason.TOKEN_INVALID, "token is not ASCII")
        token_hash = hashlib.sha256(token.encode("ascii")).hexdigest()
        cached = self._cache.get(token_hash)
        if cached is not None:
            return self._cached(token_hash, cached, now), "cached"
        segments = token.split(".")
        if len(segments) != 3 or not segments[0] or not segments[1]:
            raise TokenError(Reason.TOKEN_INVALID, "not a compact JWS of three segments")
        header = _json_object(segments[0], "header")
        payload = _json_object(segments[1], "payload")
        # Routing only: the issuer is trusted after its own key verifies the signature.
        iss = payload.get("iss")
        if not isinstance(iss, str):
            raise TokenError(Reason.TOKEN_CLAIMS_INVALID, "'iss' is missing or not a string")
        config = self._by_iss.get(iss)
        if config is None:
            raise TokenError(Reason.TOKEN_ISSUER_UNKNOWN, "no configured issuer has this 'iss'")
        try:
            verified = await self._verify_for(config, token, token_hash, header, segments[2], now)
        except TokenError as exc:
            exc.issuer = exc.issuer or config.name
            raise
        except Exception as exc:
            raise TokenError(
                Reason.TOKEN_INVALID,
                f"unexpected {type(exc).__name__} while verifying",
                issuer=config.name,
            ) from exc
        self._remember(verified)
        return verified, "valid"

    def _cached(self, token_hash: str, verified: VerifiedToken, now: float) -> VerifiedToken:
        config = self._by_name[verified.issuer]
        try:
            _check_times(verified.claims, config, now)
        except TokenError as exc:
            self._cache.pop(token_hash, None)
            exc.issuer = config.name
            raise
        self._cache.move_to_end(token_hash)
        return verified

    def _remember(self, verified: VerifiedToken) -> None:
        if self._cache_size == 0:
            return
        self._cache[verified.token_hash] = verified
        self._cache.move_to_end(verified.token_hash)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _check_header(
        self, config: IssuerConfig, header: Mapping[str, Any]
    ) -> tuple[str, str | None]:
        alg = header.get("alg")
        # SECURITY: RFC 8725 §3.1: the token's alg is checked against the issuer's configured
        # list (case-sensitively, so "None"/"NONE" fail like "none"); it never selects one.
        if not isinstance(alg, str) or alg not in config.algorithms:
            raise TokenError(Reason.TOKEN_ALGORITHM_REFUSED, f"alg {alg!r} is not allowed")
        refused = REFUSED_HEADERS.intersection(header)
        if refused:
            raise TokenError(Reason.TOKEN_HEADER_REFUSED, f"key-locating headers {sorted(refused)}")
        # SECURITY: RFC 7515 §4.1.11: we implement no critical extension, so any "crit" makes
        # the token invalid; "b64" (RFC 7797) unencoded payloads are not bearer tokens.
        if "crit" in header or "b64" in header:
            raise TokenError(Reason.TOKEN_HEADER_REFUSED, "critical extensions are not supported")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenError(Reason.TOKEN_INVALID, "'kid' is not a string")
        return alg, kid

    async def _verify_for(
        self,
        config: IssuerConfig,
        token: str,
        token_hash: str,
        header: Mapping[str, Any],
        signature_segment: str,
        now: float,
    ) -> VerifiedToken:
        if len(token) > config.max_token_bytes:
            raise TokenError(
                Reason.TOKEN_INVALID, f"token longer than {config.max_token_bytes} bytes"
            )
        alg, kid = self._check_header(config, header)
        try:
            _b64url_segment(signature_segment)
        except (ValueError, binascii.Error) as exc:
            raise TokenError(Reason.TOKEN_SIGNATURE_INVALID, "signature is not base64url") from exc
        # SECURITY: RFC 8725 §3.10: kid is only ever a dictionary key into the cached JWKS.
        try:
            entry = await self._jwks[config.name].get_key(kid)
        except KeyNotFound as exc:
            raise TokenError(Reason.TOKEN_KEY_UNKNOWN, str(exc)) from exc
        except JwksUnavailable as exc:
            raise TokenError(Reason.TOKEN_ISSUER_UNAVAILABLE, str(exc)) from exc
        if not entry.fits(alg):
            raise TokenError(
                Reason.TOKEN_ALGORITHM_REFUSED,
                f"alg {alg} does not fit key {entry.kid!r} ({entry.kty}, alg {entry.alg})",
            )
        options: Options = {
            "require": list(config.required_claims),
            "verify_signature": True,
            "verify_aud": True,
            "verify_iss": True,
            "verify_sub": True,
            "verify_jti": True,
            # Times are checked below against the injected clock; PyJWT reads the wall clock.
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "strict_aud": False,
            "enforce_minimum_key_length": True,
        }
        try:
            claims = self._pyjwt.decode(
                token,
                key=entry.key,
                algorithms=[alg],
                options=options,
                audience=list(config.audiences),
                issuer=config.issuer,
                leeway=config.leeway,
            )
        except jwt_errors.PyJWTError as exc:
            raise TokenError(_pyjwt_reason(exc), f"{type(exc).__name__}: {exc}") from exc
        _check_times(claims, config, now)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise TokenError(Reason.TOKEN_CLAIMS_INVALID, "'sub' is not a non-empty string")
        thumbprint = _confirmation(claims)
        expires_at = _numeric_date(claims, "exp")
        issued_at = _numeric_date(claims, "iat")
        assert expires_at is not None and issued_at is not None  # required by config
        return VerifiedToken(
            issuer=config.name,
            claims=MappingProxyType(claims),
            subject=subject,
            token_hash=token_hash,
            expires_at=expires_at,
            issued_at=issued_at,
            cnf_x5t_s256=thumbprint,
            algorithm=alg,
            key_id=kid,
        )
