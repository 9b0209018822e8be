"""`ztgateway users list | show | set | lock | unlock | mfa enroll | mfa reset | webauthn list |
webauthn remove` and
`ztgateway sessions list | show | terminate`.

They write to the store the running gateway reads; it applies the change within its sync
interval (0.25 s with SQLite): a terminated session is refused and its open WebSockets closed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..clock import SYSTEM_CLOCK
from ..config import load_config
from ..credentials.mfa import MFA, MFAUnavailable
from ..credentials.totp import qr_terminal
from ..store import Store, store_from_url
from ..store.base import SESSION_HISTORY, UserRecord
from .common import (
    add_config,
    add_json,
    duration_arg,
    fmt_duration,
    fmt_time,
    key_values,
    operator_audit_log,
    print_json,
    table,
)

FOREVER = 4102444800.0  # 2100-01-01: "until unlocked"


def _run(args: argparse.Namespace, work: Callable[[Store, Any], Awaitable[int]]) -> int:
    config = load_config(args.config)

    async def go() -> int:
        store = store_from_url(config.store.url, base=config.store.base)
        await store.open()
        try:
            return await work(store, config)
        finally:
            await store.close()

    return asyncio.run(go())


def users_list(args: argparse.Namespace) -> int:
    async def work(store: Store, config: Any) -> int:
        now = SYSTEM_CLOCK.time()
        users = store.users()
        if args.json:
            print_json(
                [
                    {
                        "user": u.user,
                        "mfa_enrolled": bool(u.mfa_secret),
                        "locked": u.locked(now),
                        "locked_until": u.locked_until,
                        "lock_reason": u.lock_reason,
                        "timezone": u.timezone,
                        "working_hours": u.working_hours,
                    }
                    for u in users
                ]
            )
            return 0
        rows = [
            (
                u.user,
                "enrolled" if u.mfa_secret else "-",
                _locked_text(u.locked_until) if u.locked(now) else "-",
                u.timezone or "-",
                u.working_hours or "-",
            )
            for u in users
        ]
        headers = ("USER", "MFA", "LOCKED UNTIL", "TIMEZONE", "HOURS")
        print(table(headers, rows, empty="no users yet"))
        return 0

    return _run(args, work)


def users_set(args: argparse.Namespace) -> int:
    async def work(store: Store, config: Any) -> int:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        from ..config import parse_time_window

        u = store.user(args.user) or UserRecord(user=args.user)
        if args.timezone:
            try:
                ZoneInfo(args.timezone)
            except (ZoneInfoNotFoundError, ValueError):
                print(f"error: unknown time zone {args.timezone!r}", file=sys.stderr)
                return 2
            u = replace(u, timezone=args.timezone)
        if args.hours:
            try:
                parse_time_window(args.hours, ZoneInfo(u.timezone or "UTC"))
            except ValueError as exc:
                print(f"error: --hours: {exc}", file=sys.stderr)
                return 2
            u = replace(u, working_hours=args.hours)
        await store.save_user(u)
        print(f"{u.user}: timezone={u.timezone or '-'} hours={u.working_hours or '-'}")
        return 0

    return _run(args, work)


def _locked_text(until: float | None) -> str:
    return "until unlocked" if until is not None and until >= FOREVER else fmt_time(until)


def users_lock(args: argparse.Namespace) -> int:
    async def work(store: Store, config: Any) -> int:
        u = store.user(args.user) or UserRecord(user=args.user)
        until = SYSTEM_CLOCK.time() + args.duration if args.duration else FOREVER
        await store.save_user(
            replace(u, locked_until=until, lock_reason=args.reason or "locked by an operator")
        )
        ended = 0
        for s in store.sessions(args.user):
            ended += await store.revoke_session(s.session_id, "account locked", SYSTEM_CLOCK.time())
        shown = (
            "until unlocked"
            if until >= FOREVER
            else f"until {fmt_time(until)} ({fmt_duration(args.duration)})"
        )
        print(f"{args.user}: locked {shown}; {ended} sessions terminated")
        return 0

    return _run(args, work)


def users_unlock(args: argparse.Namespace) -> int:
    async def work(store: Store, config: Any) -> int:
        u = store.user(args.user)
        if u is None:
            print(f"error: no user {args.user!r}", file=sys.stderr)
            return 1
        await store.save_user(
            replace(u, locked_until=None, lock_reason=None, mfa_locked_until=None)
        )
        await store.reset_failures_async(f"mfa:{args.user}")
        print(f"{args.user}: unlocked")
        return 0

    return _run(args, work)


def mfa_enroll(args: argparse.Namespace) -> int:
    async def work(store: Store, config: Any) -> int:
        mfa = MFA(config.mfa, store, create_key=config.mfa.key_file is not None)
        try:
            enrollment = await mfa.enroll(args.user)
        except MFAUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        # stdout: the otpauth URI alone (scripts rely on it); the rest is for a person.
        print(enrollment.uri)
        if not args.quiet:
            print(qr_terminal(enrollment.uri), file=sys.stderr)
            print("Backup codes (each works once; store them safely):", file=sys.stderr)
            for c in enrollment.backup_codes:
                print(f"  {c}", file=sys.stderr)
        return 0

    return _run(args, work)


def mfa_reset(args: argparse.Namespace) -> int:
    async def work(store: Store, config: Any) -> int:
        mfa = MFA(config.mfa, store)
        if not await mfa.reset(args.user):
            print(f"{args.user}: no MFA enrolment", file=sys.stderr)
            return 1
        print(f"{args.user}: MFA reset; the user enrols again at the next step-up")
        return 0

    return _run(args, work)


def webauthn_list(args: argparse.Namespace) -> int:
    async def work(store: Store, config: Any) -> int:
        credentials = await store.webauthn_credentials(args.user)
        if args.json:
            print_json([c.summary() for c in credentials])
            return 0
        rows = [
            [c.credential_id, c.name, fmt_time(c.created_at), fmt_time(c.last_used_at),
             str(c.sign_count), "yes" if c.user_verified else "no"]
            for c in credentials
        ]  # fmt: skip
        print(
            table(
                ["CREDENTIAL", "NAME", "ADDED", "LAST USED", "COUNTER", "UV"], rows, empty="(none)"
            )
        )
        return 0

    return _run(args, work)


def webauthn_remove(args: argparse.Namespace) -> int:
    """Remove a lost or compromised key; the removal is audited like the admin API's."""

    async def work(store: Store, config: Any) -> int:
        ids = [c.credential_id for c in await store.webauthn_credentials(args.user)]
        found = [i for i in ids if i.startswith(args.credential)]
        if len(found) != 1:
            what = "no credential" if not found else "more than one credential"
            print(f"error: {what} of {args.user} starts with {args.credential!r}", file=sys.stderr)
            return 1
        if not await store.remove_webauthn_credential(args.user, found[0]):
            print(f"error: {found[0]} was removed meanwhile", file=sys.stderr)
            return 1
        await _audit_operator(config, f"cli: webauthn credential {found[0]} of {args.user} removed")
        print(f"{args.user}: security key {found[0]} removed")
        return 0

    return _run(args, work)


