"""The audit log's two keys, both kept outside the audit store (issue 18, M5 and L7).

- The **mask key** (32 random bytes, base64 in a 0600 file or an environment variable) keys the
  HMAC that replaces secrets in events. Unkeyed, a masked password or TOTP code was a bare
  SHA-256 prefix that a dictionary reverses offline in under a second; keyed, whoever reads the
  log, its archives or the SIEM copy learns nothing without the key.
- The **checkpoint key** (Ed25519, PKCS#8 PEM, 0600) signs checkpoints over the chain's head,
  so deleting an event and re-hashing the rest no longer verifies. Its public half goes to a
  PEM bundle of trusted keys that `ztgateway audit verify` reads; the bundle keeps the public
  keys of rotated-out keys, so older checkpoints keep verifying.

Both are created on first start when their file is configured and missing, like the MFA and
assertion keys. Several workers may start at once: a key is written to a temporary file and
linked into place, so exactly one key wins and nobody reads a half-written file.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MASK_KEY_BYTES = 32


class AuditKeyError(ValueError):
    """A configured audit key file that cannot be used (wrong type, unreadable, too short)."""


@dataclass(frozen=True, slots=True)
class MaskKey:
    secret: bytes
    key_id: str
    """Names the key in each mask (a hash of the key, which reveals nothing of it): masks
    made under different keys are never compared by mistake after a rotation."""

    @classmethod
    def from_secret(cls, secret: bytes) -> MaskKey:
        if len(secret) < 16:
            raise AuditKeyError("the audit mask key must be at least 16 bytes")
        key_id = hashlib.sha256(b"ztgw-audit-mask-key-id\x00" + secret).hexdigest()[:8]
        return cls(secret, key_id)


def _synced_temp(path: Path, data: bytes) -> Path:
    """`data` in a new 0600 file beside `path`, on disk: ready to be linked or renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def create_exclusive(path: Path, data: bytes) -> bool:
    """Write `data` to `path` (0600) unless it exists; True when this call created it."""
    tmp = _synced_temp(path, data)
    try:
        os.link(tmp, path)  # atomic, and fails if another process got there first
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    return True


def replace_atomically(path: Path, data: bytes) -> None:
    """A rotation: the new content appears whole, under the same name, mode 0600."""
    tmp = _synced_temp(path, data)
    try:
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# --------------------------------------------------------------------------- mask key


def new_mask_secret() -> bytes:
    return base64.b64encode(secrets.token_bytes(MASK_KEY_BYTES)) + b"\n"


def load_mask_key(path: Path | None, env: str, *, create: bool) -> MaskKey | None:
    """The key from the environment variable `env`, else from `path` (created when asked)."""
    value = os.environ.get(env) if env else None
    if value:
        return MaskKey.from_secret(_decode_secret(value, f"${env}"))
    if path is None:
        return None
    if create and not path.exists():
        create_exclusive(path, new_mask_secret())
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditKeyError(f"{path}: cannot read the audit mask key: {exc}") from exc
    return MaskKey.from_secret(_decode_secret(text, str(path)))


def _decode_secret(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except ValueError as exc:
        raise AuditKeyError(f"{where}: the audit mask key must be base64") from exc


# --------------------------------------------------------------------------- checkpoint key


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_checkpoint_key(path: Path, *, create: bool) -> Ed25519PrivateKey:
    if create and not path.exists():
        create_exclusive(path, _private_pem(Ed25519PrivateKey.generate()))
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise AuditKeyError(f"{path}: cannot load the audit checkpoint key: {exc}") from exc
    if not isinstance(loaded, Ed25519PrivateKey):
        raise AuditKeyError(f"{path}: the audit checkpoint key must be an Ed25519 private key")
    return loaded


def load_public_keys(bundle: Path) -> dict[str, Ed25519PublicKey]:
    """Every Ed25519 public key in a PEM bundle, by key id (a missing bundle holds none)."""
    try:
        data = bundle.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise AuditKeyError(f"{bundle}: cannot read the checkpoint public keys: {exc}") from exc
    keys: dict[str, Ed25519PublicKey] = {}
    marker = b"-----END PUBLIC KEY-----"
    for block in data.split(marker):
        if b"-----BEGIN PUBLIC KEY-----" not in block:
            continue
        try:
            public = serialization.load_pem_public_key(block.strip() + b"\n" + marker + b"\n")
        except ValueError as exc:
            raise AuditKeyError(f"{bundle}: not a PEM public key: {exc}") from exc
        if not isinstance(public, Ed25519PublicKey):
            raise AuditKeyError(f"{bundle}: only Ed25519 public keys are trusted")
        keys[key_id(public)] = public
    return keys


def trust_public_key(bundle: Path, public: Ed25519PublicKey) -> None:
    """Add `public` to the bundle unless it is there (the current key is always trusted)."""
    if key_id(public) in load_public_keys(bundle):
        return
    bundle.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(bundle, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "ab") as f:
        f.write(public_pem(public))


def rotate_checkpoint_key(path: Path, bundle: Path) -> str:
    """A new signing key in `path`; the old public key stays trusted. Returns the new key id."""
    if path.exists():
        trust_public_key(bundle, load_checkpoint_key(path, create=False).public_key())
    key = Ed25519PrivateKey.generate()
    trust_public_key(bundle, key.public_key())
    replace_atomically(path, _private_pem(key))
    return key_id(key.public_key())


def rotate_mask_key(path: Path) -> str:
    """A new mask key in `path`; returns its id (masks made after it do not match older ones)."""
    secret = new_mask_secret()
    replace_atomically(path, secret)
    return MaskKey.from_secret(base64.b64decode(secret)).key_id


def load_checkpoint_signing(
    path: Path | None, bundle: Path | None, *, create: bool
) -> Ed25519PrivateKey | None:
    """The configured checkpoint key (created when asked), its public half made trusted."""
    if path is None:
        return None
    key = load_checkpoint_key(path, create=create)
    if bundle is not None:
        try:
            trust_public_key(bundle, key.public_key())
        except OSError as exc:
            raise AuditKeyError(
                f"{bundle}: cannot record the checkpoint public key: {exc}"
            ) from exc
    return key


def placement_warnings(
    db: Path,
    jsonl: Path | None,
    mask_key: Path | None,
    checkpoint_key: Path | None,
    *,
    mask_env: bool,
) -> list[str]:
    """What `check-config` and start-up say about where the audit keys are (or are not)."""
    out: list[str] = []
    if mask_key is None and not mask_env:
        out.append(
            "[audit] mask_key_file is not set: masked secrets are logged as <masked> with no "
            "digest, so two events carrying the same secret cannot be correlated"
        )
    if checkpoint_key is None:
        out.append(
            "[audit] checkpoint_key_file is not set: the audit chain is not anchored, so an "
            "event deleted and the rest re-hashed would still verify"
        )
    store = {db.parent.resolve(), *((jsonl.parent.resolve(),) if jsonl else ())}
    for name, key in (("mask_key_file", mask_key), ("checkpoint_key_file", checkpoint_key)):
        if key is not None and key.parent.resolve() in store:
            out.append(
                f"[audit] {name} {key} is in the audit store's directory: whoever can write "
                "the audit log may read the key; keep it elsewhere (with the TLS keys)"
            )
    return out
