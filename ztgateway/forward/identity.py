"""The identity the upstream may trust (Oathkeeper's mutators, Pomerium's assertion header).

Only after an ALLOW: the forwarding facts, the identity headers the route names and the
signed `X-ZT-Assertion` JWT. Forward-auth answers with the same headers, so an edge proxy's
upstream sees exactly what one behind the data plane sees.
"""

from __future__ import annotations

from ..context import RequestContext
from ..decision import Decision
from ..responses import DECISION_HEADER
from .assertion import AssertionSigner
from .headers import list_header_value


def asserted_identity(
    signer: AssertionSigner, ctx: RequestContext, decision: Decision
) -> dict[str, str]:
    """Identity headers and the signed assertion (also what forward-auth answers).

    A request a monitor-mode route let through says so in its assertion; identities that
    failed their own checks never get this far (pipeline._NEVER_MONITORED)."""
    route = ctx.route
    assert route is not None
    h = route.headers
    ident = ctx.identity
    add: dict[str, str] = {DECISION_HEADER: ctx.decision_id}
    if ident is not None:
        if ident.user:
            add[h.user] = ident.user
        if ident.email:
            add[h.email] = ident.email
        if ident.groups:
            add[h.groups] = list_header_value(ident.groups)
        if ident.device_id:
            add[h.device] = ident.device_id
        add[h.assertion] = signer.sign(
            audience=route.name,
            user=ident.user,
            email=ident.email,
            groups=ident.groups,
            device_id=ident.device_id,
            source=ident.source,
            now=ctx.now,
            would=decision.would_verdict.label
            if decision.monitor and decision.would_verdict
            else None,
        )
    return add


def identity_headers(
    signer: AssertionSigner, ctx: RequestContext, original_host: str, decision: Decision
) -> dict[str, str]:
    """The headers the upstream may trust: forwarding facts, identity, signed assertion."""
    add: dict[str, str] = {
        "X-Forwarded-For": ctx.client_ip,
        "X-Forwarded-Proto": ctx.forwarded_proto,
        "X-Forwarded-Host": original_host,
    }
    add.update(asserted_identity(signer, ctx, decision))
    return add
