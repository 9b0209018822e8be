"""`workers = N`: N gateway processes on one host, one listening port, supervised.

Each worker is a full gateway (`ztgateway run --worker I`) binding the mTLS port with
SO_REUSEPORT, so the kernel spreads connections over them; state is shared through the store
(SQLite in WAL mode with its change log, or Redis). A worker's ops listener is a Unix socket in
a private (0700) directory the supervisor creates, so workers take no TCP ports of their own:
a port chosen as "ops port + 1 + I" could be held by anything on the host, and a worker that
cannot bind it would crash and be restarted forever. The supervisor owns the configured ops
port: `/metrics` merges the workers' metrics (counters and histograms summed, per-process
gauges summed, shared or timestamp gauges by maximum), `/healthz` and `/readyz` answer for all
workers, `/admin/reload` reloads every worker, and everything else (the admin API, `/decide`,
`/forward-auth`) is relayed to one live worker, since they share their state. A worker that
dies is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from ..clock import SYSTEM_CLOCK
from ..config import GatewayConfig
from ..ops import RELAY_PEER_HEADER
from . import sdnotify
from .lifeline import claim_port

log = logging.getLogger("ztgateway.workers")
RESTART_BACKOFF = 1.0
ADDITIVE_GAUGES = frozenset(
    {
        "ztgw_connections_open",
        "ztgw_audit_queue_depth",
        # Each worker is its own process: the host's gateway uses the sum of their memory and
        # descriptors (a maximum would hide all but one worker from a capacity alert).
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
    }
)
MIN_GAUGES = frozenset({"ztgw_config_last_reload_successful"})
NOT_RELAYED = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding",
        "Upgrade", "Host", "Content-Length", RELAY_PEER_HEADER,
    )
)  # fmt: skip
"""Hop-by-hop headers, and the peer header only the supervisor may set."""
RELAY_FAILURES = ("too_large", "worker_error", "no_worker")


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
        self.clock = SYSTEM_CLOCK
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self.stopping = False
        remove_stale_socket_dirs()
        self.socket_dir = Path(tempfile.mkdtemp(prefix=f"ztgw-ops-{os.getpid()}-"))
        self._clients: dict[int, aiohttp.ClientSession] = {}
        self._turn = itertools.count()
        self.relay_failures: dict[str, int] = dict.fromkeys(RELAY_FAILURES, 0)
        # The lifeline: workers watch the read end; only this process holds the write end, so
        # the kernel closes it (EOF for every worker) whenever this process dies.
        self._lifeline_r, self._lifeline_w = os.pipe()
        # sd_notify between the workers and us (sdnotify.py): who is ready, and whether the
        # service manager has been told READY=1 yet / which workers a reload still waits for.
        self.readiness = sdnotify.WorkerReadiness(self.socket_dir, self._worker_said)
        self.ready_workers: set[int] = set()
        self.announced = False
        self._reload_waits: set[int] | None = None

    def ops_socket(self, index: int) -> Path:
        return self.socket_dir / f"worker-{index}.sock"

    async def spawn(self, index: int) -> None:
        extra = ["--ops-socket", str(self.ops_socket(index))] if self.config.ops.enabled else []
        self.procs[index] = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ztgateway",
            "run",
            "-c",
            str(self.config_path),
            "--worker",
            str(index),
            "--supervisor-pid",
            str(os.getpid()),
            "--lifeline-fd",
            str(self._lifeline_r),
            *extra,
            pass_fds=(self._lifeline_r,),
            env=self.readiness.environment(worker_environment()),
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
                    self._worker_gone(index)
                    await asyncio.sleep(RESTART_BACKOFF)
                    if not self.stopping:
                        await self.spawn(index)

    def _needed(self) -> int:
        return max(1, min(self.config.server.min_ready_workers, self.count))

    def _status(self) -> str:
        return (
            f"{len(self.ready_workers)} of {self.count} workers serving https://"
            f"{self.config.server.host}:{self.config.server.port}"
        )

    def _worker_said(self, fields: dict[str, str]) -> None:
        try:
            index = int(fields.get(sdnotify.WORKER_FIELD, ""))
        except ValueError:
            return  # not one of our workers' messages
        if fields.get("READY") != "1" or index not in self.procs:
            return
        self.ready_workers.add(index)
        if self._reload_waits is not None:
            self._reload_waits.discard(index)
            if not self._reload_waits:
                self._reload_waits = None
                sdnotify.ready(self._status())
                return
        if not self.announced and len(self.ready_workers) >= self._needed():
            self.announced = True
            sdnotify.ready(self._status())

    def _worker_gone(self, index: int) -> None:
        self.ready_workers.discard(index)
        if self._reload_waits is not None:
            self._reload_waits.discard(index)
            if not self._reload_waits:
                self._reload_waits = None
                sdnotify.ready(self._status())

    def reload_signal(self) -> None:
        """SIGHUP: every worker reloads; the service manager hears RELOADING=1 now and READY=1
        once each worker that was serving has said READY=1 again (or has gone)."""
        self._reload_waits = set(self.ready_workers)
        sdnotify.reloading(self.clock)
        self.signal_all(signal.SIGHUP)
        if not self._reload_waits:
            self._reload_waits = None
            sdnotify.ready(self._status())

    def signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    def _client(self, index: int) -> aiohttp.ClientSession:
        client = self._clients.get(index)
        if client is None:
            client = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.ops_socket(index))),
                timeout=aiohttp.ClientTimeout(total=30),
                auto_decompress=False,
            )
            self._clients[index] = client
        return client

    async def _ask(
        self,
        index: int,
        method: str,
        path: str,
        headers: CIMultiDict[str] | dict[str, str],
        body: bytes = b"",
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """One request to one worker's ops socket; the URL's host is a placeholder."""
        async with self._client(index).request(
            method, f"http://worker{path}", headers=headers, data=body or None
        ) as r:
            kept = [(k, v) for k, v in r.headers.items() if k.lower() not in NOT_RELAYED]
            return r.status, kept, await r.read()

    async def scrape(self, path: str) -> list[tuple[int, int, str]]:
        async def one(index: int) -> tuple[int, int, str]:
            try:
                status, _, body = await asyncio.wait_for(self._ask(index, "GET", path, {}), 5)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                return index, 599, str(exc)
            return index, status, body.decode("utf-8", "replace")

        return list(await asyncio.gather(*(one(i) for i in range(self.count))))

    @staticmethod
    def _relayed_headers(request: web.Request) -> CIMultiDict[str]:
        """The caller's headers, repeated ones kept (a dict would keep only the last), less the
        hop-by-hop ones, plus the caller's address for the worker."""
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in NOT_RELAYED
        )
        headers[RELAY_PEER_HEADER] = request.remote or ""
        return headers

    async def relay(self, request: web.Request) -> web.Response:
        """The admin API, `/decide` and `/forward-auth`, answered by the next live worker. A
        worker that cannot be reached (restarting) is skipped; none reachable is a 503."""
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            return self._relay_failed(413, "body too large", exc.text or "", "too_large")
        headers = self._relayed_headers(request)
        first = next(self._turn)
        for step in range(self.count):
            index = (first + step) % self.count
            try:
                status, kept, answer = await self._ask(
                    index, request.method, request.rel_url.raw_path_qs, headers, body
                )
            except aiohttp.ClientConnectorError:
                continue  # never reached the worker, so trying the next one repeats nothing
            except (aiohttp.ClientError, TimeoutError) as exc:
                detail = f"worker {index}: {exc}"
                return self._relay_failed(502, "worker did not answer", detail, "worker_error")
            return web.Response(status=status, headers=kept, body=answer)
        return self._relay_failed(
            503, "no worker available", "every worker is restarting", "no_worker"
        )

    def _relay_failed(self, status: int, title: str, detail: str, kind: str) -> web.Response:
        """Counted and logged here: the workers keep the audit log, and none of them saw it."""
        self.relay_failures[kind] += 1
        log.warning("ops relay refused (%s): %s", kind, detail)
        return _problem(status, title, detail)

    async def reload_all(self, request: web.Request) -> web.Response:
        """`/admin/reload` reloads every worker, as SIGHUP to the supervisor does. Each worker
        checks the admin token itself; a refusal is passed on as it came."""
        headers = self._relayed_headers(request)
        body = await request.read()
        results: dict[str, object] = {}
        ok = True
        for index in range(self.count):
            try:
                status, kept, answer = await self._ask(
                    index, "POST", "/admin/reload", headers, body
                )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                ok = False
                results[str(index)] = {"reloaded": False, "error": str(exc)}
                continue
            if status in (401, 403):
                return web.Response(status=status, headers=kept, body=answer)
            try:
                results[str(index)] = json.loads(answer)
            except ValueError:
                results[str(index)] = {"status": status}
            ok = ok and status == 200
        return web.json_response({"reloaded": ok, "workers": results}, status=200 if ok else 409)

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
                "# HELP ztgw_ops_relay_failures_total Ops calls the supervisor could not relay.\n"
                "# TYPE ztgw_ops_relay_failures_total counter\n"
                + "".join(
                    f'ztgw_ops_relay_failures_total{{kind="{k}"}} {float(n)}\n'
                    for k, n in self.relay_failures.items()
                )
            )
            return web.Response(text=merged, content_type="text/plain", charset="utf-8")

        async def health(request: web.Request) -> web.Response:
            """Ready while at least `min_ready_workers` workers are (issue 19: one worker
            restarting made the host 503, so a load balancer drained it although the other
            worker served); alive while any worker is."""
            ready = request.path == "/readyz"
            results = await self.scrape("/readyz" if ready else "/healthz")
            up = sum(1 for _, status, _ in results if status == 200)
            needed = min(self.config.server.min_ready_workers, self.count) if ready else 1
            ok = up >= needed
            body = {
                "status": ("ok" if up == self.count else "degraded") if ok else "unavailable",
                "workers_ok": up,
                "workers_needed": needed,
                "workers": {str(i): status for i, status, _ in results},
            }
            return web.json_response(body, status=200 if ok else 503)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", health)
        app.router.add_get("/readyz", health)
        app.router.add_post("/admin/reload", self.reload_all)
        app.router.add_route("*", "/{tail:.*}", self.relay)
        return app

    async def run(self) -> None:
        # Before any worker: refuse to serve beside another gateway (or its orphans), and hold
        # the port so that a second supervisor refuses too (lifeline.py).
        guard = claim_port(self.config.server.host, self.config.server.port)
        try:
            await self._run()
        finally:
            guard.close()
            os.close(self._lifeline_w)
            os.close(self._lifeline_r)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_signal)
        self.readiness.start()
        runner = web.AppRunner(self.ops_app(), access_log=None)
        try:
            for index in range(self.count):
                await self.spawn(index)
            await runner.setup()
            where = "no ops listener ([ops] enabled = false)"
            if self.config.ops.enabled:
                site = web.TCPSite(runner, self.config.ops.host, self.config.ops.port)
                await site.start()
                where = f"merged ops on http://{self.config.ops.host}:{self.config.ops.port}"
            print(
                f"ztgateway supervisor: {self.count} workers on https://"
                f"{self.config.server.host}:{self.config.server.port}; {where}",
                flush=True,
            )
            watcher = asyncio.ensure_future(self.watch())
            await stop.wait()
            self.stopping = True
            watcher.cancel()
        finally:
            self.stopping = True
            sdnotify.stopping()
            self.signal_all(signal.SIGTERM)
            deadline = self.clock.monotonic() + self.config.server.shutdown_timeout + 5
            for proc in self.procs.values():
                try:
                    await asyncio.wait_for(proc.wait(), max(0.1, deadline - self.clock.monotonic()))
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            await runner.cleanup()
            for client in self._clients.values():
                await client.close()
            self.readiness.close()
            shutil.rmtree(self.socket_dir, ignore_errors=True)


def _problem(status: int, title: str, detail: str) -> web.Response:
    return web.json_response(
        {"type": "about:blank", "title": title, "status": status, "detail": detail},
        status=status,
        content_type="application/problem+json",
    )


def remove_stale_socket_dirs() -> None:
    """Remove the private socket directories of supervisors that died without cleaning up
    (SIGKILL): named `ztgw-ops-<pid>-…`, ours, and no process <pid> any more."""
    for path in Path(tempfile.gettempdir()).glob("ztgw-ops-*-*"):
        pid = path.name.split("-")[2]
        try:
            if not pid.isdigit() or path.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def worker_environment() -> dict[str, str]:
    """The supervisor's environment, with glibc's malloc held to two arenas unless the operator
    chose otherwise: each thread that allocates (SQLite's, the default executor's) would get an
    arena of its own, and freed memory stays in them; issue 19 measured a worker growing from
    70 to 144 MB over 12,000 connections. See also `memory.py`."""
    env = dict(os.environ)
    env.setdefault("MALLOC_ARENA_MAX", "2")
    return env
