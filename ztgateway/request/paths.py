"""Normalise the request path once, before routing and policy.

The path that policy saw is exactly the path forwarded (architecture guide §7.5): we decode
percent-escapes, resolve dot-segments (RFC 3986 §5.2.4), collapse duplicate slashes, and then
re-encode the result for the upstream. Inputs that different servers interpret differently are
refused instead of guessed at: encoded slashes (`%2F`), backslashes, NUL and other control
characters, invalid UTF-8, dot-segments that climb above the root, and dot-segments carrying
path parameters (`..;x`), which RFC 3986 leaves as plain segments but Tomcat and other servlet
containers resolve as `..` after stripping the parameters.

What is left is not ambiguous to RFC 3986, but common upstreams fold it further, so the route
table and policy must see the path *as the upstream will act on it* (`route_key`), and the
route decides which folding it accepts (`route_path_refusal`):

- path parameters (`/admin;jsessionid=x/echo`): Tomcat, Jetty and other servlet containers
  strip `;...` from every segment before mapping, so the route table matches on the stripped
  path and a route must opt in (`allow_path_params`) before a `;` reaches its upstream;
- a second percent-decoding (`%252e%252e`, `%252f`, `%255c`, `%u002e`): many frameworks and
  IIS decode again, turning data into dot-segments or separators; refused unless the route
  opts in (`allow_double_encoding`);
- case and Windows file-name folding (`/ADMIN/`, `/admin./`, `/admin::$DATA`, `/ADMINI~1/`):
  IIS and other case-insensitive servers; routes of an upstream marked `case_insensitive`
  match case-insensitively, and names such a server would fold are refused.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote, unquote_to_bytes

_ENCODED_SLASH = re.compile(r"%2[fF]")
_ENCODED_BACKSLASH = re.compile(r"%5[cC]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# RFC 3986 pchar minus "%" (we re-encode), plus "/" as the separator.
_SAFE = "/:@!$&'()*+,;=-._~"
MAX_PATH_BYTES = 8192
# In the *decoded* path: an escape that another decoding pass turns into a dot, a separator
# ("/", "\\", ";", "?", "#"), a "%" (a third pass), or a control character; and IIS's "%uXXXX".
_SECOND_DECODING = re.compile(
    r"%(?:2[eEfF3]|5[cC]|3[bBfF]|25|[01][0-9a-fA-F]|7[fF])|%[uU][0-9a-fA-F]{4}"
)
# Windows file names: a trailing dot or space is dropped, ":" names an alternate data stream
# ("admin.asp::$DATA"), "~<digit>" an 8.3 short name ("ADMINI~1").
_WINDOWS_FOLDED = re.compile(r"[. ]$|:|~[0-9]")


class PathError(ValueError):
    """The path cannot be normalised safely; `detail` is for the audit event only."""


def normalize_path(raw: str, *, allow_encoded_slash: bool = False) -> str:
    """Return the normalised, decoded path; raise PathError if it must be refused."""
    if not raw.startswith("/"):
        raise PathError("path does not start with '/'")
    if len(raw) > MAX_PATH_BYTES:
        raise PathError("path too long")
    if "\\" in raw or _ENCODED_BACKSLASH.search(raw):
        raise PathError("backslash in path")
    if _BAD_ESCAPE.search(raw):
        raise PathError("malformed percent-escape")
    if not allow_encoded_slash and _ENCODED_SLASH.search(raw):
        raise PathError("encoded slash in path")
    try:
        # Encode errors too: a str carrying lone surrogates (undecodable bytes smuggled in with
        # "surrogateescape") is not a path we can re-encode faithfully.
        decoded = unquote_to_bytes(raw).decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError) as exc:
        raise PathError("path is not valid UTF-8") from exc
    if _CONTROL.search(decoded):
        raise PathError("control character or NUL in path")
    if "\\" in decoded:
        raise PathError("backslash in path")
    return _resolve(decoded)


def _resolve(path: str) -> str:
    out: list[str] = []
    segments = path.split("/")
    for seg in segments[1:]:
        if seg in ("", "."):
            continue
        if ";" in seg and seg.partition(";")[0] in (".", ".."):
            # SECURITY: "/app/..;/admin" is "/admin" to Tomcat (path parameters are stripped
            # before dot-segments are resolved) but a plain segment to RFC 3986 and to us, so
            # policy would see "/app/..;/admin" while the upstream served "/admin".
            raise PathError("dot-segment with path parameters")
        if seg == "..":
            if not out:
                raise PathError("dot-segment climbs above the root")
            out.pop()
            continue
        out.append(seg)
    trailing = segments[-1] in ("", ".", "..") and len(segments) > 2
    result = "/" + "/".join(out)
    if trailing and out:
        result += "/"
    return result


def encode_path(path: str) -> str:
    """Re-encode a normalised path for the wire, so the upstream decodes what policy saw."""
    return quote(path, safe=_SAFE)


def strip_path_params(path: str) -> str:
    """The path without `;parameters` in any segment: what a servlet container maps."""
    if ";" not in path:
        return path
    return "/".join(seg.partition(";")[0] for seg in path.split("/"))


def route_key(path: str, *, case_insensitive: bool = False) -> str:
    """The path as the upstream acts on it, which routes and path policies are matched on."""
    path = strip_path_params(path)
    return path.lower() if case_insensitive else path


def route_path_refusal(
    path: str,
    *,
    allow_path_params: bool = False,
    allow_double_encoding: bool = False,
    case_insensitive: bool = False,
) -> str | None:
    """Why this route's upstream could read the normalised `path` as another path, or None.

    `path` is the output of `normalize_path` (decoded once, dot-segments resolved).
    """
    if ";" in path:
        if not allow_path_params:
            # SECURITY: Tomcat/Jetty strip ";..." from every segment (Shiro CVE-2020-1957,
            # Spring Security's StrictHttpFirewall refuses ";" by default for the same reason).
            return "path parameters"
        if any(seg.startswith(";") for seg in path.split("/")):
            # "/a/;x/../b" is "/a/b" to us but "/b" to a server that strips the parameters
            # first, then folds the empty segment, then resolves "..".
            return "path parameters on an empty segment"
    if "%" in path and not allow_double_encoding and _SECOND_DECODING.search(path):
        return "double percent-encoding"
    if case_insensitive:
        if unicodedata.normalize("NFKC", path).casefold() != path.lower():
            # What Windows or .NET folds beyond lower-casing ("ß", compatibility forms,
            # decomposed accents) would match a route we did not choose.
            return "characters a case-insensitive server folds"
        for seg in strip_path_params(path).split("/"):
            if seg and _WINDOWS_FOLDED.search(seg):
                return "Windows file-name alias (trailing dot or space, ':' or '~<digit>')"
    return None
