"""The gateway's histograms observe by binary search (metrics._bisect_observe): the exposition
must be exactly the library's, bucket by bucket, at every boundary and beyond the last."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.registry import Collector

from ztgateway.metrics import _LATENCY_BUCKETS, Metrics


def _samples(registry: Collector, name: str) -> list[tuple[str, str, float]]:
    return sorted(
        (s.name.removeprefix(name), str(s.labels.get("le")), s.value)
        for family in registry.collect()
        if family.name == name
        for s in family.samples
        if not s.name.endswith("_created")
    )


def test_histogram_buckets_match_the_library_at_every_boundary() -> None:
    metrics = Metrics()
    reference = CollectorRegistry()
    library = Histogram(
        "ref_seconds", "reference", ["route"], buckets=_LATENCY_BUCKETS, registry=reference
    )
    values = [0.0, -1.0, 1e9, *_LATENCY_BUCKETS]
    values += [b * 0.999 for b in _LATENCY_BUCKETS] + [b * 1.001 for b in _LATENCY_BUCKETS]
    for v in values:
        metrics.request_seconds.labels("app").observe(v)
        library.labels("app").observe(v)
    ours = _samples(metrics.registry, "ztgw_request_duration_seconds")
    assert ours == _samples(reference, "ref_seconds")
    assert ("_count", "None", float(len(values))) in ours


def test_unlabelled_histogram_counts_in_its_buckets() -> None:
    metrics = Metrics()
    metrics.decision_seconds.observe(0.00002)
    metrics.decision_seconds.observe(0.3)
    got = {
        le: v
        for n, le, v in _samples(metrics.registry, "ztgw_decision_duration_seconds")
        if n == "_bucket"
    }
    assert got["2e-05"] == 1.0
    assert got["0.25"] == 1.0
    assert got["1.0"] == 2.0
    assert got["+Inf"] == 2.0
