"""`make soak`: a long run on Redis with `workers = 2`, and what it left behind.

Issue 19's soak, reproducible: a real gateway supervisor with two workers on a real
redis-server and the demo upstream, an open-loop load at a fixed rate (default 200 req/s for
10 minutes, 32 keep-alive connections; 70 % `GET /echo` with the certificate only, 20 %
`GET /api/echo` with a bearer token, 10 % `POST /api/echo` with 4 KB), and connection churn on
top (every `--churn-every` seconds, `--churn-size` new mTLS connections opened together, one
request each, then closed: the pattern that grew a worker from 70 to 144 MB). Every answer's
status and `X-ZT-Decision-Id` is kept; every `--sample-every` seconds the supervisor's and
workers' RSS and open file descriptors are read from /proc.

At the end the gateway is stopped with SIGTERM and the audit is checked: every decision a
client got an answer for (2xx or 4xx) must be in the database, `ztgateway audit verify` must
pass on the database and on the JSON-lines sink, the sink must hold no event twice, and the
journals must be empty. Prints the summary and writes `bench/results/soak-latest.md` (and
`.json`); exits 1 if a goal was missed (errors, audit incomplete or not verifiable, worker RSS
growth of 10 % or more after the warm-up).

    make soak                                  # 10 minutes
    make soak SOAK_ARGS="--duration 120"       # a shorter run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import release_on_schedule
from bench.scenarios import CLIENT, REPO, WORK, Pki, make_pki
from ztgateway.dev.tokens import issue_token

RESULTS = REPO / "bench" / "results"
MIX = (("GET", "/echo", False, 70), ("GET", "/api/echo", True, 20), ("POST", "/api/echo", True, 10))
BODY = b"x" * 4096


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports (bound together, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the stack


def gateway_config(pki: Pki, work: Path, *, port: int, ops: int, redis: int, upstream: int) -> str:
    q = json.dumps
    return f"""
[server]
host = "127.0.0.1"
port = {port}
workers = 2
client_cert = "required"
public_url = "https://127.0.0.1:{port}"

[tls]
cert = {q(str(pki.paths.server_cert))}
key = {q(str(pki.paths.server_key))}
client_ca = {q(str(pki.ca))}
crl = {q(str(pki.crl))}

[ops]
host = "127.0.0.1"
port = {ops}

[logging]
level = "info"
format = "json"

[audit]
db = {q(str(work / "audit" / "audit.db"))}
jsonl = {q(str(work / "audit" / "audit.jsonl"))}
mask_key_file = {q(str(work / "keys" / "audit-mask.key"))}
checkpoint_key_file = {q(str(work / "keys" / "audit-checkpoint.key"))}

[store]
url = "redis://127.0.0.1:{redis}/0"

[devices]
auto_approve = true

[risk]
trusted_zones = ["loopback"]
failed_attempts_threshold = 1000000000

[sessions]
burst_requests = 1000000000

[zones]
loopback = ["127.0.0.0/8"]

[assertion]
key = {q(str(pki.paths.assertion_key))}

[issuers.dev]
issuer = "https://ztgateway.dev/issuer"
audiences = ["ztgateway"]
algorithms = ["ES256"]
jwks_file = {q(str(pki.paths.issuer_jwks))}

[upstreams.demo]
url = "http://127.0.0.1:{upstream}"

[[routes]]
name = "app"
prefix = "/"
upstream = "demo"

