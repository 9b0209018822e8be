"""`ztgateway policy explain` and `ztgateway policy test`: the real pipeline, no socket.

Explain runs exactly the stages a live request would (same configuration, same CRL, same
issuers) over a synthetic context and prints every finding. Test runs a table of cases and
exits non-zero on a mismatch, so a policy change is tested before deploy (OPA's policy tests).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import jwt
from cryptography import x509

from ..clock import SYSTEM_CLOCK, Clock
from ..config import GatewayConfig, load_config
from ..configreader import ConfigError, Table
from ..context import RequestContext
from ..credentials.jwt import TokenVerifier
from ..decision import Decision, Verdict
from ..decisions import DecisionPath, explain_json
from ..edge.tls import CertInfo, RevocationList, load_crl, parse_client_cert
from ..metrics import Metrics
from ..pipeline import Pipeline, default_stages
from ..risk.posture import PostureError, digest, validate_report
from ..routes import RouteTable
from ..runtime import Runtime
from ..sessions import token_session_id
from ..store import store_from_url
from ..store.base import PostureRecord, Session, Store


@dataclass
class Request:
    method: str = "GET"
    path: str = "/"
    host: str = "127.0.0.1"
    ip: str = "127.0.0.1"
    token: str | None = None
    cert: CertInfo | None = None
    headers: Mapping[str, str] | None = None
    now: float | None = None
    mfa_age: float | None = None
    """A policy case's "the person gave their second factor this long ago" (token sessions)."""
    posture: dict[str, Any] | None = None
    """A policy case's posture report for the presented certificate's device (validated)."""
    report_age: float = 0.0


