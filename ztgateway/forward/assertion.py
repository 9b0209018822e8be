"""The signed identity assertion the gateway adds for the upstream (`X-ZT-Assertion`).

Plain identity headers are trustworthy only while nothing but the gateway can reach the app;
a short-lived JWT signed by the gateway's own key (audience = the route) stays verifiable even
if that assumption breaks (Pomerium, IAP and Cloudflare Access do the same). Its public key is
published at `/.ztgw/jwks.json`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..clock import SYSTEM_CLOCK, Clock
from ..keys import create_private_file


def _b64(n: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()


def load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The configured key file, created (0600) if missing. Without one configured the gateway
    derives its key from its shared root key (keys.py), the same in every process."""
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Linked into place whole: workers starting together all read the one that won.
        create_private_file(path, pem)
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name != "secp256r1":
        raise ValueError(f"{path}: the assertion key must be an EC P-256 private key")
    return loaded


def _jwk(public: ec.EllipticCurvePublicKey) -> dict[str, str]:
    numbers = public.public_numbers()
    members = {"crv": "P-256", "kty": "EC", "x": _b64(numbers.x), "y": _b64(numbers.y)}
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    # RFC 7638 thumbprint as the kid, so rotation never reuses an id.
    kid = base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()
    return {**members, "kid": kid, "alg": "ES256", "use": "sig"}


def load_public_keys(paths: Sequence[Path]) -> list[ec.EllipticCurvePublicKey]:
    """P-256 public keys from PEM files holding a private key or a public key."""
    out = []
    for path in paths:
        data = path.read_bytes()
        try:
            key: Any = serialization.load_pem_private_key(data, password=None).public_key()
        except ValueError:
            key = serialization.load_pem_public_key(data)
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise ValueError(f"{path}: not an EC P-256 key")
        out.append(key)
    return out


class AssertionSigner:
    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        *,
        issuer: str,
        ttl: int,
        clock: Clock = SYSTEM_CLOCK,
        also_publish: Sequence[Path] = (),
    ) -> None:
        self._key = key
        self.clock = clock
        self.issuer = issuer
        self.ttl = ttl
        current = _jwk(key.public_key())
        self.kid = current["kid"]
        # Rotation (docs/deploy.md): the next key is published before it signs, the previous
        # one until the assertions it signed have expired, so verifiers never meet a kid
        # their cached JWKS lacks.
        extra = [_jwk(k) for k in load_public_keys(also_publish)]
        self.jwks = {"keys": [current, *(k for k in extra if k["kid"] != self.kid)]}
        self._cache: OrderedDict[tuple[Any, ...], tuple[float, str]] = OrderedDict()

    def sign(
        self,
        *,
        audience: str,
        user: str | None,
        email: str | None,
        groups: frozenset[str],
        device_id: str | None,
        source: str,
        now: float | None = None,
        would: str | None = None,
    ) -> str:
        """Signing costs ~50 µs, so an assertion is reused until half its lifetime has passed.

        `would` is the verdict a route in monitor mode did not enforce: the upstream can tell
        a monitored request from an allowed one (`ztgw.monitor`, `ztgw.would`)."""
        now = self.clock.time() if now is None else now
        key = (audience, user, email, groups, device_id, source, would)
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        iat = int(now)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": audience,
            "iat": iat,
            "nbf": iat - 5,
            "exp": iat + self.ttl,
            "sub": user or "",
            "ztgw": {"auth": source}
            if would is None
            else {"auth": source, "monitor": True, "would": would},
        }
        if email:
            claims["email"] = email
        if groups:
            claims["groups"] = sorted(groups)
        if device_id:
            claims["device_id"] = device_id
        token = jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.kid})
        self._cache[key] = (now + self.ttl / 2, token)
        if len(self._cache) > 10_000:
            self._cache.popitem(last=False)
        return token
