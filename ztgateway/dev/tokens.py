"""A development token issuer, so the demo and the tests exercise the same verifier as production.

Tokens are ES256-signed with a local P-256 key; the `kid` is the key's RFC 7638 thumbprint, the
same one `ztgateway.dev.pki` writes into `issuer.jwks.json`, so a JWKS built from the key verifies
them without any shared registry of key ids. Not for production: whoever holds the key file can
mint any identity.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import jwt as pyjwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ztgateway.clock import SYSTEM_CLOCK
from ztgateway.credentials.jwks import jwk_thumbprint
from ztgateway.credentials.jwt import cert_thumbprint_s256

DEV_ISSUER: Final = "https://ztgateway.dev/issuer"
DEV_AUDIENCE: Final = "ztgateway"
DEV_ALGORITHM: Final = "ES256"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The RFC 7518 §6.2.1 members of a P-256 public key, coordinates at full 32-byte length."""
    if not isinstance(public_key.curve, ec.SECP256R1):
        raise ValueError(f"the dev issuer key must be P-256, not {public_key.curve.name}")
    numbers = public_key.public_numbers()
    return {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64url(numbers.x.to_bytes(32, "big")),
        "y": _b64url(numbers.y.to_bytes(32, "big")),
    }


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The key's `kid`: its RFC 7638 thumbprint."""
    return jwk_thumbprint(public_jwk(public_key))


def public_jwks(public_key: ec.EllipticCurvePublicKey, *, kid: str | None = None) -> dict[str, Any]:
    """A JWK Set publishing the key for ES256 signatures only, as the verifier expects it."""
    jwk: dict[str, Any] = dict(public_jwk(public_key))
    jwk.update({"kid": kid or key_id(public_key), "use": "sig", "alg": DEV_ALGORITHM})
    return {"keys": [jwk]}


def load_signing_key(key_path: Path) -> ec.EllipticCurvePrivateKey:
    """Read the PKCS#8 PEM private key, refusing anything but P-256 (the key of ES256)."""
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{key_path}: the dev issuer key must be an EC P-256 private key")
    return key


def issue_token(
    key_path: Path,
    *,
    sub: str,
    groups: Sequence[str] = (),
    scope: str = "",
    roles: Sequence[str] = (),
    email: str | None = None,
    ttl: int = 300,
    bind_cert: Path | None = None,
    issuer: str = DEV_ISSUER,
    audience: str = DEV_AUDIENCE,
    kid: str | None = None,
    extra_claims: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> str:
    """Mint an ES256 access token; `extra_claims` go last so tests can shape a bad token."""
    if not sub:
        raise ValueError("sub must not be empty")
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    key = load_signing_key(key_path)
    issued_at = int(SYSTEM_CLOCK.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": sub,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + ttl,
        "jti": secrets.token_urlsafe(16),
        "groups": list(groups),
        "scope": scope,
        "roles": list(roles),
    }
    if email is not None:
        claims["email"] = email
    if bind_cert is not None:
        cert = x509.load_pem_x509_certificate(bind_cert.read_bytes())
        # RFC 8705 §3.1: bind the token to the client certificate it will be presented with.
        claims["cnf"] = {
            "x5t#S256": cert_thumbprint_s256(cert.public_bytes(serialization.Encoding.DER))
        }
    if extra_claims:
        claims.update(extra_claims)
    headers = {"kid": kid or key_id(key.public_key()), "typ": "JWT"}
    return pyjwt.encode(claims, key, algorithm=DEV_ALGORITHM, headers=headers)
