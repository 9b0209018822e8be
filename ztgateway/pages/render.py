"""Templates to pages: one skeleton (`templates/base.html`), one stylesheet, autoescaping on.

Every template is rendered by one jinja2 Environment with `autoescape=True` for every file,
whatever its extension, and `StrictUndefined`, so a value is escaped unless a template marks it
trusted (`Markup`, which only this package builds) and a misspelt name is an error in the
tests rather than an empty string on a page. The environment is built once per process and
holds nothing per request; the branding comes in with each rendering (a reload changes it).

The pages load their stylesheet and logo from `/.ztgw/static/` under names that carry a hash of
their content (cached for a year, never stale), so the Content-Security-Policy allows styles
and images from this origin only: no `'unsafe-inline'`, no other host.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from importlib import resources
from typing import Any

import jinja2
from markupsafe import Markup

from .. import SERVER_BANNER
from .branding import DEFAULT_ACCENT, PortalConfig

STATIC_PREFIX = "/.ztgw/static/"
DECISION_HEADER = "X-ZT-Decision-Id"


@functools.cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("ztgateway.pages", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )


def template_names() -> list[str]:
    return sorted(environment().list_templates(extensions=["html"]))


@functools.cache
def _base_stylesheet() -> str:
    return (resources.files("ztgateway.pages") / "static" / "portal.css").read_text("utf-8")


@functools.cache
def stylesheet(accent: str) -> bytes:
    """The stylesheet with the operator's accent colour (validated `#rrggbb`)."""
    return _base_stylesheet().replace(f"--accent:{DEFAULT_ACCENT}", f"--accent:{accent}").encode()


def stylesheet_path(look: PortalConfig) -> str:
    return _stylesheet_path(look.accent)


@functools.cache
def _stylesheet_path(accent: str) -> str:
    tag = hashlib.sha256(stylesheet(accent)).hexdigest()[:12]
    return f"{STATIC_PREFIX}portal-{tag}.css"


def static_asset(path: str, look: PortalConfig) -> tuple[bytes, str] | None:
    """The stylesheet or logo at `path` (exactly the current names), or None."""
    if path == stylesheet_path(look):
        return stylesheet(look.accent), "text/css; charset=utf-8"
    if look.logo is not None and path == look.logo.path:
        return look.logo.content, look.logo.media_type
    return None


def static_headers(media_type: str) -> list[tuple[str, str]]:
    return [
        ("Content-Type", media_type),
        ("Cache-Control", "public, max-age=31536000, immutable"),
        ("X-Content-Type-Options", "nosniff"),
        # An SVG logo opened on its own must not run anything (it is only ever an <img>).
        ("Content-Security-Policy", "default-src 'none'; sandbox"),
        ("Server", SERVER_BANNER),
    ]


def content_security_policy(form_targets: Iterable[str] = (), *, scripts: bool = False) -> str:
    """`scripts`: the page loads the gateway's own script (the WebAuthn ceremonies), so
    scripts and fetches from this origin are allowed; never inline ones."""
    targets = " ".join(("'self'", *form_targets))
    script = "script-src 'self'; connect-src 'self'; " if scripts else ""
    return (
        f"default-src 'none'; {script}style-src 'self'; img-src 'self' data:; "
        f"form-action {targets}; frame-ancestors 'none'; base-uri 'none'"
    )


def page_headers(
    decision_id: str, form_targets: Iterable[str] = (), *, scripts: bool = False
) -> list[tuple[str, str]]:
    """The headers of every page: never cached, never framed, no other origin's resources."""
    return [
        ("Content-Type", "text/html; charset=utf-8"),
        (DECISION_HEADER, decision_id),
        ("Server", SERVER_BANNER),
        ("Cache-Control", "no-store"),
        ("Content-Security-Policy", content_security_policy(form_targets, scripts=scripts)),
        ("X-Frame-Options", "DENY"),
        ("X-Content-Type-Options", "nosniff"),
        # same-origin, not no-referrer: under no-referrer a browser sends "Origin: null" on
        # the portal's own form posts (Fetch §3.1); other origins still get no Referer.
        ("Referrer-Policy", "same-origin"),
    ]


def render(
    template: str,
    look: PortalConfig,
    *,
    title: str,
    decision_id: str,
    status: int = 200,
    scripts: tuple[str, ...] = (),
    **values: Any,
) -> str:
    """One page: `template` (which extends base.html) with the branding and `values`;
    `scripts`: the gateway's own scripts the page loads (from this origin, never inline)."""
    page = environment().get_template(template)
    return page.render(
        brand=look,
        stylesheet=stylesheet_path(look),
        title=title,
        decision_id=decision_id,
        status=status,
        scripts=scripts,
        **values,
    )


def trusted(html: str) -> Markup:
    """HTML the gateway built itself (a QR code SVG, a caller's page body): not escaped again."""
    return Markup(html)  # noqa: S704 - only for markup the gateway generated
