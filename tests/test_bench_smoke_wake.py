"""Smoke runs of the wake benchmarks (stampede, webhooks) at --quick size against a real
stack (redis, control plane, edge, bench/apps/sample_app.py): each writes its JSON, every
documented key holds a plausible value, and what each promises holds (one wake, no
error; no webhook lost or delivered twice)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench_smoke import (
    Check,
    check_report,
    count,
    dict_of,
    eq,
    in_range,
    is_true,
    list_of,
    machine,
    nonneg,
    num,
    opt,
    pos,
    run_bench,
    text,
)

STAMPEDE_TARGETS = {
    "wakes",
    "errors",
    "ready_to_hot_ms",
    "release_vs_hot",
    "small_ready_to_first_byte_p50_ms",
}
STAMPEDE_ROW_KEYS = {
    "app",
    "requests",
    "max_concurrency",
    "connect_ms",
    "wall_ms",
    "p50_ms",
    "p99_ms",
    "release_ms",
    "release_vs_hot",
    "ready_to_hot_ms",
    "ready_to_first_byte_p50_ms",
    "ready_to_first_byte_p99_ms",
    "wakes",
    "errors",
    "errors_by_kind",
    "held",
    "memory_growth_mib",
}


def stampede_row(app: str, requests: int, limit: int | None, *, cold: bool, ratio: bool) -> Check:
    """One row of the table: every answer 200, one wake for a cold row (none for the hot
    one), each request held by it (none when hot), times in order; never a speed target."""

    def check(row: Any) -> bool:
        if not isinstance(row, dict) or set(row) != STAMPEDE_ROW_KEYS:
            return False
        timed = pos if cold else opt(pos)
        return (
            row["app"] == app
            and row["requests"] == requests
            and row["max_concurrency"] == limit
            # Every row opens its connections first, then sends (the barrier).
            and pos(row["connect_ms"])
            and pos(row["wall_ms"])
            and pos(row["p50_ms"])
            and row["p50_ms"] <= row["p99_ms"] <= row["wall_ms"]
            and row["wakes"] == (1 if cold else 0)
            and row["errors"] == 0
            and row["errors_by_kind"] == {}
            and row["held"] == (requests if cold else 0)
            and nonneg(row["memory_growth_mib"])
            # The app is ready before the edge routes to it, and before any first byte.
            and (nonneg(row["ready_to_hot_ms"]) if cold else row["ready_to_hot_ms"] is None)
            and timed(row["release_ms"])
            and timed(row["ready_to_first_byte_p50_ms"])
            and timed(row["ready_to_first_byte_p99_ms"])
            and (
                not cold
                or row["ready_to_first_byte_p50_ms"]
                <= row["ready_to_first_byte_p99_ms"]
                <= row["release_ms"]
                < row["wall_ms"]
            )
            and (pos(row["release_vs_hot"]) if ratio else row["release_vs_hot"] is None)
        )

    return check


def stampede_targets_met(value: Any) -> bool:
    """A verdict per target (release_vs_hot null: not judged below N = 5000), and all;
    wakes and errors are behaviour, not speed: they must hold."""
    return (
        isinstance(value, dict)
        and set(value) == {*STAMPEDE_TARGETS, "all"}
        and value["release_vs_hot"] is None
        and all(isinstance(v, bool) for k, v in value.items() if k != "release_vs_hot")
        and value["wakes"] is True
        and value["errors"] is True
    )


# --quick: --requests; the defaults of --small and --max-concurrency
STAMPEDE_REQUESTS, STAMPEDE_SMALL, STAMPEDE_LIMIT = 50, 20, 32


def check_stampede(report: dict, store: str) -> None:
    """Every documented key of stampede.py's report plausible (one wake and no error in
    every row, never a speed target), and the top-level figures the rows' own."""
    requests, small, limit = STAMPEDE_REQUESTS, STAMPEDE_SMALL, STAMPEDE_LIMIT

    def allocations(value: list) -> bool:
        return list_of(lambda a: text(a.get("id")) and a.get("state") == "ready", 1)(value)

    check_report(
        "stampede.py",
        report,
        {
            "requests": eq(requests),
            "store": eq(store),
            "workers": eq(2),
            "start_delay_s": eq(0.3),
            "max_held": eq(1000),
            "idle_timeout_s": eq(3.0),
            "max_concurrency": eq(limit),
            "hot_wall_ms": pos,
            "hot_p50_ms": pos,
            "hot_p99_ms": pos,
            "hot_connect_ms": pos,
            "hot_with_connect_wall_ms": pos,
            "hot_with_connect_p50_ms": pos,
            "hot_with_connect_p99_ms": pos,
            "hot_with_connect_errors": eq(0),
            "release_ms": pos,
            "release_vs_hot": pos,
            "ready_to_hot_ms": nonneg,
            "ready_to_first_byte_p50_ms": pos,
            "ready_to_first_byte_p99_ms": pos,
            "wakes": eq(1),
            "errors": eq(0),
            "memory_growth_mib": nonneg,
            "cold": stampede_row("stampede", requests, None, cold=True, ratio=True),
            "hot": stampede_row("stampede", requests, None, cold=False, ratio=False),
            "small": stampede_row("stampede", small, None, cold=True, ratio=False),
            "limited": stampede_row("limited", requests, limit, cold=True, ratio=True),
            "ok": eq(requests),
            "errors_by_kind": eq({}),
            "statuses": eq({"200": requests}),
            "allocation_ids": list_of(text, 1),
            "missing_ready_at": eq(0),
            "held": eq(requests),
            "wake_wait_p50_ms": pos,
            "wake_wait_max_ms": pos,
            "ready_after_fire_ms": pos,
            "peak_concurrent_starts": in_range(0, 1),
            "memory_growth_max_worker_mib": nonneg,
            "memory_growth_by_worker_mib": dict_of(nonneg),
            "rss_before_mib": pos,
            "rss_peak_mib": pos,
            "rss_samples": pos,
            "allocations": allocations,
            "tcp_counters_delta": dict_of(count),
            "listen_overflows_before_app_ready": opt(count),
            "listen_overflows_after_app_ready": opt(count),
            "cp_polls": pos,
            "cp_poll_errors": count,
            "edge_app_state": lambda v: isinstance(v, dict) and v.get("name") == "stampede",
            "app_ready_at": pos,
            "cp_ready_after_app_ready_ms": opt(num),
            "first_byte_after_edge_hot_ms": pos,
            "nofile_limit": in_range(requests + 100, float("inf")),
            "targets": dict_of(num, STAMPEDE_TARGETS),
            "targets_met": stampede_targets_met,
            "edge_log": eq([]),
            "controlplane_log": eq([]),
            "machine": machine,
            "quick": is_true,
            "total_s": pos,
        },
    )
    r = report
    # The top-level figures are the cold row's and the hot row's.
    for key in ("release_ms", "release_vs_hot", "ready_to_hot_ms", "wakes", "errors"):
        assert r[key] == r["cold"][key], key
    assert (r["hot_wall_ms"], r["hot_p50_ms"]) == (r["hot"]["wall_ms"], r["hot"]["p50_ms"])
    assert r["hot_connect_ms"] == r["hot"]["connect_ms"]
    assert r["hot_with_connect_p50_ms"] <= r["hot_with_connect_p99_ms"]
    assert r["hot_with_connect_p99_ms"] <= r["hot_with_connect_wall_ms"]
    assert r["release_vs_hot"] == round(r["release_ms"] / r["hot_wall_ms"], 3)
    assert r["wake_wait_p50_ms"] <= r["wake_wait_max_ms"]
    assert r["rss_before_mib"] <= r["rss_peak_mib"]
    assert len(r["memory_growth_by_worker_mib"]) == r["workers"]
    assert r["allocation_ids"] == [r["allocations"][0]["id"]]


