"""Real revocation counterparts on loopback: an OCSP responder and an HTTP server for CRLs.

The OCSP responder is a small aiohttp server that parses real RFC 6960 requests and answers with
responses built and signed by `cryptography.x509.ocsp`, from the test CA's key (or, to test the
checks, a delegated responder, a stranger's key, a stale validity, another nonce). Times come
from the clock the test hands it, the same ManualClock the gateway reads.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support import Certs
from ztgateway.clock import Clock
from ztgateway.dev.pki import CertificateAuthority, generate_key

HOST = "127.0.0.1"

Mode = Literal[
    "ca",  # signed by the issuing CA
    "delegated",  # signed by a responder certificate the CA issued with id-kp-OCSPSigning
    "delegated-no-eku",  # the same without id-kp-OCSPSigning
    "stranger",  # claims to be the CA, signed with another key
    "stale",  # nextUpdate already passed
    "future",  # thisUpdate an hour ahead (a responder clock, or an answer made for later)
    "other-serial",  # a valid answer about another certificate of the same CA
    "other-nonce",  # echoes a nonce other than the request's
    "no-nonce",  # omits the nonce (a pre-signed answer)
    "try-later",  # an unsigned tryLater
]


def _status(value: str) -> ocsp.OCSPCertStatus:
    return {
        "good": ocsp.OCSPCertStatus.GOOD,
        "revoked": ocsp.OCSPCertStatus.REVOKED,
    }.get(value, ocsp.OCSPCertStatus.UNKNOWN)


def _delegate(ca: CertificateAuthority, *, eku: bool) -> tuple[x509.Certificate, object]:
    key = generate_key("ec")
    now = ca.clock.now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test OCSP responder")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
    )
    if eku:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False
        )
    return builder.sign(ca.key, hashes.SHA256()), key  # type: ignore[arg-type]


class LoopbackServer:
    """An aiohttp server on 127.0.0.1 (a free port, kept across stop/start)."""

    port: int = 0
    _runner: web.AppRunner | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        """The server goes down: connections to its port are refused."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@dataclass
class OCSPResponder(LoopbackServer):
    ca: CertificateAuthority
    clock: Clock
    statuses: dict[int, str] = field(default_factory=dict)
    """serial -> "good" | "revoked"; anything else is "unknown"."""
    mode: Mode = "ca"
    validity: float = 3600.0
    requests: int = 0
    nonces: list[bytes | None] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/ocsp"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/ocsp", self._answer)

    async def _answer(self, request: web.Request) -> web.Response:
        self.requests += 1
        assert request.content_type == "application/ocsp-request"
        req = ocsp.load_der_ocsp_request(await request.read())
        try:
            nonce: bytes | None = req.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
        except x509.ExtensionNotFound:
            nonce = None
        self.nonces.append(nonce)
        if self.mode == "try-later":
            der = ocsp.OCSPResponseBuilder.build_unsuccessful(
                ocsp.OCSPResponseStatus.TRY_LATER
            ).public_bytes(serialization.Encoding.DER)
            return web.Response(body=der, content_type="application/ocsp-response")
        now = self.clock.now()
        this_update = now - dt.timedelta(minutes=1)
        next_update = now + dt.timedelta(seconds=self.validity)
        if self.mode == "stale":
            this_update, next_update = now - dt.timedelta(days=2), now - dt.timedelta(days=1)
        elif self.mode == "future":
            this_update, next_update = now + dt.timedelta(hours=1), now + dt.timedelta(hours=2)
        status = _status(self.statuses.get(req.serial_number, "unknown"))
        revoked = status is ocsp.OCSPCertStatus.REVOKED
        builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
            issuer_name_hash=req.issuer_name_hash,
            issuer_key_hash=req.issuer_key_hash,
            serial_number=req.serial_number + (1 if self.mode == "other-serial" else 0),
            algorithm=req.hash_algorithm,
            cert_status=status,
            this_update=this_update,
            next_update=next_update,
            revocation_time=this_update if revoked else None,
            revocation_reason=x509.ReasonFlags.key_compromise if revoked else None,
        )
        if self.mode == "other-nonce":
            builder = builder.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
        elif nonce is not None and self.mode != "no-nonce":
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        signer_cert, signer_key = self.ca.cert, self.ca.key
        if self.mode in ("delegated", "delegated-no-eku"):
            signer_cert, key = _delegate(self.ca, eku=self.mode == "delegated")
            signer_key = key  # type: ignore[assignment]
            builder = builder.certificates([signer_cert])
        elif self.mode == "stranger":
            # Someone else's CA answering for ours (a captive portal, a spoofed responder).
            stranger = CertificateAuthority.generate("Mallory CA", clock=self.clock)
            signer_cert, signer_key = stranger.cert, stranger.key
            builder = builder.certificates([stranger.cert])
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, signer_cert)
        der = builder.sign(signer_key, hashes.SHA256()).public_bytes(  # type: ignore[arg-type]
            serialization.Encoding.DER
        )
        return web.Response(body=der, content_type="application/ocsp-response")


