"""The checks every state-changing request to the gateway's own endpoints passes (portal/forms.py), and
the keys they and the sign-in are made with (keys.py)."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
from pathlib import Path

import pytest

from ztgateway.config import KeysConfig
from ztgateway.context import RequestContext
from ztgateway.decision import Reason
from ztgateway.keys import GatewayKeys, create_private_file, load_root_key
from ztgateway.portal.forms import CSRF_TTL, CSRFTokens, cross_site, parse_form
from ztgateway.portal.redirect import local_path, local_redirect

NOW = 1_800_000_000.0
PUBLIC = "https://gw.example"


def ctx(**headers: str) -> RequestContext:
    return RequestContext.synthetic(method="POST", headers={"Host": "gw.example", **headers})


@pytest.mark.parametrize(
    "headers",
    [
        {},  # not a browser
        {"Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},
        {"Origin": "https://gw.example"},
        {"Origin": "https://GW.example", "Sec-Fetch-Site": "same-origin"},
        {"Origin": "null", "Sec-Fetch-Site": "same-origin"},  # Chromium under no-referrer
    ],
)
def test_requests_from_this_gateway_or_no_browser_pass(headers: dict[str, str]) -> None:
    assert cross_site(ctx(**headers), PUBLIC) is None


def test_the_origin_may_be_the_host_the_browser_addressed_or_the_public_url() -> None:
    addressed = RequestContext.synthetic(headers={"Host": "127.0.0.1:8443", "Origin": PUBLIC})
    assert cross_site(addressed, PUBLIC) is None
    own = RequestContext.synthetic(
        headers={"Host": "127.0.0.1:8443", "Origin": "https://127.0.0.1:8443"}
    )
    assert cross_site(own, "") is None
    default_port = RequestContext.synthetic(
        headers={"Host": "gw.example:443", "Origin": "https://gw.example"}
    )
    assert cross_site(default_port, "") is None


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # a sibling host is not this origin
        {"Sec-Fetch-Site": "cross-site", "Origin": "https://gw.example"},
        {"Origin": "https://evil.example"},
        {"Origin": "http://gw.example"},  # another scheme is another origin
        {"Origin": "https://gw.example:444"},
        {"Origin": "null"},  # an opaque origin: a sandboxed frame, a data: URL
        {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
    ],
)
def test_requests_another_site_started_are_refused(headers: dict[str, str]) -> None:
    refusal = cross_site(ctx(**headers), PUBLIC)
    assert refusal is not None and refusal.reason is Reason.ORIGIN_MISMATCH


def test_csrf_tokens_bind_purpose_device_session_and_time() -> None:
    tokens = CSRFTokens(b"k" * 32)
    token = tokens.issue("logout", "fp:session", NOW)
    assert tokens.valid(token, "logout", "fp:session", NOW + CSRF_TTL)
    assert not tokens.valid(token, "logout", "fp:session", NOW + CSRF_TTL + 1), "expired"
    assert not tokens.valid(token, "enroll", "fp:session", NOW), "another form"
    assert not tokens.valid(token, "logout", "fp:other", NOW), "another session or device"
    assert not CSRFTokens(b"j" * 32).valid(token, "logout", "fp:session", NOW), "another key"
    ahead = tokens.issue("logout", "fp:session", NOW + 3600)
    assert not tokens.valid(ahead, "logout", "fp:session", NOW), "stamped in the future"


ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")


@pytest.mark.parametrize(
    "forged",
    [
        "",
        ".",
        "abc",
        f"{int(NOW)}.",
        f"{int(NOW)}.{'0' * 31}",
        f"{int(NOW)}.{'g' * 32}",
        f"{int(NOW)}.{'0' * 32}x",
        # Digits of another script: `str.isdigit()` and `int()` take them, and
        # `hmac.compare_digest` raised TypeError on the non-ASCII text (issue 18, I4).
        str(int(NOW)).translate(ARABIC_INDIC) + "." + "0" * 32,
        "１" * 10 + "." + "0" * 32,
        f"{int(NOW)}.{'é' * 32}",
        "9" * 400 + "." + "0" * 32,
    ],
)
def test_malformed_csrf_tokens_are_invalid_never_an_error(forged: str) -> None:
    assert CSRFTokens(b"k" * 32).valid(forged, "logout", "fp:-", NOW) is False


def test_forms_with_a_field_twice_or_bad_bytes_are_not_forms() -> None:
    assert parse_form(b"csrf=a&code=1") == {"csrf": "a", "code": "1"}
    assert parse_form(b"csrf=a&csrf=b") is None
    assert parse_form(b"code=\xff\xfe") is None
    assert parse_form(b"&".join(b"f%d=1" % i for i in range(50))) is None


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/admin/echo", "/admin/echo"),
        ("/a%2520b", "/a%2520b"),  # what `rd=/a%2520b` arrives as once the query is decoded
        ("/a b", "/a%20b"),
        ("/a?x=1 2", "/a?x=1%202"),
        ("/é", "/%C3%A9"),
        ("/a/../b?x=1", "/b?x=1"),
        ("//evil.example", "/"),
        ("/\\evil.example", "/"),
        ("https://evil.example", "/"),
        ("/%2e%2e/etc", "/"),
        ("/a\r\nSet-Cookie: x", "/"),
        ("/" + "a" * 3000, "/"),
        (None, "/"),
    ],
)
def test_redirect_targets_are_paths_on_this_origin_the_sign_in_accepts(
    target: str | None, expected: str
) -> None:
    got = local_redirect(target)
    assert got == expected
    # Normal already: what the sign-in's begin() takes unchanged.
    assert local_path(got) == got


class OneStore:
    def __init__(self) -> None:
        self.value: str | None = None

    async def shared_secret(self, name: str, candidate: str) -> str:
        if self.value is None:
            self.value = candidate
        return self.value


async def test_the_root_key_comes_from_the_environment_a_file_or_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = OneStore()
    one, source = await load_root_key(KeysConfig(), store)
    again, _ = await load_root_key(KeysConfig(), store)
    assert source == "store" and one == again and len(one) == 32
    path = tmp_path / "keys" / "gateway.key"
    from_file, source = await load_root_key(KeysConfig(file=path), store)
    assert source == "file" and from_file != one
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (await load_root_key(KeysConfig(file=path), store))[0] == from_file
    key = base64.b64encode(b"e" * 32).decode()
    monkeypatch.setenv("ZTGW_GATEWAY_KEY", key)
    assert await load_root_key(KeysConfig(file=path), store) == (b"e" * 32, "env")
    monkeypatch.setenv("ZTGW_GATEWAY_KEY", "c2hvcnQ=")
    with pytest.raises(ValueError, match="32 bytes"):
        await load_root_key(KeysConfig(), store)


async def test_workers_creating_the_key_file_together_all_read_one_whole_key(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gateway.key"
    won = await asyncio.gather(
        *[
            asyncio.to_thread(create_private_file, path, os.urandom(8).hex().encode())
            for _ in range(16)
        ]
    )
    assert won.count(True) == 1
    assert len(path.read_bytes()) == 16 and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_purpose_keys_differ_and_the_assertion_key_is_the_same_in_every_process() -> None:
    keys = GatewayKeys.from_root(b"r" * 32)
    assert len({keys.csrf, keys.oidc_login}) == 2
    one, two = keys.assertion_key(), GatewayKeys.from_root(b"r" * 32).assertion_key()
    assert one.private_numbers() == two.private_numbers()
    other = GatewayKeys.from_root(b"s" * 32).assertion_key()
    assert other.private_numbers() != one.private_numbers()
    assert "r" * 8 not in repr(keys)
