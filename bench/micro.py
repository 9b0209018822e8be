"""Micro-benchmarks of the per-request work, in-process (not part of `make test`).

    python -m bench.micro [--quick] [--json out.json] [--pki DIR]

Each row times one piece of what the gateway does for every request, with warm caches, built
the way `ztgateway/commands/policy.py`'s OfflineEvaluator builds its pipeline (same config loader,
same stages, same token verifier) and from the very route the end-to-end benchmark uses
(`bench/scenarios.py`). A row runs its operation in batches sized to take ~0.1 s and repeats
the batch; the table gives the median and minimum of the per-operation mean over the repeats.
The decision pipeline is also timed call by call, and `decision_us_median` is the median of
those per-request times.

The session rows (`bench/micro_sessions.py`) look sessions up in a real SQLiteStore holding 10
and then 100,000 realistic sessions, loaded from disk through the store's own load path, and
run the session stage's per-request check on them; `session_lookup_ratio` and
`session_stage_ratio` compare 100,000 with 10 sessions (minimum times, as for routes), and
`session_bytes_each` is the resident memory a loaded session costs. No numbers are invented:
a row that cannot be measured says "n/a" and why.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import micro_sessions
from bench.scenarios import (
    CLIENT,
    SCENARIOS,
    WORK,
    Pki,
    bound_token,
    gateway_config,
    make_pki,
)
from bench.scenarios import scenario as get_scenario
from bench.timing import Body, Setup, batch_size


@dataclass
class Row:
    name: str
    setup: Setup | None = None
    note: str = ""
    unavailable: str | None = None
    result: dict[str, Any] | None = None  # measured beforehand (the session rows)


def _pki(path: Path | None) -> Pki:
    from ztgateway.dev.pki import PKIPaths

    directory = path or (WORK / "pki")
    if (directory / "ca.pem").exists() and (directory / "clients" / f"{CLIENT}.pem").exists():
        return Pki(PKIPaths(directory))
    directory.mkdir(parents=True, exist_ok=True)
    return make_pki(directory)


async def measure(setup: Setup, *, target: float, repeats: int) -> dict[str, Any]:
    """Calibrate a batch size, then time `repeats` batches; µs per operation."""
    n = await batch_size(setup, target)
    per_op: list[float] = []
    for _ in range(repeats):
        body = await setup(n)
        gc.collect()
        t0 = time.perf_counter()
        await body(n)
        per_op.append((time.perf_counter() - t0) / n * 1e6)
    return {
        "median_us": round(statistics.median(per_op), 3),
        "min_us": round(min(per_op), 3),
        "batch": n,
        "repeats_us": [round(x, 3) for x in per_op],
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from yarl import URL

    from ztgateway.app import Gateway
    from ztgateway.audit import AuditLog
    from ztgateway.commands.policy import OfflineEvaluator, load_cert
    from ztgateway.config import RouteConfig, UpstreamConfig, load_config
    from ztgateway.context import RequestContext
    from ztgateway.credentials.jwt import TokenVerifier
    from ztgateway.forward.headers import upstream_request_headers
    from ztgateway.forward.identity import identity_headers
    from ztgateway.routes import RouteTable

    pki = _pki(Path(args.pki) if args.pki else None)
    tmp = Path(tempfile.mkdtemp(prefix="ztgw-micro-"))
    cfg_path = tmp / "gateway.toml"
    cfg_path.write_text(gateway_config(pki, port=8443, ops_port=9100, upstream_port=8080, work=tmp))
    config = load_config(cfg_path)
    cert_pem, _ = pki.client(CLIENT)
    cert = load_cert(str(cert_pem))
    token = bound_token(pki)
    full = get_scenario("ztgw_full")
    cert_only = get_scenario("ztgw_cert")

    evaluator = OfflineEvaluator(config)
    await evaluator.__aenter__()
    pipeline = evaluator.pipeline

    def context(path: str, with_token: bool) -> RequestContext:
        headers = {
            "Host": "127.0.0.1:8443",
            "User-Agent": "wrk",
            "Accept": "*/*",
        }
        if with_token:
            headers["Authorization"] = f"Bearer {token}"
        return RequestContext.synthetic(
            method="GET", path=path, host="127.0.0.1", headers=headers, cert=cert
        )

    # Warm: the first evaluation verifies the token (ES256) and fills the verified-token cache.
    warm = context(full.path, True)
    decision = await pipeline.evaluate(warm)
    if not decision.allowed:
        raise SystemExit(f"micro: the every-check request is not allowed: {decision.reason}")
    # The live gateway writes the token's session back after its first request; the offline
    # evaluator is a dry run and would otherwise look the unknown session up in the backend
    # (a thread hop to SQLite) on every evaluation, which a warm gateway never does.
    from ztgateway.sessions import SessionKeeper

    await SessionKeeper(evaluator.facts._base, config.sessions).after_decision(warm, decision)
    if not (await pipeline.evaluate(context(full.path, True))).allowed:
        raise SystemExit("micro: the every-check request is refused once its session exists")

    def pipeline_setup(path: str, with_token: bool) -> Setup:
        async def setup(n: int) -> Body:
            ctxs = [context(path, with_token) for _ in range(n)]

            async def body(n: int) -> None:
                ev = pipeline.evaluate
                for c in ctxs:
                    await ev(c)

            return body

        return setup

    async def ctx_setup(n: int) -> Body:
        async def body(n: int) -> None:
            for _ in range(n):
                context(full.path, True)

        return body

    verifier_cached = TokenVerifier(config.issuers)
    await verifier_cached.start()
    await verifier_cached.verify(token)
    verifier_uncached = TokenVerifier(config.issuers, cache_size=0)
    await verifier_uncached.start()

    def verify_setup(verifier: TokenVerifier) -> Setup:
        async def setup(n: int) -> Body:
            async def body(n: int) -> None:
                v = verifier.verify
                for _ in range(n):
                    await v(token)

            return body

        return setup

    upstream = UpstreamConfig(name="u", url=URL("http://127.0.0.1:8080"))

    def route_setup(count: int) -> Setup:
        routes = (
            *(
                RouteConfig(name=f"r{i}", prefix=f"/svc{i}/api/", upstream=upstream)
                for i in range(count)
            ),
            RouteConfig(name="root", prefix="/", upstream=upstream),
        )
        table = RouteTable(routes)
        # A mix: a deep path under the last route, one under the first, one that falls to "/".
        paths = [
            f"/svc{count - 1}/api/v1/items/42",
            "/svc0/api/orders",
            "/static/css/site.css",
        ]
        assert table.match("127.0.0.1", paths[0]) is routes[count - 1]

        async def setup(n: int) -> Body:
            async def body(n: int) -> None:
                m = table.match
                k = len(paths)
                for i in range(n):
                    m("127.0.0.1", paths[i % k])

            return body

        return setup

    gw = Gateway(config)
    # The signer and CSRF keys come from the gateway's root key at start-up (keys.py).
    await gw.store.open()
    await gw._load_keys()
    await gw.store.close()
    full_ctx = context(full.path, True)
    full_decision = await pipeline.evaluate(full_ctx)

    async def event_setup(n: int) -> Body:
        async def body(n: int) -> None:
            for _ in range(n):
                gw.audit_event(full_ctx, full_decision, None)

        return body

    audits = {
        mode: AuditLog(
            tmp / f"micro-audit-{mode}.db",
            max_queue=50_000_000,
            batch_size=5000,
            durability=mode,
        )
        for mode in ("memory", "journal", "fsync")
    }
    for log in audits.values():
        await log.start()
    template = gw.audit_event(full_ctx, full_decision, None)
    counter = [0]

    def record_setup_for(mode: str, waiting: int = 64) -> Setup:
        """record() per event; with "fsync", `waiting` requests share each group fdatasync."""
        log = audits[mode]

        async def setup(n: int) -> Body:
            events = []
            for _ in range(n):
                counter[0] += 1
                events.append({**template, "decision_id": f"micro-{counter[0]}"})

            async def body(n: int) -> None:
                rec = log.record
                for i, e in enumerate(events, start=1):
                    rec(e)
                    if log.needs_sync and i % waiting == 0:
                        await log.sync()
                await log.sync()

            return body

        return setup

    record_setup = record_setup_for("journal")

    async def metrics_setup(n: int) -> Body:
        m = gw.metrics

        async def body(n: int) -> None:
            for _ in range(n):
                m.requests.labels("ztgw_full", "allow", "policy-allowed").inc()
                m.decision_seconds.observe(0.00004)
                m.request_seconds.labels("ztgw_full").observe(0.001)
                m.upstream_seconds.labels("ztgw_full").observe(0.0005)

        return body

    async def headers_setup(n: int) -> Body:
        async def body(n: int) -> None:
            for _ in range(n):
                add = identity_headers(gw.signer, full_ctx, "127.0.0.1:8443", full_decision)
                upstream_request_headers(full_ctx.headers, add, forward_authorization=False)

        return body

    # Issue 9's complete list (posture, risk, session) needs the device, its posture report and
    # the token's session that a bench.run created: reuse a copy of that run's state.
    all_eval: OfflineEvaluator | None = None
    all_note = "n/a: run `python -m bench.run` first (it registers the device and session)"
    all_scn = get_scenario("ztgw_all")
    state = WORK / "state-all.db"
    if state.exists():
        import shutil

        for suffix in ("", "-wal", "-shm"):
            src = WORK / f"state-all.db{suffix}"
            if src.exists():
                shutil.copy(src, tmp / f"state-all.db{suffix}")
        all_cfg = tmp / "gateway-all.toml"
        all_cfg.write_text(
            gateway_config(
                pki, port=8443, ops_port=9100, upstream_port=8080, work=tmp, process="all"
            )
        )
        all_eval = OfflineEvaluator(load_config(all_cfg))
        await all_eval.__aenter__()
        probe = context(all_scn.path, True)
        got = await all_eval.pipeline.evaluate(probe)
        if got.allowed:
            all_note = "+ device posture, risk, session (store state from the last bench.run)"
        else:
            all_note = f"n/a: the request was refused offline ({got.reason.value})"
            await all_eval.__aexit__(None, None, None)
            all_eval = None

    def all_setup(n: int) -> Awaitable[Body]:
        assert all_eval is not None
        ev_all = all_eval.pipeline.evaluate

        async def setup(n: int) -> Body:
            ctxs = [context(all_scn.path, True) for _ in range(n)]

            async def body(n: int) -> None:
                for c in ctxs:
                    await ev_all(c)

            return body

        return setup(n)

    target = 0.05 if args.quick else 0.1
    repeats = 3 if args.quick else 5
    # Sessions first: their 100,000-session stores are built on a heap the other rows have not
    # churned (memory is measured as resident growth), and freed before those rows run.
    sessions = await micro_sessions.run(
        tmp,
        target=target,
        repeats=repeats,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    session_rows = [
        Row(r["name"], note=r["note"], result={k: v for k, v in r.items() if k != "name"})
        for r in sessions.pop("rows")
    ]

    rows = [
        Row(
            "decision pipeline, every check on (warm caches)",
            pipeline_setup(full.path, True),
            "request → identity (cert + cached bound JWT) → policy ("
            + ", ".join(full.route["policy"])
            + ")",
        ),
        Row(
            "decision pipeline, every check incl. posture, risk, session",
            all_setup if all_eval is not None else None,
            all_note,
            unavailable=None if all_eval is not None else all_note,
        ),
        Row(
            "decision pipeline, certificate-only route",
            pipeline_setup(cert_only.path, False),
            "request → identity (cert) → policy",
        ),
        Row(
            "RequestContext.synthetic (stand-in for from_request)",
            ctx_setup,
            "path normalisation, spoofed-header scan, decision id",
        ),
        Row("JWT verify, cached (token-hash hit)", verify_setup(verifier_cached), "ES256"),
        Row(
            "JWT verify, uncached (signature + claims)",
            verify_setup(verifier_uncached),
            "ES256, cache_size=0",
        ),
        Row("route match, 10 routes", route_setup(10), "longest prefix, 3-path mix"),
        Row("route match, 1,000 routes", route_setup(1000), "longest prefix, 3-path mix"),
        *session_rows,
        Row("audit event build (decisions.audit_event)", event_setup, "masking, findings, to_json"),
        Row(
            "audit enqueue (AuditLog.record), durability = journal (default)",
            record_setup,
            "canonical JSON + journal write(2) + queue",
        ),
        Row(
            "audit enqueue, durability = memory",
            record_setup_for("memory"),
            "canonical JSON + queue (a crash loses the batch)",
        ),
        Row(
            "audit enqueue, durability = fsync",
            record_setup_for("fsync"),
            "+ one fdatasync per 64 events (64 requests waiting together)",
        ),
        Row("metrics per request (4 label lookups + observations)", metrics_setup, ""),
        Row(
            "upstream headers + identity + assertion (cached)",
            headers_setup,
            "identity_headers + upstream_request_headers",
        ),
    ]
    out_rows: list[dict[str, Any]] = []
    for row in rows:
        if row.result is not None:
            out_rows.append({"name": row.name, **row.result})
            continue
        if row.unavailable or row.setup is None:
            out_rows.append(
                {"name": row.name, "median_us": None, "min_us": None, "note": row.unavailable}
            )
            continue
        result = await measure(row.setup, target=target, repeats=repeats)
        out_rows.append({"name": row.name, **result, "note": row.note})
        print(
            f"{row.name:<58} {result['median_us']:>10.2f} µs  (min {result['min_us']:.2f})",
            file=sys.stderr,
            flush=True,
        )

    # Per-call timing of the whole pipeline: the median request, not the mean of a batch.
    samples: list[int] = []
    per_call = 20_000 if args.quick else 50_000
    ctxs = [context(full.path, True) for _ in range(per_call)]
    gc.collect()
    clock = time.perf_counter_ns
    ev = pipeline.evaluate
    for c in ctxs:
        t0 = clock()
        await ev(c)
        samples.append(clock() - t0)
    samples.sort()
    decision_us = {
        "median": round(samples[len(samples) // 2] / 1000, 3),
        "p90": round(samples[int(len(samples) * 0.9)] / 1000, 3),
        "p99": round(samples[int(len(samples) * 0.99)] / 1000, 3),
        "samples": len(samples),
    }
    print(f"decision pipeline per call: {decision_us}", file=sys.stderr)
    all_us: dict[str, Any] | None = None
    if all_eval is not None:
        ev_all = all_eval.pipeline.evaluate
        ctxs = [context(all_scn.path, True) for _ in range(per_call)]
        gc.collect()
        samples = []
        for c in ctxs:
            t0 = clock()
            await ev_all(c)
            samples.append(clock() - t0)
        samples.sort()
        all_us = {
            "median": round(samples[len(samples) // 2] / 1000, 3),
            "p90": round(samples[int(len(samples) * 0.9)] / 1000, 3),
            "p99": round(samples[int(len(samples) * 0.99)] / 1000, 3),
            "samples": len(samples),
        }
        print(f"all-checks pipeline per call: {all_us}", file=sys.stderr)
        await all_eval.__aexit__(None, None, None)

    for log in audits.values():
        await log.close()
    await verifier_cached.close()
    await verifier_uncached.close()
    await evaluator.__aexit__(None, None, None)
    by_name = {r["name"]: r for r in out_rows}
    # Minimum times: at ~1 µs per match, scheduling noise dominates the medians.
    r10 = by_name["route match, 10 routes"]["min_us"]
    r1000 = by_name["route match, 1,000 routes"]["min_us"]
    return {
        "rows": out_rows,
        "decision_us_median": decision_us["median"],
        "decision_us": decision_us,
        "all_checks_decision_us_median": all_us["median"] if all_us else None,
        "all_checks_decision_us": all_us,
        "route_match_1000_vs_10": round(r1000 / r10, 3) if r10 else None,
        "route_match_added_us": round(r1000 - r10, 3),
        **sessions,
        "quick": args.quick,
        "full_checks": list(full.checks),
        "scenarios": [s.key for s in SCENARIOS],
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.micro")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--pki", help="PKI directory (default bench/work/pki, created if missing)")
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print("\n| operation | median µs | min µs | note |\n|---|--:|--:|---|")
    for r in result["rows"]:
        med = "n/a" if r["median_us"] is None else f"{r['median_us']:.2f}"
        mn = "" if r["min_us"] is None else f"{r['min_us']:.2f}"
        print(f"| {r['name']} | {med} | {mn} | {r['note']} |")
    print(f"\ndecision_us_median = {result['decision_us_median']}")
    print(
        f"sessions, 100,000 vs 10: lookup ×{result['session_lookup_ratio']}, stage check "
        f"×{result['session_stage_ratio']} (flat: ≤ {micro_sessions.FLAT_GOAL}); resident "
        f"memory per session {result['session_bytes_each']} B active (full history), "
        f"{result['session_bytes_each_new']} B new, + {result['session_counter_bytes_each']} B "
        f"request counter (goal ≤ {micro_sessions.BYTES_GOAL} B)"
    )


if __name__ == "__main__":
    main()