class CaseFacts:
    """The configured store, read as is, with what a policy case states laid over it: a session
    with its second factor given `mfa_age` ago, and the device's posture report. Nothing is
    written to the store (the evaluation is a dry run)."""

    def __init__(self, base: Store) -> None:
        self._base = base
        self._sessions: dict[str, Session] = {}
        self._postures: dict[str, PostureRecord] = {}

    def state(self, sessions: dict[str, Session], postures: dict[str, PostureRecord]) -> None:
        self._sessions, self._postures = sessions, postures

    def session(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id) or self._base.session(session_id)

    async def find_session(self, session_id: str) -> Session | None:
        stated = self._sessions.get(session_id)
        return stated if stated is not None else await self._base.find_session(session_id)

    def posture(self, device_id: str) -> PostureRecord | None:
        return self._postures.get(device_id) or self._base.posture(device_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


class OfflineEvaluator:
    """A pipeline over one configuration, for explain, policy tests and /decide."""

    def __init__(self, config: GatewayConfig, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self.clock = clock
        self.facts = CaseFacts(
            store_from_url(config.store.url, base=config.store.base, clock=clock)
        )
        revocations = RevocationList()
        if config.tls.crl is not None:
            revocations = load_crl(config.tls.crl)
        self.tokens = TokenVerifier(config.issuers, clock=clock.time) if config.issuers else None
        self.runtime = Runtime(
            config=config,
            routes=RouteTable(config.routes),
            metrics=Metrics(),
            revocations=lambda: revocations,
            tokens=self.tokens,
            store=cast(Store, self.facts),
            dry_run=True,
            clock=clock,
        )
        self.pipeline = Pipeline(default_stages(self.runtime))

    async def __aenter__(self) -> OfflineEvaluator:
        if self.tokens is not None:
            await self.tokens.start()
        await self.facts._base.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.tokens is not None:
            await self.tokens.close()
        await self.facts._base.close()

    async def evaluate(self, req: Request) -> tuple[RequestContext, Decision]:
        headers = dict(req.headers or {})
        if req.token:
            headers["Authorization"] = f"Bearer {req.token}"
        ctx = RequestContext.synthetic(
            method=req.method,
            path=req.path,
            host=req.host,
            headers=headers,
            client_ip=req.ip,
            cert=req.cert,
            now=req.now,
            clock=self.clock,
        )
        self.facts.state(*self._stated(req, ctx.now))
        # The one decision path, as a dry run: nothing is recorded.
        return ctx, (
            await DecisionPath(None).decide(ctx, self.runtime, self.pipeline, dry=True)
        ).decision

    def _stated(
        self, req: Request, now: float
    ) -> tuple[dict[str, Session], dict[str, PostureRecord]]:
        sessions: dict[str, Session] = {}
        postures: dict[str, PostureRecord] = {}
        if req.mfa_age is not None and req.token:
            # The session the gateway keeps for this token (keyed by its hash), as it stands
            # after a step-up `mfa_age` seconds ago.
            token_hash = hashlib.sha256(req.token.encode("ascii")).hexdigest()
            user = _token_subject(req.token)
            sid = token_session_id(token_hash)
            sessions[sid] = Session(
                session_id=sid,
                kind="token",
                user=user,
                device_id=req.cert.device_id if req.cert else None,
                start_ip=req.ip,
                last_ip=req.ip,
                user_agent=(req.headers or {}).get("User-Agent", ""),
                created=now - req.mfa_age,
                last_seen=now,
                expires_at=now + self.config.sessions.absolute_timeout,
                mfa_at=now - req.mfa_age,
                anomaly_at=now,
            )
        if req.posture is not None and req.cert is not None:
            report = dict(req.posture)
            collected = now - req.report_age
            report.setdefault("collected_at", collected)
            raw = json.dumps(report, sort_keys=True).encode()
            postures[req.cert.device_id] = PostureRecord(
                device_id=req.cert.device_id,
                report=report,
                received_at=collected,
                collected_at=collected,
                signed=True,
                digest=digest(raw),
            )
        return sessions, postures


def _token_subject(token: str) -> str:
    """The token's `sub`, unverified: only to name the stated session's user (the pipeline
    verifies the token itself and refuses a mismatch as `session-invalid`)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return ""
    return str(claims.get("sub", ""))


def load_cert_pem(data: bytes) -> CertInfo:
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = (
        x509.load_pem_x509_certificate(data)
        if b"-----BEGIN" in data
        else x509.load_der_x509_certificate(data)
    )
    return parse_client_cert(cert.public_bytes(Encoding.DER))


def load_cert(path: str) -> CertInfo:
    return load_cert_pem(Path(path).read_bytes())


def cmd_explain(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    headers = dict(h.split(":", 1) for h in args.header) if args.header else {}
    req = Request(
        method=args.method.upper(),
        path=args.path,
        host=args.host,
        ip=args.ip,
        token=args.token,
        cert=load_cert(args.cert) if args.cert else None,
        headers={k.strip(): v.strip() for k, v in headers.items()},
    )

    async def run() -> tuple[RequestContext, Decision]:
        async with OfflineEvaluator(config) as ev:
            return await ev.evaluate(req)

    ctx, decision = asyncio.run(run())
    if args.json:
        print(json.dumps(explain_json(ctx, decision), indent=2))
        return 0
    route = ctx.route.name if ctx.route else "-"
    mode = f" ({ctx.route.mode})" if ctx.route else ""
    print(
        f"decision: {decision.verdict.label.upper()}  reason: {decision.reason.value}  status: {decision.status}"
    )
    if decision.monitor and decision.would_verdict:
        print(f"monitor mode: would {decision.would_verdict.label} — forwarded anyway")
    print(f"route: {route}{mode}   path: {ctx.path or ctx.path_error}")
    ident = ctx.identity
    if ident:
        print(
            f"identity: user={ident.user or '-'} source={ident.source} groups={','.join(sorted(ident.groups)) or '-'} "
            f"scopes={' '.join(sorted(ident.scopes)) or '-'} device={ident.device_id or '-'}"
        )
    print("findings:")
    for f in decision.findings:
        verdict = f.verdict.label if f.verdict is not None else "info"
        extra = f" risk={f.risk:.2f}" if f.risk else ""
        detail = f" — {f.detail}" if f.detail else ""
        print(f"  [{f.stage}] {verdict:<9} {f.reason.value}{extra}{detail}")
    return 0


def _case_request(case: Table, base: Path, key: Path | None) -> Request:
    token = case.text("token")
    claims_t = case.table("token_claims")
    if claims_t.data:
        if key is None:
            case.fail("token_claims", "needs issuer_key at the top of the file")
        from ..dev.tokens import issue_token

        data = dict(claims_t.data)
        claims_t._read.update(data)
        token = issue_token(
            key,
            sub=str(data.pop("sub", "alice")),
            groups=list(data.pop("groups", [])),
            scope=str(data.pop("scope", "")),
            roles=list(data.pop("roles", [])),
            email=data.pop("email", None),
            ttl=int(data.pop("ttl", 300)),
            issuer=str(data.pop("iss")) if "iss" in data else "https://ztgateway.dev/issuer",
            audience=str(data.pop("aud")) if "aud" in data else "ztgateway",
            extra_claims=data,
            now=case.number("now"),  # a case judged at `now` carries a token minted then
        )
    claims_t.done()
    cert_path = case.path("cert")
    headers_t = case.table("headers")
    headers = {k: str(v) for k, v in headers_t.data.items()}
    headers_t._read.update(headers)
    headers_t.done()
    mfa_age = case.duration("mfa_age", None, min=0.0)
    if mfa_age is not None and not token:
        case.fail("mfa_age", "needs token or token_claims: a second factor is a person's")
    posture, report_age = _case_posture(case, case.number("now"))
    if posture is not None and cert_path is None:
        case.fail("posture", "needs cert: posture is reported by the certificate's device")
    return Request(
        method=case.text("method", "GET"),
        path=case.text("path", "/"),
        host=case.text("host", "127.0.0.1"),
        ip=case.text("ip", "127.0.0.1"),
        token=token,
        cert=load_cert(str(cert_path)) if cert_path else None,
        headers=headers,
        now=case.number("now"),
        mfa_age=mfa_age,
        posture=posture,
        report_age=report_age,
    )


def _case_posture(case: Table, now: float | None) -> tuple[dict[str, Any] | None, float]:
    """`[case.posture]`: a posture report as the device agent sends it, validated the same way.

    Times are relative, so a case does not start failing as the calendar moves on:
    `patch_age_days` instead of `last_patch`, `report_age` (a duration) instead of
    `collected_at`."""
    t = case.table("posture")
    if not t.data:
        t.done()
        return None, 0.0
    doc = dict(t.data)
    t._read.update(doc)
    report_age = 0.0
    if "report_age" in doc:
        report_age = t.duration("report_age", 0.0, min=0.0)
        doc.pop("report_age")
    if "patch_age_days" in doc:
        days = t.integer("patch_age_days", 0, min=0)
        doc.pop("patch_age_days")
        when = (now if now is not None else SYSTEM_CLOCK.time()) - days * 86400
        doc["last_patch"] = dt.datetime.fromtimestamp(when, dt.UTC).date().isoformat()
    try:
        report = validate_report(doc)
    except PostureError as exc:
        t.fail(exc.field if exc.field in doc else "", exc.message)
    t.done()
    return report, report_age


def cmd_test(args: argparse.Namespace) -> int:
    file = Path(args.file).resolve()
    data = tomllib.loads(file.read_text())
    root = Table(data, file)
    config_path = root.path("config", required=True)
    assert config_path is not None
    config = load_config(config_path)
    key = root.path("issuer_key")
    cases = root.tables("case")
    root.done()
    if not cases:
        raise ConfigError(file, "case", "no [[case]] tables")
    prepared = []
    for case in cases:
        name = case.text("name", required=True)
        expect = case.choice("verdict", tuple(v.label for v in Verdict), "allow")
        reason = case.text("reason")
        req = _case_request(case, file.parent, key)
        case.done()
        prepared.append((name, expect, reason, req))

    async def run() -> list[tuple[str, str, str | None, Decision]]:
        out = []
        async with OfflineEvaluator(config) as ev:
            for name, expect, reason, req in prepared:
                _, decision = await ev.evaluate(req)
                out.append((name, expect, reason, decision))
        return out

    failed = 0
    for name, expect, reason, decision in asyncio.run(run()):
        ok = decision.verdict.label == expect and (
            reason is None or decision.reason.value == reason
        )
        failed += not ok
        mark = "PASS" if ok else "FAIL"
        got = f"{decision.verdict.label} ({decision.reason.value})"
        want = f"{expect}" + (f" ({reason})" if reason else "")
        print(f"{mark} {name}: got {got}" + ("" if ok else f", expected {want}"))
    print(f"{len(prepared) - failed} passed, {failed} failed")
    return 1 if failed else 0


def register(sub: Any) -> None:
    from .common import add_config, add_json

    p = sub.add_parser("policy", help="explain and test policy")
    psub = p.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    ex = add_config(psub.add_parser("explain", help="decide one request and print every finding"))
    ex.add_argument("--method", default="GET", help="request method (default GET)")
    ex.add_argument("--path", required=True, help="request path, as the client sends it")
    ex.add_argument("--host", default="127.0.0.1", help="Host header (default 127.0.0.1)")
    ex.add_argument("--ip", default="127.0.0.1", help="client address (default 127.0.0.1)")
    ex.add_argument("--token", help="bearer token the request carries")
    ex.add_argument("--cert", metavar="PEM", help="client certificate the request presents")
    ex.add_argument(
        "--header", action="append", metavar="'NAME: VALUE'", help="extra header (repeatable)"
    )
    add_json(ex)
    ex.set_defaults(func=cmd_explain)
    te = psub.add_parser("test", help="run a table of policy cases")
    te.add_argument("file", help="TOML file of [[case]] tables (see the README)")
    te.set_defaults(func=cmd_test)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
