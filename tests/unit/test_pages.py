"""The portal's pages: one skeleton, autoescaping in every template, branding, words for
posture checks, session-end reasons and lock times in the person's terms."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from tests.support import Certs
from tests.unit.test_config import error_for, write
from ztgateway.config import load_config
from ztgateway.context import LockView, RequestContext, SessionView
from ztgateway.decision import Decision, Finding, Reason, Verdict
from ztgateway.portal.branding import Logo, PortalConfig, contrast_with_white
from ztgateway.portal.posture_text import CHECKS, check_text
from ztgateway.portal.render import (
    content_security_policy,
    environment,
    page_headers,
    render,
    static_asset,
    stylesheet_path,
    template_names,
    trusted,
)
from ztgateway.portal.session_end import ENDED, ended_code, ended_text
from ztgateway.portal.when import until, zone
from ztgateway.responses import problem_parts
from ztgateway.responses import render as render_refusal
from ztgateway.risk.posture import REMEDIATION, PosturePolicy, evaluate

EVIL = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
LOOK = PortalConfig(
    name="Acme Corp",
    support_email="help@acme.test",
    support_url="https://help.acme.test/access",
    support_text="the service desk (ext. 4455)",
)
# 2026-03-02 09:00 UTC: a fixed instant given to the code, never compared with "now".
NOW = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC).timestamp()


def _check(name: str, passed: bool) -> Any:
    from ztgateway.risk.posture import CheckResult

    return check_text(CheckResult(name, passed, EVIL, EVIL))


def _form() -> dict[str, Any]:
    return {
        "action": EVIL,
        "hidden": {"csrf": EVIL, "rd": EVIL},
        "label": EVIL,
        "button": EVIL,
        "error": EVIL,
    }


# Values for every template, each carrying markup where a person or an identity provider
# could have put some (claims, device ids, paths, reasons, details).
SAMPLES: dict[str, dict[str, Any]] = {
    "refusal.html": {
        "advice": EVIL,
        "ask_support": True,
        "detail": EVIL,
        "lock_ends": EVIL,
        "reason": EVIL,
        "continue_url": "/x" + EVIL,
        "continue_label": EVIL,
    },
    "sign_in.html": {
        "ended": EVIL,
        "device": EVIL,
        "known_device": False,
        "providers": [(EVIL, "/.ztgw/login/start?rd=" + EVIL), (EVIL, "/x")],
        "rd": EVIL,
    },
    "sign_in_failed.html": {"reason": EVIL},
    "sign_in_unavailable.html": {"provider": EVIL, "rd_query": EVIL},
    "sign_out.html": {"csrf": EVIL},
    "signed_out.html": {},
    "whoami.html": {
        "you": [("User", EVIL), ("Groups", EVIL)],
        "device": [("Device", EVIL)],
        "risk": [(EVIL, EVIL)],
        "risk_score": EVIL,
        "session": [("Started", EVIL)],
        "times_in": EVIL,
    },
    "device.html": {
        "device_id": EVIL,
        "state": EVIL,
        "owner": EVIL,
        "failed": [_check("firewall", False)],
        "checks": [_check("firewall", False), _check("jailbroken", True)],
        "reported": EVIL,
        "rd": "/" + EVIL,
        "rd_query": EVIL,
    },
    "step_up.html": {
        "why": EVIL,
        "form": _form(),
        "lock_ends": EVIL,
        "key_section": {"csrf": EVIL, "rd": EVIL, "ceremony": "authenticate"},
        "totp": True,
    },
    "enrol_start.html": {"error": EVIL, "hidden": {"csrf": EVIL, "rd": EVIL}},
    "enrol_pending.html": {
        "qr": trusted("<svg></svg>"),
        "uri": "otpauth://totp/" + EVIL,
        "secret": EVIL,
        "secret_grouped": EVIL,
        "minutes": 3,
        "form": _form(),
    },
    "enrol_replace.html": {"form": _form()},
    "enrolled.html": {"codes": [EVIL, EVIL], "rd": "/" + EVIL},
    "security_keys.html": {
        "keys": [{"name": EVIL, "added": EVIL, "last_used": EVIL}],
        "step_up": None,
        "key": {"csrf": EVIL, "rd": EVIL, "ceremony": "register"},
        "rd": "/" + EVIL,
    },
}


def test_every_template_has_sample_values_here() -> None:
    """A new template must join SAMPLES, so the autoescaping test covers it."""
    pages = [t for t in template_names() if not t.startswith("_") and t != "base.html"]
    assert sorted(pages) == sorted(SAMPLES)


@pytest.mark.parametrize("template", sorted(SAMPLES))
def test_every_template_escapes_what_it_shows(template: str) -> None:
    evil_look = PortalConfig(name=EVIL, support_text=EVIL, support_email="a@b.test")
    html = render(template, evil_look, title=EVIL, decision_id=EVIL, **SAMPLES[template])
    assert "<script>" not in html
    assert html.count(ESCAPED) >= 3  # title twice, and a value
    assert html.startswith("<!doctype html>")


@pytest.mark.parametrize("template", sorted(SAMPLES))
def test_every_page_is_the_one_skeleton_with_the_one_stylesheet(template: str) -> None:
    html = render(template, LOOK, title="T", decision_id="d-1", **SAMPLES[template])
    assert html.count('<link rel="stylesheet"') == 1
    assert f'href="{stylesheet_path(LOOK)}"' in html
    assert 'name="viewport" content="width=device-width, initial-scale=1"' in html
    assert "<style" not in html and " style=" not in html  # nothing for 'unsafe-inline'
    assert re.search(r"<script", html) is None


def test_the_environment_autoescapes_every_file_and_refuses_unknown_names() -> None:
    env = environment()
    assert env.autoescape is True
    with pytest.raises(Exception, match="undefined"):
        env.from_string("{{ nope }}").render()


def test_branding_is_on_every_page() -> None:
    logo = Logo(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml", "svg")
    look = PortalConfig(
        name="Acme Corp",
        logo=logo,
        logo_alt="Acme",
        support_email="h@a.test",
        support_url="https://help.acme.test/",
        support_text="the desk",
    )
    html = render("signed_out.html", look, title="Signed out", decision_id="d-7")
    assert "<title>Signed out – Acme Corp</title>" in html
    assert f'<img src="{logo.path}" alt="Acme">' in html
    assert '<a href="mailto:h@a.test">h@a.test</a>' in html
    assert '<a href="https://help.acme.test/">' in html and "the desk" in html
    assert "d-7" in html
    assert static_asset(logo.path, look) == (logo.content, "image/svg+xml")
    css = static_asset(stylesheet_path(look), look)
    assert css is not None and css[1].startswith("text/css")
    assert static_asset("/.ztgw/static/other.css", look) is None


def test_without_a_support_contact_a_refusal_still_says_to_quote_the_reference() -> None:
    _, _, body = problem_parts(Reason.PATH_DENIED, "d-1", accept="text/html")
    assert b"quote the reference" in body and b"Need help?" not in body
    _, _, body = problem_parts(Reason.PATH_DENIED, "d-1", accept="text/html", look=LOOK)
    assert b"Need help? Contact the service desk (ext. 4455)" in body
    assert b"mailto:help@acme.test" in body


def test_the_accent_colour_reaches_the_stylesheet_and_its_name_changes_with_it() -> None:
    other = PortalConfig(accent="#7a1f5c")
    css = static_asset(stylesheet_path(other), other)
    assert css is not None and b"--accent:#7a1f5c" in css[0]
    assert stylesheet_path(other) != stylesheet_path(PortalConfig())


def test_pages_forbid_inline_style_and_script_and_other_origins() -> None:
    csp = content_security_policy(("https://idp.test",))
    assert "unsafe-inline" not in csp
    assert "default-src 'none'" in csp and "style-src 'self'" in csp
    assert "form-action 'self' https://idp.test" in csp
    headers = dict(page_headers("d-1"))
    assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "no-store"


# --- configuration ---------------------------------------------------------------------------


def test_portal_settings_load(certs: Certs, tmp_path: Path) -> None:
    logo = tmp_path / "logo.png"
    logo.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    cfg = load_config(
        write(
            tmp_path,
            certs,
            {
                "portal": {
                    "name": "Acme",
                    "logo": str(logo),
                    "accent": "#7A1F5C",
                    "support_email": "help@acme.test",
                    "support_url": "https://help.acme.test",
                    "support_text": "ext. 4455",
                }
            },
        )
    )
    assert cfg.portal.name == "Acme" and cfg.portal.accent == "#7a1f5c"
    assert cfg.portal.logo is not None and cfg.portal.logo.media_type == "image/png"
    assert cfg.portal.logo_alt == "Acme"


@pytest.mark.parametrize(
    ("portal", "key", "message"),
    [
        ({"accent": "blue"}, "portal.accent", "must be a colour like"),
        ({"accent": "#ffee00"}, "portal.accent", "too light for white button text"),
        ({"support_email": "not an address"}, "portal.support_email", "not an e-mail address"),
        ({"support_url": "javascript:alert(1)"}, "portal.support_url", "http(s) URL"),
        ({"name": ""}, "portal.name", "1 to 80 characters"),
        ({"logo": "/nonexistent/logo.png"}, "portal.logo", "file not found"),
        ({"colour": "#000000"}, "portal.colour", "unknown key"),
    ],
)
def test_bad_portal_settings_are_named_with_file_and_key(
    certs: Certs, tmp_path: Path, portal: dict[str, Any], key: str, message: str
) -> None:
    err = error_for(tmp_path, certs, {"portal": portal})
    assert err.key == key and message in err.message
    assert str(err.file).endswith(".toml")


def test_a_logo_that_is_not_an_image_or_too_big_is_refused(certs: Certs, tmp_path: Path) -> None:
    text = tmp_path / "logo.png"
    text.write_text("just text")
    err = error_for(tmp_path, certs, {"portal": {"logo": str(text)}})
    assert err.key == "portal.logo" and "not a PNG, JPEG, WebP or SVG" in err.message
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 300_000)
    err = error_for(tmp_path, certs, {"portal": {"logo": str(big)}})
    assert err.key == "portal.logo" and "at most" in err.message


def test_the_default_accent_is_readable() -> None:
    assert contrast_with_white(PortalConfig().accent) >= 4.5


# --- posture checks in words ------------------------------------------------------------------


def test_every_check_the_evaluation_can_produce_has_words() -> None:
    """Including the ones the page cannot find in REMEDIATION's keys (report_fresh)."""
    names = {*REMEDIATION, "report_fresh"} - {"report_stale"}
    assert names <= set(CHECKS)