def test_stampede_quick(tmp_path: Path) -> None:
    check_stampede(run_bench("stampede.py", tmp_path / "stampede.json"), "redis")


def test_stampede_quick_cluster(tmp_path: Path) -> None:
    """The same on a local Redis Cluster (3 masters, a replica each; redis+cluster://)."""
    report = run_bench("stampede.py", tmp_path / "stampede.json", "--store", "cluster")
    check_stampede(report, "cluster")


WEBHOOKS, RESENT = 40, 4  # --quick, --resend 0.1


def webhooks_checks(store: str, acks: int, strict: bool) -> dict:
    """A checker per documented key of webhooks.py's report. `strict`: every send answered
    202; else (replica acks on a loaded machine) a few may be refused 503 for a missing
    ack: each 202 still delivered, once."""

    def queues_after(value: dict) -> bool:
        queues = value.get("queues") if isinstance(value, dict) else None
        return list_of(lambda q: q.get("queued") == 0 and q.get("dead_letters") == 0, 1)(queues)

    def statuses(value: dict) -> bool:
        return isinstance(value, dict) and set(value) <= {"202", "503"} and "202" in value

    def reasons(value: dict) -> bool:
        return dict_of(pos, None)(value) and set(value) <= {"queue_unavailable (replica ack)"}

    return {
        "sent": eq(WEBHOOKS + RESENT),
        "accepted": eq(WEBHOOKS) if strict else in_range(1, WEBHOOKS),
        "refused": eq(0) if strict else in_range(0, WEBHOOKS - 1),
        "statuses": eq({"202": WEBHOOKS}) if strict else statuses,
        "resent": eq(RESENT),
        "resent_same_id": eq(RESENT) if strict else in_range(0, RESENT),
        "resent_statuses": eq({"202": RESENT}) if strict else statuses,
        "errors": eq(0),
        "status_503": eq(0) if strict else in_range(0, WEBHOOKS + RESENT - 1),
        "reasons_503": eq({}) if strict else reasons,
        "latency_202_p50_ms": pos,
        "latency_202_p99_ms": pos,
        "latency_202_max_ms": pos,
        "delivered_once": eq(WEBHOOKS) if strict else in_range(1, WEBHOOKS),
        "duplicates": eq(0),
        "lost": eq(0),
        "delivery_attempts": in_range(WEBHOOKS if strict else 1, float("inf")),
        "queue_seconds": nonneg,
        "queue_rps": opt(pos),
        "replay_seconds": nonneg,
        "replay_rps": opt(pos),
        "delivered_before_queueing_ended": in_range(0, WEBHOOKS),
        "queues_after": queues_after,
        "edge_queue_metrics": list_of(lambda line: line.startswith("edge_queue")),
        "store": eq(store),
        "min_replicas_acked": eq(acks),
        "config": lambda v: v["webhooks"] == WEBHOOKS and v["app"] == "stampede",
        "machine": machine,
        "quick": is_true,
    }


