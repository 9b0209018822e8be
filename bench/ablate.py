"""Ablations: how much would removing one piece of per-request work save? (exploration tool)

Starts the benchmark's upstream, nginx and one extra ztgateway per variant, each variant being
the real gateway with a few functions monkeypatched away at start-up (never in the source),
then runs the chosen scenario against every variant in interleaved rounds and prints the
median requests/s and CPU per request. The patches reach into ztgateway's internals and may
need updating when those change; a variant that no longer applies fails at start-up.

    python -m bench.ablate [scenario] [set]     # scenario: ztgw_full (default); set: a key of SETS
    python -m bench.ablate ztgw_full tail --p99 RATE   # p99 at a fixed rate instead (bench.loadgen)
    python -m bench.ablate ztgw_cert_2w none --old ../wt-old  # this checkout against another
"""

from __future__ import annotations

import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from bench import run as R
from bench.scenarios import SCENARIOS, Scenario, gateway_config, make_pki

NO_AUDIT = (
    "from ztgateway import app, audit\n"
    "audit.AuditLog.record = lambda self, e: None\n"
    "app.Gateway.audit_event = lambda self, c, d, r: None\n"
)
NO_METRICS = (
    "import prometheus_client.metrics as m\n"
    "class _N:\n"
    "    def inc(self, *a, **k): pass\n"
    "    def observe(self, *a, **k): pass\n"
    "    def set(self, *a, **k): pass\n"
    "_n = _N()\n"
    "m.MetricWrapperBase.labels = lambda self, *a, **k: _n\n"
    "m.Histogram.observe = lambda self, *a, **k: None\n"
    "m.Counter.inc = lambda self, *a, **k: None\n"
)
ONE_WRITE = "from aiohttp import web\nweb.StreamResponse._send_headers_immediately = False\n"
AUDIT_NO_SQLITE = (
    "from ztgateway.audit import writer\n"
    "async def _cb(self):\n"
    "    n = min(len(self._pending), self._batch_size)\n"
    "    for _ in range(n):\n"
    "        d, _b, seg = self._pending.popleft()\n"
    "        self._pending_ids.discard(d)\n"
    "        if self._journal is not None:\n"
    "            self._journal.written((seg,))\n"
    "    self._written += n\n"
    "    return self._last_seq + 1, []\n"
    "writer.AuditLog._commit_batch = _cb\n"
)
MULTI_ROW_INSERT = (
    "import aiosqlite, itertools\n"
    "from ztgateway.audit import store\n"
    "_orig = aiosqlite.Connection.executemany\n"
    "_VALUES = '(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)'\n"
    "_HEAD = store.INSERT.split(' VALUES ')[0] + ' VALUES '\n"
    "def _multi(conn, rows):\n"
    "    for i in range(0, len(rows), 80):\n"
    "        chunk = rows[i:i + 80]\n"
    "        conn.execute(_HEAD + ', '.join([_VALUES] * len(chunk)), list(itertools.chain.from_iterable(chunk)))\n"
    "async def _em(self, sql, rows):\n"
    "    if sql != store.INSERT:\n"
    "        return await _orig(self, sql, rows)\n"
    "    rows = list(rows)\n"
    "    await self._execute(_multi, self._conn, rows)\n"
    "aiosqlite.Connection.executemany = _em\n"
)
NO_JOURNAL = (
    "from ztgateway.audit import journal\n"
    "journal.Journal.append = lambda self, line: self._current.number\n"
)
MERGE_OUTCOMES = (
    "import orjson\n"
    "from ztgateway.audit import writer, chain\n"
    "def _merge(batch):\n"
    "    where = {d: i for i, (d, _e) in enumerate(batch)}\n"
    "    out, drop = list(batch), set()\n"
    "    for i, (d, e) in enumerate(batch):\n"
    "        if d.endswith('/upstream'):\n"
    "            j = where.get(d[:-9])\n"
    "            if j is None or e[3] is None or out[j][1][3] is None:\n"
    "                continue\n"
    "            body = orjson.loads(out[j][1][2])\n"
    "            body['upstream'] = orjson.loads(e[2])['upstream']\n"
    "            out[j] = (out[j][0], chain.encode_entry(body, out[j][1][0]))\n"
    "            drop.add(i)\n"
    "    return [x for i, x in enumerate(out) if i not in drop]\n"
    "async def _cb(self):\n"
    "    import itertools\n"
    "    batch = list(itertools.islice(self._pending, self._batch_size))\n"
    "    rows = _merge([(d, e) for d, e, _ in batch])\n"
    "    reason = self._checkpoint_owed(adding=len(rows))\n"
    "    first_seq, lines = await self._commit(rows, checkpoint=reason)\n"
    "    for _ in batch:\n"
    "        d, _e, _s = self._pending.popleft()\n"
    "        self._pending_ids.discard(d)\n"
    "    self._written += len(batch)\n"
    "    if self._journal is not None:\n"
    "        self._journal.written(s for _d, _e, s in batch)\n"
    "    return first_seq, lines\n"
    "writer.AuditLog._commit_batch = _cb\n"
)
GC = "import gc\ngc.set_threshold(50000, 50, 100)\n"
NO_GC_TUNING = "from ztgateway import app\napp.tune_gc = lambda: None\n"
GC_FREEZE_ONLY = (
    "import gc\nfrom ztgateway import app\napp.tune_gc = lambda: (gc.collect(), gc.freeze())\n"
)
SMALL_LINK_CHUNKS = "from ztgateway.audit import writer\nwriter._LINK_CHUNK = 16\n"

