"""Session micro-benchmark for `bench.micro`: lookup cost and memory, 10 and 100,000 sessions.

Issue 9: "session lookup with 10 and 100,000 sessions ... Cost must stay flat as routes and
sessions grow ... memory per session ≤ 2 KB".

    python -m bench.micro_sessions [--population active|new] [--sessions N]

(alone: the memory of one population, in a fresh process; `bench.micro` runs the rest)

What is measured is what the gateway holds: a real `SQLiteStore` (the production store) in a
temporary directory, opened through its normal load path (`open()` → `_load_all`), so the
sessions in memory are the ones it decoded from its own rows.

- 10 sessions are written through the store's own write path (`save_session`).
- 100,000 sessions are written with the very SQL `save_session` runs (the session row and its
  change event; `data` is the JSON of every field, as `json.dumps(asdict(session))` gives), in
  one transaction: `save_session` commits once per session (~0.5 ms each, ~45 s for 100,000).
  After loading, a sample of sessions is compared field by field with what was written, so the
  bulk rows are what the store would have written itself.

Sessions are realistic: 90% token-bound API sessions (`tok:` + 48 hex, as `token_session_id`),
10% browser sessions (`ck:` + 48 hex) from an OIDC sign-in followed by a TOTP step-up (their
`extra` holds what `portal/signin.py` and `portal/mfa.py` keep: provider, e-mail, groups, the ~1 KB
ID token, the MFA method); every one device-bound (`sha256:` + 32 hex, the id of a certificate
without a device URI), with a user, an IPv4 address (its `verified_ip`), a client user agent,
timestamps, and `extra` as sign-in leaves it. A session's decision history is not in memory
(it is written behind to the store's `session_history`, decision 0008). Two populations:

- *active*: sessions that served more than 20 requests, each with the
  per-session request counter `SessionKeeper` records (`req:<session id>`): the steady state
  of a session in use. The lookup and stage timings use this population.
- *new*: sessions as `SessionKeeper` creates them (one request, no counter yet).

The timings are `bench.micro.measure`'s (batches of ~0.1 s; median and minimum of the
per-operation mean), with the batches of the 10- and the 100,000-session store alternating, so
their ratio is not skewed by the machine getting busier between the two.

Memory per session is the growth of the process's resident memory (RSS) while a fresh store
loads 100,000 sessions, divided by 100,000: the `Session` objects, their strings, floats,
`extra` dicts, the store's dictionary, and the allocator's overhead. The
new population is measured in a fresh process of its own (started at the beginning and run
while this one builds the active store), so neither measurement reuses memory the other
freed. The request counters are measured with tracemalloc (allocated bytes) and reported
apart.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.timing import Body, Setup, batch_size
from ztgateway.store.base import SESSION_HISTORY, ChangeKind, Session
from ztgateway.store.sqlite import SAVE_SESSION, SCHEMA, SQLiteStore

REPO = Path(__file__).resolve().parent.parent
SMALL = 10
LARGE = 100_000
BYTES_GOAL = 2048
FLAT_GOAL = 1.5
ROUTE = "api"
CONTEXT_POOL = 16_384  # request contexts for the stage row, the same number for 10 and 100,000
SAMPLE_EVERY = 500  # sessions kept to check the round trip through the store
_FIELDS = tuple(f.name for f in fields(Session))

# The change event SQLiteStore._write appends to save_session's SAVE_SESSION.
CHANGE_SQL = "INSERT INTO changes (kind, key, at) VALUES (?, ?, ?)"

API_AGENTS = (
    "python-httpx/0.27.0",
    "curl/8.5.0",
    "Go-http-client/2.0",
    "okhttp/4.12.0",
    "ztgw-agent/1.4.2 (linux; amd64)",
    "Apache-HttpClient/5.3 (Java/21.0.2)",
)
BROWSER_AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4_1) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4.1 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:125.0) Gecko/20100101 Firefox/125.0",
)


GROUPS = ("staff", "engineering", "platform-oncall", "finance-readonly", "vpn-users", "admins")
_JWT_HEADER = base64.urlsafe_b64encode(b'{"alg":"RS256","kid":"2024-05-rsa","typ":"JWT"}')


def id_token(rng: random.Random) -> str:
    """An RS256 ID token's length and shape (~1 KB): header, claims, 2048-bit signature."""
    claims = base64.urlsafe_b64encode(rng.randbytes(rng.randint(380, 520)))
    signature = base64.urlsafe_b64encode(rng.randbytes(256))
    return b".".join((_JWT_HEADER, claims, signature)).decode().replace("=", "")


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def iter_sessions(
    n: int, *, now: float, active: bool, seed: int
) -> Iterator[tuple[Session, str | None]]:
    """`n` sessions as the gateway creates and updates them, with their token hashes."""
    from ztgateway.sessions import cookie_session_id, token_session_id

    rng = random.Random(seed)
    for i in range(n):
        cookie = i % 10 == 9
        ip = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        token_hash: str | None = None
        if cookie:
            sid = cookie_session_id(rng.randbytes(32).hex())
            created = now - rng.uniform(0, 6 * 3600)
            expires = created + 43200.0  # sessions.absolute_timeout
            agent = rng.choice(BROWSER_AGENTS)
            mfa_at: float | None = created + rng.uniform(1, 20)
        else:
            token_hash = rng.randbytes(32).hex()
            sid = token_session_id(token_hash)
            created = now - rng.uniform(0, 3000)
            expires = created + 3600.0  # capped by the token's exp
            agent = rng.choice(API_AGENTS)
            mfa_at = None
        user = f"user{i:06d}@corp.example.com"
        extra: dict[str, Any] = {}
        if cookie:
            # What the OIDC sign-in (portal/signin.py) and a TOTP step-up (portal/mfa.py) keep.
            extra = {
                "source": "oidc",
                "provider": "corp",
                "email": user,
                "groups": rng.sample(GROUPS, rng.randint(1, 4)),
                "id_token": id_token(rng),
                "mfa_method": "totp",
            }
        if active:
            last_seen = max(created, now - rng.uniform(0, 300))
            requests = rng.randint(SESSION_HISTORY + 1, 5000)
            anomaly = rng.choice((0.0, 0.0, 0.0, rng.uniform(0.01, 0.3)))
            anomaly_at = last_seen
        else:
            created = max(created, now - 300)
            last_seen, requests, anomaly, anomaly_at = created, 1, 0.0, 0.0
        session = Session(
            session_id=sid,
            kind="cookie" if cookie else "token",
            user=user,
            device_id="sha256:" + rng.randbytes(16).hex(),
            start_ip=ip,
            last_ip=ip,
            user_agent=agent,
            created=created,
            last_seen=last_seen,
            expires_at=expires,
            mfa_at=mfa_at,
            anomaly=anomaly,
            anomaly_at=anomaly_at,
            requests=requests,
            extra=extra,
            verified_ip=ip,
        )
        yield session, token_hash


