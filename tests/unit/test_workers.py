"""The supervisor's pure parts: merging the workers' metrics and the headers it relays."""

from __future__ import annotations

from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from ztgateway.ops import RELAY_PEER_HEADER
from ztgateway.process.workers import Supervisor, merge_metrics


def worker_metrics(requests: float, open_conns: float, reload_ok: float, started: float) -> str:
    return f"""# HELP ztgw_requests Requests decided.
# TYPE ztgw_requests counter
ztgw_requests_total{{route="app",verdict="allow"}} {requests}
ztgw_requests_created{{route="app",verdict="allow"}} 1.7e9
# HELP ztgw_connections_open Open client connections.
# TYPE ztgw_connections_open gauge
ztgw_connections_open {open_conns}
# HELP ztgw_config_last_reload_successful Whether the last reload worked.
# TYPE ztgw_config_last_reload_successful gauge
ztgw_config_last_reload_successful {reload_ok}
# HELP ztgw_start_time_seconds When the process started.
# TYPE ztgw_start_time_seconds gauge
ztgw_start_time_seconds {started}
"""


def samples(text: str) -> dict[str, float]:
    return {
        s.name + str(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_merge_by_what_each_series_means() -> None:
    merged = samples(
        merge_metrics([worker_metrics(20, 3, 1, 100.0), worker_metrics(22, 4, 0, 105.0)])
    )
    assert merged["ztgw_requests_total[('route', 'app'), ('verdict', 'allow')]"] == 42
    assert merged["ztgw_connections_open[]"] == 7  # per process: summed
    assert merged["ztgw_config_last_reload_successful[]"] == 0  # one failed: the merge says so
    assert merged["ztgw_start_time_seconds[]"] == 105.0  # a timestamp: the latest
    assert not any("_created" in k for k in merged)  # a sum of timestamps means nothing


def process_metrics(rss: float, fds: float, max_fds: float, cpu: float) -> str:
    return f"""# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes {rss}
# HELP process_open_fds Number of open file descriptors.
# TYPE process_open_fds gauge
process_open_fds {fds}
# HELP process_max_fds Maximum number of open file descriptors.
# TYPE process_max_fds gauge
process_max_fds {max_fds}
# HELP process_cpu_seconds Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds counter
process_cpu_seconds_total {cpu}
"""


def test_process_metrics_of_the_workers_add_up_to_the_hosts_gateway() -> None:
    merged = samples(
        merge_metrics(
            [process_metrics(100e6, 30, 20000, 1.5), process_metrics(150e6, 40, 20000, 2.0)]
        )
    )
    assert merged["process_resident_memory_bytes[]"] == 250e6  # memory of every worker
    assert merged["process_open_fds[]"] == 70
    assert merged["process_max_fds[]"] == 20000  # a per-process limit: not summed
    assert merged["process_cpu_seconds_total[]"] == 3.5


def test_relayed_headers_keep_repeats_drop_hop_by_hop_and_name_the_real_caller() -> None:
    request = make_mocked_request(
        "GET",
        "/forward-auth",
        headers=CIMultiDict(
            [
                ("X-Forwarded-For", "10.0.0.1"),
                ("X-Forwarded-For", "10.0.0.2"),
                ("Connection", "keep-alive"),
                ("Host", "127.0.0.1:9100"),
                (RELAY_PEER_HEADER, "10.9.9.9"),  # a caller's attempt to choose its address
            ]
        ),
    )
    headers = Supervisor._relayed_headers(request)
    assert headers.getall("X-Forwarded-For") == ["10.0.0.1", "10.0.0.2"]
    assert "Connection" not in headers and "Host" not in headers
    assert headers.getall(RELAY_PEER_HEADER) == [request.remote or ""]
