"""Prometheus against a real gateway: `promtool check metrics` on the live /metrics output, a real
Prometheus server scraping the ops listener (with the shipped example configuration and alert
rules), the alert rules' promtool unit tests, and the Grafana dashboard's queries.

promtool and prometheus come from Debian's `prometheus` package; these tests fail (never skip)
without them. Prometheus runs on a free loopback port with its own temporary storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import Certs, client_ssl, free_port, scrape, session
from ztgateway.app import Gateway

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "config" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts.test.yml"
EXAMPLE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = ROOT / "config" / "grafana" / "ztgateway.json"

HOST = "127.0.0.1"
DEADLINE = 15.0


# --------------------------------------------------------------------------- helpers


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: these tests need Debian's `prometheus` package "
            "(apt-get install -y prometheus), which provides /usr/bin/prometheus and "
            "/usr/bin/promtool",
            pytrace=False,
        )
    return path


async def run(*argv: str, stdin: bytes | None = None) -> tuple[int, str]:
    """Run a command without blocking the event loop the gateway shares; exit code, output."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def refused_handshake(gw: Gateway, certs: Certs) -> None:
    """One connection with a client certificate from another CA: refused in the TLS handshake
    (unknown_ca). A raw connection, because aiohttp retries a GET on a dropped connection."""
    ctx = client_ssl(certs, "mallory-laptop")
    with contextlib.suppress(ssl.SSLError, ConnectionError, OSError, asyncio.IncompleteReadError):
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, gw.port, ssl=ctx, server_hostname=HOST), DEADLINE
        )
        try:
            # TLS 1.3: the client finishes first; the refusal arrives with the first read.
            writer.write(b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), DEADLINE)
            assert not answer.startswith(b"HTTP/"), "an unknown CA's certificate got an answer"
        finally:
            writer.close()
            with contextlib.suppress(ssl.SSLError, ConnectionError, OSError):
                await writer.wait_closed()
    deadline = time.monotonic() + DEADLINE
    while 'ztgw_tls_handshake_failures_total{reason="unknown_ca"} 1.0' not in await scrape(
        gw.ops_port
    ):
        assert time.monotonic() < deadline, "the refused handshake was never counted"
        await asyncio.sleep(0.05)


async def exercise(gw: Gateway, certs: Certs) -> str:
    """Allowed requests, refused requests and a refused handshake; the /metrics text after."""
    base = f"https://{HOST}:{gw.port}"
    async with session(certs) as s:
        for _ in range(3):
            async with s.get(f"{base}/echo") as r:
                assert r.status == 200
        async with s.get(f"{base}/api/echo") as r:
            assert r.status == 401
        async with s.get(f"{base}/api/echo", headers={"Authorization": "Bearer not.a.jwt"}) as r:
            assert r.status == 401
    await refused_handshake(gw, certs)
    text = await scrape(gw.ops_port)
    for series in (
        'ztgw_requests_total{reason="policy-allowed",route="app",verdict="allow"} 3.0',
        'ztgw_requests_total{reason="token-required",route="api",verdict="deny"} 1.0',
        'ztgw_tls_handshake_failures_total{reason="unknown_ca"} 1.0',
    ):
        assert series in text, series
    return text


