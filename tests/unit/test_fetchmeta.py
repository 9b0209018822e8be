"""Fetch Metadata and Origin: who made a request, as a browser tells (security review M2)."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from ztgateway.request.fetchmeta import (
    ambient_refusal,
    cross_site_refusal,
    own_origin,
    read,
    websocket_origin_refusal,
)

HOST = "gw.example:8443"


def headers(**kw: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in kw.items()}))


def fetch(method: str = "GET", html: bool = False, **kw: str):  # type: ignore[no-untyped-def]
    return read(method, headers(**kw), HOST, html)


def test_own_origin_is_the_host_header_as_a_browser_serialises_it() -> None:
    assert own_origin("gw.example:8443") == "https://gw.example:8443"
    assert own_origin("GW.example:443") == "https://gw.example"
    # As the browser addressed it: a trailing dot is part of its origin too.
    assert own_origin("gw.example.") == "https://gw.example."


def test_fetch_metadata_makes_a_browser_whatever_the_accept_header() -> None:
    f = fetch(Sec_Fetch_Site="same-origin", Sec_Fetch_Mode="cors", Sec_Fetch_Dest="empty")
    assert f.browser and not f.navigation and not f.cross_site
    assert not fetch().browser  # curl, an API client
    legacy = fetch(html=True)  # an old browser's navigation
    assert legacy.browser and legacy.navigation


@pytest.mark.parametrize(
    ("kw", "cross"),
    [
        ({"Sec_Fetch_Site": "cross-site"}, True),
        ({"Sec_Fetch_Site": "same-site"}, True),
        ({"Sec_Fetch_Site": "same-origin"}, False),
        ({"Sec_Fetch_Site": "none"}, False),
        # Sec-Fetch-Site wins over Origin: under Referrer-Policy no-referrer a same-origin
        # form post says Origin: null.
        ({"Sec_Fetch_Site": "same-origin", "Origin": "null"}, False),
        ({"Origin": "https://gw.example:8443"}, False),
        ({"Origin": "https://evil.example"}, True),
        ({"Origin": "https://gw.example"}, True),  # another port is another origin
        ({"Origin": "http://gw.example:8443"}, True),
        ({"Origin": "null"}, True),
        ({}, False),
    ],
)
def test_cross_site_is_read_from_sec_fetch_site_then_origin(
    kw: dict[str, str], cross: bool
) -> None:
    assert fetch("POST", **kw).cross_site is cross


@pytest.mark.parametrize(
    ("method", "kw", "mode", "refused"),
    [
        ("GET", {"Sec_Fetch_Mode": "navigate", "Sec_Fetch_Dest": "document"}, "lax", False),
        ("HEAD", {"Sec_Fetch_Mode": "navigate", "Sec_Fetch_Dest": "document"}, "lax", False),
        ("GET", {"Sec_Fetch_Mode": "navigate", "Sec_Fetch_Dest": "iframe"}, "lax", True),
        ("GET", {"Sec_Fetch_Mode": "no-cors", "Sec_Fetch_Dest": "image"}, "lax", True),
        ("GET", {"Sec_Fetch_Mode": "cors", "Sec_Fetch_Dest": "empty"}, "lax", True),
        ("OPTIONS", {"Sec_Fetch_Mode": "cors", "Sec_Fetch_Dest": "empty"}, "lax", True),
        ("POST", {"Sec_Fetch_Mode": "navigate", "Sec_Fetch_Dest": "document"}, "lax", True),
        # "strict" lets the navigation through to be decided on its identity (ambient_refusal)
        ("GET", {"Sec_Fetch_Mode": "navigate", "Sec_Fetch_Dest": "document"}, "strict", False),
        ("GET", {"Sec_Fetch_Mode": "navigate", "Sec_Fetch_Dest": "iframe"}, "strict", True),
        ("GET", {"Sec_Fetch_Mode": "no-cors", "Sec_Fetch_Dest": "image"}, "strict", True),
        ("GET", {"Sec_Fetch_Mode": "no-cors", "Sec_Fetch_Dest": "image"}, "safe-methods", False),
        ("POST", {"Sec_Fetch_Mode": "no-cors", "Sec_Fetch_Dest": "empty"}, "safe-methods", True),
        ("PUT", {"Sec_Fetch_Mode": "cors", "Sec_Fetch_Dest": "empty"}, "safe-methods", True),
        ("DELETE", {"Sec_Fetch_Mode": "cors", "Sec_Fetch_Dest": "empty"}, "safe-methods", True),
    ],
)
def test_route_modes_and_never_unsafe_methods_from_another_site(
    method: str, kw: dict[str, str], mode: str, refused: bool
) -> None:
    f = fetch(method, Sec_Fetch_Site="cross-site", **kw)
    assert (cross_site_refusal(method, f, mode) is not None) is refused


def test_under_strict_the_certificate_alone_never_identifies_a_cross_site_navigation() -> None:
    nav = {"Sec_Fetch_Mode": "navigate", "Sec_Fetch_Dest": "document"}
    assert ambient_refusal(fetch(Sec_Fetch_Site="cross-site", **nav), "strict") is not None
    assert ambient_refusal(fetch(Sec_Fetch_Site="cross-site", **nav), "lax") is None
    assert ambient_refusal(fetch(Sec_Fetch_Site="same-origin", **nav), "strict") is None
    assert ambient_refusal(fetch(Sec_Fetch_Site="none", **nav), "strict") is None


def test_same_origin_requests_are_never_refused() -> None:
    f = fetch("DELETE", Sec_Fetch_Site="same-origin", Sec_Fetch_Mode="cors")
    assert cross_site_refusal("DELETE", f, "strict") is None


@pytest.mark.parametrize(
    ("origin", "refused"),
    [
        (None, False),  # not a browser
        ("https://gw.example:8443", False),
        ("https://portal.example", False),  # listed by the route
        ("https://evil.example", True),
        ("null", True),
        ("https://gw.example", True),
    ],
)
def test_websocket_origin_must_be_ours_or_listed(origin: str | None, refused: bool) -> None:
    h = headers(Origin=origin) if origin else headers()
    got = websocket_origin_refusal(h, HOST, frozenset({"https://portal.example"}))
    assert (got is not None) is refused