@dataclass
class CRLServer(LoopbackServer):
    """Serves the CA's CRL over plain HTTP, like a CA's publication point."""

    body: bytes = b""
    status: int = 200
    requests: int = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/ca.crl"

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/ca.crl", self._serve)

    async def _serve(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.status != 200:
            return web.Response(status=self.status)
        return web.Response(body=self.body, content_type="application/pkix-crl")

    def publish(
        self, ca: CertificateAuthority, revoked: list[int], *, next_update_days: float = 1.0
    ) -> x509.CertificateRevocationList:
        crl = ca.crl(revoked, next_update_days=next_update_days)  # type: ignore[arg-type]
        self.body = crl.public_bytes(serialization.Encoding.DER)
        return crl


def issue(
    ca: CertificateAuthority,
    directory: Path,
    name: str,
    *,
    ocsp_url: str | None = None,
    crl_url: str | None = None,
) -> tuple[Path, Path, int]:
    issued = ca.issue_client(name, user="alice", ocsp_url=ocsp_url, crl_url=crl_url)
    pem, key = directory / f"{name}.pem", directory / f"{name}.key"
    issued.write(pem, key)
    return pem, key, issued.cert.serial_number


def load_ca_with(certs: Certs, clock: Clock) -> CertificateAuthority:
    return CertificateAuthority.load(certs.ca, certs.ca_key, clock=clock)


@dataclass
class OpenSSLResponder(LoopbackServer):
    """`openssl ocsp` as the responder: OpenSSL's own responder code builds and signs every
    answer from an index file (its `ca` database format), from the request the gateway sent.

    `openssl ocsp -port` would listen on every interface; the tests stay on loopback, so a small
    aiohttp front on 127.0.0.1 hands each request to `openssl ocsp -reqin ... -respout ...`.
    OpenSSL reads the system clock: tests using it run the gateway on the system clock too."""

    ca_cert: Path
    ca_key: Path
    directory: Path
    revoked: set[int] = field(default_factory=set)
    good: set[int] = field(default_factory=set)
    requests: int = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/", self._answer)

    def _index(self) -> str:
        far = "491231235959Z"  # notAfter; openssl only checks the serial and the flag
        lines = [f"V\t{far}\t\t{s:X}\tunknown\t/CN=good" for s in sorted(self.good)]
        lines += [f"R\t{far}\t240101000000Z\t{s:X}\tunknown\t/CN=revoked" for s in self.revoked]
        return "".join(line + "\n" for line in lines)

    async def _answer(self, request: web.Request) -> web.Response:
        import asyncio

        self.requests += 1
        n = self.requests
        index, req, resp = (self.directory / f"{name}-{n}" for name in ("index", "req", "resp"))
        index.write_text(self._index())
        req.write_bytes(await request.read())
        proc = await asyncio.create_subprocess_exec(
            "openssl", "ocsp", "-index", str(index), "-CA", str(self.ca_cert),
            "-rsigner", str(self.ca_cert), "-rkey", str(self.ca_key),
            "-reqin", str(req), "-respout", str(resp), "-nmin", "5",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        assert proc.returncode == 0, err
        return web.Response(body=resp.read_bytes(), content_type="application/ocsp-response")
