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