async def _audit_operator(config: Any, detail: str) -> None:
    """One `ztgw.admin` event in the gateway's audit chain for an operator's change made here
    (the same shape the admin API writes), through the journal like a gateway process."""
    from ..audit.keys import load_mask_key
    from ..context import RequestContext
    from ..decision import Decision, Finding, Reason, Verdict
    from ..decisions import audit_event

    a = config.audit
    log = operator_audit_log(a)
    ctx = RequestContext.synthetic(method="CLI", path="ztgateway users", headers={})
    finding = Finding("admin", Reason.POLICY_ALLOWED, Verdict.ALLOW, detail=detail)
    decision = Decision(ctx.decision_id, Verdict.ALLOW, Reason.POLICY_ALLOWED, (finding,))
    mask = load_mask_key(a.mask_key_file, a.mask_key_env, create=False)
    event = audit_event(ctx, decision, config.revision, mask_key=mask)
    event["type"] = "ztgw.admin"
    async with log:
        log.record(event)


def mfa_rotate_key(args: argparse.Namespace) -> int:
    """Re-seal every stored TOTP secret under a new MFA key (the old one is the configured key).

    The running gateways hold the old key in memory: stop them, rotate, install the new key
    where [mfa] key_file or its environment variable points, start them (docs/deploy.md).
    """

    import os

    from ..credentials.totp import SecretBox

    new_path = Path(args.new_key_file)
    if not new_path.exists():
        fd = os.open(new_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(SecretBox.generate_key_b64() + "\n")
        print(f"created a new key in {new_path} (mode 0600)")
    new = SecretBox.from_b64(new_path.read_text().strip())

    async def work(store: Store, config: Any) -> int:
        from ..credentials.mfa import load_box

        old = load_box(config.mfa)
        if old is None:
            print("error: no current MFA key ([mfa] key_file or its variable)", file=sys.stderr)
            return 2
        resealed = []
        for u in store.users():
            if not u.mfa_secret:
                continue
            # Every secret opens with the old key before anything is written: a mixed store
            # (some secrets under each key) would lock people out.
            resealed.append(
                replace(u, mfa_secret=new.seal(old.open(u.mfa_secret, user=u.user), user=u.user))
            )
        for u in resealed:
            await store.save_user(u)
        print(
            f"re-sealed {len(resealed)} TOTP secrets under {new_path}; now point [mfa] key_file "
            f"(or {config.mfa.key_env}) at it and start the gateways"
        )
        return 0

    return _run(args, work)


def sessions_list(args: argparse.Namespace) -> int:
    async def work(store: Store, config: Any) -> int:
        sessions = store.sessions(args.user)
        if args.json:
            print_json([s.to_json() | {"session_id": s.session_id} for s in sessions])
            return 0
        now = SYSTEM_CLOCK.time()
        rows = []
        for s in sessions:
            state = (
                f"terminated ({s.revoked_reason})"
                if s.revoked
                else ("expired" if s.expires_at < now else "active")
            )
            rows.append(
                (
                    s.session_id[:24],
                    s.kind,
                    s.user,
                    s.device_id or "-",
                    s.last_ip,
                    fmt_time(s.last_seen),
                    f"{s.anomaly:.2f}",
                    state,
                )
            )
        headers = ("SESSION", "KIND", "USER", "DEVICE", "LAST IP", "LAST SEEN", "ANOMALY", "STATE")
        print(table(headers, rows, empty="no sessions"))
        return 0

    return _run(args, work)


def _find(store: Store, prefix: str) -> list[str]:
    return [s.session_id for s in store.sessions() if s.session_id.startswith(prefix)]


def sessions_show(args: argparse.Namespace) -> int:
    async def work(store: Store, config: Any) -> int:
        found = _find(store, args.session)
        if len(found) != 1:
            print(f"error: {len(found)} sessions match {args.session!r}", file=sys.stderr)
            return 1
        s = store.session(found[0])
        assert s is not None
        # The last decisions live in the store, not on the session (written behind by the
        # gateway: up to its flush interval old).
        history = await store.session_history(s.session_id)
        if args.json:
            print_json(
                s.to_json()
                | {
                    "session_id": s.session_id,
                    "verified_ip": s.verified_ip or s.start_ip,
                    "extra": s.extra,
                    "history": [d.to_json() for d in history],
                }
            )
            return 0
        data = s.to_json()
        now = SYSTEM_CLOCK.time()
        state = (
            f"terminated ({s.revoked_reason})"
            if s.revoked
            else ("expired" if s.expires_at < now else "active")
        )
        pairs: list[tuple[str, Any]] = [("session", s.session_id), ("state", state)]
        for key, value in data.items():
            if key in ("session_id", "revoked", "revoked_reason"):
                continue
            is_time = (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and (key.endswith(("_at", "_seen")) or key in ("created", "expires", "mfa_at"))
            )
            pairs.append((key.replace("_", " "), fmt_time(value) if is_time else value))
        pairs.append(("verified ip", s.verified_ip or s.start_ip))
        print(key_values(pairs))
        if history:
            print("last decisions:")
            rows = []
            for d in history:
                h = d.to_json()
                rows.append(
                    (
                        fmt_time(h.get("at") or h.get("time") or h.get("ts")),
                        h.get("verdict", "-"),
                        h.get("reason", "-"),
                        h.get("route") or "-",
                        h.get("path") or "-",
                        h.get("ip") or "-",
                    )
                )
            headers = ("TIME", "VERDICT", "REASON", "ROUTE", "PATH", "IP")
            print("  " + table(headers, rows).replace("\n", "\n  "))
        return 0

    return _run(args, work)


def sessions_terminate(args: argparse.Namespace) -> int:
    async def work(store: Store, config: Any) -> int:
        if args.user:
            targets = [s.session_id for s in store.sessions(args.user) if not s.revoked]
        elif args.session:
            targets = _find(store, args.session)
            if len(targets) != 1:
                print(f"error: {len(targets)} sessions match {args.session!r}", file=sys.stderr)
                return 1
        else:
            print("error: give a session id or --user", file=sys.stderr)
            return 2
        now = SYSTEM_CLOCK.time()
        ended = sum([await store.revoke_session(sid, args.reason, now) for sid in targets])
        print(f"{ended} sessions terminated")
        return 0

    return _run(args, work)


def register(sub: Any) -> None:
    def add(
        parent: Any, name: str, help_text: str, func: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = add_config(parent.add_parser(name, help=help_text))
        sp.set_defaults(func=func)
        return sp

    user_help = "user name (as the gateway sees it: token sub or certificate UID)"
    users = sub.add_parser("users", help="accounts: locks, working hours, MFA")
    usub = users.add_subparsers(dest="users_command", required=True, metavar="SUBCOMMAND")
    add_json(add(usub, "list", "known users", users_list))
    st = add(usub, "set", "a user's time zone and working hours (risk signal)", users_set)
    st.add_argument("user", help=user_help)
    st.add_argument("--timezone", metavar="ZONE", help="IANA time zone, e.g. Europe/Paris")
    st.add_argument("--hours", help="working hours, e.g. 'mon-fri 08:00-18:00'")
    lk = add(usub, "lock", "lock an account and end its sessions", users_lock)
    lk.add_argument("user", help=user_help)
    span = lk.add_mutually_exclusive_group()
    span.add_argument(
        "--for",
        dest="duration",
        type=duration_arg("m"),
        default=0.0,
        metavar="DURATION",
        help="how long, like 30m, 4h or 2d (default: until unlocked)",
    )
    span.add_argument(
        "--minutes",
        dest="duration",
        type=duration_arg("m"),
        metavar="N",
        help="the same as --for, in minutes",
    )
    lk.add_argument("--reason", help="shown in audit events and to the user")
    add(usub, "unlock", "unlock an account (and its MFA lock-out)", users_unlock).add_argument(
        "user", help=user_help
    )
    mfa = usub.add_parser("mfa", help="TOTP enrolment")
    msub = mfa.add_subparsers(dest="mfa_command", required=True, metavar="SUBCOMMAND")
    en = add(
        msub,
        "enroll",
        "new TOTP secret: prints the otpauth URI (QR and backup codes on stderr)",
        mfa_enroll,
    )
    en.add_argument("user", help=user_help)
    en.add_argument("--quiet", action="store_true", help="only the URI")
    add(msub, "reset", "remove a user's TOTP enrolment", mfa_reset).add_argument(
        "user", help=user_help
    )
    rk = add(
        msub,
        "rotate-key",
        "re-seal every TOTP secret under a new MFA key (gateways stopped)",
        mfa_rotate_key,
    )
    rk.add_argument(
        "--new-key-file",
        required=True,
        metavar="FILE",
        help="the new key (base64 of 32 bytes); created with mode 0600 if it does not exist",
    )

    wa = usub.add_parser("webauthn", help="security keys and passkeys")
    wsub = wa.add_subparsers(dest="webauthn_command", required=True, metavar="SUBCOMMAND")
    add_json(add(wsub, "list", "a user's security keys and passkeys", webauthn_list)).add_argument(
        "user", help=user_help
    )
    rm = add(wsub, "remove", "remove a lost or compromised key (audited)", webauthn_remove)
    rm.add_argument("user", help=user_help)
    rm.add_argument("credential", help="credential id or unique prefix (users webauthn list)")

    sessions = sub.add_parser("sessions", help="live sessions")
    ssub = sessions.add_subparsers(dest="sessions_command", required=True, metavar="SUBCOMMAND")
    ls = add_json(add(ssub, "list", "sessions (all, or one user's)", sessions_list))
    ls.add_argument("--user", help="only this user's sessions")
    add_json(
        add(ssub, "show", f"one session, with its last {SESSION_HISTORY} decisions", sessions_show)
    ).add_argument("session", help="id or unique prefix")
    tm = add(ssub, "terminate", "end a session or every session of a user", sessions_terminate)
    tm.add_argument("session", nargs="?", help="id or unique prefix")
    tm.add_argument("--user", help="end every session of this user")
    tm.add_argument(
        "--reason",
        default="terminated by an operator",
        help="recorded for the audit and `sessions list` (the person is told an administrator ended it)",
    )