def new_store(path: Path) -> SQLiteStore:
    # Background sync and write-behind would only poll an unchanging database here.
    return SQLiteStore(path, sync_interval=3600.0, flush_interval=3600.0)


async def write_with_store(
    path: Path, sessions: Iterable[tuple[Session, str | None]]
) -> tuple[list[str], list[Session]]:
    """Through `SQLiteStore.save_session`, one durable write each."""
    hashes: list[str] = []
    written: list[Session] = []
    store = new_store(path)
    await store.open()
    try:
        for s, h in sessions:
            await store.save_session(s)
            written.append(s)
            if h is not None:
                hashes.append(h)
    finally:
        await store.close()
    return hashes, written


def write_bulk(
    path: Path, sessions: Iterable[tuple[Session, str | None]], now: float
) -> tuple[list[str], list[Session], list[str]]:
    """save_session's SQL in one transaction; the token hashes, a sample, the session ids."""
    hashes: list[str] = []
    sample: list[Session] = []
    ids: list[str] = []  # kept until the store has loaded: its memory is not to be reused

    def rows() -> Iterator[tuple[str, str, float, str]]:
        for i, (s, h) in enumerate(sessions):
            data = json.dumps({name: getattr(s, name) for name in _FIELDS})
            if i % SAMPLE_EVERY == 0:
                assert data == json.dumps(asdict(s))  # what save_session writes
                sample.append(s)
            if h is not None:
                hashes.append(h)
            ids.append(s.session_id)
            yield s.session_id, s.user, s.expires_at, data

    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.executescript(SCHEMA)
        with con:
            con.executemany(SAVE_SESSION, rows())
            con.executemany(CHANGE_SQL, ((ChangeKind.SESSION.value, k, now) for k in ids))
    finally:
        con.close()
    return hashes, sample, ids