SETS: dict[str, dict[str, str]] = {
    "none": {"as is": ""},
    "main": {
        "as is": "",
        "one write per response": ONE_WRITE,
        "no audit": NO_AUDIT,
        "no metrics": NO_METRICS,
        "no audit + no metrics + one write": NO_AUDIT + NO_METRICS + ONE_WRITE,
    },
    "audit": {
        "as is": "",
        "AuditLog.record a no-op": "from ztgateway import audit\n"
        "audit.AuditLog.record = lambda self, e: None\n",
        "no SQLite writer": AUDIT_NO_SQLITE,
        "no journal writes": NO_JOURNAL,
        "multi-row INSERT": MULTI_ROW_INSERT,
        "no audit": NO_AUDIT,
    },
    "insert": {
        "as is": "",
        "multi-row INSERT": MULTI_ROW_INSERT,
        "no SQLite writer": AUDIT_NO_SQLITE,
    },
    "onhead": {
        "as is": "",
        "locked path (BEGIN, head, INSERTs, COMMIT)": "from ztgateway.audit import writer\n"
        "writer.ROWS_ON_HEAD = 0\n",
        "AuditLog.record a no-op": "from ztgateway import audit\n"
        "audit.AuditLog.record = lambda self, e: None\n",
    },
    "misses": {
        "as is": "",
        "locked path only": "from ztgateway.audit import writer\nwriter.ROWS_ON_HEAD = 0\n",
    },
    "switch": {
        "as is": "",
        "switch interval 0.5 ms": "import sys\nsys.setswitchinterval(0.0005)\n",
        "switch interval 20 ms": "import sys\nsys.setswitchinterval(0.02)\n",
        "AuditLog.record a no-op": "from ztgateway import audit\n"
        "audit.AuditLog.record = lambda self, e: None\n",
    },
    "outcome": {
        "as is": "",
        "outcome events not journaled": "from ztgateway.audit import writer, journal\n"
        "_orig = journal.Journal.append\n"
        "def _append(self, line):\n"
        '    if b\'"type":"ztgw.upstream"\' in line:\n'
        "        return self._current.number\n"
        "    return _orig(self, line)\n"
        "journal.Journal.append = _append\n",
        "outcome merged into its decision's row (prototype)": MERGE_OUTCOMES,
        "no outcome events": "from ztgateway.edge import request_path\n"
        "request_path.RequestPath._record_upstream = lambda self, c, r, s, h: None\n",
    },
    "inline": {
        "as is": "",
        "SQLite calls on the event loop (no thread)": "import sqlite3, aiosqlite.core as c\n"
        "_connect = sqlite3.connect\n"
        "c.sqlite3 = type('S', (), {})()\n"
        "for _n in dir(sqlite3):\n"
        "    setattr(c.sqlite3, _n, getattr(sqlite3, _n))\n"
        "c.sqlite3.connect = lambda *a, **k: _connect(*a, **{**k, 'check_same_thread': False})\n"
        "async def _execute(self, fn, *args, **kwargs):\n"
        "    if not self._running or not self._connection:\n"
        "        raise ValueError('Connection closed')\n"
        "    return fn(*args, **kwargs)\n"
        "c.Connection._execute = _execute\n",
    },
    "gc": {"as is": "", "gc threshold 50000": GC, "gc threshold + no audit": GC + NO_AUDIT},
    "tail": {
        "as is": "",
        "default gc (no tune_gc)": NO_GC_TUNING,
        "gc.freeze only": GC_FREEZE_ONLY,
        "audit chunks of 16": SMALL_LINK_CHUNKS,
        "no audit": NO_AUDIT,
    },
}


