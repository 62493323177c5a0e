"""Per-worker request statistics: plain counters on the hot path, snapshots off it.

Each worker bumps dict counters per request (no locks, no prometheus calls) and
periodically writes a `StatsSnapshot` file; the admin listener sums every
worker's latest snapshot when scraped, so `/metrics` covers all workers.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from pathlib import Path

import msgspec

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class LatencyHistogram(msgspec.Struct):
    counts: list[int]  # one per bucket plus +Inf
    total: float = 0.0

    @classmethod
    def empty(cls) -> LatencyHistogram:
        return cls(counts=[0] * (len(LATENCY_BUCKETS) + 1))


class StatsSnapshot(msgspec.Struct):
    pid: int
    index: int
    written_at: float
    open_connections: int
    requests: dict[str, int]  # "app\x00status" -> count
    upstream_errors: dict[str, int]  # "app\x00kind" -> count
    latency: dict[str, LatencyHistogram]  # app -> histogram
    rejections: dict[str, int] = {}  # "app\x00reason" -> count
    held: int = 0
    held_by_app: dict[str, int] = {}  # app -> requests held now
    wake_events: dict[str, int] = {}  # "transition:a->b", "gallery:<id>", "budget_wait:..."
    # phase -> [seconds, count, bucket counts...] (wake.controller.PHASE_BUCKETS, +Inf)
    wake_phases: dict[str, list[float]] = {}
    # Route follower: epoch, table_age_s, refused, resyncs, acks, ack_seconds.
    route: dict[str, float] = {}
    # Durable queue: "app\x00event" -> count (accepted, dedupe_hit, delivered, ...).
    queue: dict[str, int] = {}
    # Apps with max_concurrency: app -> [requests in flight through the limit, waiting now].
    limited: dict[str, list[int]] = {}
    # app -> time requests waited in line under max_concurrency (those that had to wait).
    concurrency_wait: dict[str, LatencyHistogram] = {}


class WorkerStats:
    """Mutable counters owned by one worker's event loop."""

    __slots__ = (
        "held",
        "held_by_app",
        "index",
        "latency",
        "limited",
        "open_connections",
        "queue",
        "rejections",
        "requests",
        "route",
        "upstream_errors",
        "waits",
        "wake_events",
        "wake_phases",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.open_connections = 0
        self.requests: dict[tuple[str, int], int] = {}
        self.upstream_errors: dict[tuple[str, str], int] = {}
        self.latency: dict[str, LatencyHistogram] = {}
        self.rejections: dict[tuple[str, str], int] = {}
        self.held = 0
        self.held_by_app: dict[str, int] = {}
        # The wake controller's own counters, shared by reference ("gallery:<id>" included:
        # the front reports its admissions through the controller).
        self.wake_events: dict[str, int] = {}
        self.wake_phases: dict[str, list[float]] = {}
        self.route: dict[str, float] = {}
        self.queue: dict[tuple[str, str], int] = {}
        self.limited: dict[str, list[int]] = {}
        self.waits: dict[str, LatencyHistogram] = {}  # see concurrency_wait

    def record(self, app: str, status: int, seconds: float) -> None:
        key = (app, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.latency.get(app)
        if hist is None:
            hist = self.latency[app] = LatencyHistogram.empty()
        hist.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        hist.total += seconds

    def concurrency_wait(self, app: str, seconds: float) -> None:
        """A request's wait in line under its app's concurrency limit ended (either way)."""
        hist = self.waits.get(app)
        if hist is None:
            hist = self.waits[app] = LatencyHistogram.empty()
        hist.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        hist.total += seconds

    def upstream_error(self, app: str, kind: str) -> None:
        key = (app, kind)
        self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1

    def rejection(self, app: str, reason: str) -> None:
        key = (app, reason)
        self.rejections[key] = self.rejections.get(key, 0) + 1

    def wake_start(self, by: str) -> None:
        """A wake this worker started, by what kind of request (refused ones count too)."""
        key = "wake_start:" + by
        self.wake_events[key] = self.wake_events.get(key, 0) + 1

    def queue_event(self, app: str, event: str) -> None:
        key = (app, event)
        self.queue[key] = self.queue.get(key, 0) + 1

    def snapshot(self) -> StatsSnapshot:
        return StatsSnapshot(
            pid=os.getpid(),
            index=self.index,
            written_at=time.time(),
            open_connections=self.open_connections,
            requests={f"{a}\x00{s}": n for (a, s), n in self.requests.items()},
            upstream_errors={f"{a}\x00{k}": n for (a, k), n in self.upstream_errors.items()},
            latency=dict(self.latency),
            rejections={f"{a}\x00{r}": n for (a, r), n in self.rejections.items()},
            held=self.held,
            held_by_app=dict(self.held_by_app),
            wake_events=dict(self.wake_events),
            wake_phases={k: list(v) for k, v in self.wake_phases.items()},
            route=dict(self.route),
            queue={f"{a}\x00{e}": n for (a, e), n in self.queue.items()},
            limited={app: list(counts) for app, counts in self.limited.items()},
            concurrency_wait=dict(self.waits),
        )


def write_snapshot(directory: Path, snapshot: StatsSnapshot) -> None:
    """Atomically replace this worker's snapshot file."""
    final = directory / f"worker-{snapshot.index}.json"
    temp = directory / f".worker-{snapshot.index}.{snapshot.pid}.tmp"
    temp.write_bytes(msgspec.json.encode(snapshot))
    os.replace(temp, final)


def read_snapshots(directory: Path) -> list[StatsSnapshot]:
    """Every worker's latest snapshot; unreadable files are skipped."""
    decoder = msgspec.json.Decoder(StatsSnapshot)
    snapshots = []
    for path in sorted(directory.glob("worker-*.json")):
        try:
            snapshots.append(decoder.decode(path.read_bytes()))
        except (OSError, msgspec.DecodeError):
            continue
    return snapshots