REPORT = {
    "platform": "ios",
    "os_version": "17.4",
    "disk_encrypted": True,
    "firewall": True,
    "antivirus": True,
    "screen_lock": True,
    "mdm_enrolled": True,
    "jailbroken": False,
}


def _evaluated(**changes: Any) -> dict[str, Any]:
    today = dt.datetime.fromtimestamp(NOW, dt.UTC).date().isoformat()
    report = {**REPORT, "last_patch": today, **changes}
    result = evaluate(report, NOW, PosturePolicy(), now=NOW)
    return {c.name: check_text(c) for c in result.checks}


def test_a_device_that_is_not_jailbroken_never_reads_jailbroken_with_a_tick() -> None:
    view = _evaluated()["jailbroken"]
    assert view.passed and view.title == "System integrity"
    assert view.result == "not jailbroken or rooted"
    html = render(
        "device.html",
        LOOK,
        title="t",
        decision_id="d",
        device_id="x",
        state="approved",
        owner=None,
        failed=[],
        checks=[view],
        reported=None,
        rd="",
        rd_query="",
    )
    assert "Passed</span>" in html and "not jailbroken or rooted" in html
    assert "✓" not in html


def test_a_jailbroken_device_fails_that_check_in_plain_words() -> None:
    view = _evaluated(jailbroken=True)["jailbroken"]
    assert not view.passed and view.result == "the device is jailbroken or rooted"
    assert "restore it" in view.remediation


