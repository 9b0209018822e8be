"""`[portal]`: the organisation's name, logo, colour and support contact on every page.

Validated at start-up like every other section (errors name the file and the key): a logo
must be a PNG, JPEG, WebP or SVG file of at most 256 KiB (it is served by the gateway itself,
from `/.ztgw/static/`, so pages keep `default-src 'none'` and load nothing from elsewhere); an
e-mail address must look like one; a support URL must be http(s); the accent colour is
`#rrggbb` and must keep white button text readable (WCAG 2.2 §1.4.3: contrast of at least 4.5:1).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..configreader import Table

MAX_LOGO_BYTES = 256 * 1024
DEFAULT_ACCENT = "#0b57d0"
_EMAIL = re.compile(r"[^@\s<>\"']{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253})\.[A-Za-z]{2,63}")
_COLOUR = re.compile(r"#[0-9a-fA-F]{6}")
_LOGO_TYPES = (
    (b"\x89PNG\r\n\x1a\n", "image/png", "png"),
    (b"\xff\xd8\xff", "image/jpeg", "jpg"),
)


@dataclass(frozen=True, slots=True)
class Logo:
    content: bytes
    media_type: str
    extension: str

    @property
    def path(self) -> str:
        """Where the page finds it; the content hash in the name lets browsers cache it for
        good and still see a new logo after a reload."""
        tag = hashlib.sha256(self.content).hexdigest()[:12]
        return f"/.ztgw/static/logo-{tag}.{self.extension}"


@dataclass(frozen=True, slots=True)
class PortalConfig:
    name: str = "ztgateway"
    """Shown in every page's header and title: the organisation or the service."""
    logo: Logo | None = None
    logo_alt: str = ""
    accent: str = DEFAULT_ACCENT
    support_email: str = ""
    support_url: str = ""
    support_text: str = ""
    """How people reach help besides e-mail and the web ("IT service desk, ext. 4455")."""

    @property
    def has_support(self) -> bool:
        return bool(self.support_email or self.support_url or self.support_text)


def _sniff(content: bytes) -> tuple[str, str] | None:
    for magic, media_type, ext in _LOGO_TYPES:
        if content.startswith(magic):
            return media_type, ext
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        return "image/webp", "webp"
    head = content[:1024].lstrip().lower()
    if head.startswith((b"<svg", b"<?xml")) and b"<svg" in head:
        return "image/svg+xml", "svg"
    return None


def _luminance(colour: str) -> float:
    def channel(c: int) -> float:
        s = c / 255
        return s / 12.92 if s <= 0.04045 else ((s + 0.055) / 1.055) ** 2.4

    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def contrast_with_white(colour: str) -> float:
    """WCAG 2.2 contrast ratio of white text on `colour`."""
    return 1.05 / (_luminance(colour) + 0.05)


def parse_portal(t: Table) -> PortalConfig:
    name = t.text("name", "ztgateway").strip()
    if not name or len(name) > 80:
        t.fail("name", "must be 1 to 80 characters")
    logo = None
    logo_path = t.path("logo")
    if logo_path is not None:
        try:
            content = logo_path.read_bytes()
        except OSError as exc:
            t.fail("logo", f"cannot read {logo_path}: {exc.strerror or exc}")
        if len(content) > MAX_LOGO_BYTES:
            t.fail("logo", f"{logo_path} is {len(content)} bytes; at most {MAX_LOGO_BYTES}")
        kind = _sniff(content)
        if kind is None:
            t.fail("logo", f"{logo_path} is not a PNG, JPEG, WebP or SVG image")
        logo = Logo(content, *kind)
    accent = t.text("accent", DEFAULT_ACCENT)
    if not _COLOUR.fullmatch(accent):
        t.fail("accent", f"must be a colour like #0b57d0, not {accent!r}")
    if contrast_with_white(accent) < 4.5:
        t.fail(
            "accent",
            f"{accent} is too light for white button text "
            f"(contrast {contrast_with_white(accent):.1f}:1, needs 4.5:1)",
        )
    email = t.text("support_email", "").strip()
    if email and not _EMAIL.fullmatch(email):
        t.fail("support_email", f"not an e-mail address: {email!r}")
    url = t.text("support_url", "").strip()
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.netloc:
            t.fail("support_url", f"must be an http(s) URL, not {url!r}")
    text = t.text("support_text", "").strip()
    if len(text) > 200:
        t.fail("support_text", "at most 200 characters")
    cfg = PortalConfig(
        name=name,
        logo=logo,
        logo_alt=t.text("logo_alt", name),
        accent=accent.lower(),
        support_email=email,
        support_url=url,
        support_text=text,
    )
    t.done()
    return cfg


DEFAULT_LOOK = PortalConfig()
"""The look without any `[portal]` settings (frozen: shared safely)."""
