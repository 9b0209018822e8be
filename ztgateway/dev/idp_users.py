"""The dev IdP's users-and-clients file and the scrypt password hashes it stores.

A mistake in the file is a `ConfigError` naming the key, the way the gateway's own configuration
reports it; a password hash is scrypt (RFC 7914) in the PHC string format, with bounded
parameters so a typo cannot ask for gigabytes per sign-in. Apart from the provider (`idp.py`) so
the file can be read and a hash made without starting a server (`ztgateway dev-idp
hash-password`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final
from urllib.parse import urlsplit

from ..configreader import ConfigError, Table
from .ssf import DevSSFConfig, OutgoingTLS, load_outgoing, load_ssf

# scrypt (RFC 7914) as a PHC-style string: $scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt>$<hash>.
SCRYPT_LOG_N: Final = 15
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
SCRYPT_MAXMEM: Final = 1 << 27
_HASH_RE: Final = re.compile(
    r"\$scrypt\$ln=(?P<ln>\d{1,2}),r=(?P<r>\d{1,2}),p=(?P<p>\d{1,2})"
    r"\$(?P<salt>[A-Za-z0-9_-]{16,})\$(?P<hash>[A-Za-z0-9_-]{43,})"
)
_USERNAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


# -- passwords -------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, log_n: int = SCRYPT_LOG_N) -> str:
    """A salted scrypt hash (RFC 7914) in the PHC string format the users file stores."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=1 << log_n,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=SCRYPT_MAXMEM,
        dklen=32,
    )
    return f"$scrypt$ln={log_n},r={SCRYPT_R},p={SCRYPT_P}${b64url(salt)}${b64url(digest)}"


def _parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    match = _HASH_RE.fullmatch(encoded)
    if match is None:
        raise ValueError("not a $scrypt$ln=..,r=..,p=..$salt$hash string")
    ln, r, p = int(match["ln"]), int(match["r"]), int(match["p"])
    # Bounds keep a typo in the file from asking for gigabytes of memory per login.
    if not (10 <= ln <= 20 and 1 <= r <= 16 and 1 <= p <= 4):
        raise ValueError("scrypt parameters out of range (ln 10-20, r 1-16, p 1-4)")
    try:
        return ln, r, p, _b64url_decode(match["salt"]), _b64url_decode(match["hash"])
    except (binascii.Error, ValueError) as exc:
        raise ValueError("salt or hash is not base64url") from exc


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time comparison of a password against a stored scrypt hash. Blocking (~0.1 s)."""
    ln, r, p, salt, expected = _parse_hash(encoded)
    digest = hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=1 << ln,
        r=r,
        p=p,
        maxmem=SCRYPT_MAXMEM,
        dklen=len(expected),
    )
    return hmac.compare_digest(digest, expected)


# -- the users file --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DevUser:
    username: str
    password_hash: str = field(repr=False)
    email: str | None
    name: str
    groups: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DevClient:
    client_id: str
    client_secret: str = field(repr=False)
    redirect_uris: tuple[str, ...]
    post_logout_redirect_uris: tuple[str, ...]
    backchannel_logout_uri: str | None = None
    """Back-Channel Logout 1.0 §2.2: where logout tokens go when a session ends here."""


@dataclass(frozen=True, slots=True)
class DevIdPConfig:
    users: Mapping[str, DevUser]
    clients: Mapping[str, DevClient]  # by client_id
    ssf: DevSSFConfig | None = None
    outgoing: OutgoingTLS = field(default_factory=OutgoingTLS)


def _check_redirect_uri(table: Table, key: str, uri: str) -> None:
    parts = urlsplit(uri)
    # RFC 6749 §3.1.2: an absolute URI without fragment; it is compared exactly, never by prefix.
    if parts.scheme not in ("http", "https") or not parts.hostname or "#" in uri:
        table.fail(key, f"must be an absolute http(s) URI without fragment, not {uri!r}")


def load_devidp_file(path: Path) -> DevIdPConfig:
    """Read and validate the users-and-clients file; a mistake is a ConfigError naming the key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(path, "", exc.strerror or str(exc)) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from exc
    root = Table(data, path)
    users: dict[str, DevUser] = {}
    for username, t in root.named_tables("users").items():
        if _USERNAME_RE.fullmatch(username) is None:
            t.fail("", "user names are lower-case letters, digits, '.', '_' or '-'")
        password_hash: str = t.text("password_hash", required=True)
        try:
            _parse_hash(password_hash)
        except ValueError as exc:
            t.fail("password_hash", str(exc))
        groups = t.str_list("groups")
        if not all(groups):
            t.fail("groups", "must not contain empty names")
        users[username] = DevUser(
            username=username,
            password_hash=password_hash,
            email=t.text("email"),
            name=t.text("name", username),
            groups=groups,
        )
        t.done()
    clients: dict[str, DevClient] = {}
    for section, t in root.named_tables("clients").items():
        client_id: str = t.text("client_id", section)
        secret: str = t.text("client_secret", required=True)
        if not client_id or not secret:
            t.fail("client_secret", "client_id and client_secret must not be empty")
        if client_id in clients:
            t.fail("client_id", f"duplicate client_id {client_id!r}")
        redirect_uris = t.str_list("redirect_uris")
        if not redirect_uris:
            t.fail("redirect_uris", "at least one redirect URI is required")
        for i, uri in enumerate(redirect_uris):
            _check_redirect_uri(t, f"redirect_uris[{i}]", uri)
        logout_uris = t.str_list("post_logout_redirect_uris")
        for i, uri in enumerate(logout_uris):
            _check_redirect_uri(t, f"post_logout_redirect_uris[{i}]", uri)
        backchannel = t.text("backchannel_logout_uri")
        if backchannel is not None:
            _check_redirect_uri(t, "backchannel_logout_uri", backchannel)
        clients[client_id] = DevClient(
            client_id=client_id,
            client_secret=secret,
            redirect_uris=redirect_uris,
            post_logout_redirect_uris=logout_uris,
            backchannel_logout_uri=backchannel,
        )
        t.done()
    ssf = load_ssf(root)
    outgoing = load_outgoing(root)
    root.done()
    if not users:
        raise ConfigError(path, "users", "at least one user is required")
    if not clients:
        raise ConfigError(path, "clients", "at least one client is required")
    return DevIdPConfig(
        users=MappingProxyType(users),
        clients=MappingProxyType(clients),
        ssf=ssf,
        outgoing=outgoing,
    )
