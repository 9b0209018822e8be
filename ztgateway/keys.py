"""The gateway's own secret: one root key every worker and replica shares, purpose keys from it.

Three things must agree across every process that serves one gateway, or sign-in and forms fail
at random with `workers > 1` or several replicas (issue 18, I3):

- the key of the CSRF tokens on the portal's forms (`forms.CSRFTokens`), because the form may
  be shown by one process and posted to another;
- the key of the MAC on the OIDC login cookie, because the sign-in may start on one process and
  come back from the provider to another (the attempts themselves are in the shared store);
- the default key that signs `X-ZT-Assertion`, because an upstream verifies assertions from
  every process with the one JWKS it fetched.

They are derived (HKDF-SHA256, RFC 5869, one `info` label per purpose) from one 32-byte root
key, taken from, in order: the environment variable `[keys] env` (base64), the file
`[keys] file` (created 0600 on first start, atomically, so workers starting together agree), or
else the shared store, where the first process to start writes a random one and every other
process reads that one (`Store.shared_secret`). The last needs no configuration and is right
for workers on one host and for replicas on one Redis; the first two keep the key out of the
store, which an operator who backs up or replicates the store may prefer.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

if TYPE_CHECKING:
    from .config import KeysConfig

ROOT_BYTES = 32
STORE_NAME = "gateway-root-key"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class SharedSecrets(Protocol):
    async def shared_secret(self, name: str, candidate: str) -> str: ...


def _decode(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: not valid base64") from None
    if len(key) != ROOT_BYTES:
        raise ValueError(f"{where}: must be {ROOT_BYTES} bytes (base64), not {len(key)}")
    return key


def new_root_key_b64() -> str:
    return base64.b64encode(secrets.token_bytes(ROOT_BYTES)).decode("ascii")


def create_private_file(path: Path, data: bytes) -> bool:
    """Write `data` to `path` (0600) unless it exists; False if another process was first.

    Written to a temporary name and linked into place, so a process that finds the file never
    reads it half-written (an `O_EXCL` create followed by a write leaves that window open to
    a worker starting at the same moment).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


async def load_root_key(cfg: KeysConfig, store: SharedSecrets) -> tuple[bytes, str]:
    """The root key and where it came from ("env", "file" or "store")."""
    env = os.environ.get(cfg.env)
    if env:
        return _decode(env, f"environment variable {cfg.env}"), "env"
    if cfg.file is not None:
        if not cfg.file.exists():
            create_private_file(cfg.file, (new_root_key_b64() + "\n").encode("ascii"))
        return _decode(cfg.file.read_text(), str(cfg.file)), "file"
    stored = await store.shared_secret(STORE_NAME, new_root_key_b64())
    return _decode(stored, f"store secret {STORE_NAME}"), "store"


def _derive(root: bytes, label: str, length: int = 32) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=None, info=f"ztgateway/{label}".encode()
    ).derive(root)


@dataclass(frozen=True, slots=True)
class GatewayKeys:
    csrf: bytes
    oidc_login: bytes
    webauthn_user: bytes
    source: str
    _root: bytes

    @classmethod
    def from_root(cls, root: bytes, source: str = "given") -> GatewayKeys:
        return cls(
            csrf=_derive(root, "csrf/v1"),
            oidc_login=_derive(root, "oidc-login-cookie/v1"),
            webauthn_user=_derive(root, "webauthn-user-handle/v1"),
            source=source,
            _root=root,
        )

    @classmethod
    async def load(cls, cfg: KeysConfig, store: SharedSecrets) -> GatewayKeys:
        root, source = await load_root_key(cfg, store)
        return cls.from_root(root, source)

    def assertion_key(self) -> ec.EllipticCurvePrivateKey:
        """A P-256 key derived from the root (FIPS 186-5 A.2.1: 64 more bits than the order
        removes the modulo bias), the same in every process."""
        material = int.from_bytes(_derive(self._root, "assertion-es256/v1", 40), "big")
        scalar = material % (_P256_ORDER - 1) + 1
        return ec.derive_private_key(scalar, ec.SECP256R1())

    def __repr__(self) -> str:
        return f"GatewayKeys(source={self.source!r}, <keys redacted>)"
