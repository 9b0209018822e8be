"""The pieces of several providers that need no browser: login attempts tied to their provider
(two clients sharing one store and one key), the single-provider form's attempts from before an
upgrade, and the session checks of the identity stage."""

from __future__ import annotations

import pytest

from tests.unit.test_oidc import SECRET, DevSetup, dev, dev_config  # noqa: F401
from ztgateway.credentials.oidc import (
    MemoryPendingLogins,
    OIDCClient,
    OIDCError,
    OIDCReason,
    PendingLogin,
)
from ztgateway.credentials.providers import SignInProviders
from ztgateway.decision import Reason
from ztgateway.stages.identity import provider_session_refusal


async def test_an_attempt_of_one_provider_is_not_finished_by_another(
    dev: DevSetup,  # noqa: F811 - the fixture of test_oidc.py
) -> None:
    # The same store and the same cookie key, as in the gateway: only the provider differs.
    pending = MemoryPendingLogins(100)
    corp = OIDCClient(dev.config(name="corp"), secret=SECRET, pending=pending)
    partners = OIDCClient(
        dev.config(name="partners", redirect_uri="https://gw.example/.ztgw/oidc/callback/p"),
        secret=SECRET,
        pending=pending,
    )
    async with corp, partners:
        start = await corp.begin("/")
        query = await dev.login(start)
        with pytest.raises(OIDCError) as info:
            await partners.finish(
                state=query["state"],
                code=query["code"],
                error=None,
                cookie_value=start.cookie_value,
                iss=query["iss"],
            )
        # The cookie is bound to its provider as well: refused before the store is touched.
        assert info.value.reason is OIDCReason.STATE_INVALID
        assert "not for this state" in info.value.detail
        result = await corp.finish(
            state=query["state"],
            code=query["code"],
            error=None,
            cookie_value=start.cookie_value,
            iss=query["iss"],
        )
        assert result.user == "alice"


async def test_a_stored_attempt_names_its_provider() -> None:
    attempt = PendingLogin("n", "v", b"h", "/", 1.0, provider="partners")
    assert PendingLogin.from_json(attempt.to_json()).provider == "partners"
    # Written by a version with a single provider: no name.
    old = attempt.to_json().replace(', "provider": "partners"', "")
    assert PendingLogin.from_json(old).provider == ""


async def test_only_the_single_provider_form_accepts_attempts_without_a_provider(
    dev: DevSetup,  # noqa: F811 - the fixture of test_oidc.py
) -> None:
    for legacy in (True, False):
        pending = MemoryPendingLogins(100)
        async with OIDCClient(
            dev.config(accept_unlabelled=legacy), secret=SECRET, pending=pending
        ) as client:
            start = await client.begin("/")
            query = await dev.login(start)
            # As an older gateway would have stored it.
            stored, source, expires = pending._pending[query["state"]]
            pending._pending[query["state"]] = (
                PendingLogin(
                    stored.nonce,
                    stored.code_verifier,
                    stored.cookie_hash,
                    stored.return_to,
                    stored.created,
                ),
                source,
                expires,
            )
            if legacy:
                result = await client.finish(
                    state=query["state"],
                    code=query["code"],
                    error=None,
                    cookie_value=start.cookie_value,
                    iss=query["iss"],
                )
                assert result.user == "alice"
            else:
                with pytest.raises(OIDCError) as info:
                    await client.finish(
                        state=query["state"],
                        code=query["code"],
                        error=None,
                        cookie_value=start.cookie_value,
                        iss=query["iss"],
                    )
                assert "started with provider" in info.value.detail


def test_sign_in_providers_offer_a_routes_choice_in_its_order() -> None:
    corp = dev_config("https://corp.example", name="corp")
    partners = dev_config(
        "https://partners.example",
        name="partners",
        redirect_uri="https://gw.example/.ztgw/oidc/callback/partners",
    )
    providers = SignInProviders((corp, partners), lambda p: OIDCClient(p, secret=SECRET))
    assert [c.cfg.name for c in providers.offered(())] == ["corp", "partners"]
    assert [c.cfg.name for c in providers.offered(("partners", "corp"))] == ["partners", "corp"]
    assert [c.cfg.name for c in providers.offered(("partners",))] == ["partners"]
    assert providers.by_callback("/.ztgw/oidc/callback/partners") is providers.get("partners")
    assert providers.by_callback("/.ztgw/oidc/callback/nobody") is None
    assert providers.get(None) is None and providers.first is providers.get("corp")


def test_a_session_is_held_to_its_provider_and_name_space() -> None:
    directory = dev_config("https://corp.example", name="corp")
    partners = dev_config("https://partners.example", name="partners", user_namespace="partners")
    assert provider_session_refusal("alice", directory, "corp", ()) is None
    assert provider_session_refusal("partners:alice", partners, "partners", ()) is None
    assert provider_session_refusal("partners:alice", partners, "partners", ("partners",)) is None
    refused = provider_session_refusal("partners:alice", partners, "partners", ("corp",))
    assert refused is not None and refused.reason is Reason.PROVIDER_NOT_ALLOWED
    assert "partners" in refused.detail and "corp" in refused.detail
    # Signed in before the name space was set: the old name may be someone else's now.
    stale = provider_session_refusal("alice", partners, "partners", ())
    assert stale is not None and stale.reason is Reason.SESSION_INVALID
    gone = provider_session_refusal("alice", None, "google", ())
    assert gone is not None and gone.reason is Reason.SESSION_INVALID
    # A record naming no provider: the directory's, and only where the route does not choose.
    assert provider_session_refusal("alice", None, None, ()) is None
    unnamed = provider_session_refusal("alice", None, None, ("corp",))
    assert unnamed is not None and unnamed.reason is Reason.PROVIDER_NOT_ALLOWED
