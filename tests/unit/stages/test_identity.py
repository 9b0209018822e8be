"""The identity stage, check by check: the client certificate (revocation, validity, usage,
presence), the Authorization header and the bearer token (count, scheme, emptiness, issuer,
verification, binding, requirement, throttling), a browser session signed in with an identity
provider, and identity from the certificate alone (route settings, ambient requests, name
spaces). Each check: missing, invalid, valid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests import factories
from ztgateway.context import RequestContext
from ztgateway.decision import Finding, Reason, Verdict
from ztgateway.runtime import Runtime
from ztgateway.stages.identity import IdentityStage
from ztgateway.store.sqlite import SQLiteStore


async def check(ctx: RequestContext, rt: Runtime) -> Sequence[Finding]:
    return await IdentityStage(rt).check(ctx)


def denied(findings: Sequence[Finding]) -> Reason:
    assert len(findings) == 1 and findings[0].verdict is Verdict.DENY, findings
    return findings[0].reason


@pytest.fixture
def issuer(tmp_path: Path) -> factories.Issuer:
    return factories.Issuer(tmp_path)


async def with_tokens(
    issuer: factories.Issuer,
    store: SQLiteStore | None = None,
    overrides: dict[str, Any] | None = None,
    **route: Any,
) -> Runtime:
    cfg = factories.config({**issuer.config(), **(overrides or {})}, **route)
    return factories.runtime(cfg, store=store, tokens=await issuer.verifier(cfg))


# --- the client certificate ------------------------------------------------------------------


async def test_a_valid_certificate_identifies_its_user() -> None:
    rt = factories.runtime()
    ctx = factories.routed(rt)
    assert await check(ctx, rt) == ()
    assert ctx.identity is not None
    assert (ctx.identity.user, ctx.identity.source, ctx.identity.device_id) == (
        "alice",
        "cert",
        "alice-laptop",
    )


async def test_a_revoked_certificate_is_refused() -> None:
    rt = factories.runtime(revoked=frozenset({factories.cert().serial}))
    assert denied(await check(factories.routed(rt), rt)) is Reason.CLIENT_CERT_REVOKED


@pytest.mark.parametrize(
    ("changes", "detail"),
    [
        ({"not_after": factories.NOW - 1}, "certificate expired"),
        ({"not_before": factories.NOW + 1}, "certificate not yet valid"),
        ({"client_auth": False}, "no clientAuth extended key usage"),
        ({"is_ca": True}, "a CA certificate is not a client"),
    ],
)
async def test_an_unusable_certificate_is_invalid(changes: dict[str, Any], detail: str) -> None:
    rt = factories.runtime()
    findings = await check(factories.routed(rt, cert=factories.cert(**changes)), rt)
    assert denied(findings) is Reason.CLIENT_CERT_INVALID
    assert findings[0].detail == detail


async def test_no_certificate_where_the_route_requires_one_is_refused() -> None:
    rt = factories.runtime()
    assert denied(await check(factories.routed(rt, cert=None), rt)) is Reason.CLIENT_CERT_REQUIRED


async def test_no_certificate_where_the_route_does_not_require_one_is_nobody() -> None:
    rt = factories.runtime(factories.config(policy={"require_client_cert": False}))
    ctx = factories.routed(rt, cert=None)
    assert await check(ctx, rt) == ()
    assert ctx.identity is not None and (ctx.identity.user, ctx.identity.source) == (None, "none")


# --- the Authorization header ----------------------------------------------------------------


async def test_two_authorization_headers_are_invalid() -> None:
    rt = factories.runtime()
    ctx = factories.routed(rt)
    ctx.headers = factories.context(headers={}).headers.copy()  # type: ignore[assignment]
    ctx.headers.add("Authorization", "Bearer a")  # type: ignore[attr-defined]
    ctx.headers.add("Authorization", "Bearer b")  # type: ignore[attr-defined]
    assert denied(await check(ctx, rt)) is Reason.TOKEN_INVALID


async def test_another_scheme_is_invalid_unless_the_route_forwards_it() -> None:
    basic = {"Authorization": "Basic YWxpY2U6cHc="}
    rt = factories.runtime()
    assert denied(await check(factories.routed(rt, headers=basic), rt)) is Reason.TOKEN_INVALID
    passes = factories.runtime(factories.config(forward_authorization=True))
    ctx = factories.routed(passes, headers=basic)
    assert await check(ctx, passes) == ()
    assert ctx.identity is not None and ctx.identity.source == "cert"


async def test_an_empty_bearer_token_is_invalid() -> None:
    rt = factories.runtime()
    ctx = factories.routed(rt, headers={"Authorization": "Bearer   "})
    assert denied(await check(ctx, rt)) is Reason.TOKEN_INVALID


async def test_a_token_where_no_issuer_is_configured_has_an_unknown_issuer() -> None:
    rt = factories.runtime()
    ctx = factories.routed(rt, headers={"Authorization": "Bearer abc.def.ghi"})
    assert denied(await check(ctx, rt)) is Reason.TOKEN_ISSUER_UNKNOWN


# --- the bearer token ------------------------------------------------------------------------


async def test_a_valid_token_identifies_its_subject(issuer: factories.Issuer) -> None:
    rt = await with_tokens(issuer)
    token = issuer.token(groups=["staff"], scope="read write")
    ctx = factories.routed(rt, headers={"Authorization": f"Bearer {token}"})
    assert await check(ctx, rt) == ()
    ident = ctx.identity
    assert ident is not None and ident.token is not None
    assert (ident.user, ident.source, ident.issuer) == ("alice", "token", issuer.name)
    assert ident.groups == {"staff"} and ident.scopes == {"read", "write"}


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": int(factories.NOW) - 3600}, Reason.TOKEN_EXPIRED),
        ({"aud": "someone-else"}, Reason.TOKEN_AUDIENCE_INVALID),
        ({"iss": "https://unknown.example"}, Reason.TOKEN_ISSUER_UNKNOWN),
    ],
)
async def test_a_token_that_fails_verification_is_refused_for_its_reason(
    issuer: factories.Issuer, claims: dict[str, Any], reason: Reason
) -> None:
    rt = await with_tokens(issuer)
    ctx = factories.routed(rt, headers={"Authorization": f"Bearer {issuer.token(**claims)}"})
    assert denied(await check(ctx, rt)) is reason


async def test_a_token_of_an_issuer_the_route_does_not_accept_is_refused(
    issuer: factories.Issuer,
) -> None:
    cfg = factories.config(
        {**issuer.config(), "issuers": {
            "corp": {**issuer.config()["issuers"]["corp"], "user_namespace": ""}, "other": {
            "issuer": "https://other.example", "audiences": ["ztgateway"],
            "algorithms": ["ES256"], "jwks_file": str(issuer.jwks), "user_namespace": "",
        }}},
        policy={"issuers": ["other"]},
    )  # fmt: skip
    rt = factories.runtime(cfg, tokens=await issuer.verifier(cfg))
    ctx = factories.routed(rt, headers={"Authorization": f"Bearer {issuer.token()}"})
    findings = await check(ctx, rt)
    assert denied(findings) is Reason.TOKEN_ISSUER_UNKNOWN
    assert "not accepted here" in findings[0].detail


async def test_token_binding_missing_wrong_and_right(issuer: factories.Issuer) -> None:
    rt = await with_tokens(issuer, policy={"require_token": True, "require_bound_token": True})

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    unbound = factories.routed(rt, headers=bearer(issuer.token()))
    assert denied(await check(unbound, rt)) is Reason.TOKEN_BINDING_REQUIRED
    other = factories.cert(der=b"another certificate")
    wrong = factories.routed(rt, headers=bearer(issuer.token(bound_to=other)))
    assert denied(await check(wrong, rt)) is Reason.TOKEN_BINDING_MISMATCH
    right = factories.routed(rt, headers=bearer(issuer.token(bound_to=factories.cert())))
    assert await check(right, rt) == ()


async def test_no_token_where_the_route_requires_one(issuer: factories.Issuer) -> None:
    rt = await with_tokens(issuer, policy={"require_token": True})
    assert denied(await check(factories.routed(rt), rt)) is Reason.TOKEN_REQUIRED
    ok = factories.routed(rt, headers={"Authorization": f"Bearer {issuer.token()}"})
    assert await check(ok, rt) == ()


async def test_a_browser_on_a_browsers_sign_in_route_is_not_asked_for_a_token(
    issuer: factories.Issuer,
) -> None:
    rt = await with_tokens(
        issuer, overrides=PROVIDER, policy={"require_token": True, "login": "browsers"}
    )
    browser = {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate", "Accept": "text/html"}
    ctx = factories.routed(rt, headers=browser)
    assert await check(ctx, rt) == ()
    assert ctx.identity is not None and ctx.identity.user is None


async def test_invalid_tokens_from_one_address_are_throttled(
    issuer: factories.Issuer, store: SQLiteStore
) -> None:
    rt = await with_tokens(issuer, store=store)
    limit = rt.config.server.invalid_credentials_limit
    stage = IdentityStage(rt)
    forged = {"Authorization": "Bearer " + issuer.token()[:-4] + "AAAA"}
    for _ in range(limit):
        assert denied(await stage.check(factories.routed(rt, headers=forged))) is not None
    throttled = await stage.check(factories.routed(rt, headers=forged))
    assert denied(throttled) is Reason.CREDENTIALS_THROTTLED


# --- a browser session from an identity provider ---------------------------------------------

PROVIDER: dict[str, Any] = {
    "oidc": {
        "corp": {
            "issuer": "https://idp.example",
            "client_id": "gw",
            "client_secret": "s",
            "user_namespace": "",
        }
    }
}


async def signed_in(store: SQLiteStore, **extra: Any) -> dict[str, str]:
    await store.save_session(
        factories.session(
            extra={"source": "oidc", "provider": "corp", "groups": ["staff"], **extra}
        )
    )
    return {"Cookie": f"__Host-ztgw-session={factories.COOKIE}"}


async def test_a_session_signed_in_with_the_provider_identifies_its_user(
    store: SQLiteStore,
) -> None:
    rt = factories.runtime(factories.config(PROVIDER), store=store)
    ctx = factories.routed(rt, headers=await signed_in(store))
    assert await check(ctx, rt) == ()
    ident = ctx.identity
    assert ident is not None
    assert (ident.user, ident.source, ident.provider, ident.groups) == (
        "alice",
        "session",
        "corp",
        {"staff"},
    )


async def test_an_unknown_cookie_identifies_nobody_here(store: SQLiteStore) -> None:
    rt = factories.runtime(
        factories.config(PROVIDER, policy={"allow_cert_identity": False}), store=store
    )
    ctx = factories.routed(rt, headers={"Cookie": "__Host-ztgw-session=forged"})
    assert await check(ctx, rt) == ()  # the session stage refuses the cookie
    assert ctx.identity is not None and ctx.identity.user is None


async def test_a_session_of_a_provider_no_longer_configured_is_invalid(store: SQLiteStore) -> None:
    rt = factories.runtime(factories.config(PROVIDER), store=store)
    ctx = factories.routed(rt, headers=await signed_in(store, provider="gone"))
    assert denied(await check(ctx, rt)) is Reason.SESSION_INVALID


async def test_a_session_of_a_provider_the_route_does_not_accept_is_refused(
    store: SQLiteStore,
) -> None:
    cfg = factories.config(deep_provider("partners"), policy={"providers": ["partners"]})
    rt = factories.runtime(cfg, store=store)
    ctx = factories.routed(rt, headers=await signed_in(store))
    assert denied(await check(ctx, rt)) is Reason.PROVIDER_NOT_ALLOWED


def deep_provider(name: str) -> dict[str, Any]:
    corp = PROVIDER["oidc"]["corp"]
    other = {**corp, "issuer": f"https://{name}.example", "user_namespace": name}
    return {"oidc": {"corp": corp, name: other}}


# --- identity from the certificate alone -----------------------------------------------------


async def test_a_route_that_does_not_take_certificate_identity_leaves_nobody() -> None:
    rt = factories.runtime(factories.config(policy={"allow_cert_identity": False}))
    ctx = factories.routed(rt)
    assert await check(ctx, rt) == ()
    assert ctx.identity is not None and ctx.identity.user is None
    assert ctx.identity.device_id == "alice-laptop"


async def test_a_certificate_without_a_user_identifies_only_the_device() -> None:
    rt = factories.runtime()
    ctx = factories.routed(rt, cert=factories.cert(user=None))
    assert await check(ctx, rt) == ()
    assert ctx.identity is not None and ctx.identity.user is None


async def test_a_cross_site_navigation_is_not_identified_by_the_certificate() -> None:
    rt = factories.runtime()
    nav = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Accept": "text/html"}
    assert denied(await check(factories.routed(rt, headers=nav), rt)) is Reason.ORIGIN_DENIED
    same = {**nav, "Sec-Fetch-Site": "same-origin"}
    ctx = factories.routed(rt, headers=same)
    assert await check(ctx, rt) == ()
    assert ctx.identity is not None and ctx.identity.user == "alice"


async def test_a_certificate_user_in_another_sources_name_space_is_ambiguous(
    issuer: factories.Issuer,
) -> None:
    cfg = factories.config(
        {
            "issuers": {
                "corp": {
                    **issuer.config()["issuers"]["corp"],
                    "user_namespace": "partner",
                }
            }
        }
    )
    rt = factories.runtime(cfg, tokens=await issuer.verifier(cfg))
    ctx = factories.routed(rt, cert=factories.cert(user="partner:bob"))
    assert denied(await check(ctx, rt)) is Reason.IDENTITY_AMBIGUOUS
