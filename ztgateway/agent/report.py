"""Assemble, sign and send a posture report.

The report is the document `ztgateway/risk/posture.py` validates; it is signed as a compact JWS
with the device certificate's own key (RFC 7515), so the gateway knows the report was made by
the holder of that key and not copied from another machine, and it is POSTed to
`/.ztgw/posture` over the same mTLS connection that names the device. `collected_at` makes each
report fresh: the gateway refuses one that is not newer than the last.
"""

from __future__ import annotations

import json
import platform
import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .. import __version__
from ..clock import SYSTEM_CLOCK, Clock
from ..risk.posture import validate_report
from . import linux, macos, windows
from .probe import Collected, Probe

COLLECTORS = {"linux": linux.collect, "macos": macos.collect, "windows": windows.collect}
POSTURE_PATH = "/.ztgw/posture"


def this_platform(system: str = platform.system()) -> str:
    """The report's platform name for `platform.system()` (Linux, Darwin, Windows)."""
    names = {"Linux": "linux", "Darwin": "macos", "Windows": "windows"}
    if system not in names:
        raise SystemExit(f"error: the agent does not know how to read {system}")
    return names[system]


def device_id_of(cert_pem: bytes) -> str:
    """The device id the gateway will see for this certificate (one rule: ztgateway.edge.tls)."""
    from ..edge.tls import parse_client_cert

    cert = x509.load_pem_x509_certificate(cert_pem)
    return parse_client_cert(cert.public_bytes(serialization.Encoding.DER)).device_id


def build_report(
    collected: Collected,
    platform: str,
    *,
    clock: Clock = SYSTEM_CLOCK,
    device_id: str | None = None,
    hostname: str | None = None,
) -> dict[str, Any]:
    report: dict[str, Any] = {"platform": platform, **collected.fields}
    report["collected_at"] = clock.now().isoformat(timespec="milliseconds").replace("+00:00", "Z")
    report["agent_version"] = __version__
    report["hostname"] = (hostname or socket.gethostname())[:255]
    if collected.os_name:
        report["os_name"] = collected.os_name[:255]
    if collected.kernel:
        report["kernel"] = collected.kernel[:255]
    if device_id:
        report["device_id"] = device_id
    report["evidence"] = dict(collected.evidence)
    # The gateway's own validator: a report it would refuse is caught here, on the device.
    validate_report(report)
    return report


def collect_report(
    system: str | None = None,
    probe: Probe | None = None,
    *,
    clock: Clock = SYSTEM_CLOCK,
    device_id: str | None = None,
) -> dict[str, Any]:
    name = system or this_platform()
    collected = COLLECTORS[name](probe or Probe())
    return build_report(collected, name, clock=clock, device_id=device_id)


def _algorithm(key: Any) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = {"secp256r1": "ES256", "secp384r1": "ES384"}.get(key.curve.name)
        if alg:
            return alg
    elif isinstance(key, rsa.RSAPrivateKey):
        return "PS256"
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise ValueError("the device key must be EC P-256/P-384, RSA or Ed25519 to sign reports")


def sign_report(report: dict[str, Any], key_pem: bytes) -> str:
    """A compact JWS over the report's JSON, by the device key (verified by risk/posture.py)."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    payload = json.dumps(report, separators=(",", ":"), sort_keys=True).encode()
    return jwt.api_jws.encode(payload, key, algorithm=_algorithm(key))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: dict[str, Any]

    @property
    def accepted(self) -> bool:
        return self.status == 200 and self.body.get("accepted") is True


def send_report(
    gateway: str,
    report: dict[str, Any],
    *,
    cert: Path,
    key: Path,
    ca: Path | None,
    signed: bool = True,
    timeout: float = 30.0,
) -> Answer:
    """POST the report over mTLS; the answer is the gateway's judgement or its refusal."""
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    if signed:
        body = sign_report(report, key.read_bytes()).encode("ascii")
        content_type = "application/jose"
    else:
        body = json.dumps(report).encode()
        content_type = "application/json"
    if not gateway.startswith("https://"):
        raise ValueError(f"the gateway URL must be https://, not {gateway!r}")
    request = urllib.request.Request(  # noqa: S310 - an https:// URL, checked above
        gateway.rstrip("/") + POSTURE_PATH,
        data=body,
        method="POST",
        headers={
            "Content-Type": content_type,
            "Accept": "application/json",
            "User-Agent": f"ztgateway-agent/{__version__}",
        },
    )
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(request, timeout=timeout) as response:
            return Answer(response.status, _json(response.read()))
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, _json(exc.read()))


def _json(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError:
        return {"detail": raw[:200].decode("utf-8", "replace")}
    return doc if isinstance(doc, dict) else {"detail": str(doc)[:200]}
