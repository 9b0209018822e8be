"""The names the gateway answers to: a Host or SNI that is not one of them is misdirected.

A request naming another host reaches the upstream with that name in `X-Forwarded-Host`, which
legacy apps build links (password-reset mails, redirects) from: Host-header poisoning. An SNI
that differs from the Host is a request meant for another virtual server (domain fronting).
Both are refused with 421 Misdirected Request (RFC 9110 §15.5.20, RFC 9112 §3.2).

The names are `[server] hosts` when set; otherwise the server certificate's DNS and IP subject
alternative names (a browser reaches us under no other name without a certificate warning) and
the host of `[server] public_url`. Route `hosts` are always included.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from cryptography import x509
from yarl import URL

if TYPE_CHECKING:
    from .config import GatewayConfig


def certificate_names(cert: x509.Certificate) -> frozenset[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    names = {n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)}
    names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return frozenset(names)


def _bare(host: str) -> str:
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        return h


class ServerNames:
    def __init__(
        self,
        configured: Iterable[str],
        certificate: Callable[[], frozenset[str]] = frozenset,
    ) -> None:
        exact: set[str] = set()
        wildcards: set[str] = set()
        for name in configured:
            n = _bare(name)
            (wildcards.add(n[2:]) if n.startswith("*.") else exact.add(n))
        self._exact = frozenset(exact)
        self._wildcards = frozenset(wildcards)
        self._certificate = certificate

    def allows(self, host: str) -> bool:
        h = _bare(host)
        if not h:
            return False
        if h in self._exact:
            return True
        parent = h.partition(".")[2]
        if parent and parent in self._wildcards:
            return True
        cert = self._certificate()
        return h in cert or (bool(parent) and "*." + parent in cert)

    def refusal(self, host: str, sni: str | None) -> str | None:
        """Why a request for `host` (the Host header, port removed) over a connection that
        named `sni` is misdirected, or None."""
        if not self.allows(host):
            return f"host {host[:100]!r} is not one of the gateway's names"
        if sni is not None and _bare(sni) != _bare(host):
            return f"host {host[:100]!r} on a connection for {sni[:100]!r}"
        return None


def server_names(config: GatewayConfig, certificate: Callable[[], frozenset[str]]) -> ServerNames:
    """The gateway's names for `config`, the certificate's read live (it reloads on its own)."""
    s = config.server
    routes = [h for r in config.routes for h in r.hosts]
    if s.hosts:
        return ServerNames([*s.hosts, *routes])
    public = URL(s.public_url).host if s.public_url else None
    return ServerNames([*routes, *([public] if public else [])], certificate)


__all__ = ["ServerNames", "certificate_names", "server_names"]
