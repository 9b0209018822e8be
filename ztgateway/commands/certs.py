"""`ztgateway certs`: create and manage the development PKI from the command line.

Thin on purpose: every operation lives in `ztgateway.dev.pki` so tests and `make run` use the same
code; this module only parses arguments and prints what an operator needs to know next.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import sys
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from ztgateway.clock import SYSTEM_CLOCK
from ztgateway.dev import pki

Handler = Callable[[argparse.Namespace], int]

EXIT_OK = 0
EXIT_ERROR = 2

_EKU_NAMES: dict[ObjectIdentifier, str] = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = subparsers.add_parser(
        "certs",
        help="create and manage the development PKI",
        description="Development PKI: CA, server and client certificates, CRL, dev signing keys. "
        "Not for production.",
    )
    sub = certs.add_subparsers(dest="certs_command", metavar="SUBCOMMAND", required=True)

    p_init = sub.add_parser("init", help="create the CA, server cert, client certs, CRL and keys")
    _add_dir(p_init)
    mode = p_init.add_mutually_exclusive_group()
    mode.add_argument(
        "--force", action="store_true", help="replace an existing PKI (all old certs stop working)"
    )
    mode.add_argument(
        "--renew",
        action="store_true",
        help="keep an existing PKI usable: create it if missing, re-issue what has expired or "
        "expires within --within days (what `make run` does)",
    )
    p_init.add_argument(
        "--within",
        type=_positive_int,
        default=pki.RENEW_BEFORE.days,
        metavar="DAYS",
        help=f"with --renew: renew what expires within DAYS (default {pki.RENEW_BEFORE.days})",
    )
    p_init.set_defaults(func=_guarded(_cmd_init))

    p_issue = sub.add_parser("issue-client", help="issue a client certificate for a device")
    p_issue.add_argument("name", metavar="NAME", help="device name, e.g. carol-laptop")
    p_issue.add_argument("--user", required=True, help="user the device belongs to (UID)")
    p_issue.add_argument("--email", help="email SAN (default: USER@example.test)")
    p_issue.add_argument("--days", type=_positive_int, default=365, help="validity (default 365)")
    _add_dir(p_issue)
    p_issue.add_argument("--force", action="store_true", help="overwrite an existing client")
    p_issue.set_defaults(func=_guarded(_cmd_issue_client))

    p_revoke = sub.add_parser("revoke", help="revoke a client certificate and re-sign the CRL")
    p_revoke.add_argument(
        "name", metavar="NAME", help="the client's name, as given to issue-client"
    )
    _add_dir(p_revoke)
    p_revoke.set_defaults(func=_guarded(_cmd_revoke))

    p_crl = sub.add_parser("crl", help="re-sign the CRL from revoked.json (refreshes nextUpdate)")
    _add_dir(p_crl)
    p_crl.set_defaults(func=_guarded(_cmd_crl))

    p_show = sub.add_parser("show", help="print the identity and validity of a certificate")
    p_show.add_argument("path", metavar="PATH", type=Path, help="PEM or DER certificate")
    p_show.set_defaults(func=_guarded(_cmd_show))


def _add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        dest="directory",
        type=Path,
        default=Path("certs"),
        help="PKI directory (default: certs)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def _guarded(handler: Handler) -> Handler:
    """PKIError is an operator mistake, not a crash: one line on stderr, exit code 2."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except pki.PKIError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR

    return run


