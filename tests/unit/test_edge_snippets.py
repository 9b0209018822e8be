"""The shipped edge-proxy snippets agree with the gateway (security review H1).

nginx runs for real in tests/e2e/test_forward_auth_nginx.py; Traefik and Caddy are not on this
machine, so their files are read here: each passes the client certificate in exactly the one
header its `[forward_auth] cert_header` names, never trusts the client's forwarding headers,
and clears every certificate header (and the gateway's identity headers) towards the app.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from ztgateway.request.headerfamilies import CERTIFICATE_HEADERS, EDGES, cert_header_problem

REPO = Path(__file__).resolve().parents[2]
IDENTITY = ("X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Groups", "X-ZT-Assertion")


def configured(text: str) -> tuple[str, str]:
    """The `edge` and `cert_header` the snippet's header comment tells the gateway to use."""
    edge = re.search(r'edge = "([a-z]+)"', text)
    header = re.search(r'cert_header = "([A-Za-z-]+)"', text)
    assert edge and header, "the snippet must say which [forward_auth] settings it needs"
    assert cert_header_problem(edge.group(1), header.group(1)) is None
    return edge.group(1), header.group(1)


def lower(names: list[str]) -> set[str]:
    return {n.lower() for n in names}


def test_nginx_passes_one_certificate_header_and_clears_the_rest_towards_the_app() -> None:
    auth = (REPO / "config/nginx/ztgateway-forward-auth.conf").read_text()
    edge, header = configured(auth)
    assert edge == "nginx"
    sets = dict(re.findall(r"proxy_set_header\s+(\S+)\s+(\S+);", auth))
    assert sets[header] == "$ssl_client_escaped_cert"
    used = EDGES["nginx"]
    assert {used.uri, used.method, used.host, used.client} <= set(sets)
    # No other certificate header is set for the gateway: a client's copy of one reaches it
    # and is refused (header-spoofed).
    assert lower([h for h in sets if h != header]).isdisjoint(lower(list(CERTIFICATE_HEADERS)))
    app = (REPO / "config/nginx/ztgateway-identity-headers.conf").read_text()
    cleared = lower(re.findall(r'proxy_set_header\s+(\S+)\s+"";', app))
    assert lower(list(CERTIFICATE_HEADERS)) <= cleared
    own = dict(re.findall(r"proxy_set_header\s+(\S+)\s+(\S+);", app))
    assert own["X-Forwarded-For"] == "$remote_addr"
    assert own["X-Forwarded-Proto"] == "$scheme"
    for name in IDENTITY:
        assert own[name].startswith("$ztgw_"), name


def test_traefik_never_trusts_forwarded_headers_and_clears_the_rest() -> None:
    text = (REPO / "config/traefik/ztgateway.toml").read_text()
    edge, header = configured(text)
    assert (edge, header) == ("traefik", "X-Forwarded-Tls-Client-Cert")
    mw = tomllib.loads(text)["http"]["middlewares"]
    assert mw["ztgw"]["chain"]["middlewares"] == ["ztgw-cert", "ztgw-auth", "ztgw-clear"]
    assert mw["ztgw-cert"]["passTLSClientCert"]["pem"] is True
    auth = mw["ztgw-auth"]["forwardAuth"]
    assert auth["trustForwardHeader"] is False
    assert set(IDENTITY) <= set(auth["authResponseHeaders"])
    cleared = mw["ztgw-clear"]["headers"]["customRequestHeaders"]
    assert all(v == "" for v in cleared.values())
    assert lower(list(CERTIFICATE_HEADERS)) <= lower(list(cleared))


def test_caddy_passes_its_verified_certificate_in_the_configured_header_only() -> None:
    text = (REPO / "config/caddy/ztgateway.Caddyfile").read_text()
    edge, header = configured(text)
    assert edge == "caddy"
    ups = dict(re.findall(r"header_up\s+(\S+)\s+(\S+)", text))
    assert ups[header] == "{http.request.tls.client.certificate_der_base64}"
    removed = lower(re.findall(r"^\s+-(\S+)$", text, re.M))
    assert lower(list(CERTIFICATE_HEADERS)) <= removed
    assert lower(list(IDENTITY)) <= removed
    copied = re.search(r"copy_headers (.+)", text)
    assert copied and set(IDENTITY) <= set(copied.group(1).split())
