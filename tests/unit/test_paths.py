"""normalize_path and encode_path: the one path that policy sees and the upstream receives.

The contract (architecture guide §7.5): decode once, resolve dot-segments, collapse duplicate
slashes, and refuse what servers disagree about; then re-encode so that the upstream, decoding
once, gets back exactly the normalised path.
"""

from __future__ import annotations

from urllib.parse import unquote

import pytest

from ztgateway.request.paths import MAX_PATH_BYTES, PathError, encode_path, normalize_path

NORMALISED = [
    # already normal
    ("/", "/"),
    ("/echo", "/echo"),
    ("/a/b/c", "/a/b/c"),
    ("/a/b/", "/a/b/"),
    ("/api/", "/api/"),
    # duplicate slashes collapse
    ("//echo", "/echo"),
    ("//", "/"),
    ("/a//b///c", "/a/b/c"),
    ("/a/b//", "/a/b/"),
    # dot-segments resolve (RFC 3986 §5.2.4)
    ("/.", "/"),
    ("/./", "/"),
    ("/a/./b", "/a/b"),
    ("/a/../b", "/b"),
    ("/a/b/../../c", "/c"),
    ("/a/../echo", "/echo"),
    ("/a/b/..", "/a/"),
    ("/a/b/../", "/a/"),
    ("/a/..", "/"),
    ("/a/.", "/a/"),
    ("/a/b/.", "/a/b/"),
    ("/a/./../b/./c/.", "/b/c/"),
    # percent-encoded dots are dots: resolved after decoding, never passed on to be resolved
    ("/%2e/a", "/a"),
    ("/a/%2e%2e/b", "/b"),
    ("/a/%2E%2E/b", "/b"),
    ("/a/.%2e/b", "/b"),
    ("/a/%2e./b", "/b"),
    # segments that only look like dot-segments are ordinary names
    ("/a/...", "/a/..."),
    ("/a/..b", "/a/..b"),
    ("/a/b..", "/a/b.."),
    ("/.well-known/jwks.json", "/.well-known/jwks.json"),
    ("/a;b=c/d", "/a;b=c/d"),
    ("/a/b;v=1", "/a/b;v=1"),
    # percent-escapes decode exactly once
    ("/%65cho", "/echo"),
    ("/a%20b", "/a b"),
    ("/%25", "/%"),
    ("/100%25/x", "/100%/x"),
    ("/%252e%252e/x", "/%2e%2e/x"),
    ("/%252F", "/%2F"),
    ("/%255C", "/%5C"),
    ("/a%3Fb", "/a?b"),
    ("/a%23b", "/a#b"),
    # unicode: upper or lower-case escapes of the same UTF-8 bytes are the same path
    ("/caf%C3%A9", "/caf\u00e9"),
    ("/caf%c3%a9", "/caf\u00e9"),
    ("/caf\u00e9", "/caf\u00e9"),
    ("/%E2%9C%93/ok", "/\u2713/ok"),
    ("/%F0%9F%94%91", "/\U0001f511"),
    # characters RFC 3986 allows unescaped in a segment
    ("/a:b@c!$&'()*+,;=-._~", "/a:b@c!$&'()*+,;=-._~"),
]

