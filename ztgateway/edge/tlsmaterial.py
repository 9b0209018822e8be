"""The live TLS material: the server context, the CRL and the out-of-band certificate verifier,
built from `[tls]` as one snapshot and swapped as one on a reload (file polling, SIGHUP, newly
fetched CRLs).

It sits above both `tls` (contexts, certificate parsing, CRLs) and `certverify` (verifying a
certificate that did not arrive in our handshake, which itself parses with `tls`), so neither
of those imports the other back.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509

from ..config import TLSConfig
from .certverify import ClientCertVerifier
from .tls import RevocationList, load_crl, server_context

log = logging.getLogger("ztgateway.tls")


@dataclass
class TLSMaterial:
    """The current server context and CRL, swapped as one snapshot on reload."""

    context: ssl.SSLContext
    revocations: RevocationList
    server_not_after: float
    ca_not_after: float
    verifier: ClientCertVerifier
    """Verifies certificates that arrive outside our handshake (forward-auth, /decide)."""
    fingerprints: tuple[int, ...] = field(default_factory=tuple)


def _mtimes(cfg: TLSConfig) -> tuple[int, ...]:
    out: list[int] = []
    for p in (cfg.cert, cfg.key, cfg.client_ca, cfg.crl):
        if p is None:
            continue
        try:
            st = os.stat(p)
            out.append(st.st_mtime_ns + st.st_size)
        except OSError:
            out.append(-1)
    return tuple(out)


def build_material(cfg: TLSConfig, client_cert: str, extra_crls: bytes = b"") -> TLSMaterial:
    ctx = server_context(cfg, client_cert, extra_crls)
    ca = x509.load_pem_x509_certificate(cfg.client_ca.read_bytes())
    crl = load_crl(cfg.crl, ca) if cfg.crl else RevocationList()
    server = x509.load_pem_x509_certificate(cfg.cert.read_bytes())
    return TLSMaterial(
        context=ctx,
        revocations=crl,
        server_not_after=server.not_valid_after_utc.timestamp(),
        ca_not_after=ca.not_valid_after_utc.timestamp(),
        verifier=ClientCertVerifier(cfg.client_ca, crl),
        fingerprints=_mtimes(cfg),
    )


class TLSManager:
    """Owns the live TLSMaterial; `maybe_reload()` swaps it when files change."""

    def __init__(
        self,
        cfg: TLSConfig,
        client_cert: str,
        *,
        on_reload: Callable[[bool, str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.client_cert = client_cert
        self.extra_crls = b""
        self.current = build_material(cfg, client_cert)
        self._on_reload = on_reload

    def reconfigure(self, cfg: TLSConfig, client_cert: str) -> None:
        """Apply a new TLS section (hot reload); raises and keeps the old one on failure."""
        material = build_material(cfg, client_cert, self.extra_crls)
        self.cfg, self.client_cert, self.current = cfg, client_cert, material

    def set_extra_crls(self, pem: bytes) -> None:
        """New fetched CRLs: new connections are checked against them in the handshake."""
        if pem == self.extra_crls:
            return
        material = build_material(self.cfg, self.client_cert, pem)
        self.extra_crls, self.current = pem, material

    def maybe_reload(self, *, force: bool = False) -> bool:
        if not force and _mtimes(self.cfg) == self.current.fingerprints:
            return False
        try:
            material = build_material(self.cfg, self.client_cert, self.extra_crls)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("TLS reload failed, keeping the previous certificates: %s", exc)
            if self._on_reload:
                self._on_reload(False, str(exc))
            # Remember the broken state so the error is not logged on every poll.
            self.current.fingerprints = _mtimes(self.cfg)
            return False
        self.current = material
        log.info(
            "TLS material reloaded (%d revoked serials)", len(material.revocations.revoked_serials)
        )
        if self._on_reload:
            self._on_reload(True, "")
        return True
