"""Normalise the request path once, before routing and policy.

The path that policy saw is exactly the path forwarded (architecture guide §7.5): we decode
percent-escapes, resolve dot-segments (RFC 3986 §5.2.4), collapse duplicate slashes, and then
re-encode the result for the upstream. Inputs that different servers interpret differently are
refused instead of guessed at: encoded slashes (`%2F`), backslashes, NUL and other control
characters, invalid UTF-8, dot-segments that climb above the root, and dot-segments carrying
path parameters (`..;x`), which RFC 3986 leaves as plain segments but Tomcat and other servlet
containers resolve as `..` after stripping the parameters.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote_to_bytes

_ENCODED_SLASH = re.compile(r"%2[fF]")
_ENCODED_BACKSLASH = re.compile(r"%5[cC]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# RFC 3986 pchar minus "%" (we re-encode), plus "/" as the separator.
_SAFE = "/:@!$&'()*+,;=-._~"
MAX_PATH_BYTES = 8192


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
