"""Secrets in headers and query strings are masked before an event is built."""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Iterable
from typing import Final
from urllib.parse import unquote_plus

from .keys import MaskKey

UNKEYED_MASK: Final = "<masked>"

SECRET_HEADERS: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "x-ztgw-mfa",
        "x-auth-token",
        "x-access-token",
        "x-csrf-token",
        "x-xsrf-token",
        "x-amz-security-token",
        "x-goog-iap-jwt-assertion",
        "cf-access-jwt-assertion",
    }
)
"""Always masked; names that merely look secret (see _SECRET_WORDS) are masked as well."""

SECRET_QUERY_PARAMS: Final = frozenset(
    {"code", "state", "ticket", "sig", "samlresponse", "samlrequest", "relaystate"}
)
"""OAuth/OIDC and SAML parameters that grant or bind a login; masked with the _SECRET_WORDS."""

_SECRET_WORDS: Final = frozenset(
    {
        "token",
        "secret",
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "apikey",
        "key",
        "signature",
        "credential",
        "credentials",
        "session",
        "sessionid",
        "jwt",
        "assertion",
        "otp",
        "mfa",
        "auth",
        "authorization",
        "cookie",
    }
)
_SECRET_SUFFIXES: Final = ("token", "secret", "password", "apikey", "signature")
_WORD_SPLIT: Final = re.compile(r"[^a-z0-9]+")


_CACHED_NAME_MAX: Final = 64
"""Names up to this long have their verdict cached (clients reuse a few dozen header and
parameter names); longer ones are judged every time, so the cache stays small."""


@functools.lru_cache(maxsize=2048)
def _is_secret_lowered(lowered: str, always: frozenset[str]) -> bool:
    if lowered in always:
        return True
    if any(word in _SECRET_WORDS for word in _WORD_SPLIT.split(lowered)):
        return True
    # camelCase names (refreshToken, clientSecret) have no separator to split on.
    return lowered.endswith(_SECRET_SUFFIXES)


def _is_secret_name(name: str, always: frozenset[str]) -> bool:
    lowered = name.lower()
    if len(lowered) > _CACHED_NAME_MAX:
        return bool(_is_secret_lowered.__wrapped__(lowered, always))
    return _is_secret_lowered(lowered, always)


@functools.lru_cache(maxsize=1024)
def _query_name(raw_name: str) -> tuple[str, bool]:
    """A query parameter's decoded name and whether its value is a secret."""
    name = unquote_plus(raw_name)
    return name, _is_secret_name(name, SECRET_QUERY_PARAMS)


def _mask(value: str, key: MaskKey | None) -> str:
    """`<masked:KEY-ID:HMAC>` with a key, `<masked>` without one (issue 18 M5).

    The mask used to be an unkeyed SHA-256 prefix: a Basic password, a query-string password
    and a TOTP code were recovered from it offline in under a second. Keyed with a secret held
    outside the audit store, the 64-bit HMAC still correlates two events carrying the same
    secret, and reveals nothing to whoever reads the log without the key. Without a key there is
    nothing safe to derive, so the value is dropped entirely.
    """
    if key is None:
        return UNKEYED_MASK
    mac = hmac.new(key.secret, value.encode("utf-8", "surrogatepass"), hashlib.sha256)
    return f"<masked:{key.key_id}:{mac.hexdigest()[:16]}>"


def mask_headers(
    headers: Iterable[tuple[str, str]],
    *,
    key: MaskKey | None = None,
    prefix: str = "input.headers",
) -> tuple[dict[str, str], list[str]]:
    """Headers for the event input with secrets replaced, and the paths that were masked.

    Each value of a repeated header is masked on its own so one shared cookie still correlates.
    """
    out: dict[str, str] = {}
    repeated: dict[str, list[str]] = {}
    masked: list[str] = []
    for name, raw in headers:
        lowered = name.lower()
        value = raw
        if _is_secret_name(lowered, SECRET_HEADERS):
            value = _mask(raw, key)
            if lowered not in out:
                masked.append(f"{prefix}.{lowered}")
        if lowered in out:
            repeated.setdefault(lowered, [out[lowered]]).append(value)
        else:
            out[lowered] = value
    # A repeated header is one entry, its values joined in order.
    for lowered, values in repeated.items():
        out[lowered] = ", ".join(values)
    masked.sort()
    return out, masked


def mask_query(
    query: str, *, key: MaskKey | None = None, prefix: str = "input.query"
) -> tuple[str, list[str]]:
    """The query string (without '?') with secret parameter values masked, and their paths.

    Names keep their original encoding and order, so the logged query still shows what the
    client sent; empty values are left alone since they reveal nothing.
    """
    if not query:
        return query, []
    parts: list[str] = []
    masked: set[str] = set()
    for part in query.split("&"):
        raw_name, sep, raw_value = part.partition("=")
        name, secret = (
            _query_name(raw_name)
            if len(raw_name) <= _CACHED_NAME_MAX
            else _query_name.__wrapped__(raw_name)
        )
        if sep and raw_value and secret:
            parts.append(f"{raw_name}={_mask(unquote_plus(raw_value), key)}")
            masked.add(f"{prefix}.{name}")
        else:
            parts.append(part)
    return "&".join(parts), sorted(masked)