async def load(path: Path, n: int, sample: list[Session]) -> tuple[SQLiteStore, dict[str, Any]]:
    """Open a fresh store on `path`; the resident memory it added, per session."""
    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    store = new_store(path)
    await store.open()
    seconds = time.perf_counter() - t0
    gc.collect()
    after = rss_bytes()
    if len(store.sessions()) != n:
        raise SystemExit(f"micro: the store loaded {len(store.sessions())} sessions, not {n}")
    for s in sample:
        if store.session(s.session_id) != s:
            raise SystemExit(f"micro: session {s.session_id[:16]}… did not round-trip")
    # Resident memory moves in pages and arenas: meaningless for a handful of sessions.
    grown = None if before is None or after is None or n < 10_000 else after - before
    return store, {
        "sessions": n,
        "load_s": round(seconds, 2),
        "rss_growth_bytes": grown,
        "bytes_each": None if grown is None else round(grown / n),
    }


def add_request_counters(store: SQLiteStore) -> int:
    """The `req:<id>` window SessionKeeper records on every request; bytes allocated."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for s in store.sessions():
        store.record_failure(f"req:{s.session_id}", s.last_seen)
    allocated = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return allocated


async def population(
    directory: Path, population: str, n: int, now: float
) -> tuple[SQLiteStore, list[str], dict[str, Any]]:
    """Write `n` sessions of a population, load them into a fresh store; memory figures."""
    path = directory / f"sessions-{population}-{n}.db"
    sessions = iter_sessions(n, now=now, active=population == "active", seed=n)
    t0 = time.perf_counter()
    ids: list[str] = []
    if n <= 1000:
        hashes, sample = await write_with_store(path, sessions)
        how = "SQLiteStore.save_session"
    else:
        hashes, sample, ids = write_bulk(path, sessions, now)
        how = "save_session's SQL, one transaction"
    insert_s = time.perf_counter() - t0
    store, mem = await load(path, n, sample)
    del ids
    mem.update(insert_s=round(insert_s, 2), written_with=how)
    return store, hashes, mem


def fresh(text: str) -> str:
    """An equal string that is a new object (its hash not computed yet)."""
    half = len(text) // 2
    return text[:half] + text[half:]


def lookup_setup(store: SQLiteStore, token_hashes: list[str], seed: int) -> Setup:
    """What the stage does to find a request's session: derive the id, read the cache."""
    from ztgateway.sessions import token_session_id

    rng = random.Random(seed)
    assert all(store.session(token_session_id(h)) is not None for h in token_hashes[:1000])

    async def setup(n: int) -> Body:
        # New strings, as a verified token's hash is: nothing cached, nothing shared.
        hashes = [fresh(h) for h in rng.choices(token_hashes, k=n)]

        async def body(n: int) -> None:
            get = store.session
            tsid = token_session_id
            for h in hashes:
                get(tsid(h))

        return body

    return setup


