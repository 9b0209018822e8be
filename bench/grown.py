"""CPU per request once the audit file has grown: this checkout against another (exploration tool).

    python -m bench.grown --old PATH [--grow S] [--measure S] [--rounds N]

`bench.ablate` starts every variant from an empty audit file, so it cannot see a cost that grows
with the file (a B-tree index whose inserts land all over it). Here each variant is the real
gateway on the certificate-only route (`bench/scenarios.py`), loaded by wrk (64 keep-alive
connections) for `--grow` seconds to fill its audit file (two rows per request), then measured
for `--measure` seconds: requests/s and the gateway's CPU per request, and how many rows the
file then held. `--old` is another checkout (a git worktree of an older commit), imported
instead of this one; rounds alternate the two.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from bench import run as R
from bench.ablate import start_variant
from bench.scenarios import SCENARIOS, make_pki


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.grown")
    p.add_argument("--old", required=True, help="another checkout to compare with")
    p.add_argument("--grow", type=int, default=100, help="seconds of load before measuring")
    p.add_argument("--measure", type=int, default=10, help="seconds measured")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    scenario = next(s for s in SCENARIOS if s.key == "ztgw_cert")
    tools = R.ensure_tools()
    shim = R.build_shim(tools["gcc"])
    pki = make_pki(R.WORK / "pki")
    stack = R.Stack()
    try:
        up = R.free_port()
        upstream = stack.start("upstream", [R.PY, "-m", "bench.upstream", "--port", str(up)])
        R.wait_ready(upstream, lambda: R.http_get(up, "/", tls=None)[0] == 200)
        tls = R.client_context(pki)
        pem, key = pki.client(R.CLIENT)
        env = dict(
            os.environ, LD_PRELOAD=str(shim), WRK_CLIENT_CERT=str(pem), WRK_CLIENT_KEY=str(key)
        )
        for rnd in range(args.rounds):
            for name, code_path in (("this checkout", R.REPO), (args.old, Path(args.old))):
                work = R.WORK / f"grown-{rnd}-{'old' if code_path != R.REPO else 'new'}"
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True)
                prelude = f"import sys\nsys.path.insert(0, {str(code_path)!r})\n"
                gw, port, _ops = start_variant(
                    stack, f"grown-{rnd}-{code_path.name}", pki, work, up, scenario, prelude
                )
                R.wait_ready(
                    gw, lambda port=port: R.http_get(port, scenario.path, tls=tls)[0] == 200
                )
                url = f"https://127.0.0.1:{port}{scenario.path}"
                wrk = [tools["wrk"], "-t1", "-c64", "--timeout", "10s"]
                subprocess.run(
                    [*wrk, f"-d{args.grow}s", url], env=env, capture_output=True, check=True
                )
                time.sleep(2)  # the writer catches up; its work is not in the measured window
                before = R.cpu_seconds(gw.tree())
                run = subprocess.run(
                    [*wrk, f"-d{args.measure}s", url],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                used = R.cpu_seconds(gw.tree()) - before
                line = next(x for x in run.stdout.splitlines() if "requests in" in x)
                requests = int(line.split()[0])
                db = sqlite3.connect(next(work.glob("audit-*.db")))
                rows = db.execute("SELECT count(*) FROM audit_events").fetchone()[0]
                db.close()
                print(
                    f"round {rnd + 1}, {name}: {requests / args.measure:,.0f} req/s, "
                    f"{used / requests * 1e6:.0f} µs of CPU per request, {rows:,} audit rows",
                    flush=True,
                )
                gw.popen.send_signal(signal.SIGTERM)
                gw.popen.wait(60)
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
