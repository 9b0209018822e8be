"""Verification of the signed JWTs identity providers send the gateway on their own initiative:
Security Event Tokens (RFC 8417) and OIDC back-channel logout tokens (Back-Channel Logout 1.0
§2.4). Neither is a bearer token: no `sub` is required, a SET has no `exp`, and each is acted on
once (replay is refused by `jti` in the store, by the caller).

Every refusal is a `SignalTokenError` carrying one of RFC 8935 §2.4's error codes, so the push
endpoint can answer with it and the audit and metrics can count it by a closed label.
"""

from __future__ import annotations

import binascii
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt as pyjwt
from jwt import exceptions as jwt_errors
from jwt.utils import base64url_decode

from ..credentials.jwks import JwksCache, JwksUnavailable, KeyNotFound
from ..credentials.jwt import REFUSED_HEADERS

# RFC 8935 §2.4 (Security Event Token Error Codes registry, RFC 8935 §7.1).
INVALID_REQUEST: Final = "invalid_request"
INVALID_KEY: Final = "invalid_key"
INVALID_ISSUER: Final = "invalid_issuer"
INVALID_AUDIENCE: Final = "invalid_audience"
AUTHENTICATION_FAILED: Final = "authentication_failed"
ACCESS_DENIED: Final = "access_denied"
ERROR_CODES: Final = (
    INVALID_REQUEST,
    INVALID_KEY,
    INVALID_ISSUER,
    INVALID_AUDIENCE,
    AUTHENTICATION_FAILED,
    ACCESS_DENIED,
)
KEYS_UNAVAILABLE: Final = "keys_unavailable"
"""Not an RFC 8935 code: the transmitter's keys could not be fetched, a fault on our side or
theirs, answered 503 so a push transmitter retries (RFC 8935 §2.3 lets it retry on 5xx)."""

MAX_TOKEN_BYTES: Final = 64 * 1024
SET_TYPE: Final = "secevent+jwt"  # RFC 8417 §2.3, required by SSF 1.0 §4.1.
LOGOUT_TYPE: Final = "logout+jwt"  # Back-Channel Logout 1.0 §2.4 (explicit typing, RFC 8725 §3.11)


class SignalTokenError(Exception):
    """A refused token; `detail` is for the audit log and the transmitter, never a secret."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class TokenRules:
    """What one kind of token from one sender must look like."""

    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    types: tuple[str | None, ...]
    """Accepted `typ` headers (None: no `typ` at all, for senders that predate explicit typing)."""
    required: tuple[str, ...]
    leeway: float
    max_age: float
    """Refused when `iat` is older than this (a SET has no `exp`: RFC 8417 §2.2)."""


def _segment_json(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64url_decode(segment.encode("ascii"))
        value = json.loads(raw)
    except (ValueError, binascii.Error, UnicodeError, RecursionError) as exc:
        raise SignalTokenError(INVALID_REQUEST, f"the {what} is not base64url JSON") from exc
    if not isinstance(value, dict):
        raise SignalTokenError(INVALID_REQUEST, f"the {what} is not a JSON object")
    return value


def peek_claim(token: str, name: str) -> Any:
    """An unverified claim, only to choose whose keys verify the token (RFC 8725 §3.10: the
    keys themselves never come from it)."""
    if len(token) > MAX_TOKEN_BYTES or not token.isascii():
        raise SignalTokenError(
            INVALID_REQUEST, f"not an ASCII JWT of at most {MAX_TOKEN_BYTES} bytes"
        )
    parts = token.split(".")
    if len(parts) == 5:
        # RFC 8417 §2.2 allows encrypted SETs; this receiver has no decryption key to offer.
        raise SignalTokenError(INVALID_REQUEST, "encrypted (JWE) tokens are not supported")
    if len(parts) != 3 or not all(parts[:2]):
        raise SignalTokenError(INVALID_REQUEST, "not a compact JWS of three segments")
    return _segment_json(parts[1], "payload").get(name)


def peek_issuer(token: str) -> str:
    """The unverified `iss`, only to choose which sender's keys verify the token."""
    iss = peek_claim(token, "iss")
    if not isinstance(iss, str) or not iss:
        raise SignalTokenError(INVALID_REQUEST, "'iss' is missing or not a string")
    return iss


def numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SignalTokenError(INVALID_REQUEST, f"{name!r} is not a finite number")
    return float(value)


