"""Where the gateway sends a browser: the one open-redirect guard, and the way to the sign-in.

The guard is its own module, importing nothing but the path normaliser, so that the OIDC client
(credentials/oidc.py), which the configuration imports, can ask it too without pulling the
portal's form handling (and with it the configuration) into an import circle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from ..request.paths import PathError, encode_path, normalize_path

if TYPE_CHECKING:
    from ..context import RequestContext

_QUERY_SAFE = "=&;:/?@!$'()*+,~-._%"


MAX_REDIRECT = 2048


def local_path(target: str | None) -> str | None:
    """THE open-redirect guard: `target` as a path on this origin, normalised and re-encoded,
    or None when it is not one. Every place that sends a browser on to a target it was given
    asks here: the portal's `rd` (`local_redirect`) and the sign-in's `return_to`
    (credentials/oidc.py `begin`, which takes only what this returns unchanged).

    Refused: anything not starting with one "/" ("//evil" and "/\\evil" are other hosts to a
    browser, which reads a backslash as a slash), a scheme, control characters (header
    splitting), a path the data plane's normaliser refuses (`%2F`, `%2e%2e` past the root), and
    more than 2048 characters. Normalising first means a check never sees one path and the
    browser another (`rd=/a%2520b` once decoded to a path with a space, which one check took
    and the other refused with an exception: issue 18, I4).
    """
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    if len(target) > MAX_REDIRECT or any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        return None
    path, _, query = target.partition("?")
    try:
        norm = normalize_path(path)
    except PathError:
        return None
    query = quote(query.partition("#")[0], safe=_QUERY_SAFE)
    local = encode_path(norm) + ("?" + query if query else "")
    # However the path was built, what a browser would read as another origin never leaves.
    parts = urlsplit(local)
    if (
        len(local) > MAX_REDIRECT
        or local.startswith("//")
        or parts.scheme
        or parts.netloc
        or any(ord(c) < 0x21 or ord(c) == 0x7F for c in local)
    ):
        return None
    return local


def local_redirect(target: str | None) -> str:
    """Where a form or sign-in may send the browser back to: `local_path`, or else "/"."""
    return local_path(target) or "/"


def login_redirect_to(target: str) -> str:
    """The sign-in page, coming back to `target` (a path on this origin) afterwards."""
    return "/.ztgw/login?rd=" + quote(target, safe="/")


def login_redirect(ctx: RequestContext) -> str:
    """The sign-in page, with the way back to what this request asked for."""
    return login_redirect_to((ctx.path or "/") + ("?" + ctx.query if ctx.query else ""))
