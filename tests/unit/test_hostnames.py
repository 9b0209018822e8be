"""The names the gateway answers to (Host, SNI); anything else is misdirected (421)."""

from __future__ import annotations

from ztgateway.hostnames import ServerNames


def test_exact_wildcard_and_certificate_names() -> None:
    names = ServerNames(
        ["gw.example", "*.apps.example", "10.0.0.5"],
        lambda: frozenset({"cert.example", "*.wild.example", "::1"}),
    )
    for ok in ("gw.example", "GW.EXAMPLE.", "x.apps.example", "cert.example", "a.wild.example",
               "10.0.0.5", "[::1]", "[0:0::1]"):  # fmt: skip
        assert names.allows(ok), ok
    for bad in ("apps.example", "a.b.apps.example", "evil.example", "wild.example", "", "[::2]",
                "gw.example.evil", "10.0.0.6"):  # fmt: skip
        assert not names.allows(bad), bad


def test_sni_and_host_must_name_the_same_server() -> None:
    names = ServerNames(["a.example", "b.example"])
    assert names.refusal("a.example", None) is None
    assert names.refusal("a.example", "A.example.") is None
    refusal = names.refusal("b.example", "a.example")
    assert refusal is not None and "connection for" in refusal
    assert names.refusal("c.example", None) is not None