REFUSED = [
    # not an origin-form path
    ("", "does not start"),
    ("echo", "does not start"),
    ("*", "does not start"),
    ("http://evil.example/echo", "does not start"),
    ("%2Fecho", "does not start"),
    # climbing above the root, plain or encoded
    ("/..", "climbs"),
    ("/../etc/passwd", "climbs"),
    ("/a/../../b", "climbs"),
    ("/%2e%2e/etc/passwd", "climbs"),
    ("/%2E%2E", "climbs"),
    ("/.%2E/", "climbs"),
    ("/a/%2e%2e/%2e%2e/b", "climbs"),
    ("//../x", "climbs"),
    # encoded slashes: one server splits on them, another does not
    ("/a%2Fb", "encoded slash"),
    ("/a%2fb", "encoded slash"),
    ("/a/..%2F..%2Fetc/passwd", "encoded slash"),
    # backslashes: IIS and some frameworks treat them as separators
    ("/a\\b", "backslash"),
    ("/\\..\\x", "backslash"),
    ("/a%5Cb", "backslash"),
    ("/a%5cb", "backslash"),
    ("/..%5c..%5cwindows", "backslash"),
    # NUL and control characters: C strings end early, log lines split
    ("/a%00b", "control"),
    ("/echo%00.html", "control"),
    ("/a\x00b", "control"),
    ("/a%0Ab", "control"),
    ("/a%0d%0aSet-Cookie:%20x=1", "control"),
    ("/a%09b", "control"),
    ("/a%1Fb", "control"),
    ("/a%7F", "control"),
    ("/a\x7fb", "control"),
    # malformed escapes
    ("/%", "malformed"),
    ("/%2", "malformed"),
    ("/a%zzb", "malformed"),
    ("/%u002e%u002e/x", "malformed"),
    ("/%%32%65", "malformed"),
    # not UTF-8: truncated, invalid, overlong ("%C0%AE" is an overlong "."), surrogates
    ("/%C3", "UTF-8"),
    ("/%FF", "UTF-8"),
    ("/%C0%AE%C0%AE/x", "UTF-8"),
    ("/%C0%AF", "UTF-8"),
    ("/%E0%80%AF", "UTF-8"),
    ("/%ED%A0%80", "UTF-8"),
    ("/\udcff", "UTF-8"),
    # dot-segments with path parameters: Tomcat strips ";..." and then resolves ".."
    ("/..;/admin", "path parameters"),
    ("/app/..;/admin", "path parameters"),
    ("/app/..;jsessionid=x/admin", "path parameters"),
    ("/app/.;/admin", "path parameters"),
    ("/app/%2e%2e;/admin", "path parameters"),
    ("/app/..%3B/admin", "path parameters"),
    # absurd lengths
    ("/" + "a" * MAX_PATH_BYTES, "too long"),
]


