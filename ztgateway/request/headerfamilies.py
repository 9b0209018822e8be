"""Request headers that speak for someone: the client's address, the original URL, the client
certificate, the user. Only the gateway (or a trusted edge proxy, for the forwarding facts) may
set them towards an upstream; from anyone else they are a spoofing attempt.

Upstream frameworks and proxies believe a long tail of vendor spellings, so the families are
matched by name and by prefix, after lower-casing and mapping "_" to "-" (CGI, PHP and some
WSGI stacks read `X_Forwarded_User` as `X-Forwarded-User`). Sources: Django/Rails/Spring/
ASP.NET forwarded-header middlewares, Tomcat RemoteIpValve and SSLValve, IIS ARR, nginx
`auth_request`, Apache mod_auth_*/mod_ssl, Traefik, Caddy, Envoy (XFCC), AWS ALB, Google IAP,
Cloudflare, Azure App Service (EasyAuth), Kong, Grafana/Jenkins auth-proxy headers, oauth2-proxy,
Pomerium, Authelia, Authentik, Vouch, RFC 7239 and RFC 9440.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

# The forwarding facts a reverse proxy in front of us sets as a matter of course. From a trusted
# proxy they are expected, not a spoofing attempt; they are still replaced by ours before
# forwarding. Identity headers stay spoofing whoever sends them: no proxy speaks for the user.
FORWARDING_HEADERS = frozenset(
    {
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-real-ip",
    }
)

CERTIFICATE_HEADERS = (
    "Client-Cert",  # RFC 9440
    "Client-Cert-Chain",
    "X-Client-Cert",
    "X-Client-Certificate",
    "X-Client-Verify",
    "X-Client-DN",
    "X-SSL-Cert",
    "X-SSL-Client-Cert",
    "X-SSL-Client-Verify",
    "X-SSL-Client-DN",
    "X-SSL-Client-S-DN",
    "X-SSL-Client-I-DN",
    "SSL-Client-Cert",
    "X-ARR-ClientCert",  # IIS Application Request Routing, Azure App Service
    "X-ARR-SSL",
    "X-Forwarded-Client-Cert",  # Envoy XFCC
    "X-Forwarded-Tls-Client-Cert",  # Traefik
    "X-Forwarded-Tls-Client-Cert-Info",
    "X-Amzn-Mtls-Clientcert",  # AWS ALB mTLS
    "X-Amzn-Mtls-Clientcert-Leaf",
    "X-Amzn-Mtls-Clientcert-Serial-Number",
    "X-Amzn-Mtls-Clientcert-Issuer",
    "X-Amzn-Mtls-Clientcert-Subject",
    "X-Amzn-Mtls-Clientcert-Validity",
    "WL-Proxy-Client-Cert",  # WebLogic
    "X-WL-Proxy-Client-Cert",
    "Proxy-SSL-Client-Cert",
)
"""Where proxies and frameworks pass a client certificate (or its parts) on; the shipped edge
snippets clear every one of them towards the app (tests/unit/test_edge_snippets.py)."""
_CERT_NAMES = frozenset(h.lower() for h in CERTIFICATE_HEADERS)
_CERT_PREFIXES = (
    "x-ssl-client-",
    "ssl-client-",
    "x-client-cert-",
    "x-forwarded-tls-client-",
    "x-amzn-mtls-",
    "x-tls-client-",
)

# Identity, the original request line, the client's address: never from a client.
_PROTECTED_NAMES = (
    FORWARDING_HEADERS
    | _CERT_NAMES
    | frozenset(
        {
            # users and groups asserted by an authenticating proxy
            "remote-user",
            "remote-groups",
            "remote-name",
            "remote-email",
            "x-remote-user",
            "x-remote-group",
            "x-remote-groups",
            "x-remote-email",
            "x-user",
            "x-email",
            "x-username",
            "x-user-id",
            "x-userid",
            "x-groups",
            "x-auth-user",
            "auth-user",
            "x-authenticated-user",
            "x-authenticated-userid",
            "x-authenticated-scope",
            "x-authenticated-groups",
            "x-proxy-user",
            "x-proxy-remote-user",
            "x-webauth-user",
            "x-webauth-email",
            "x-webauth-name",
            "x-webauth-groups",
            "x-credential-identifier",
            "x-consumer-id",
            "x-consumer-username",
            "x-consumer-custom-id",
            "x-consumer-groups",
            "x-anonymous-consumer",
            "x-userinfo",
            "x-oidc-user",
            "x-jwt-assertion",
            "x-jwt-payload",
            "x-pomerium-jwt-assertion",
            "x-goog-iap-jwt-assertion",
            "cf-access-jwt-assertion",
            "cf-access-authenticated-user-email",
            "x-ms-client-principal",
            "x-ms-client-principal-id",
            "x-ms-client-principal-name",
            "x-ms-client-principal-idp",
            # the original request line (URL rewrites, method overrides)
            "x-original-url",
            "x-original-uri",
            "x-original-method",
            "x-rewrite-url",
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
            "x-original-host",
            "x-host",
            "x-http-host-override",
            # the client's address and scheme
            "x-client-ip",
            "client-ip",
            "true-client-ip",
            "cf-connecting-ip",
            "cf-connecting-ipv6",
            "cf-visitor",
            "cf-ipcountry",
            "fastly-client-ip",
            "x-cluster-client-ip",
            "x-original-forwarded-for",
            "x-real-port",
            "x-proxyuser-ip",
            "proxy-client-ip",
            "wl-proxy-client-ip",
            "wl-proxy-ssl",
            "x-envoy-external-address",
            "x-envoy-internal",
            "x-scheme",
            "x-url-scheme",
            "front-end-https",
            "x-appengine-user-ip",
            "x-azure-clientip",
            "x-azure-socketip",
        }
    )
)
_PROTECTED_PREFIXES = (
    "x-zt-",
    "x-ztgw-",
    "x-forwarded-",  # every X-Forwarded-* (User, Email, Groups, Uri, Method, Ssl, ...)
    "x-original-",
    "x-auth-request-",  # oauth2-proxy
    "x-ms-client-principal",  # Azure App Service EasyAuth
    "x-ms-token-",
    "x-amzn-oidc-",  # AWS ALB
    "x-goog-authenticated-user-",  # Google IAP
    "x-goog-iap-",
    "cf-access-",
    "x-pomerium-",
    "x-vouch-",
    "x-authentik-",
    "x-authelia-",
    "x-webauth-",
    "x-remote-",
    "x-consumer-",
    "x-envoy-",
    *_CERT_PREFIXES,
)


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


@functools.lru_cache(maxsize=4096)
def protected_header(name: str) -> bool:
    """True for a header only the gateway (or a trusted edge, for forwarding facts) may set.

    Asked for every header of every request, twice; the names repeat, so the answer is
    remembered (bounded: a client inventing names only churns the LRU)."""
    n = _norm(name)
    return n in _PROTECTED_NAMES or n.startswith(_PROTECTED_PREFIXES)


def forwarding_header(name: str) -> bool:
    return _norm(name) in FORWARDING_HEADERS


@functools.lru_cache(maxsize=1024)
def certificate_header(name: str) -> bool:
    """A header some proxy or framework reads a client certificate (or its parts) from."""
    n = _norm(name)
    return n in _CERT_NAMES or n.startswith(_CERT_PREFIXES)


CertFormat = Literal["pem-urlencoded", "base64-der"]


@dataclass(frozen=True, slots=True)
class EdgeHeaders:
    """The headers one kind of edge proxy describes the original request in."""

    uri: str
    method: str
    host: str
    client: str
    cert_format: CertFormat


EDGES: dict[str, EdgeHeaders] = {
    # config/nginx/ztgateway-forward-auth.conf
    "nginx": EdgeHeaders(
        "X-Original-URI", "X-Original-Method", "X-Forwarded-Host", "X-Forwarded-For",
        "pem-urlencoded",
    ),
    # Traefik ForwardAuth (trustForwardHeader: false) + passTLSClientCert (pem: true)
    "traefik": EdgeHeaders(
        "X-Forwarded-Uri", "X-Forwarded-Method", "X-Forwarded-Host", "X-Forwarded-For",
        "base64-der",
    ),
    # Caddy forward_auth + header_up <cert_header> {http.request.tls.client.certificate_der_base64}
    "caddy": EdgeHeaders(
        "X-Forwarded-Uri", "X-Forwarded-Method", "X-Forwarded-Host", "X-Forwarded-For",
        "base64-der",
    ),
}  # fmt: skip


def cert_header_problem(edge: str, name: str) -> str | None:
    """Why `name` cannot be the header forward-auth reads the client certificate from."""
    if not name.replace("-", "").isalnum() or not name.isascii():
        return "must be a header name of letters, digits and '-'"
    if not certificate_header(name):
        # SECURITY: a name outside the certificate family would not be cleared by the data
        # plane or the shipped snippets, so a client could set it.
        return "must be a certificate header (e.g. X-SSL-Client-Cert, X-Forwarded-Tls-Client-Cert)"
    used = EDGES[edge]
    if _norm(name) in {_norm(h) for h in (used.uri, used.method, used.host, used.client)}:
        return f"names a header {edge} uses for the request itself"
    return None