def test_each_failed_check_says_what_failed_and_what_to_do() -> None:
    views = _evaluated(disk_encrypted=False, firewall=False)
    assert views["disk_encrypted"].result == "the disk is not encrypted"
    assert views["firewall"].result == "the firewall is off"
    assert views["screen_lock"].passed and views["screen_lock"].result == "the screen lock is set"


def test_a_platform_name_is_written_as_its_maker_writes_it() -> None:
    policy = PosturePolicy(min_os_version=(("macos", "14.0"),))
    today = dt.datetime.fromtimestamp(NOW, dt.UTC).date().isoformat()
    result = evaluate(
        {**REPORT, "platform": "macos", "os_version": "13.1", "last_patch": today},
        NOW,
        policy,
        now=NOW,
    )
    (os_check,) = [c for c in result.checks if c.name == "os_version"]
    assert os_check.remediation == "Update macOS to version 14.0 or later."


# --- why a session ended, and until when a lock holds -------------------------------------------


@pytest.mark.parametrize(
    ("reason", "detail", "code"),
    [
        (Reason.SESSION_EXPIRED, "", "expired"),
        (Reason.SESSION_TERMINATED, "signed out", "signed-out"),
        (Reason.SESSION_TERMINATED, "ip-drift", "ip-drift"),
        (Reason.IP_DRIFT, "10.0.0.1 -> 10.9.9.9", "ip-drift"),
        (Reason.SESSION_TERMINATED, "session-terminated", "anomaly"),
        (Reason.SESSION_TERMINATED, "anomaly 0.93", "anomaly"),
        (Reason.SESSION_TERMINATED, "laptop reported stolen", "revoked"),
        (Reason.SESSION_TERMINATED, "terminated by an operator", "revoked"),
        (Reason.SESSION_TERMINATED, "account locked", "locked"),
        (Reason.SESSION_INVALID, "unknown session cookie", "invalid"),
        (Reason.IDENTITY_UNAUTHENTICATED, "", None),
    ],
)
def test_why_a_session_ended_is_a_code_of_the_closed_vocabulary(
    reason: Reason, detail: str, code: str | None
) -> None:
    assert ended_code(reason, detail) == code
    if code is not None:
        assert ended_text(code) == ENDED[code]


