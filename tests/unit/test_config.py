"""Configuration errors name the file and the key; a loadable config is a safe one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import base_config
from tests.support import Certs, deep_merge, to_toml
from ztgateway.cli import main
from ztgateway.config import load_config
from ztgateway.configreader import ConfigError


def write(tmp_path: Path, certs: Certs, over: dict[str, Any] | None = None, **replace: Any) -> Path:
    cfg = deep_merge(base_config(certs, 9, tmp_path), over or {})
    cfg.update(replace)
    path = tmp_path / "gw.toml"
    path.write_text(to_toml(cfg))
    return path


def error_for(
    tmp_path: Path, certs: Certs, over: dict[str, Any] | None = None, **replace: Any
) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, certs, over, **replace))
    return info.value


def test_the_demo_configuration_loads(certs: Certs, tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, certs))
    assert [r.name for r in cfg.routes] == ["app", "api", "admin"]
    assert cfg.routes[1].policy.require_token
    assert cfg.revision


def test_unknown_key_is_named_with_its_path(certs: Certs, tmp_path: Path) -> None:
    err = error_for(tmp_path, certs, {"server": {"client_certs": "required"}})
    assert err.key == "server.client_certs"
    assert "unknown key" in str(err)
    assert str(tmp_path / "gw.toml") in str(err)


def test_wrong_type_is_named(certs: Certs, tmp_path: Path) -> None:
    err = error_for(tmp_path, certs, {"server": {"port": "8443"}})
    assert err.key == "server.port"
    assert "integer" in err.message


def test_missing_certificate_file_is_named(certs: Certs, tmp_path: Path) -> None:
    err = error_for(tmp_path, certs, {"tls": {"cert": str(tmp_path / "nope.pem")}})
    assert err.key == "tls.cert"
    assert "file not found" in err.message


def test_route_key_errors_name_the_route_index(certs: Certs, tmp_path: Path) -> None:
    cfg = base_config(certs, 9, tmp_path)
    cfg["routes"][2]["policy"]["groupz"] = ["x"]
    err = error_for(tmp_path, certs, routes=cfg["routes"])
    assert err.key == "routes[2].policy.groupz"


def test_overlapping_routes_are_refused(certs: Certs, tmp_path: Path) -> None:
    routes = [
        {"name": "a", "prefix": "/api/", "upstream": "demo"},
        {"name": "b", "prefix": "/api/", "upstream": "demo"},
    ]
    err = error_for(tmp_path, certs, routes=routes)
    assert err.key == "routes[1].prefix"
    assert "overlaps route 'a'" in err.message


def test_same_prefix_on_disjoint_hosts_is_not_an_overlap(certs: Certs, tmp_path: Path) -> None:
    routes = [
        {"name": "a", "prefix": "/", "upstream": "demo", "hosts": ["a.example"]},
        {"name": "b", "prefix": "/", "upstream": "demo", "hosts": ["b.example"]},
        {"name": "c", "prefix": "/", "upstream": "demo"},
    ]
    assert len(load_config(write(tmp_path, certs, routes=routes)).routes) == 3


def test_prefix_without_trailing_slash_is_refused(certs: Certs, tmp_path: Path) -> None:
    err = error_for(tmp_path, certs, routes=[{"name": "a", "prefix": "/api", "upstream": "demo"}])
    assert err.key == "routes[0].prefix"


def test_unknown_zone_upstream_and_issuer_are_refused(certs: Certs, tmp_path: Path) -> None:
    r = {"name": "a", "prefix": "/", "upstream": "demo", "policy": {"zones": ["office"]}}
    assert error_for(tmp_path, certs, routes=[r]).key == "routes[0].policy.zones[0]"
    r = {"name": "a", "prefix": "/", "upstream": "nowhere"}
    assert error_for(tmp_path, certs, routes=[r]).key == "routes[0].upstream"
    r = {"name": "a", "prefix": "/", "upstream": "demo", "policy": {"issuers": ["corp"]}}
    assert error_for(tmp_path, certs, routes=[r]).key == "routes[0].policy.issuers"


def test_contradictions_are_refused(certs: Certs, tmp_path: Path) -> None:
    r = {"name": "a", "prefix": "/", "upstream": "demo", "policy": {"require_bound_token": True}}
    err = error_for(tmp_path, certs, routes=[r])
    assert err.key == "routes[0].policy.require_bound_token"
    assert (
        error_for(tmp_path, certs, {"forward_auth": {"enabled": True}}).key
        == "forward_auth.trusted_proxies"
    )


def test_bad_cidr_and_time_window_are_named(certs: Certs, tmp_path: Path) -> None:
    assert (
        error_for(tmp_path, certs, {"zones": {"corp": ["10.0.0.0/8", "10.0.0.300/8"]}}).key
        == "zones.corp[1]"
    )
    r = {
        "name": "a",
        "prefix": "/",
        "upstream": "demo",
        "policy": {"time_windows": ["weekdays 9-5"]},
    }
    assert error_for(tmp_path, certs, routes=[r]).key == "routes[0].policy.time_windows[0]"


def test_hmac_algorithm_for_an_issuer_is_refused(certs: Certs, tmp_path: Path) -> None:
    err = error_for(tmp_path, certs, {"issuers": {"dev": {"algorithms": ["HS256"]}}})
    assert err.key == "issuers.dev.algorithms"


def test_check_config_warns_about_missing_or_misplaced_audit_keys(
    certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", "-c", str(write(tmp_path, certs))]) == 0
    out = capsys.readouterr().out
    assert "mask_key_file is not set" in out
    assert "checkpoint_key_file is not set" in out
    beside = {"mask_key_file": str(tmp_path / "mask.key")}  # audit.db is in tmp_path too
    assert main(["check-config", "-c", str(write(tmp_path, certs, {"audit": beside}))]) == 0
    assert "is in the audit store's directory" in capsys.readouterr().out
    elsewhere = {
        "mask_key_file": str(tmp_path / "keys" / "mask.key"),
        "checkpoint_key_file": str(tmp_path / "keys" / "checkpoint.key"),
    }
    assert main(["check-config", "-c", str(write(tmp_path, certs, {"audit": elsewhere}))]) == 0
    assert "warning" not in capsys.readouterr().out


def test_audit_and_server_keys_are_checked(certs: Certs, tmp_path: Path) -> None:
    assert error_for(tmp_path, certs, {"audit": {"durability": "eventually"}}).key == (
        "audit.durability"
    )
    err = error_for(tmp_path, certs, {"server": {"min_ready_workers": 3, "workers": 2}})
    assert err.key == "server.min_ready_workers"
    cfg = load_config(write(tmp_path, certs, {"audit": {"checkpoint_key_file": "k/cp.key"}}))
    assert cfg.audit.checkpoint_public_keys == tmp_path / "k" / "cp.key.pub"
    assert cfg.audit.durability == "journal"


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[server\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)


def test_check_config_cli_reports_ok_and_errors(
    certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path, certs)
    assert main(["check-config", "-c", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = write(tmp_path, certs, {"server": {"bogus": 1}})
    assert main(["check-config", "-c", str(bad)]) == 2
    assert "server.bogus: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["gateway.toml", "gateway.example.toml"])
def test_repository_configs_are_valid(certs: Certs, tmp_path: Path, name: str) -> None:
    """The shipped configurations load (against a test PKI), so they never rot."""
    root = Path(__file__).resolve().parents[2]
    # Files the example names that the test PKI does not make: the IdP's secret and CA.
    (tmp_path / "oidc-client-secret").write_text("a-secret\n")
    (tmp_path / "oidc-client-secret-partners").write_text("another-secret\n")
    text = (root / "config" / name).read_text()
    text = text.replace(
        "../certs/oidc-client-secret-partners", f"{tmp_path}/oidc-client-secret-partners"
    )
    text = text.replace("../certs/oidc-client-secret", f"{tmp_path}/oidc-client-secret")
    text = text.replace("../certs/idp-ca.pem", str(certs.ca))
    text = text.replace("../certs/", f"{certs.dir}/")
    text = text.replace("../var/", f"{tmp_path}/")
    path = tmp_path / name
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.routes
    if name == "gateway.toml":
        assert {r.prefix for r in cfg.routes} >= {"/", "/api/", "/admin/"}


def test_a_bad_blocklist_line_is_a_config_error_naming_the_line(
    certs: Certs, tmp_path: Path
) -> None:
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("10.0.0.0/8\n# comment\n192.168.1.300\n")
    err = error_for(tmp_path, certs, {"risk": {"blocklist": str(blocklist)}})
    assert err.key == "risk.blocklist"
    assert f"{blocklist}:3" in err.message


def _webauthn_route(**session: Any) -> dict[str, Any]:
    return {"name": "a", "prefix": "/", "upstream": "demo", "session": session}


def test_webauthn_relying_party_comes_from_public_url_or_its_own_section(
    certs: Certs, tmp_path: Path
) -> None:
    # The base config's public_url is an address: no RP ID can be made from it.
    assert not load_config(write(tmp_path, certs)).webauthn.enabled
    named = {"server": {"public_url": "https://gw.example.com:8443"}}
    wa = load_config(write(tmp_path, certs, named)).webauthn
    assert (wa.rp_id, wa.origins, wa.enabled) == (
        "gw.example.com",
        ("https://gw.example.com:8443",),
        True,
    )
    own = {
        "webauthn": {
            "rp_id": "example.com",
            "origins": ["https://A.example.com:443/", "https://example.com:8443"],
        }
    }
    wa = load_config(write(tmp_path, certs, own)).webauthn
    assert (wa.rp_id, wa.origins) == (
        "example.com",
        ("https://a.example.com", "https://example.com:8443"),
    )


@pytest.mark.parametrize(
    ("section", "key", "message"),
    [
        ({"rp_id": "127.0.0.1", "origins": ["https://127.0.0.1"]}, "webauthn.rp_id", "domain"),
        ({"rp_id": "Example.com", "origins": ["https://example.com"]}, "webauthn.rp_id", "lower"),
        ({"rp_id": "example.com"}, "webauthn.origins", "origins"),
        (
            {"rp_id": "example.com", "origins": ["https://evil.test"]},
            "webauthn.origins[0]",
            "subdomain",
        ),
        (
            {"rp_id": "example.com", "origins": ["http://example.com"]},
            "webauthn.origins[0]",
            "https",
        ),
        (
            {"rp_id": "example.com", "origins": ["https://example.com/login"]},
            "webauthn.origins[0]",
            "nothing more",
        ),
        ({"user_verification": "always"}, "webauthn.user_verification", ""),
        ({"challenge_ttl": 5}, "webauthn.challenge_ttl", ""),
    ],
)
def test_webauthn_section_errors_name_the_key(
    certs: Certs, tmp_path: Path, section: dict[str, Any], key: str, message: str
) -> None:
    err = error_for(tmp_path, certs, {"webauthn": section})
    assert err.key == key and message in err.message
    assert str(tmp_path / "gw.toml") in str(err)


def test_step_up_factors_are_validated_with_their_route_and_key(
    certs: Certs, tmp_path: Path
) -> None:
    named = {"server": {"public_url": "https://gw.example.com"}}
    cfg = load_config(
        write(tmp_path, certs, named, routes=[_webauthn_route(step_up_factors=["webauthn"])])
    )
    assert cfg.routes[0].session.step_up_factors == ("webauthn",)
    either = load_config(
        write(
            tmp_path, certs, named, routes=[_webauthn_route(step_up_factors=["webauthn", "totp"])]
        )
    )
    assert either.routes[0].session.step_up_factors == ("totp", "webauthn")
    cases = [
        (_webauthn_route(step_up_factors=["sms"]), "routes[0].session.step_up_factors[0]"),
        (_webauthn_route(step_up_factors=[]), "routes[0].session.step_up_factors"),
        (_webauthn_route(step_up_factors=["totp", "totp"]), "routes[0].session.step_up_factors"),
        (
            _webauthn_route(require_user_verification=True),
            "routes[0].session.require_user_verification",
        ),
        (
            _webauthn_route(step_up_factors=["totp"], require_user_verification=True),
            "routes[0].session.require_user_verification",
        ),
    ]
    for route, key in cases:
        assert error_for(tmp_path, certs, named, routes=[route]).key == key
    # A route that takes only a security key needs a relying party (the base public_url is an
    # address, which cannot be an RP ID).
    err = error_for(tmp_path, certs, routes=[_webauthn_route(step_up_factors=["webauthn"])])
    assert err.key == "routes[0].session.step_up_factors" and "relying party" in err.message