[[routes]]
name = "api"
prefix = "/api/"
upstream = "demo"
[routes.policy]
require_token = true
"""


@dataclass
class Stack:
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, args: list[str], log_file: Path, **kw: Any) -> subprocess.Popen[bytes]:
        out = log_file.open("wb")
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, **kw)
        out.close()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        time.sleep(0.1)
    raise SystemExit(f"soak: nothing listens on port {port}")


# --------------------------------------------------------------------------- load


@dataclass
class Answer:
    at: float  # seconds since the start of the load
    status: int  # 0: no answer (I/O error)
    decision_id: str
    intended: float
    service: float


@dataclass
class Load:
    answers: list[Answer] = field(default_factory=list)
    churn_answers: list[Answer] = field(default_factory=list)
    churn_failures: int = 0


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, str]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    decision_id = ""
    length = 0
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"x-zt-decision-id":
            decision_id = value.strip().decode()
        elif name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status, decision_id


def request_bytes(method: str, path: str, token: str | None, port: int) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: application/json\r\n"
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    if method == "POST":
        head += f"Content-Type: application/octet-stream\r\nContent-Length: {len(BODY)}\r\n"
        return head.encode() + b"\r\n" + BODY
    return head.encode() + b"\r\n"


async def steady_load(
    args: argparse.Namespace, port: int, tls: ssl.SSLContext, token: str, load: Load, t0: float
) -> None:
    kinds = [k for k in MIX for _ in range(k[3])]
    payloads = [request_bytes(m, p, token if t else None, port) for m, p, t, _ in kinds]
    queue: asyncio.Queue[tuple[float, int] | None] = asyncio.Queue()
    clock = time.perf_counter

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", port, ssl=tls)

    async def worker() -> None:
        reader, writer = await connect()
        while True:
            item = await queue.get()
            if item is None:
                writer.close()
                return
            scheduled, n = item
            sent = clock()
            try:
                writer.write(payloads[n % len(payloads)])
                status, decision_id = await read_answer(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                load.answers.append(Answer(sent - t0, 0, "", clock() - scheduled, 0.0))
                writer.close()
                with contextlib.suppress(OSError):
                    reader, writer = await connect()
                continue
            done = clock()
            load.answers.append(
                Answer(scheduled - t0, status, decision_id, done - scheduled, done - sent)
            )

    workers = [asyncio.ensure_future(worker()) for _ in range(args.connections)]
    await release_on_schedule(
        lambda scheduled, i: queue.put_nowait((scheduled, i)), args.rate, args.duration, t0
    )
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)


async def churn(
    args: argparse.Namespace, port: int, tls: ssl.SSLContext, load: Load, t0: float
) -> None:
    """Every `churn_every` s, `churn_size` connections opened together (at most 48 handshakes
    in flight: all come from 127.0.0.1, and each worker lets one address hold at most
    `max_pending_handshakes_per_source` = 64 pending handshakes), one request each, all held
    until the last one is open, then closed."""
    clock = time.perf_counter
    request = request_bytes("GET", "/echo", None, port)
    limit = asyncio.Semaphore(48)
    rounds = int(args.duration // args.churn_every) if args.churn_size else 0
    for r in range(rounds):
        await asyncio.sleep(max(0.0, t0 + (r + 0.5) * args.churn_every - clock()))
        held: list[asyncio.StreamWriter] = []

        async def one(held: list[asyncio.StreamWriter] = held) -> None:
            async with limit:
                started = clock()
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
                    writer.write(request)
                    status, decision_id = await read_answer(reader)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    load.churn_failures += 1
                    return
                done = clock()
                load.churn_answers.append(
                    Answer(started - t0, status, decision_id, done - started, done - started)
                )
                held.append(writer)

        await asyncio.gather(*(one() for _ in range(args.churn_size)))
        for writer in held:
            writer.close()
        log(f"churn round {r + 1}/{rounds}: {len(held)} connections opened and closed")


# --------------------------------------------------------------------------- sampling


def process_tree(supervisor: int) -> dict[str, int]:
    """{"supervisor": pid, "worker-0": pid, ...} from /proc."""
    out = {"supervisor": supervisor}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != supervisor:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if b"--worker" in argv:
            out[f"worker-{argv[argv.index(b'--worker') + 1].decode()}"] = int(entry.name)
    return out


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def sampler(
    args: argparse.Namespace,
    supervisor: int,
    samples: list[dict[str, Any]],
    t0: float,
    stop: asyncio.Event,
) -> None:
    while not stop.is_set():
        row: dict[str, Any] = {"t": round(time.perf_counter() - t0, 1)}
        for name, pid in process_tree(supervisor).items():
            with contextlib.suppress(OSError):
                row[name] = {"pid": pid, "rss_kb": rss_kb(pid), "fds": fd_count(pid)}
        samples.append(row)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.sample_every)


# --------------------------------------------------------------------------- after the run


def scrape_refusals(ops: int) -> dict[str, float]:
    """What the gateway refused or failed at the connection level, from its merged metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{ops}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        for family in (
            "ztgw_connections_rejected_total",
            "ztgw_tls_handshake_failures_total",
            "ztgw_worker_restarts_total",
            "ztgw_audit_recovered_events_total",
            "ztgw_log_lines_suppressed_total",
        ):
            if line.startswith(family) and not line.endswith(" 0.0"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
    return out


def audit_report(work: Path, config: Path, answered: set[str]) -> dict[str, Any]:
    db = work / "audit" / "audit.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT decision_id, json_extract(event, '$.type') FROM audit_events"
        ).fetchall()
    types = Counter(t for _, t in rows)
    stored = {d for d, _ in rows}
    sink = work / "audit" / "audit.jsonl"
    mirrored = [json.loads(line)["decision_id"] for line in sink.read_text().splitlines()]

    def verify(*extra: str) -> str:
        """`ok: N events, chain intact` and what the checkpoints vouch for, or the failure."""
        done = subprocess.run(
            [sys.executable, "-m", "ztgateway", "audit", "verify", "-c", str(config), *extra],
            capture_output=True,
            text=True,
            check=False,
        )
        notes = "; ".join(line.strip() for line in done.stderr.strip().splitlines())
        if done.returncode != 0:
            return f"FAILED: {notes}"
        return f"{done.stdout.strip()} ({notes})" if notes else done.stdout.strip()

    journal = work / "audit" / "audit.db.journal"
    return {
        "answered": len(answered),
        "missing": sorted(answered - stored),
        "events": dict(types),
        "verify_db": verify(),
        "verify_jsonl": verify("--jsonl", str(sink)),
        "jsonl_lines": len(mirrored),
        "jsonl_duplicates": len(mirrored) - len(set(mirrored)),
        "jsonl_matches_db": len(mirrored) == len(rows),
        "journal_left": sorted(p.name for p in journal.iterdir()) if journal.is_dir() else [],
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[max(0, min(len(values) - 1, round(q / 100 * (len(values) - 1))))]


def rss_between_churn(
    samples: list[dict[str, Any]], churn_every: float, rounds: int
) -> dict[str, list[float]]:
    """Each worker's RSS (MB) in the last sample before each churn round starts: what the
    process keeps once the connections of the round before are gone (the soak of issue 19 saw
    70 -> 144 MB over 12 rounds without malloc_trim)."""
    out: dict[str, list[float]] = {}
    names = sorted({k for s in samples for k in s if k.startswith("worker-")})
    for name in names:
        series = [(s["t"], s[name]["rss_kb"]) for s in samples if name in s]
        settled = []
        for r in range(1, rounds + 1):
            before = [kb for t, kb in series if t < (r + 0.5) * churn_every]
            if before:
                settled.append(round(before[-1] / 1024, 1))
        # and after the last round, at the end of the run
        settled.append(round(series[-1][1] / 1024, 1))
        out[name] = settled
    return out


def rss_growth_ok(rss: dict[str, Any], settled: dict[str, list[float]]) -> bool:
    """Under churn, compare what each worker keeps between rounds (first vs last); without
    churn, the sample after warm-up with the last one."""
    if settled and all(len(v) >= 2 for v in settled.values()):
        return all((v[-1] - v[0]) / v[0] < 0.10 for v in settled.values())
    return all((v["growth_pct"] or 0) < 10 for k, v in rss.items() if k.startswith("worker-"))


def summarize(
    args: argparse.Namespace, load: Load, samples: list[dict[str, Any]], audit: dict[str, Any]
) -> dict[str, Any]:
    answers = load.answers
    statuses = Counter(a.status for a in answers)
    errors = sum(n for s, n in statuses.items() if s == 0 or s >= 500)
    warm = args.duration * args.warmup
    workers = sorted({k for s in samples for k in s if k.startswith("worker-")})
    rss: dict[str, Any] = {}
    for name in ["supervisor", *workers]:
        series = [(s["t"], s[name]["rss_kb"], s[name]["pid"]) for s in samples if name in s]
        after = [(t, kb, pid) for t, kb, pid in series if t >= warm]
        if not after:
            continue
        pids = {pid for _, _, pid in after}
        first, last = after[0][1], after[-1][1]
        rss[name] = {
            "at_warmup_mb": round(first / 1024, 1),
            "end_mb": round(last / 1024, 1),
            "peak_mb": round(max(kb for _, kb, _ in after) / 1024, 1),
            "growth_pct": round((last - first) / first * 100, 2) if first else None,
            "restarted": len(pids) > 1,
        }
    fds = {
        name: [s[name]["fds"] for s in samples if name in s] for name in ["supervisor", *workers]
    }
    minutes: list[dict[str, Any]] = []
    span = 60.0 if args.duration >= 180 else max(10.0, args.duration / 6)
    n = int(args.duration // span + (1 if args.duration % span else 0))
    for m in range(n):
        window = [a for a in answers if m * span <= a.at < (m + 1) * span]
        lat = [a.intended * 1000 for a in window if a.status]
        minutes.append(
            {
                "until_s": round((m + 1) * span),
                "requests": len(window),
                "errors": sum(1 for a in window if a.status == 0 or a.status >= 500),
                "p50_ms": round(percentile(lat, 50), 2),
                "p99_ms": round(percentile(lat, 99), 2),
            }
        )
    lat = [a.intended * 1000 for a in answers if a.status]
    service = [a.service * 1000 for a in answers if a.status]
    rounds = int(args.duration // args.churn_every) if args.churn_size else 0
    settled = rss_between_churn(samples, args.churn_every, rounds)
    goals = {
        "no errors": errors == 0 and load.churn_failures == 0,
        "every answered decision audited": not audit["missing"],
        "audit verify (database)": audit["verify_db"].startswith("ok"),
        "audit verify --jsonl": audit["verify_jsonl"].startswith("ok"),
        "sink holds each event once": audit["jsonl_duplicates"] == 0 and audit["jsonl_matches_db"],
        "journals empty after shutdown": not audit["journal_left"],
        "worker RSS growth < 10 %": rss_growth_ok(rss, settled),
    }
    return {
        "rss_between_churn_mb": settled,
        "settings": {
            "duration_s": args.duration,
            "rate": args.rate,
            "connections": args.connections,
            "churn": f"{args.churn_size} connections every {args.churn_every} s",
            "warmup_fraction": args.warmup,
        },
        "requests": len(answers),
        "rate_achieved": round(len(answers) / args.duration, 1),
        "by_status": {str(k): v for k, v in sorted(statuses.items())},
        "errors": errors,
        "churn_connections": len(load.churn_answers),
        "churn_failures": load.churn_failures,
        "latency_ms": {
            "intended_p50": round(percentile(lat, 50), 2),
            "intended_p99": round(percentile(lat, 99), 2),
            "intended_max": round(max(lat), 2) if lat else None,
            "service_p50": round(percentile(service, 50), 2),
            "service_p99": round(percentile(service, 99), 2),
        },
        "per_window": minutes,
        "rss": rss,
        "fds": {k: {"min": min(v), "max": max(v), "end": v[-1]} for k, v in fds.items() if v},
        "audit": {**audit, "missing": len(audit["missing"]), "missing_ids": audit["missing"][:20]},
        "goals": goals,
        "ok": all(goals.values()),
    }


def markdown(res: dict[str, Any], commit: str, started: str) -> str:
    s = res["settings"]
    out = [
        f"# ztgateway soak — {started}",
        "",
        f'ztgateway {commit}. `make soak SOAK_ARGS="--duration {s["duration_s"]:g}"`: Redis store, '
        f"`workers = 2`, {s['rate']:g} req/s open loop on {s['connections']} keep-alive "
        "connections (70 % GET /echo, 20 % GET /api/echo with a token, 10 % POST /api/echo "
        f"4 KB), plus churn: {s['churn']}. Audit durability: journal (the default), "
        "mask and checkpoint keys configured.",
        "",
        "| goal | met |",
        "|---|---|",
        *(f"| {g} | {'yes' if ok else '**no**'} |" for g, ok in res["goals"].items()),
        "",
        f"**Requests**: {res['requests']:,} at {res['rate_achieved']} req/s, by status "
        f"{res['by_status']}; errors (5xx or no answer): {res['errors']}. Churn: "
        f"{res['churn_connections']:,} connections, {res['churn_failures']} failed.",
        "",
        f"**Latency** from the scheduled send: p50 {res['latency_ms']['intended_p50']} ms, p99 "
        f"{res['latency_ms']['intended_p99']} ms, max {res['latency_ms']['intended_max']} ms; "
        f"service time p50 {res['latency_ms']['service_p50']} ms, p99 "
        f"{res['latency_ms']['service_p99']} ms.",
        "",
        "| window until (s) | requests | errors | p50 ms | p99 ms |",
        "|--:|--:|--:|--:|--:|",
        *(
            f"| {m['until_s']} | {m['requests']:,} | {m['errors']} | {m['p50_ms']} | {m['p99_ms']} |"
            for m in res["per_window"]
        ),
        "",
        f"**RSS** (from {s['warmup_fraction']:.0%} of the run, after warm-up, to the end):",
        "",
        "| process | at warm-up MB | end MB | peak MB | growth | restarted |",
        "|---|--:|--:|--:|--:|---|",
        *(
            f"| {k} | {v['at_warmup_mb']} | {v['end_mb']} | {v['peak_mb']} | "
            f"{v['growth_pct']} % | {'yes' if v['restarted'] else 'no'} |"
            for k, v in res["rss"].items()
        ),
        "",
        "**RSS between churn rounds** (MB; the last sample before each round, then the end): "
        + "; ".join(
            f"{k}: {' → '.join(f'{v:g}' for v in vs)}"
            for k, vs in res.get("rss_between_churn_mb", {}).items()
        ),
        "",
        "**Connection-level refusals and failures** (merged metrics, non-zero only): "
        + (", ".join(f"`{k}` {v:g}" for k, v in res.get("refusals", {}).items()) or "none"),
        "",
        "**File descriptors** (min / max / end): "
        + ", ".join(f"{k} {v['min']}/{v['max']}/{v['end']}" for k, v in res["fds"].items()),
        "",
        f"**Audit**: {res['audit']['answered']:,} answered decisions, {res['audit']['missing']} "
        f"missing from the database; events by type {res['audit']['events']}; "
        f"`audit verify`: {res['audit']['verify_db']}; `audit verify --jsonl`: "
        f"{res['audit']['verify_jsonl']}; sink {res['audit']['jsonl_lines']:,} lines, "
        f"{res['audit']['jsonl_duplicates']} duplicates; journal files left: "
        f"{len(res['audit']['journal_left'])}.",
        "",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------- main


async def drive(
    args: argparse.Namespace, port: int, supervisor: int, pki: Pki, token: str
) -> tuple[Load, list[dict[str, Any]]]:
    tls = ssl.create_default_context(cafile=str(pki.ca))
    pem, key = pki.client(CLIENT)
    tls.load_cert_chain(str(pem), str(key))
    tls.check_hostname = False
    load = Load()
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    t0 = time.perf_counter() + 0.2
    sampling = asyncio.ensure_future(sampler(args, supervisor, samples, t0, stop))
    await asyncio.gather(
        steady_load(args, port, tls, token, load, t0), churn(args, port, tls, load, t0)
    )
    # One last sample once the churn connections are gone and a trim had its chance.
    await asyncio.sleep(min(args.sample_every, 5))
    stop.set()
    await sampling
    return load, samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument("--rate", type=float, default=200.0, help="requests per second (default 200)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--churn-every", type=float, default=50.0, help="seconds between churn rounds")
    p.add_argument("--churn-size", type=int, default=1000, help="connections per round (0: none)")
    p.add_argument("--sample-every", type=float, default=10.0)
    p.add_argument(
        "--warmup", type=float, default=0.2, help="fraction of the run before RSS counts"
    )
    p.add_argument(
        "--no-save", action="store_true", help="do not write bench/results/soak-latest.*"
    )
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    work = WORK / "soak"
    shutil.rmtree(work, ignore_errors=True)
    (work / "audit").mkdir(parents=True)
    pki = make_pki(work / "pki")
    token = issue_token(
        pki.paths.issuer_key,
        sub="alice",
        groups=["soak"],
        ttl=int(args.duration) + 3600,
        issuer="https://ztgateway.dev/issuer",
        audience="ztgateway",
    )
    port, ops, redis, upstream = free_ports(4)
    config = work / "soak.toml"
    config.write_text(gateway_config(pki, work, port=port, ops=ops, redis=redis, upstream=upstream))
    stack = Stack()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        stack.start(
            [
                "redis-server",
                "--port",
                str(redis),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            work / "redis.log",
            cwd=work,
        )
        stack.start(
            [
                sys.executable,
                "-m",
                "ztgateway.dev.demo_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(upstream),
            ],
            work / "upstream.log",
        )
        wait_port(redis)
        wait_port(upstream)
        gateway = stack.start(
            [sys.executable, "-m", "ztgateway", "run", "-c", str(config)], work / "gateway.log"
        )
        wait_port(ops)
        deadline = time.monotonic() + 30
        while len(process_tree(gateway.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        wait_port(port)
        log(
            f"gateway {gateway.pid} with 2 workers on :{port}, Redis :{redis}; {args.duration:g} s at {args.rate:g} req/s"
        )
        load, samples = asyncio.run(drive(args, port, gateway.pid, pki, token))
        refusals = scrape_refusals(ops)
        log("load done; stopping the gateway (SIGTERM)")
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=60)
    finally:
        stack.stop()
    answered = {
        a.decision_id
        for a in (*load.answers, *load.churn_answers)
        if a.decision_id and 200 <= a.status < 500
    }
    audit = audit_report(work, config, answered)
    res = summarize(args, load, samples, audit)
    res["refusals"] = refusals
    res["samples"] = samples
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    ).stdout.strip()
    text = markdown(res, commit, started)
    print(text)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "soak-latest.md").write_text(text)
        (RESULTS / "soak-latest.json").write_text(json.dumps(res, indent=1) + "\n")
    if not res["ok"]:
        log("a goal was missed: " + ", ".join(g for g, ok in res["goals"].items() if not ok))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
