"""Configuration keys of the security review's fixes: validated at load, errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import Certs
from tests.unit.test_config import error_for, write
from ztgateway.config import load_config

CI_UPSTREAM = {"upstreams": {"iis": {"url": "http://127.0.0.1:9", "case_insensitive": True}}}


@pytest.mark.parametrize("prefix", ["/a;b/", "/a%2F/", "/a\\b/", "/a?/", "/a#/", "/a\x01/"])
def test_route_prefix_must_be_a_decoded_path_without_parameters(
    certs: Certs, tmp_path: Path, prefix: str
) -> None:
    err = error_for(tmp_path, certs, routes=[{"name": "a", "prefix": prefix, "upstream": "demo"}])
    assert err.key == "routes[0].prefix"


def test_prefixes_differing_in_case_overlap_when_an_upstream_ignores_case(
    certs: Certs, tmp_path: Path
) -> None:
    routes = [
        {"name": "a", "prefix": "/Admin/", "upstream": "demo"},
        {"name": "b", "prefix": "/admin/", "upstream": "iis"},
    ]
    err = error_for(tmp_path, certs, CI_UPSTREAM, routes=routes)
    assert err.key == "routes[1].prefix"
    assert "differ only in case" in err.message


def test_prefixes_differing_in_case_are_distinct_on_case_sensitive_upstreams(
    certs: Certs, tmp_path: Path
) -> None:
    routes = [
        {"name": "a", "prefix": "/Admin/", "upstream": "demo"},
        {"name": "b", "prefix": "/admin/", "upstream": "demo"},
    ]
    assert len(load_config(write(tmp_path, certs, routes=routes)).routes) == 2


def test_case_insensitive_prefixes_on_disjoint_hosts_do_not_overlap(
    certs: Certs, tmp_path: Path
) -> None:
    routes = [
        {"name": "a", "prefix": "/Admin/", "upstream": "iis", "hosts": ["a.example"]},
        {"name": "b", "prefix": "/admin/", "upstream": "iis", "hosts": ["b.example"]},
    ]
    cfg = load_config(write(tmp_path, certs, CI_UPSTREAM, routes=routes))
    assert cfg.upstreams["iis"].case_insensitive


def test_path_opt_ins_are_flags(certs: Certs, tmp_path: Path) -> None:
    r = {"name": "a", "prefix": "/", "upstream": "demo", "allow_path_params": "yes"}
    assert error_for(tmp_path, certs, routes=[r]).key == "routes[0].allow_path_params"
    r = {"name": "a", "prefix": "/", "upstream": "demo", "allow_double_encoding": 1}
    assert error_for(tmp_path, certs, routes=[r]).key == "routes[0].allow_double_encoding"
    err = error_for(tmp_path, certs, {"upstreams": {"demo": {"case_insensitive": "no"}}})
    assert err.key == "upstreams.demo.case_insensitive"


def test_forward_auth_reads_one_edge_and_one_certificate_header(
    certs: Certs, tmp_path: Path
) -> None:
    fa = {"enabled": True, "trusted_proxies": ["127.0.0.1/32"]}
    cfg = load_config(write(tmp_path, certs, {"forward_auth": fa}))
    assert (cfg.forward_auth.edge, cfg.forward_auth.cert_header) == ("nginx", "")
    err = error_for(tmp_path, certs, {"forward_auth": {**fa, "edge": "haproxy"}})
    assert err.key == "forward_auth.edge"
    err = error_for(tmp_path, certs, {"forward_auth": {**fa, "cert_header": "X-Device-Id"}})
    assert err.key == "forward_auth.cert_header" and "certificate header" in err.message
    err = error_for(tmp_path, certs, {"forward_auth": {**fa, "cert_header": "X SSL"}})
    assert err.key == "forward_auth.cert_header"
    ok = {**fa, "edge": "traefik", "cert_header": "X-Forwarded-Tls-Client-Cert"}
    assert load_config(write(tmp_path, certs, {"forward_auth": ok})).forward_auth.edge == "traefik"


def test_two_issuers_share_user_names_only_when_the_configuration_says_so(
    certs: Certs, tmp_path: Path
) -> None:
    second = {
        "issuer": "https://partner.example/issuer",
        "audiences": ["ztgateway"],
        "jwks_file": str(certs.issuer_jwks),
    }
    err = error_for(tmp_path, certs, {"issuers": {"partner": second}})
    assert err.key == "issuers.partner.user_namespace"
    assert "would share user names" in err.message
    cfg = load_config(
        write(tmp_path, certs, {"issuers": {"partner": {**second, "user_namespace": "partner"}}})
    )
    assert cfg.claim_maps["partner"].user_namespace == "partner"
    assert cfg.claim_maps["dev"].user_namespace == ""
    both = {"dev": {"user_namespace": ""}, "partner": {**second, "user_namespace": ""}}
    assert len(load_config(write(tmp_path, certs, {"issuers": both})).issuers) == 2
    bad = {"partner": {**second, "user_namespace": "Partner:X"}}
    assert error_for(tmp_path, certs, {"issuers": bad}).key == "issuers.partner.user_namespace"


@pytest.mark.parametrize(
    "origin", ["evil.example", "https://a.example/path", "ftp://a.example", "https://", "*"]
)
def test_websocket_origins_are_origins(certs: Certs, tmp_path: Path, origin: str) -> None:
    r = {"name": "a", "prefix": "/", "upstream": "demo", "websocket_origins": [origin]}
    assert error_for(tmp_path, certs, routes=[r]).key == "routes[0].websocket_origins[0]"


def test_websocket_origins_are_kept_as_browsers_serialise_them(
    certs: Certs, tmp_path: Path
) -> None:
    origins = ["https://A.example:443", "http://b.example:8080/", "https://[::1]:8443"]
    r = {"name": "a", "prefix": "/", "upstream": "demo", "websocket_origins": origins}
    cfg = load_config(write(tmp_path, certs, routes=[r]))
    assert cfg.routes[0].websocket_origins == {
        "https://a.example",
        "http://b.example:8080",
        "https://[::1]:8443",
    }


def test_cross_site_hosts_and_default_min_trust_are_validated(certs: Certs, tmp_path: Path) -> None:
    r = {"name": "a", "prefix": "/", "upstream": "demo", "cross_site": "open"}
    assert error_for(tmp_path, certs, routes=[r]).key == "routes[0].cross_site"
    assert error_for(tmp_path, certs, {"server": {"hosts": ["a b"]}}).key == "server.hosts"
    err = error_for(tmp_path, certs, {"devices": {"default_min_trust": "trusted"}})
    assert err.key == "devices.default_min_trust"
    cfg = load_config(write(tmp_path, certs))
    assert cfg.devices.default_min_trust == "approved"
    assert cfg.routes[0].policy.min_trust is None
    assert cfg.routes[0].cross_site == "strict"
