"""`workers = N`: N gateway processes on one host, one listening port, supervised.

Each worker is a full gateway (`ztgateway run --worker I`) binding the mTLS port with
SO_REUSEPORT, so the kernel spreads connections over them; state is shared through the store
(SQLite in WAL mode with its change log, or Redis). Each worker keeps its own ops listener on
`ops.port + 1 + I` (127.0.0.1 by default; the admin API lives there). The supervisor owns the
configured ops port: `/metrics` merges the workers' metrics (counters and histograms summed,
per-process gauges summed, shared or timestamp gauges by maximum),
`/healthz` and `/readyz` answer for all workers. A worker that dies is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from .config import GatewayConfig

log = logging.getLogger("ztgateway.workers")
RESTART_BACKOFF = 1.0
ADDITIVE_GAUGES = frozenset({"ztgw_connections_open", "ztgw_audit_queue_depth"})
MIN_GAUGES = frozenset({"ztgw_config_last_reload_successful"})


def worker_ops_port(config: GatewayConfig, index: int) -> int:
    return config.ops.port + 1 + index


def merge_metrics(texts: Iterable[str]) -> str:
    """Counters and histograms are summed across workers; gauges are summed only where they
    count something per process (open connections, queued audit events) and otherwise take the
    maximum (timestamps, shared-state counts every worker reports alike), except the reload flag,
    which takes the minimum. `_created` samples are dropped (a sum of timestamps means nothing)."""
    meta: dict[str, tuple[str, str]] = {}
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    order: list[str] = []
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in meta:
                meta[family.name] = (family.documentation, family.type)
                order.append(family.name)
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                key = tuple(sorted(s.labels.items()))
                bucket = samples[f"{family.name}\x00{s.name}"]
                previous = bucket.get(key)
                if previous is None:
                    bucket[key] = s.value
                elif family.type != "gauge" or family.name in ADDITIVE_GAUGES:
                    bucket[key] = previous + s.value
                elif family.name in MIN_GAUGES:
                    bucket[key] = min(previous, s.value)
                else:
                    bucket[key] = max(previous, s.value)
    out: list[str] = []
    for name in order:
        doc, kind = meta[name]
        exposed = name + "_total" if kind == "counter" and not name.endswith("_total") else name
        out.append(f"# HELP {exposed} {doc}")
        out.append(f"# TYPE {exposed} {kind}")
        for full, series in samples.items():
            family_name, _, sample_name = full.partition("\x00")
            if family_name != name:
                continue
            for labels, value in sorted(series.items()):
                label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                out.append(
                    f"{sample_name}{{{label_text}}} {_number(value)}"
                    if label_text
                    else f"{sample_name} {_number(value)}"
                )
    return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value)) if value == value else "NaN"  # noqa: PLR0124 - NaN check


class Supervisor:
    def __init__(self, config: GatewayConfig, config_path: Path, workers: int) -> None:
        self.config = config
        self.config_path = config_path
        self.count = workers
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self.stopping = False

    async def spawn(self, index: int) -> None:
        self.procs[index] = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ztgateway",
            "run",
            "-c",
            str(self.config_path),
            "--worker",
            str(index),
        )
        log.info("worker %d started (pid %d)", index, self.procs[index].pid)

    async def watch(self) -> None:
        while not self.stopping:
            await asyncio.sleep(0.2)
            for index, proc in list(self.procs.items()):
                if proc.returncode is not None and not self.stopping:
                    log.error(
                        "worker %d (pid %d) exited with %s; restarting",
                        index,
                        proc.pid,
                        proc.returncode,
                    )
                    self.restarts += 1
                    await asyncio.sleep(RESTART_BACKOFF)
                    if not self.stopping:
                        await self.spawn(index)

    def signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def scrape(self, path: str) -> list[tuple[int, int, str]]:
        timeout = aiohttp.ClientTimeout(total=5)
        results: list[tuple[int, int, str]] = []
        async with aiohttp.ClientSession(timeout=timeout) as s:
            for index in range(self.count):
                url = f"http://{self.config.ops.host}:{worker_ops_port(self.config, index)}{path}"
                try:
                    async with s.get(url) as r:
                        results.append((index, r.status, await r.text()))
                except (aiohttp.ClientError, TimeoutError) as exc:
                    results.append((index, 599, str(exc)))
        return results

    def ops_app(self) -> web.Application:
        async def metrics(request: web.Request) -> web.Response:
            texts = [text for _, status, text in await self.scrape("/metrics") if status == 200]
            merged = merge_metrics(texts)
            merged += (
                "# HELP ztgw_worker_restarts_total Workers restarted by the supervisor.\n"
                "# TYPE ztgw_worker_restarts_total counter\n"
                f"ztgw_worker_restarts_total {float(self.restarts)}\n"
                "# HELP ztgw_workers_up Workers answering their ops listener.\n"
                "# TYPE ztgw_workers_up gauge\n"
                f"ztgw_workers_up {float(len(texts))}\n"
            )
            return web.Response(text=merged, content_type="text/plain", charset="utf-8")

        async def health(request: web.Request) -> web.Response:
            path = "/readyz" if request.path == "/readyz" else "/healthz"
            results = await self.scrape(path)
            ok = all(status == 200 for _, status, _ in results)
            body = {
                "status": "ok" if ok else "degraded",
                "workers": {str(i): status for i, status, _ in results},
            }
            return web.json_response(body, status=200 if ok else 503)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", health)
        app.router.add_get("/readyz", health)
        return app

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.signal_all(signal.SIGHUP))
        for index in range(self.count):
            await self.spawn(index)
        runner = web.AppRunner(self.ops_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.ops.host, self.config.ops.port)
        await site.start()
        print(
            f"ztgateway supervisor: {self.count} workers on https://{self.config.server.host}:"
            f"{self.config.server.port}; merged ops on http://{self.config.ops.host}:{self.config.ops.port}",
            flush=True,
        )
        watcher = asyncio.ensure_future(self.watch())
        await stop.wait()
        self.stopping = True
        watcher.cancel()
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.shutdown_timeout + 5
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await runner.cleanup()