def _cmd_init(args: argparse.Namespace) -> int:
    if args.renew:
        renewal = pki.renew_pki(args.directory, within=dt.timedelta(days=args.within))
        if not renewal.created:
            if renewal.renewed:
                print(f"renewed in {args.directory}: {', '.join(renewal.renewed)}")
            return EXIT_OK
        if renewal.reason != "no CA":
            print(
                f"replaced the development PKI in {args.directory} ({renewal.reason}): "
                "re-import the client bundles"
            )
        paths = pki.PKIPaths(args.directory)
    else:
        paths = pki.init_pki(args.directory, force=args.force)
    ca = pki.load_certificate(paths.ca_cert)
    print(f"created a development PKI in {paths.directory} (not for production)")
    rows = [
        ("CA certificate", paths.ca_cert),
        ("CA key (secret)", paths.ca_key),
        ("server certificate", paths.server_cert),
        ("server key (secret)", paths.server_key),
        ("CRL", paths.crl),
        ("revocations", paths.revoked),
        ("token issuer key (secret)", paths.issuer_key),
        ("token issuer JWKS", paths.issuer_jwks),
        ("assertion key (secret)", paths.assertion_key),
    ]
    width = max(len(label) for label, _ in rows)
    for label, path in rows:
        print(f"  {label:<{width}}  {path}")
    print(f"CA sha256 fingerprint: {pki.fingerprint_sha256(ca)}")
    print("client certificates:")
    for name, user in pki.DEFAULT_CLIENTS:
        pem, key, p12 = paths.client_paths(name)
        cert = pki.load_certificate(pem)
        print(f"  {name} (user {user})  sha256 {pki.fingerprint_sha256(cert)}")
        print(f"    {pem}  {key} (secret)  {p12}")
    print(f"PKCS#12 password: {pki.P12_PASSWORD}")
    return EXIT_OK


def _cmd_issue_client(args: argparse.Namespace) -> int:
    pem, key, p12 = pki.issue_client(
        args.directory,
        args.name,
        user=args.user,
        email=args.email,
        days=args.days,
        force=args.force,
    )
    cert = pki.load_certificate(pem)
    print(f"issued client certificate {args.name} for user {args.user}")
    print(f"  certificate  {pem}")
    print(f"  key (secret) {key}")
    print(f"  PKCS#12      {p12} (password: {pki.P12_PASSWORD})")
    print(f"  serial       {cert.serial_number:x}")
    print(f"  sha256       {pki.fingerprint_sha256(cert)}")
    print(f"  not_after    {cert.not_valid_after_utc.isoformat()}")
    return EXIT_OK


def _cmd_revoke(args: argparse.Namespace) -> int:
    serial = pki.revoke(args.directory, args.name)
    paths = pki.PKIPaths(args.directory)
    print(f"revoked {args.name}: serial {serial:x}")
    print(
        f"re-signed {paths.crl}; the gateway picks up the new CRL on reload or when it sees "
        "the file change"
    )
    return EXIT_OK


def _cmd_crl(args: argparse.Namespace) -> int:
    crl = pki.refresh_crl(args.directory)
    paths = pki.PKIPaths(args.directory)
    next_update = crl.next_update_utc.isoformat() if crl.next_update_utc else "never"
    print(f"re-signed {paths.crl}: {len(list(crl))} revoked, next update {next_update}")
    return EXIT_OK


def _cmd_show(args: argparse.Namespace) -> int:
    cert = pki.load_certificate(args.path)
    for line in describe(cert):
        print(line)
    return EXIT_OK


def describe(cert: x509.Certificate, *, now: dt.datetime | None = None) -> list[str]:
    """Lines for `certs show`; separate from printing so other commands can reuse it."""
    moment = now or SYSTEM_CLOCK.now()
    if moment < cert.not_valid_before_utc:
        status = "not yet valid"
    elif moment > cert.not_valid_after_utc:
        status = "expired"
    else:
        status = "valid"
    return [
        f"subject:     {cert.subject.rfc4514_string()}",
        f"issuer:      {cert.issuer.rfc4514_string()}",
        f"SANs:        {', '.join(_sans(cert)) or '(none)'}",
        f"serial:      {cert.serial_number:x}",
        f"sha256:      {pki.fingerprint_sha256(cert)}",
        f"not_before:  {cert.not_valid_before_utc.isoformat()}",
        f"not_after:   {cert.not_valid_after_utc.isoformat()}",
        f"status:      {status}",
        f"EKU:         {', '.join(_ekus(cert)) or '(none)'}",
    ]


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out: list[str] = []
    for name in san:
        if isinstance(name, x509.UniformResourceIdentifier):
            out.append(f"URI:{name.value}")
        elif isinstance(name, x509.RFC822Name):
            out.append(f"email:{name.value}")
        elif isinstance(name, x509.DNSName):
            out.append(f"DNS:{name.value}")
        elif isinstance(name, x509.IPAddress):
            out.append(f"IP:{name.value}")
        else:
            out.append(f"{type(name).__name__}:{name.value}")
    return out


def _ekus(cert: x509.Certificate) -> list[str]:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return []
    return [_EKU_NAMES.get(oid, oid.dotted_string) for oid in eku]