def exposed_names(text: str) -> set[str]:
    """Every series name the exposition offers: sample names, plus each family's typed names
    (a labelled histogram with no observation yet still declares its _bucket/_sum/_count)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "atan2", "inf", "nan",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery durations
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"(?<![\w:])\d[\w.]*", " ", s)  # numbers and durations (5m, 1e3, 0.99)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][\w:]*", s):
        word = m.group(0)
        if word.lower() in _PROMQL_WORDS or re.match(r"\s*\(", s[m.end() :]):
            continue  # a keyword, or a function call
        names.add(word)
    return names


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    queries = [
        (f"panel {p['title']!r} {t['refId']}", t["expr"])
        for p in dashboard_panels(dashboard)
        for t in p.get("targets", [])
    ]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", q)
            assert m, f"variable {var['name']}: unexpected query {q!r}"
            queries.append((f"variable ${var['name']}", m.group(1)))
    return queries


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)\s*$", ALERTS.read_text(), flags=re.MULTILINE)


class Prometheus:
    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.http = http

    async def get(self, path: str, **params: str) -> Any:
        async with self.http.get(f"{self.url}{path}", params=params) as r:
            body = await r.json()
            assert r.status == 200 and body["status"] == "success", (path, params, body)
            return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    async def until(self, what: str, expr: str, want: float) -> None:
        """Poll an instant query until its single result has the wanted value."""
        deadline = time.monotonic() + DEADLINE
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = await self.query(expr)
            if len(result) == 1 and float(result[0]["value"][1]) == want:
                return
            await asyncio.sleep(0.25)
        pytest.fail(f"{what}: {expr} never became {want}; last result {result}")


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, target_port: int) -> AsyncIterator[Prometheus]:
    """A real Prometheus on the shipped example configuration, pointed at `target_port`, with a
    1 s scrape and evaluation interval, on a free loopback port with its own storage."""
    binary = tool("prometheus")
    text = EXAMPLE_CONFIG.read_text()
    for old, new in (
        ('"127.0.0.1:9100"', f'"{HOST}:{target_port}"'),
        ("scrape_interval: 15s", "scrape_interval: 1s"),
        ("evaluation_interval: 15s", "evaluation_interval: 1s"),
    ):
        assert text.count(old) == 1, f"{EXAMPLE_CONFIG} no longer has exactly one {old}"
        text = text.replace(old, new)
    work = tmp_path / "prometheus"
    work.mkdir()
    (work / "prometheus.yml").write_text(text)
    shutil.copy(ALERTS, work / "alerts.yml")  # rule_files are relative to the config file
    port = free_port()
    log = (work / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address={HOST}:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://{HOST}:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            deadline = time.monotonic() + DEADLINE
            while True:
                if proc.poll() is not None:
                    pytest.fail(
                        f"prometheus exited with {proc.returncode}:\n"
                        + (work / "prometheus.log").read_text()
                    )
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{url}/-/ready") as r:
                        if r.status == 200:
                            break
                assert time.monotonic() < deadline, "prometheus never became ready"
                await asyncio.sleep(0.1)
            yield Prometheus(url, http)
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
        log.close()


# --------------------------------------------------------------------------- 1. live metrics


async def test_promtool_check_metrics_passes_on_the_live_output(
    gateway: Gateway, certs: Certs
) -> None:
    text = await exercise(gateway, certs)
    code, out = await run(tool("promtool"), "check", "metrics", stdin=text.encode())
    problems = [line for line in out.splitlines() if line.strip()]
    assert code == 0 and problems == [], (
        f"promtool check metrics (exit {code}) complains about /metrics:\n" + "\n".join(problems)
    )


# --------------------------------------------------------------------------- 2. real scrape


async def test_prometheus_scrapes_the_ops_listener_and_evaluates_rules_and_dashboard(
    gateway: Gateway, certs: Certs, tmp_path: Path
) -> None:
    await exercise(gateway, certs)
    assert gateway.ops_port is not None
    async with prometheus(tmp_path, gateway.ops_port) as prom:
        await prom.until("the target is up", 'up{job="ztgateway"}', 1)
        await prom.until(
            "allowed requests, read back",
            'ztgw_requests_total{job="ztgateway",route="app",verdict="allow"}',
            3,
        )
        await prom.until(
            "refused handshake, read back",
            'ztgw_tls_handshake_failures_total{job="ztgateway",reason="unknown_ca"}',
            1,
        )
        # Scraped continuously, not once: one more request shows up.
        async with session(certs) as s, s.get(f"https://{HOST}:{gateway.port}/echo") as r:
            assert r.status == 200
        await prom.until(
            "a later request, read back",
            'sum(ztgw_requests_total{job="ztgateway",route="app"})',
            4,
        )
        (target,) = (await prom.get("/api/v1/targets"))["activeTargets"]
        assert target["health"] == "up" and target["lastError"] == "", target

        # Every alert rule is loaded and evaluates against the real series without error.
        deadline = time.monotonic() + DEADLINE
        while True:
            groups = (await prom.get("/api/v1/rules"))["groups"]
            rules = {rule["name"]: rule for g in groups for rule in g["rules"]}
            if all(not r["lastEvaluation"].startswith("0001-") for r in rules.values()):
                break
            assert time.monotonic() < deadline, "the rules were never evaluated"
            await asyncio.sleep(0.25)
        assert sorted(rules) == sorted(alert_names())
        unhealthy = {n: r.get("lastError") for n, r in rules.items() if r["health"] != "ok"}
        assert unhealthy == {}
        firing = {n: r["alerts"] for n, r in rules.items() if r["state"] != "inactive"}
        assert firing == {}, "a healthy test gateway should raise no alert"

        # Every dashboard query (panels and variables) is valid PromQL that Prometheus
        # evaluates on the scraped series.
        dashboard = json.loads(DASHBOARD.read_text())
        for where, expr in dashboard_queries(dashboard):
            concrete = (
                expr.replace("$__rate_interval", "1m")
                .replace("$__range", "1h")
                .replace("$instance", ".*")
                .replace("$route", ".*")
            )
            assert "$" not in concrete, (where, concrete)
            await prom.get("/api/v1/query", query=concrete)  # asserts status success
        allowed = await prom.query(
            'sum by (verdict) (rate(ztgw_requests_total{instance=~".*",route=~".*"}[1m]))'
        )
        assert {r["metric"]["verdict"] for r in allowed} == {"allow", "deny"}


# --------------------------------------------------------------------------- 3. alert rules


async def test_promtool_check_rules_passes() -> None:
    code, out = await run(tool("promtool"), "check", "rules", str(ALERTS))
    assert code == 0, out
    assert f"SUCCESS: {len(alert_names())} rules found" in out, out


async def test_promtool_rule_unit_tests_pass() -> None:
    code, out = await run(tool("promtool"), "test", "rules", str(ALERT_TESTS))
    assert code == 0, out
    assert "SUCCESS" in out and "FAILED" not in out, out


async def test_example_prometheus_config_is_valid() -> None:
    code, out = await run(tool("promtool"), "check", "config", str(EXAMPLE_CONFIG))
    assert code == 0, out


def test_every_alert_has_severity_annotations_and_a_firing_and_a_quiet_test() -> None:
    names = alert_names()
    assert len(names) == len(set(names)), "duplicate alert names"
    for required in (
        "ZtgwAuthenticationFailures",
        "ZtgwHighRiskRequests",
        "ZtgwStepUpSpike",
        "ZtgwSessionTerminationSpike",
        "ZtgwCertificateExpiringSoon",
        "ZtgwCrlExpiringSoon",
        "ZtgwCrlStale",
        "ZtgwCrlFetchFailures",
        "ZtgwOcspResponderUnavailable",
        "ZtgwUpstreamErrorRate",
        "ZtgwStageErrors",
        "ZtgwAuditWriteFailures",
        "ZtgwAuditUnavailable",
        "ZtgwStoreErrors",
        "ZtgwJwksStale",
        "ZtgwConfigReloadFailed",
    ):
        assert required in names, required
    # Each rule block (from one `- alert:` to the next) has the required fields.
    blocks = re.split(r"^\s*- alert: ", ALERTS.read_text(), flags=re.MULTILINE)[1:]
    for block in blocks:
        name = block.split()[0]
        assert re.search(r"^\s+for: \d+[smh]\s*$", block, re.MULTILINE), f"{name}: for"
        assert re.search(r"^\s+severity: (critical|warning)\s*$", block, re.MULTILINE), name
        assert re.search(r"^\s+summary: \S", block, re.MULTILINE), f"{name}: summary"
        assert re.search(r"^\s+description: \S", block, re.MULTILINE), f"{name}: description"
    # In the unit tests: every alert is expected to fire somewhere and to be quiet somewhere.
    cases = re.findall(
        r"^\s*alertname: (\w+)\s*\n\s*exp_alerts:(.*)$", ALERT_TESTS.read_text(), re.MULTILINE
    )
    firing = {n for n, rest in cases if rest.strip() != "[]"}
    quiet = {n for n, rest in cases if rest.strip() == "[]"}
    assert {n for n, _ in cases} <= set(names), "tests for an alert that does not exist"
    assert set(names) - firing == set(), "alerts never tested firing"
    assert set(names) - quiet == set(), "alerts never tested quiet"


# --------------------------------------------------------------------------- 4. dashboard


def test_promql_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(ztgw_request_duration_seconds_bucket{route=~"$route",'
        'le!="1e3"}[$__rate_interval] offset 5m))) / ignoring(x) group_left(le) '
        "min(ztgw_x:rate5m) - time() > bool 7 * 86400 and on() up"
    )
    assert promql_metric_names(expr) == {
        "ztgw_request_duration_seconds_bucket",
        "ztgw_x:rate5m",
        "up",
    }


async def test_dashboard_queries_only_metrics_the_gateway_exposes(
    gateway: Gateway, certs: Certs
) -> None:
    exposed = exposed_names(await exercise(gateway, certs))
    dashboard = json.loads(DASHBOARD.read_text())

    # A Grafana JSON model with the data source as a variable, on every panel and query.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard_panels(dashboard) if p["type"] != "row"]
    ids = [p["id"] for p in dashboard_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]

    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in (
        "requests by verdict",
        "refusals by reason",
        "refused tls handshakes",
        "request latency",
        "decision latency",
        "upstream errors",
        "risk score",
        "step-ups and terminations",
        "active sessions",
        "devices by state",
        "certificate and crl expiry",
        "audit queue depth",
        "audit, store",
    ):
        assert topic in titles, topic

    unknown: dict[str, set[str]] = {}
    for where, expr in dashboard_queries(dashboard):
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        missing = names - exposed
        if missing:
            unknown[where] = missing
    assert unknown == {}, "queries name metrics the gateway does not expose"