async def stage_setup(store: SQLiteStore, token_hashes: list[str], seed: int) -> Setup:
    """SessionStage.check for a live token session, on a route without rate limits."""
    from yarl import URL

    from ztgateway.config import (
        RiskConfig,
        RouteConfig,
        RouteSession,
        SessionsConfig,
        UpstreamConfig,
    )
    from ztgateway.context import Identity, RequestContext
    from ztgateway.credentials.jwt import VerifiedToken
    from ztgateway.edge.tls import CertInfo
    from ztgateway.sessions import token_session_id
    from ztgateway.stages.session import SessionStage

    route = RouteConfig(
        name=ROUTE,
        prefix="/api/",
        upstream=UpstreamConfig(name="u", url=URL("http://127.0.0.1:8080")),
        session=RouteSession(ip_drift="step_up"),
    )
    runtime = SimpleNamespace(
        store=store,
        config=SimpleNamespace(sessions=SessionsConfig(), risk=RiskConfig()),
        dry_run=False,
    )
    stage = SessionStage(runtime)  # type: ignore[arg-type]
    rng = random.Random(seed)
    pool: list[RequestContext] = []
    for h in rng.choices(token_hashes, k=CONTEXT_POOL):
        s = store.session(token_session_id(h))
        assert s is not None and s.device_id is not None
        # A request carries its own strings (from its certificate, token and headers), never
        # the session's objects: compared by content, as in the gateway.
        user, device_id = fresh(s.user), fresh(s.device_id)
        cert = CertInfo(
            der=b"",
            subject=f"CN={user}",
            common_name=user,
            user=user,
            email=user,
            device_id=device_id,
            sans=(),
            serial=len(pool) + 1,
            fingerprint_sha256=device_id[7:],
            issuer="CN=bench CA",
            not_before=s.created - 86400,
            not_after=s.created + 86400 * 365,
            client_auth=True,
        )
        ctx = RequestContext.synthetic(
            path="/api/v1/orders/42",
            headers={
                "Host": "gw.corp.example.com",
                "User-Agent": fresh(s.user_agent),
                "Accept": "*/*",
            },
            client_ip=fresh(s.verified_ip or s.start_ip),
            cert=cert,
        )
        ctx.route = route
        ctx.identity = Identity(
            user=user,
            source="token",
            token=VerifiedToken(
                issuer="https://idp.corp.example.com",
                claims={},
                subject=user,
                token_hash=fresh(h),
                expires_at=s.expires_at,
                issued_at=s.created,
                cnf_x5t_s256=device_id[7:],
                algorithm="ES256",
                key_id="k1",
            ),
            device_id=device_id,
        )
        pool.append(ctx)
    # Every context takes the whole path: its live session is found, checked, and passes.
    for ctx in pool[:100]:
        findings = await stage.check(ctx)
        if ctx.session is None or ctx.session.session is None or findings:
            raise SystemExit(f"micro: the session stage did not pass a live session: {findings}")

    async def setup(n: int) -> Body:
        ctxs = [pool[i % CONTEXT_POOL] for i in range(n)]

        async def body(n: int) -> None:
            check = stage.check
            for c in ctxs:
                await check(c)

        return body

    return setup


def remove_databases(directory: Path, name: str = "sessions-*.db") -> None:
    for db in directory.glob(name + "*"):  # with -wal and -shm; ~300 MB in all
        db.unlink(missing_ok=True)