def test_an_unknown_ended_code_shows_nothing() -> None:
    assert ended_text("<b>you were hacked</b>") is None and ended_text(None) is None


def _ctx(path: str = "/form", accept: str = "text/html", **fetch: str) -> RequestContext:
    """`fetch`: Fetch Metadata headers, e.g. mode="no-cors" for Sec-Fetch-Mode."""
    sent = {"Accept": accept, "Host": "gw"}
    sent.update({f"Sec-Fetch-{k.title()}": v for k, v in fetch.items()})
    headers = CIMultiDictProxy(CIMultiDict(sent))
    ctx = RequestContext(
        method="GET",
        host="gw",
        raw_path=path,
        query="",
        headers=headers,
        client_ip="127.0.0.1",
        peer_ip="127.0.0.1",
        now=NOW,
        path=path,
    )
    ctx.look = LOOK
    return ctx


def test_a_browser_whose_session_was_revoked_is_told_why_on_the_sign_in_page() -> None:
    ctx = _ctx()
    finding = Finding("session", Reason.SESSION_TERMINATED, Verdict.DENY, detail="stolen laptop")
    decision = Decision("d", Verdict.DENY, Reason.SESSION_TERMINATED, (finding,))
    status, headers, _ = render_refusal(
        ctx, decision, sign_in=True, step_up_page=True, cookie_name="__Host-s"
    )
    assert status == 303
    assert dict(headers)["Location"] == "/.ztgw/login?rd=/form&ended=revoked"


def test_a_terminating_ip_drift_ends_the_session_and_says_so() -> None:
    ctx = _ctx()
    finding = Finding("session", Reason.IP_DRIFT, Verdict.TERMINATE, detail="a -> b")
    decision = Decision("d", Verdict.TERMINATE, Reason.IP_DRIFT, (finding,))
    status, headers, _ = render_refusal(
        ctx, decision, sign_in=True, step_up_page=True, cookie_name="__Host-s"
    )
    assert status == 303 and dict(headers)["Location"].endswith("&ended=ip-drift")
    assert any(n == "Set-Cookie" and "Max-Age=0" in v for n, v in headers)


