"""Several identity providers in the configuration: `[oidc.NAME]`, the single `[oidc]` form
kept, per-route `providers`, name spaces and callbacks that never collide. Every error names
the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import base_config
from tests.support import Certs, to_toml
from ztgateway.config import GatewayConfig, load_config
from ztgateway.configreader import ConfigError

ORIGIN = "https://gw.example.test:8443"


def provider(issuer: str, **extra: Any) -> dict[str, Any]:
    return {"issuer": issuer, "client_id": "ztgateway", "client_secret": "s3cret", **extra}


def two_providers(**over: Any) -> dict[str, Any]:
    return {
        "corp": provider("https://login.corp.example/", display_name="Corp account"),
        "partners": provider("https://idp.partners.example/"),
        **over,
    }


def load(
    tmp_path: Path,
    certs: Certs,
    oidc: dict[str, Any],
    routes: list[dict[str, Any]] | None = None,
    issuers: dict[str, Any] | None = None,
) -> GatewayConfig:
    cfg = base_config(certs, 9, tmp_path)
    cfg["server"]["public_url"] = ORIGIN
    cfg["oidc"] = oidc
    if routes is not None:
        cfg["routes"] = routes
    if issuers is not None:
        cfg["issuers"] = issuers
    path = tmp_path / "gw.toml"
    path.write_text(to_toml(cfg))
    return load_config(path)


def error(tmp_path: Path, certs: Certs, *args: Any, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, certs, *args, **kwargs)
    assert info.value.file == str(tmp_path / "gw.toml")
    return info.value


def route(**policy: Any) -> dict[str, Any]:
    return {"name": "app", "prefix": "/", "upstream": "demo", "policy": policy}


def test_the_single_oidc_form_is_one_provider_of_the_directory(
    certs: Certs, tmp_path: Path
) -> None:
    cfg = load(tmp_path, certs, {**provider("https://login.corp.example/"), "name": "corp-sso"})
    (p,) = cfg.oidc.providers
    assert p.name == "corp-sso" and cfg.oidc.provider is p
    # As before several providers: the directory's users, the one callback.
    assert p.user_namespace == "" and p.qualify("alice") == "alice"
    assert p.redirect_uri == ORIGIN + "/.ztgw/oidc/callback"
    assert p.accept_unlabelled


def test_the_single_oidc_form_keeps_its_default_name(certs: Certs, tmp_path: Path) -> None:
    cfg = load(tmp_path, certs, provider("https://login.corp.example/"))
    assert cfg.oidc.names == ("oidc",)


def test_named_providers_each_have_a_name_space_and_a_callback(
    certs: Certs, tmp_path: Path
) -> None:
    cfg = load(tmp_path, certs, {**two_providers(), "post_logout_path": "/bye"})
    corp, partners = cfg.oidc.providers
    assert cfg.oidc.names == ("corp", "partners") and cfg.oidc.post_logout_path == "/bye"
    assert (corp.label, partners.label) == ("Corp account", "partners")
    assert corp.redirect_uri == ORIGIN + "/.ztgw/oidc/callback/corp"
    assert partners.callback_path == "/.ztgw/oidc/callback/partners"
    # The same "alice" at two providers is two users (and "admins" two groups).
    assert corp.qualify("alice") == "corp:alice" != partners.qualify("alice")
    assert partners.qualify("admins") == "partners:admins"
    assert not corp.accept_unlabelled


def test_one_named_provider_may_speak_for_the_directory(certs: Certs, tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        certs,
        two_providers(corp=provider("https://login.corp.example/", user_namespace="")),
    )
    assert cfg.oidc.get("corp") is not None
    assert cfg.oidc.get("corp").qualify("alice") == "alice"  # type: ignore[union-attr]


def test_two_providers_speaking_for_the_directory_are_an_error(
    certs: Certs, tmp_path: Path
) -> None:
    err = error(
        tmp_path,
        certs,
        {
            "corp": provider("https://login.corp.example/", user_namespace=""),
            "partners": provider("https://idp.partners.example/", user_namespace=""),
        },
    )
    assert err.key == "oidc.partners.user_namespace"
    assert "'corp' and 'partners' would share the directory's users" in err.message


def test_two_providers_in_one_name_space_are_an_error(certs: Certs, tmp_path: Path) -> None:
    err = error(
        tmp_path,
        certs,
        two_providers(partners=provider("https://idp.partners.example/", user_namespace="corp")),
    )
    assert err.key == "oidc.partners.user_namespace"
    assert "user_namespace 'corp'" in err.message


def test_a_default_name_space_that_is_an_issuers_must_be_stated(
    certs: Certs, tmp_path: Path
) -> None:
    issuers = {
        "partner-api": {
            "issuer": "https://api.partners.example/",
            "audiences": ["ztgateway"],
            "jwks_file": str(certs.issuer_jwks),
            "user_namespace": "partners",
        }
    }
    err = error(tmp_path, certs, two_providers(), issuers=issuers)
    assert err.key == "oidc.partners.user_namespace"
    assert "issuer 'partner-api'" in err.message
    stated = two_providers(
        partners=provider("https://idp.partners.example/", user_namespace="partners")
    )
    assert load(tmp_path, certs, stated, issuers=issuers).oidc.names == ("corp", "partners")


def test_two_providers_with_one_callback_are_an_error(certs: Certs, tmp_path: Path) -> None:
    same = ORIGIN + "/.ztgw/oidc/callback/corp"
    err = error(
        tmp_path,
        certs,
        two_providers(partners=provider("https://idp.partners.example/", redirect_uri=same)),
    )
    assert err.key == "oidc.partners.redirect_uri"
    assert "RFC 9700" in err.message


def test_a_callback_the_gateway_does_not_answer_is_an_error(certs: Certs, tmp_path: Path) -> None:
    err = error(
        tmp_path,
        certs,
        two_providers(corp=provider("https://c.example/", redirect_uri=ORIGIN + "/callback")),
    )
    assert err.key == "oidc.corp.redirect_uri"


@pytest.mark.parametrize("name", ["Corp", "claims", "a b", "x" * 33])
def test_a_provider_name_is_a_label(certs: Certs, tmp_path: Path, name: str) -> None:
    err = error(tmp_path, certs, {name: provider("https://login.corp.example/")})
    assert err.key == f"oidc.{name}"
    assert "lower-case" in err.message


def test_keys_of_both_forms_mixed_are_an_error(certs: Certs, tmp_path: Path) -> None:
    err = error(tmp_path, certs, {**two_providers(), "client_id": "x"})
    assert err.key == "oidc.client_id"
    assert "[oidc.NAME]" in err.message


def test_a_named_providers_errors_name_its_table(certs: Certs, tmp_path: Path) -> None:
    err = error(tmp_path, certs, two_providers(partners={"issuer": "https://p.example/"}))
    assert err.key == "oidc.partners.client_secret"
    err = error(
        tmp_path, certs, two_providers(partners={**provider("https://p.example/"), "bogus": 1})
    )
    assert err.key == "oidc.partners.bogus" and "unknown key" in err.message
    err = error(
        tmp_path, certs, two_providers(partners={**provider("https://p.example/"), "name": "x"})
    )
    assert err.key == "oidc.partners.name"


def test_routes_name_the_providers_they_accept(certs: Certs, tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        certs,
        two_providers(),
        routes=[
            route(login="browsers", providers=["partners", "corp"]),
            {**route(login="always", providers=["corp"]), "name": "hr", "prefix": "/hr/"},
            {**route(login="always"), "name": "all", "prefix": "/all/"},
        ],
    )
    assert [r.policy.providers for r in cfg.routes] == [("partners", "corp"), ("corp",), ()]


def test_an_unknown_provider_on_a_route_is_an_error_naming_it(certs: Certs, tmp_path: Path) -> None:
    err = error(tmp_path, certs, two_providers(), routes=[route(providers=["corp", "google"])])
    assert err.key == "routes[0].policy.providers[1]"
    assert "unknown provider 'google'" in err.message and "corp, partners" in err.message


def test_providers_on_a_route_without_any_oidc_is_an_error(certs: Certs, tmp_path: Path) -> None:
    err = error(tmp_path, certs, {}, routes=[route(providers=["corp"])])
    assert err.key == "routes[0].policy.providers[0]"
    assert "none configured" in err.message


def test_an_empty_or_repeated_provider_list_is_an_error(certs: Certs, tmp_path: Path) -> None:
    err = error(tmp_path, certs, two_providers(), routes=[route(providers=[])])
    assert err.key == "routes[0].policy.providers"
    err = error(tmp_path, certs, two_providers(), routes=[route(providers=["corp", "corp"])])
    assert err.key == "routes[0].policy.providers[1]"
