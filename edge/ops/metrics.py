"""Prometheus exposition of every worker's latest stats snapshot, summed."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from edge.ops.worker_stats import LATENCY_BUCKETS, StatsSnapshot
from wake.controller import PHASE_BUCKETS


class SnapshotCollector(Collector):
    """Turns worker snapshots into metric families at scrape time."""

    def __init__(
        self,
        snapshots: Callable[[], list[StatsSnapshot]],
        budget_in_use: int | None = None,
        queue_depths: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        self._snapshots = snapshots
        self._budget_in_use = budget_in_use
        self._queue_depths = queue_depths or {}

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

        yield _histogram(
            "edge_request_duration_seconds",
            "Time from request head to response end, by app.",
            latency,
        )

        yield GaugeMetricFamily(
            "edge_open_connections", "Client connections open, all workers.", open_connections
        )
        yield GaugeMetricFamily(
            "edge_workers_reporting", "Workers whose stats are included.", len(snapshots)
        )
        yield from _wake_families(snapshots, self._budget_in_use)
        yield from _queue_families(snapshots, self._queue_depths)
        yield from _limit_families(snapshots)


def _histogram(
    name: str, documentation: str, by_app: dict[str, tuple[list[int], float]]
) -> HistogramMetricFamily:
    """A histogram by app over LATENCY_BUCKETS, from summed bucket counts and totals."""
    histogram = HistogramMetricFamily(name, documentation, labels=["app"])
    for app, (counts, total) in sorted(by_app.items()):
        buckets = []
        running = 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
            running += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        histogram.add_metric([app], buckets, total)
    return histogram


def _limit_families(snapshots: list[StatsSnapshot]) -> Iterator[Metric]:
    """Apps with max_concurrency: requests through the limit, waiting, and how long they waited."""
    in_flight = GaugeMetricFamily(
        "edge_upstream_in_flight",
        "Requests forwarded at once under the app's max_concurrency, all workers.",
        labels=["app"],
    )
    queued = GaugeMetricFamily(
        "edge_upstream_queued",
        "Requests waiting in the edge for a slot under the app's max_concurrency.",
        labels=["app"],
    )
    totals: dict[str, list[int]] = {}
    waits: dict[str, tuple[list[int], float]] = {}
    for snap in snapshots:
        for app, counts in snap.limited.items():
            app_totals = totals.setdefault(app, [0, 0])
            app_totals[0] += counts[0]
            app_totals[1] += counts[1]
        for app, hist in snap.concurrency_wait.items():
            counts, total = waits.get(app, ([0] * len(hist.counts), 0.0))
            waits[app] = (
                [a + b for a, b in zip(counts, hist.counts, strict=True)],
                total + hist.total,
            )
    for app, (flying, waiting) in sorted(totals.items()):
        in_flight.add_metric([app], flying)
        queued.add_metric([app], waiting)
    yield in_flight
    yield queued
    yield _histogram(
        "edge_upstream_queue_wait_seconds",
        "Time requests waited in line under the app's max_concurrency (those that waited).",
        waits,
    )


def _queue_families(
    snapshots: list[StatsSnapshot], depths: dict[str, tuple[int, int]]
) -> Iterator[Metric]:
    events = CounterMetricFamily(
        "edge_queue_events",
        "Durable queue events: accepted, dedupe_hit, refused_*, replica_ack_timeout (queued "
        "but not confirmed by [store] min_replicas_acked replicas in time: 503), too_large, "
        "delivered, "
        "retried, dead_lettered, already_done, dead_letter_trimmed (dropped over "
        "max_dead_letters), lease_lost (a replayer fenced off by a newer lease holder, "
        "or by its own lease term running out), renewer_stuck (a replay's lease renewer "
        "still running a second after its cancellation).",
        labels=["app", "event"],
    )
    for key, n in sorted(_sum_by(snapshots, "queue").items()):
        events.add_metric(key.split("\x00"), n)
    yield events
    queued = GaugeMetricFamily(
        "edge_queue_depth", "Requests queued and not yet delivered, region-wide.", labels=["app"]
    )
    dead = GaugeMetricFamily(
        "edge_queue_dead_letters", "Dead-lettered requests, region-wide.", labels=["app"]
    )
    for app, (depth, dead_letters) in sorted(depths.items()):
        queued.add_metric([app], depth)
        dead.add_metric([app], dead_letters)
    yield queued
    yield dead


def _sum_by(snapshots: list[StatsSnapshot], field: str) -> dict[str, int]:
    totals: dict[str, int] = {}
    for snap in snapshots:
        for key, n in getattr(snap, field).items():
            totals[key] = totals.get(key, 0) + n
    return totals


def _wake_families(snapshots: list[StatsSnapshot], budget_in_use: int | None) -> Iterator[Metric]:
    rejections = CounterMetricFamily(
        "edge_rejections",
        "Requests the edge answered 503 for an app: not hot, or over its max_concurrency.",
        labels=["app", "reason"],
    )
    for key, n in sorted(_sum_by(snapshots, "rejections").items()):
        rejections.add_metric(key.split("\x00"), n)
    yield rejections

    transitions = CounterMetricFamily(
        "edge_wake_transitions", "Wake machine transitions written here.", labels=["from", "to"]
    )
    events = CounterMetricFamily(
        "edge_wake_events",
        "Wake controller events (coalesced waits, budget waits, ...).",
        labels=["event"],
    )
    starts = CounterMetricFamily(
        "edge_wake_starts",
        "Wakes started here, by the request that started them: admitted (held or queued)"
        " or refused (answered 503 at once).",
        labels=["by"],
    )
    gallery = CounterMetricFamily(
        "edge_wake_gallery",
        "Wake gates refused and failure modes seen, by gallery id (wake/machine.py).",
        labels=["id"],
    )
    for key, n in sorted(_sum_by(snapshots, "wake_events").items()):
        kind, _, detail = key.partition(":")
        if kind == "transition":
            transitions.add_metric(detail.split("->"), n)
        elif kind == "gallery":
            gallery.add_metric([detail], n)
        elif kind == "wake_start":
            starts.add_metric([detail], n)
        else:
            events.add_metric([key], n)
    yield transitions
    yield events
    yield gallery
    yield starts

    phases = HistogramMetricFamily(
        "edge_wake_phase_seconds",
        "Time spent per wake phase: budget wait, allocation start, readiness.",
        labels=["phase"],
    )
    merged: dict[str, list[float]] = {}
    for snap in snapshots:
        for phase, values in snap.wake_phases.items():
            totals = merged.setdefault(phase, [0.0] * len(values))
            for i, value in enumerate(values):
                totals[i] += value
    bounds = (*PHASE_BUCKETS, float("inf"))
    for phase, values in sorted(merged.items()):
        seconds, counts = values[0], values[2:]
        if len(counts) != len(bounds):
            continue  # a snapshot from an older worker: no buckets
        buckets = []
        running = 0.0
        for bound, n in zip(bounds, counts, strict=True):
            running += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        phases.add_metric([phase], buckets, seconds)
    yield phases

    yield GaugeMetricFamily(
        "edge_held_requests",
        "Requests held while their app wakes.",
        sum(s.held for s in snapshots),
    )
    if budget_in_use is not None:
        yield GaugeMetricFamily(
            "edge_wake_budget_in_use", "Region-wide wake slots in use.", budget_in_use
        )
    yield from _route_families(snapshots)


def _route_families(snapshots: list[StatsSnapshot]) -> Iterator[Metric]:
    following = [s for s in snapshots if s.route]
    if not following:
        return
    epoch = GaugeMetricFamily(
        "edge_route_epoch", "Route epoch applied, per worker.", labels=["worker"]
    )
    age = GaugeMetricFamily(
        "edge_route_table_age_seconds",
        "Seconds since the control plane last answered, per worker.",
        labels=["worker"],
    )
    stale = GaugeMetricFamily(
        "edge_route_stale",
        "1 while serving a table the control plane cannot refresh.",
        labels=["worker"],
    )
    for snap in following:
        worker = str(snap.index)
        epoch.add_metric([worker], snap.route.get("epoch", -1))
        age.add_metric([worker], snap.route.get("table_age_s", -1))
        stale.add_metric([worker], snap.route.get("stale", 0))
    yield epoch
    yield age
    yield stale
    yield CounterMetricFamily(
        "edge_route_refused_updates",
        "Route changes refused as not newer (old route epoch).",
        sum(s.route.get("refused", 0) for s in following),
    )
    yield CounterMetricFamily(
        "edge_route_resyncs",
        "Snapshot resyncs after a gap or a 410 (edge replay gap).",
        sum(s.route.get("resyncs", 0) for s in following),
    )
    acks = SummaryMetricFamily("edge_route_ack_seconds", "Latency of epoch acks.")
    acks.add_metric(
        [],
        count_value=sum(s.route.get("acks", 0) for s in following),
        sum_value=sum(s.route.get("ack_seconds", 0.0) for s in following),
    )
    yield acks


def render_metrics(
    snapshots: Callable[[], list[StatsSnapshot]],
    budget_in_use: int | None = None,
    queue_depths: dict[str, tuple[int, int]] | None = None,
) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshots, budget_in_use, queue_depths))
    return generate_latest(registry)