async def measure_pair(
    small: Setup, large: Setup, *, target: float, repeats: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """bench.micro.measure for two setups, their batches alternating: the ratio of the two is
    not skewed by the machine getting busier or quieter between them."""
    sizes = (await batch_size(small, target), await batch_size(large, target))
    per_op: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for i, setup in enumerate((small, large)):
            n = sizes[i]
            body = await setup(n)
            gc.collect()
            t0 = time.perf_counter()
            await body(n)
            per_op[i].append((time.perf_counter() - t0) / n * 1e6)
    small_r, large_r = (
        {
            "median_us": round(statistics.median(ops), 3),
            "min_us": round(min(ops), 3),
            "batch": n,
            "repeats_us": [round(x, 3) for x in ops],
        }
        for ops, n in zip(per_op, sizes, strict=True)
    )
    return small_r, large_r


async def run(
    tmp: Path, *, target: float, repeats: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """The session rows (timings, notes) and the summary keys of `bench.micro`'s results."""
    started = time.perf_counter()
    now = time.time()
    # The new population's memory, in a fresh process, while this one builds its stores.
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.micro_sessions",
        "--population",
        "new",
        "--sessions",
        str(LARGE),
        "--dir",
        str(tmp),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    timings: dict[tuple[str, int], dict[str, Any]] = {}
    memory: dict[str, Any] = {}
    stores: dict[int, tuple[SQLiteStore, list[str]]] = {}
    try:
        # The large store first, on a heap nothing large was freed from (resident memory).
        for n in (LARGE, SMALL):
            store, hashes, mem = await population(tmp, "active", n, now)
            stores[n] = store, hashes
            mem["request_counter_bytes_each"] = round(add_request_counters(store) / n)
            memory[f"active_{n}"] = mem
            log(f"sessions: {n:,} active sessions loaded: {mem}")
        out, _ = await child.communicate()
        if child.returncode != 0:
            raise SystemExit("micro: the new-session memory measurement failed")
        memory[f"new_{LARGE}"] = json.loads(out)
        log(f"sessions: {LARGE:,} new sessions loaded (own process): {memory[f'new_{LARGE}']}")
        # Out of the collector's way: what is timed is the request path, not the full
        # collections of millions of session objects that a gc.collect() before each batch
        # would cost here (about 2 s each with 100,000 sessions in use).
        gc.collect()
        gc.freeze()
        (small, small_h), (large, large_h) = stores[SMALL], stores[LARGE]
        timings["lookup", SMALL], timings["lookup", LARGE] = await measure_pair(
            lookup_setup(small, small_h, seed=1),
            lookup_setup(large, large_h, seed=2),
            target=target,
            repeats=repeats,
        )
        timings["stage", SMALL], timings["stage", LARGE] = await measure_pair(
            await stage_setup(small, small_h, seed=1),
            await stage_setup(large, large_h, seed=2),
            target=target,
            repeats=repeats,
        )
    finally:
        for store, _ in stores.values():
            await store.close()
        stores.clear()
        gc.unfreeze()
        gc.collect()
        if child.returncode is None:
            child.kill()
            await child.wait()
        remove_databases(tmp)

    def ratio(kind: str) -> float | None:
        small, large = float(timings[kind, SMALL]["min_us"]), float(timings[kind, LARGE]["min_us"])
        return round(large / small, 3) if small else None

    def added(kind: str) -> float:
        small, large = float(timings[kind, SMALL]["min_us"]), float(timings[kind, LARGE]["min_us"])
        return round(large - small, 3)

    active_b = memory[f"active_{LARGE}"]["bytes_each"]
    new_b = memory[f"new_{LARGE}"]["bytes_each"]
    rows = []
    for n, label in ((SMALL, "10"), (LARGE, "100,000")):
        rows.append(
            {
                "name": f"session lookup, {label} sessions",
                **timings["lookup", n],
                "note": "token_session_id + SQLiteStore.session (in memory), random live "
                "sessions (SQLiteStore, loaded from disk)",
            }
        )
    for n, label in ((SMALL, "10"), (LARGE, "100,000")):
        rows.append(
            {
                "name": f"session stage check, {label} sessions",
                **timings["stage", n],
                "note": "SessionStage.check of a live token session (IP, device, user, agent, "
                "anomaly, request window); no rate limit on the route",
            }
        )
    lookup_ratio, stage_ratio = ratio("lookup"), ratio("stage")
    return {
        "rows": rows,
        "session_lookup_10_us": timings["lookup", SMALL]["median_us"],
        "session_lookup_100k_us": timings["lookup", LARGE]["median_us"],
        "session_lookup_ratio": lookup_ratio,
        "session_lookup_added_us": added("lookup"),
        "session_stage_10_us": timings["stage", SMALL]["median_us"],
        "session_stage_100k_us": timings["stage", LARGE]["median_us"],
        "session_stage_ratio": stage_ratio,
        "session_stage_added_us": added("stage"),
        "session_bytes_each": active_b,
        "session_bytes_each_new": new_b,
        "session_counter_bytes_each": memory[f"active_{LARGE}"]["request_counter_bytes_each"],
        "session_lookup": {
            "store": "SQLiteStore in a temporary directory, loaded through open()",
            "ratios": "100,000 vs 10 sessions, ratio of minimum times (added_us: their "
            "difference); flat = lookup ratio <= 1.5, as for routes",
            "bytes_each": "growth of resident memory while 100,000 sessions load into a fresh "
            "store, / 100,000; active: sessions that served > 20 requests (timed population), new: "
            "as SessionKeeper creates them (own process). Request counters (req:<id> windows, "
            "tracemalloc) apart",
            "memory": memory,
            "flat": None if lookup_ratio is None else lookup_ratio <= FLAT_GOAL,
            "within_2kb": None if active_b is None else active_b <= BYTES_GOAL,
            "within_2kb_new": None if new_b is None else new_b <= BYTES_GOAL,
            "elapsed_s": round(time.perf_counter() - started, 1),
        },
    }


async def memory_only(directory: Path, kind: str, n: int) -> dict[str, Any]:
    store, _, mem = await population(directory, kind, n, time.time())
    await store.close()
    remove_databases(directory, f"sessions-{kind}-{n}.db")  # only its own: bench.micro's are open
    return mem


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.micro_sessions")
    p.add_argument("--population", choices=("active", "new"), default="new")
    p.add_argument("--sessions", type=int, default=LARGE)
    p.add_argument("--dir", help="where the database goes (default: a temporary directory)")
    args = p.parse_args()
    directory = Path(args.dir or tempfile.mkdtemp(prefix="ztgw-sessions-"))
    print(json.dumps(asyncio.run(memory_only(directory, args.population, args.sessions))))
    if not args.dir:
        directory.rmdir()


if __name__ == "__main__":
    main()