def test_a_subresource_keeps_the_ended_cookie_for_the_next_navigation_to_explain() -> None:
    """Chromium fetches /favicon.ico after a page: had that answer cleared the cookie, the
    person's next click would go to the provider without being told the session was ended."""
    finding = Finding("session", Reason.SESSION_TERMINATED, Verdict.DENY, detail="stolen laptop")
    decision = Decision("d", Verdict.DENY, Reason.SESSION_TERMINATED, (finding,))
    icon = _ctx("/favicon.ico", "image/avif,image/webp,*/*", site="same-origin", mode="no-cors")
    icon.session = SessionView(None, "ck:x", "cookie", 0.0, cookie_invalid=True)
    status, headers, _ = render_refusal(
        icon, decision, sign_in=True, step_up_page=True, cookie_name="__Host-s"
    )
    assert status == Reason.SESSION_TERMINATED.status
    assert not any(n == "Set-Cookie" for n, _ in headers)
    page = _ctx("/form", site="none", mode="navigate", dest="document")
    page.session = SessionView(None, "ck:x", "cookie", 0.0, cookie_invalid=True)
    status, headers, _ = render_refusal(
        page, decision, sign_in=True, step_up_page=True, cookie_name="__Host-s"
    )
    assert status == 303 and dict(headers)["Location"].endswith("&ended=revoked")
    assert any(n == "Set-Cookie" and "Max-Age=0" in v for n, v in headers)
    api = _ctx("/api", "application/json")  # no Fetch Metadata: an API client, cleared at once
    api.session = SessionView(None, "ck:x", "cookie", 0.0, cookie_invalid=True)
    _, headers, _ = render_refusal(
        api, decision, sign_in=True, step_up_page=True, cookie_name="__Host-s"
    )
    assert any(n == "Set-Cookie" and "Max-Age=0" in v for n, v in headers)


def test_a_locked_account_page_says_when_the_lock_ends_in_the_persons_time_zone() -> None:
    ctx = _ctx()
    ctx.locked = LockView(NOW + 25 * 60, "Europe/Paris")
    decision = Decision(
        "d",
        Verdict.DENY,
        Reason.ACCOUNT_LOCKED,
        (Finding("session", Reason.ACCOUNT_LOCKED, Verdict.DENY),),
    )
    status, _, body = render_refusal(
        ctx, decision, sign_in=True, step_up_page=True, cookie_name="__Host-s"
    )
    assert status == Reason.ACCOUNT_LOCKED.status
    text = body.decode()
    # 09:25 UTC is 10:25 in Paris (CET) on 2 March.
    assert "The lock ends at <strong>10:25 (Europe/Paris), in 25 minutes</strong>" in text
    assert "Acme Corp" in text


def test_times_are_said_relative_to_the_clock_given_not_the_wall_clock() -> None:
    utc = zone(None)
    assert until(NOW + 90, NOW, utc) == "09:01 (UTC), in 2 minutes"
    assert until(NOW + 3 * 3600, NOW, utc) == "12:00 (UTC), in 3 hours"
    assert until(NOW + 86400 + 60, NOW, utc) == "Tue 3 Mar 09:01 (UTC), in 24 hours 1 minute"
    assert zone("Mars/Olympus").key == "UTC"


def test_a_form_refusal_tells_a_person_what_to_do_in_words_once() -> None:
    _, headers, body = problem_parts(Reason.CSRF_INVALID, "d-1", accept="text/html", look=LOOK)
    assert body.count(b"Go back, reload the page and try again.") == 1
    assert dict(headers)["Content-Type"] == "text/html; charset=utf-8"


def test_a_refusal_page_rendered_once_per_reason_still_carries_each_requests_id() -> None:
    _, _, one = problem_parts(Reason.PATH_DENIED, "id-one", accept="text/html", look=LOOK)
    _, _, two = problem_parts(Reason.PATH_DENIED, "id-two", accept="text/html", look=LOOK)
    assert b"<code>id-one</code>" in one and b"<code>id-two</code>" in two
    assert one.replace(b"id-one", b"id-two") == two
    _, _, evil = problem_parts(Reason.PATH_DENIED, EVIL, accept="text/html", look=LOOK)
    assert b"<script>" not in evil and ESCAPED.encode() in evil
    _, _, other = problem_parts(Reason.PATH_DENIED, "id-one", accept="text/html")
    assert b"Acme Corp" in one and b"Acme Corp" not in other