class SignedTokenVerifier:
    """One sender's signed tokens, checked against its own key set and rules."""

    def __init__(self, rules: TokenRules, keys: JwksCache, clock: Callable[[], float]) -> None:
        self.rules = rules
        self.keys = keys
        self._clock = clock
        self._pyjwt = pyjwt.PyJWT()

    async def verify(self, token: str) -> dict[str, Any]:
        """The verified claims, or SignalTokenError; nothing else escapes for any input."""
        try:
            return await self._verify(token)
        except SignalTokenError:
            raise
        except Exception as exc:
            raise SignalTokenError(
                INVALID_REQUEST, f"unexpected {type(exc).__name__} while verifying"
            ) from exc

    async def _verify(self, token: str) -> dict[str, Any]:
        rules = self.rules
        iss = peek_issuer(token)
        if iss != rules.issuer:
            raise SignalTokenError(INVALID_ISSUER, f"issuer {iss!r} is not {rules.issuer!r}")
        header = _segment_json(token.split(".", maxsplit=1)[0], "header")
        alg = header.get("alg")
        # SECURITY: RFC 8725 §3.1: the configured algorithms decide, never the token.
        if not isinstance(alg, str) or alg not in rules.algorithms:
            raise SignalTokenError(INVALID_KEY, f"alg {alg!r} is not allowed")
        refused = REFUSED_HEADERS.intersection(header)
        if refused:
            # SECURITY: RFC 8725 §3.10: keys come from the configured JWKS only.
            raise SignalTokenError(INVALID_KEY, f"key-locating headers {sorted(refused)}")
        if "crit" in header:
            raise SignalTokenError(INVALID_REQUEST, "critical header extensions are not supported")
        typ = header.get("typ")
        normalised = typ.lower().removeprefix("application/") if isinstance(typ, str) else typ
        # SECURITY: RFC 8725 §3.11: explicit typing keeps an ID token or an access token from
        # being replayed here as an event (and a SET from being taken as a logout token).
        if normalised not in rules.types:
            raise SignalTokenError(INVALID_REQUEST, f"typ {typ!r} is not {rules.types[0]!r}")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise SignalTokenError(INVALID_REQUEST, "'kid' is not a string")
        try:
            entry = await self.keys.get_key(kid)
        except KeyNotFound as exc:
            raise SignalTokenError(INVALID_KEY, str(exc)) from exc
        except JwksUnavailable as exc:
            raise SignalTokenError(KEYS_UNAVAILABLE, str(exc)) from exc
        if not entry.fits(alg):
            raise SignalTokenError(INVALID_KEY, f"alg {alg} does not fit key {entry.kid!r}")
        try:
            claims: dict[str, Any] = self._pyjwt.decode(
                token,
                key=entry.key,
                algorithms=[alg],
                audience=rules.audience,
                issuer=rules.issuer,
                options={
                    "require": list(rules.required),
                    "verify_signature": True,
                    "verify_aud": True,
                    "verify_iss": True,
                    "verify_exp": False,  # against the injected clock, below
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_jti": True,
                    "verify_sub": True,
                    "strict_aud": False,
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt_errors.InvalidSignatureError as exc:
            raise SignalTokenError(INVALID_KEY, "the signature does not verify") from exc
        except jwt_errors.InvalidAudienceError as exc:
            raise SignalTokenError(INVALID_AUDIENCE, f"'aud' is not {rules.audience!r}") from exc
        except jwt_errors.InvalidIssuerError as exc:
            raise SignalTokenError(INVALID_ISSUER, str(exc)) from exc
        except jwt_errors.PyJWTError as exc:
            raise SignalTokenError(INVALID_REQUEST, f"{type(exc).__name__}: {exc}") from exc
        self._check_times(claims)
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > 256:
            raise SignalTokenError(INVALID_REQUEST, "'jti' is not a string of 1 to 256 characters")
        return claims

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        rules = self.rules
        now = self._clock()
        iat = numeric_date(claims, "iat")
        exp = numeric_date(claims, "exp")
        if iat is None:
            raise SignalTokenError(INVALID_REQUEST, "'iat' is missing")
        if iat > now + rules.leeway:
            raise SignalTokenError(INVALID_REQUEST, f"'iat' {iat:.0f} is in the future")
        if now - iat > rules.max_age:
            # Beyond this the jti is no longer remembered, so an older token could be replayed.
            raise SignalTokenError(
                INVALID_REQUEST, f"issued {now - iat:.0f} s ago, older than {rules.max_age:.0f} s"
            )
        if exp is not None and exp <= now - rules.leeway:
            raise SignalTokenError(INVALID_REQUEST, f"expired at {exp:.0f}")
