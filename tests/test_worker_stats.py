"""Per-worker counters and their Prometheus rendering, without processes."""

from __future__ import annotations

from pathlib import Path

from helpers import metric_sum

from edge.ops.metrics import render_metrics
from edge.ops.worker_stats import WorkerStats, read_snapshots, write_snapshot


def test_snapshots_of_all_workers_are_summed(tmp_path: Path) -> None:
    first, second = WorkerStats(0), WorkerStats(1)
    for _ in range(3):
        first.record("shop", 200, 0.002)
    second.record("shop", 200, 0.2)
    second.record("shop", 502, 0.001)
    second.upstream_error("shop", "connect_failed")
    first.open_connections, second.open_connections = 2, 5
    write_snapshot(tmp_path, first.snapshot())
    write_snapshot(tmp_path, second.snapshot())

    snapshots = read_snapshots(tmp_path)
    assert sorted(s.index for s in snapshots) == [0, 1]
    text = render_metrics(lambda: snapshots).decode()
    assert metric_sum(text, "edge_requests_total", app="shop", status="200") == 4
    assert metric_sum(text, "edge_requests_total", app="shop", status="502") == 1
    assert metric_sum(text, "edge_upstream_errors_total", kind="connect_failed") == 1
    assert metric_sum(text, "edge_open_connections") == 7
    assert metric_sum(text, "edge_request_duration_seconds_count", app="shop") == 5
    # Cumulative buckets: 4 requests at or under 2.5 ms, all 5 at or under 250 ms.
    assert metric_sum(text, "edge_request_duration_seconds_bucket", app="shop", le="0.0025") == 4
    assert metric_sum(text, "edge_request_duration_seconds_bucket", app="shop", le="0.25") == 5


def test_unreadable_snapshot_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "worker-7.json").write_bytes(b"{not json")
    write_snapshot(tmp_path, WorkerStats(0).snapshot())
    assert [s.index for s in read_snapshots(tmp_path)] == [0]


def test_held_requests_per_app_travel_in_the_snapshot(tmp_path: Path) -> None:
    stats = WorkerStats(3)
    stats.held, stats.held_by_app = 3, {"shop": 2, "blog": 1}
    write_snapshot(tmp_path, stats.snapshot())
    stats.held_by_app["shop"] = 0  # the snapshot is a copy, not the live dict
    [snapshot] = read_snapshots(tmp_path)
    assert (snapshot.held, snapshot.held_by_app) == (3, {"shop": 2, "blog": 1})
