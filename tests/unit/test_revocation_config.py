"""The `[revocation]` section and the per-route `ocsp` failure mode: validated, errors named."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import Certs
from tests.unit.test_config import error_for, write
from ztgateway.config import load_config


def route(**policy: object) -> dict[str, object]:
    return {"name": "app", "prefix": "/", "upstream": "demo", "policy": policy}


def test_defaults_check_nothing_extra_and_routes_hard_fail(certs: Certs, tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, certs))
    assert not cfg.revocation.enabled
    assert all(r.policy.ocsp is None for r in cfg.routes)  # None: hard-fail


def test_a_route_chooses_soft_fail_when_ocsp_is_on(certs: Certs, tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            certs,
            {"revocation": {"ocsp": True, "crl_refresh_before": "30m"}},
            routes=[route(ocsp="soft-fail")],
        )
    )
    assert cfg.revocation.ocsp and cfg.revocation.crl_refresh_before == 1800
    assert cfg.routes[0].policy.ocsp == "soft-fail"


@pytest.mark.parametrize(
    ("revocation", "policy", "key", "says"),
    [
        ({"ocsp": True}, {"ocsp": "fail-open"}, "routes[0].policy.ocsp", "must be one of"),
        ({}, {"ocsp": "soft-fail"}, "routes[0].policy.ocsp", "needs [revocation] ocsp = true"),
        ({"crl_urls": ["ldap://ca/crl"]}, {}, "revocation.crl_urls[0]", "http:// or https://"),
        ({"ocsp_responder": "http://127.0.0.1/"}, {}, "revocation.ocsp_responder", "ocsp = false"),
        (
            {"ocsp": True, "ocsp_nonce": False, "ocsp_require_nonce": True},
            {},
            "revocation.ocsp_require_nonce",
            "needs ocsp_nonce",
        ),
        ({"crl_retry_interval": 0}, {}, "revocation.crl_retry_interval", "at least"),
        ({"ocsp_stapling": True}, {}, "revocation.ocsp_stapling", "unknown key"),
    ],
)
def test_bad_revocation_settings_are_named(
    certs: Certs,
    tmp_path: Path,
    revocation: dict[str, object],
    policy: dict[str, object],
    key: str,
    says: str,
) -> None:
    err = error_for(tmp_path, certs, {"revocation": revocation}, routes=[route(**policy)])
    assert err.key == key
    assert says in str(err)