@pytest.mark.parametrize(("raw", "expected"), NORMALISED)
def test_path_is_normalised(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(("raw", "why"), REFUSED)
def test_path_servers_would_read_differently_is_refused(raw: str, why: str) -> None:
    with pytest.raises(PathError, match=why):
        normalize_path(raw)


def test_path_at_the_length_limit_is_accepted() -> None:
    raw = "/" + "a" * (MAX_PATH_BYTES - 1)
    assert normalize_path(raw) == raw


@pytest.mark.parametrize(("raw", "expected"), NORMALISED)
def test_normalising_is_idempotent_through_the_wire(raw: str, expected: str) -> None:
    """The upstream, normalising what we sent, arrives at the path policy saw."""
    wire = encode_path(normalize_path(raw))
    assert normalize_path(wire) == expected
    assert encode_path(normalize_path(wire)) == wire


@pytest.mark.parametrize(("raw", "expected"), NORMALISED)
def test_encoded_path_decodes_once_to_the_normalised_path(raw: str, expected: str) -> None:
    wire = encode_path(expected)
    assert unquote(wire) == expected
    assert wire.isascii()
    assert all(c not in wire for c in " ?#\\\x00")


@pytest.mark.parametrize(
    ("path", "wire"),
    [
        ("/echo", "/echo"),
        ("/a b", "/a%20b"),
        ("/caf\u00e9", "/caf%C3%A9"),
        ("/a?b", "/a%3Fb"),
        ("/a#b", "/a%23b"),
        ("/100%", "/100%25"),
        ("/%2e%2e/x", "/%252e%252e/x"),
        ('/a"b<c>', "/a%22b%3Cc%3E"),
        ("/a:b@c;d=e", "/a:b@c;d=e"),
        ("/x/", "/x/"),
    ],
)
def test_path_is_re_encoded_for_the_upstream(path: str, wire: str) -> None:
    assert encode_path(path) == wire


@pytest.mark.parametrize("raw", ["/caf%C3%A9", "/caf%c3%a9", "/caf\u00e9"])
def test_spellings_of_one_unicode_path_reach_the_upstream_identically(raw: str) -> None:
    assert encode_path(normalize_path(raw)) == "/caf%C3%A9"


def test_encoded_slash_can_be_allowed() -> None:
    assert normalize_path("/a%2Fb", allow_encoded_slash=True) == "/a/b"


@pytest.mark.parametrize("raw", ["/a/..%2F..%2Fetc", "/%2e%2e%2Fetc", "/x/..%2f..%2f..%2fetc"])
def test_allowed_encoded_slash_still_cannot_climb_above_the_root(raw: str) -> None:
    with pytest.raises(PathError, match="climbs"):
        normalize_path(raw, allow_encoded_slash=True)


def test_allowed_encoded_slash_does_not_allow_encoded_backslash() -> None:
    with pytest.raises(PathError, match="backslash"):
        normalize_path("/a%2F%5Cb", allow_encoded_slash=True)


# --- what the route's upstream would read differently (security review H2) -------------------
from ztgateway.request.paths import route_key, route_path_refusal, strip_path_params  # noqa: E402


@pytest.mark.parametrize(
    ("path", "stripped"),
    [
        ("/a;b=c/d", "/a/d"),
        ("/a/b;v=1", "/a/b"),
        ("/admin;jsessionid=x/echo", "/admin/echo"),
        ("/a;x;y/b;", "/a/b"),
        ("/plain/path", "/plain/path"),
    ],
)
def test_path_parameters_are_stripped_from_every_segment(path: str, stripped: str) -> None:
    assert strip_path_params(path) == stripped
    assert route_key(path) == stripped


def test_route_key_folds_case_only_for_case_insensitive_upstreams() -> None:
    assert route_key("/ADMIN;x/Echo") == "/ADMIN/Echo"
    assert route_key("/ADMIN;x/Echo", case_insensitive=True) == "/admin/echo"


@pytest.mark.parametrize(
    ("path", "options", "why"),
    [
        ("/a;b/c", {}, "path parameters"),
        ("/a/b;", {}, "path parameters"),
        ("/a/;x/b", {"allow_path_params": True}, "empty segment"),
        ("/;x", {"allow_path_params": True}, "empty segment"),
        # escapes that survive one decoding and turn into dots or separators at the next
        ("/%2e%2e/x", {}, "double"),
        ("/%2E/x", {}, "double"),
        ("/%2F", {}, "double"),
        ("/%5c", {}, "double"),
        ("/%3B", {}, "double"),
        ("/%3f", {}, "double"),
        ("/%23", {}, "double"),
        ("/%25", {}, "double"),
        ("/%00", {}, "double"),
        ("/%0a", {}, "double"),
        ("/%7F", {}, "double"),
        ("/%u002e", {}, "double"),
        ("/%U2215", {}, "double"),
        # Windows names on a case-insensitive upstream
        ("/admin./x", {"case_insensitive": True}, "Windows"),
        ("/admin /x", {"case_insensitive": True}, "Windows"),
        ("/x/web.config::$DATA", {"case_insensitive": True}, "Windows"),
        ("/PROGRA~1/x", {"case_insensitive": True}, "Windows"),
        ("/stra\u00dfe", {"case_insensitive": True}, "folds"),
        ("/\uff21dmin", {"case_insensitive": True}, "folds"),
        ("/e\u0301", {"case_insensitive": True}, "folds"),
    ],
)
def test_path_the_upstream_would_read_as_another_is_refused(
    path: str, options: dict[str, bool], why: str
) -> None:
    refusal = route_path_refusal(path, **options)
    assert refusal is not None and why in refusal


@pytest.mark.parametrize(
    ("path", "options"),
    [
        ("/a/b", {}),
        ("/a b/c", {}),
        ("/100%/x", {}),
        ("/%zz", {}),
        ("/%2", {}),
        ("/caf\u00e9", {"case_insensitive": True}),
        ("/ADMIN/Echo", {"case_insensitive": True}),
        ("/a;jsessionid=1/b;v=2", {"allow_path_params": True}),
        ("/%2e%2e/x", {"allow_double_encoding": True}),
        ("/a.b/c~d/e:f", {}),
        ("/.well-known/x", {"case_insensitive": True}),
        # lower() already folds the Kelvin sign to "k", so the route key matches "/kelvin"
        ("/\u212aelvin", {"case_insensitive": True}),
    ],
)
def test_path_every_upstream_reads_alike_is_accepted(path: str, options: dict[str, bool]) -> None:
    assert route_path_refusal(path, **options) is None
