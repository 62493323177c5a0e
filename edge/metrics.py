"""Prometheus exposition of every worker's latest stats snapshot, summed."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from edge.worker_stats import LATENCY_BUCKETS, StatsSnapshot


class SnapshotCollector(Collector):
    """Turns worker snapshots into metric families at scrape time."""

    def __init__(self, snapshots: Callable[[], list[StatsSnapshot]]) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        snapshots = self._snapshots()
        requests: dict[tuple[str, str], int] = {}
        errors: dict[tuple[str, str], int] = {}
        latency: dict[str, tuple[list[int], float]] = {}
        open_connections = 0
        for snap in snapshots:
            open_connections += snap.open_connections
            for key, n in snap.requests.items():
                app, status = key.split("\x00")
                requests[(app, status)] = requests.get((app, status), 0) + n
            for key, n in snap.upstream_errors.items():
                app, kind = key.split("\x00")
                errors[(app, kind)] = errors.get((app, kind), 0) + n
            for app, hist in snap.latency.items():
                counts, total = latency.get(app, ([0] * len(hist.counts), 0.0))
                latency[app] = (
                    [a + b for a, b in zip(counts, hist.counts, strict=True)],
                    total + hist.total,
                )

        family = CounterMetricFamily(
            "edge_requests", "Requests answered, by app and status.", labels=["app", "status"]
        )
        for (app, status), n in sorted(requests.items()):
            family.add_metric([app, status], n)
        yield family

        family = CounterMetricFamily(
            "edge_upstream_errors", "Upstream failures, by app and kind.", labels=["app", "kind"]
        )
        for (app, kind), n in sorted(errors.items()):
            family.add_metric([app, kind], n)
        yield family

        histogram = HistogramMetricFamily(
            "edge_request_duration_seconds",
            "Time from request head to response end, by app.",
            labels=["app"],
        )
        for app, (counts, total) in sorted(latency.items()):
            buckets = []
            running = 0
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                running += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
            histogram.add_metric([app], buckets, total)
        yield histogram

        yield GaugeMetricFamily(
            "edge_open_connections", "Client connections open, all workers.", open_connections
        )
        yield GaugeMetricFamily(
            "edge_workers_reporting", "Workers whose stats are included.", len(snapshots)
        )


def render_metrics(snapshots: Callable[[], list[StatsSnapshot]]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshots))
    return generate_latest(registry)
