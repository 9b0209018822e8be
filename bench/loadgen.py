"""An open-loop HTTP/1.1 load generator at a fixed request rate, for latency under load.

wrk is closed-loop: each connection sends its next request only when the previous answer is
back, so a slow server silently lowers the offered load (coordinated omission) and the rate
cannot be fixed; wrk2, which fixes both, is not packaged by Debian. This generator schedules
request i at `t0 + i / rate` regardless of how the server is doing, hands it to the first idle
keep-alive connection (TLS with a client certificate, or plain HTTP), and records two latencies:

* `service`: from the moment the request was written to the last byte of the response;
* `intended`: from the moment it was *scheduled*, which also counts time spent waiting for a
  free connection (the coordinated-omission-corrected figure wrk2 reports). It includes the
  event loop's timer granularity (up to 1 ms), the same for every target.

At a quarter of the gateway's maximum load this costs a small fraction of one core. Prints one
JSON line.

    python -m bench.loadgen --port 8443 --path /full/x --rate 800 --duration 10 \
        --cert alice.pem --key alice.key --cafile ca.pem -H "Authorization: Bearer ..."
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import ssl
import time
from collections.abc import Callable


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(q / 100.0 * (len(sorted_values) - 1))))
    return sorted_values[k]


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    close = b"\r\nconnection: close" in lower
    if b"\r\ncontent-length:" in lower:
        n = int(lower.split(b"\r\ncontent-length:", 1)[1].split(b"\r\n", 1)[0])
        if n:
            await reader.readexactly(n)
    elif b"\r\ntransfer-encoding:" in lower and b"chunked" in lower:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status, close


async def release_on_schedule(
    release: Callable[[float, int], None], rate: float, duration: float, t0: float
) -> None:
    """Call `release(scheduled, i)` for request i at `t0 + i / rate` (perf_counter time).

    Everything due is released at once, then the loop sleeps until the next one is due. The
    loop's timers tick in milliseconds, so a request leaves up to ~1 ms after its slot;
    "service" latency starts at the write and does not count that delay.
    """
    clock = time.perf_counter
    total = int(rate * duration)
    interval = 1.0 / rate
    i = 0
    while i < total:
        now = clock()
        while i < total and t0 + i * interval <= now:
            release(t0 + i * interval, i)
            i += 1
        if i < total:
            await asyncio.sleep(max(0.0, t0 + i * interval - clock()))


async def run(args: argparse.Namespace) -> dict[str, object]:
    ctx: ssl.SSLContext | None = None
    if args.cert:
        ctx = ssl.create_default_context(cafile=args.cafile)
        ctx.load_cert_chain(args.cert, args.key)
        ctx.check_hostname = False  # the server certificate is checked against the CA
    extra = "".join(f"{h}\r\n" for h in args.header)
    request = (f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n{extra}\r\n").encode()

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(args.host, args.port, ssl=ctx)

    # uvloop's loop.time() has millisecond resolution; latencies need microseconds.
    clock = time.perf_counter
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    service: list[float] = []
    intended: list[float] = []
    errors = {"status": 0, "io": 0}
    late = [0]  # requests written more than 2 ms after their slot (no idle connection, or GC)
    conns = [await connect() for _ in range(args.connections)]

    async def worker(slot: int) -> None:
        reader, writer = conns[slot]
        while True:
            scheduled = await queue.get()
            if scheduled is None:
                return
            t_send = clock()
            if t_send - scheduled > 0.002:
                late[0] += 1
            try:
                writer.write(request)
                status, close = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors["io"] += 1
                writer.close()
                reader, writer = await connect()
                continue
            done = clock()
            if status != 200:
                errors["status"] += 1
            service.append(done - t_send)
            intended.append(done - scheduled)
            if close:
                writer.close()
                reader, writer = await connect()

    workers = [asyncio.ensure_future(worker(i)) for i in range(args.connections)]
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = clock() + 0.05
    await release_on_schedule(
        lambda scheduled, _i: queue.put_nowait(scheduled), args.rate, args.duration, t0
    )
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    elapsed = clock() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    for _, w in conns:
        w.close()
    service.sort()
    intended.sort()

    def ms(values: list[float], q: float) -> float:
        return round(_percentile(values, q) * 1000.0, 3)

    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {
        "requests": len(service),
        "rate_target": args.rate,
        "rate_achieved": round(len(service) / elapsed, 1),
        "errors": errors,
        "service_ms": {"p50": ms(service, 50), "p99": ms(service, 99), "p999": ms(service, 99.9)},
        "intended_ms": {
            "p50": ms(intended, 50),
            "p99": ms(intended, 99),
            "p999": ms(intended, 99.9),
        },
        "late_sends": late[0],
        "generator_cpu_share": round(cpu / elapsed, 3),
        "pid": os.getpid(),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/")
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--cafile")
    p.add_argument("-H", "--header", action="append", default=[])
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
