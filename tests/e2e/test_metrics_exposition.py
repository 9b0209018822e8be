"""What a scraper reads from /metrics: no `_created` noise, the process behind the numbers, and
which build is running; parsed by prometheus_client's exposition parser and checked by promtool."""

from __future__ import annotations

import asyncio
import platform
import shutil
import subprocess

from prometheus_client.parser import text_string_to_metric_families

from tests.support import Certs, scrape, session
from ztgateway import __version__
from ztgateway.app import Gateway


async def test_metrics_have_no_created_series_and_show_the_process_and_build(
    gateway: Gateway, certs: Certs
) -> None:
    async with session(certs) as s, s.get(f"https://127.0.0.1:{gateway.port}/echo") as r:
        assert r.status == 200
    text = await scrape(gateway.ops_port)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {s.name: s for f in families.values() for s in f.samples}
    assert not [name for name in samples if name.endswith("_created")]
    assert "ztgw_requests_total" in samples and "ztgw_request_duration_seconds_bucket" in samples
    # The process: memory, CPU, descriptors, start time, from /proc of this very process.
    assert samples["process_resident_memory_bytes"].value > 10_000_000
    assert samples["process_open_fds"].value >= 3
    assert samples["process_start_time_seconds"].value > 0
    assert "process_cpu_seconds_total" in samples and "python_gc_objects_collected_total" in samples
    build = families["ztgw_build"] if "ztgw_build" in families else families["ztgw_build_info"]
    (info,) = build.samples
    assert info.labels == {"version": __version__, "python_version": platform.python_version()}
    assert info.value == 1.0
    python = families["python_info"].samples[0]
    assert python.labels["version"] == platform.python_version()


async def test_promtool_accepts_the_exposition(gateway: Gateway) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "Debian's prometheus package provides promtool"
    text = await scrape(gateway.ops_port)
    out = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "" and out.stderr.strip() == "", out