def main() -> None:
    argv = sys.argv[1:]
    p99_rate = 0.0
    if "--p99" in argv:
        at = argv.index("--p99")
        p99_rate = float(argv[at + 1])
        del argv[at : at + 2]
    old = ""
    if "--old" in argv:
        # Another checkout (a git worktree of an older commit) as one more variant: its
        # ztgateway is imported instead of this one's.
        at = argv.index("--old")
        old = argv[at + 1]
        del argv[at : at + 2]
    key = argv[0] if argv else "ztgw_full"
    patches = dict(SETS[argv[1] if len(argv) > 1 else "main"])
    if old:
        patches[f"code at {old}"] = f"import sys\nsys.path.insert(0, {old!r})\n"
    sc = next(s for s in SCENARIOS if s.key == key)
    pki = make_pki(R.WORK / "pki")
    tools = R.ensure_tools()
    stack = R.Stack()
    R.WRK_SETTINGS.update(
        threads={"keepalive": 1, "close": 2, "resumed": 2},
        connections={"keepalive": 64, "close": 16, "resumed": 16},
    )
    try:
        env = R.start_everything(pki, tools, stack, R.build_shim(tools["gcc"]))
        tls = R.client_context(pki)
        procs = {}
        variant_ops: dict[str, int] = {}
        for i, (name, patch) in enumerate(patches.items()):
            work = R.WORK / f"ablate-{i}"
            work.mkdir(exist_ok=True)
            for f in work.glob("*.db*"):
                shutil.rmtree(f) if f.is_dir() else f.unlink()  # the journal is a directory
            proc, port, ops = start_variant(
                stack, f"ablate-{i}", pki, work, env.upstream_port, sc, patch
            )
            auth = {"Authorization": f"Bearer {env.token}"} if sc.token else {}
            R.wait_ready(
                proc,
                lambda port=port, h=auth: R.http_get(port, sc.path, tls=tls, headers=h)[0] == 200,
            )
            procs[name] = (proc, port)
            variant_ops[name] = ops
            env.ops_ports[f"ablate-{i}"] = ops  # so drain_audit waits for its backlog too
        if p99_rate:
            tail_latency(env, sc, procs, p99_rate)
            return
        results: dict[str, list[tuple[float, float, float, float]]] = {n: [] for n in patches}
        for _ in range(3):
            for name, (proc, port) in procs.items():
                env.servers["ztgw_" + sc.process] = (proc, port)
                # The backlog read after the run is this variant's; none is left from before.
                env.ops_ports["ztgw_" + sc.process] = variant_ops[name]
                R.drain_audit(env)
                R.run_wrk(env, sc, "keepalive", duration=1)
                R.drain_audit(env)
                run = R.run_wrk(env, sc, "keepalive", duration=6)
                if not run.valid:
                    print(f"{name}: invalid run ({run.failures} failures)")
                    continue
                results[name].append(
                    (
                        run.rps,
                        run.per_1k(run.proxy_main_thread_cpu_s) * 1000,
                        run.per_1k(run.proxy_cpu_s) * 1000,
                        float(run.audit_backlog_after or 0),
                    )
                )
        print(f"\n{key}, keep-alive, medians of 3 interleaved rounds")
        print(
            "| variant | req/s | event-loop µs/request | process µs/request "
            "| audit events queued 1 s after |\n|---|--:|--:|--:|--:|"
        )
        for name, rr in results.items():
            if rr:
                med = [statistics.median(x[i] for x in rr) for i in range(4)]
                print(f"| {name} | {med[0]:,.0f} | {med[1]:.0f} | {med[2]:.0f} | {med[3]:,.0f} |")
    finally:
        stack.stop()


def start_variant(
    stack: R.Stack,
    name: str,
    pki: Any,
    work: Path,
    upstream_port: int,
    sc: Scenario,
    prelude: str,
) -> tuple[R.Proc, int, int]:
    """A real gateway for `sc`'s process on fresh ports, its files in `work`, with `prelude`
    (patches, or a sys.path entry for another checkout) run before it starts: (proc, port, ops)."""
    port, ops = R.free_port(), R.free_port()
    cfg = work / "gateway.toml"
    cfg.write_text(
        gateway_config(
            pki, port=port, ops_port=ops, upstream_port=upstream_port, work=work, process=sc.process
        )
    )
    code = (
        prelude + "\nimport sys\nfrom ztgateway.cli import main\n"
        f"sys.exit(main(['run', '-c', {str(cfg)!r}, '--log-level', 'warning']))\n"
    )
    return stack.start(name, [R.PY, "-c", code], cwd=R.REPO), port, ops


def tail_latency(env: R.Env, sc: Scenario, procs: dict[str, Any], rate: float) -> None:
    """p50/p99 at a fixed rate for each variant and the upstream directly, 5 interleaved rounds."""
    direct = next(s for s in SCENARIOS if s.key == "direct")
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], **{n: [] for n in procs}}
    for r in range(5):
        for name, done in runs.items():
            if name == "direct":
                done.append(R.run_fixed_rate(env, direct, rate, 6.0, r))
                continue
            env.servers["ztgw_" + sc.process] = procs[name]
            R.drain_audit(env)
            done.append(R.run_fixed_rate(env, sc, rate, 6.0, r))
    base = statistics.median(x["service_ms"]["p99"] for x in runs["direct"])
    print(f"\n{sc.key} at {rate:.0f} req/s, medians of 5 interleaved rounds of 6 s")
    print("| variant | p50 ms | p99 ms | added p99 ms | p99 of each round |\n|---|--:|--:|--:|---|")
    for name, rr in runs.items():
        p50 = statistics.median(x["service_ms"]["p50"] for x in rr)
        p99s = [x["service_ms"]["p99"] for x in rr]
        p99 = statistics.median(p99s)
        each = ", ".join(f"{v:.2f}" for v in p99s)
        print(f"| {name} | {p50:.2f} | {p99:.2f} | {p99 - base:+.2f} | {each} |")


if __name__ == "__main__":
    main()