def check_webhooks(report: dict) -> None:
    """What holds of any run: the 202 latencies in order, every 202 delivered once, and
    the edge's delivered count is the app's."""
    r = report
    assert r["latency_202_p50_ms"] <= r["latency_202_p99_ms"] <= r["latency_202_max_ms"]
    assert r["lost"] == 0 and r["duplicates"] == 0
    assert r["accepted"] <= r["delivered_once"]
    assert r["status_503"] == sum(r["reasons_503"].values())
    delivered = 'edge_queue_events_total{app="stampede",event="delivered"}'
    assert f"{delivered} {r['delivered_once']:.1f}" in r["edge_queue_metrics"]


def test_webhooks_quick(tmp_path: Path) -> None:
    report = run_bench("webhooks.py", tmp_path / "webhooks.json")
    check_report("webhooks.py", report, webhooks_checks("redis", 0, strict=True))
    check_webhooks(report)


def test_webhooks_quick_cluster_with_replica_acks(tmp_path: Path) -> None:
    """On a local Redis Cluster (3 masters, a replica each), each 202 after WAIT 1."""
    args = ("--store", "cluster", "--min-replicas-acked", "1")
    report = run_bench("webhooks.py", tmp_path / "webhooks.json", *args)
    check_report("webhooks.py", report, webhooks_checks("cluster", 1, strict=False))
    check_webhooks(report)
    assert "3 masters x 1 replica" in report["config"]["redis"]
