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


def test_stampede_quick(tmp_path: Path) -> None:
    report = run_bench("stampede.py", tmp_path / "stampede.json")
    requests, small, limit = 50, 20, 32  # --quick, --small, --max-concurrency

    def allocations(value: list) -> bool:
        return list_of(lambda a: text(a.get("id")) and a.get("state") == "ready", 1)(value)

    check_report(
        "stampede.py",
        report,
        {
            "requests": eq(requests),
            "store": eq("redis"),
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


def test_webhooks_quick(tmp_path: Path) -> None:
    report = run_bench("webhooks.py", tmp_path / "webhooks.json")
    webhooks, resent = 40, 4  # --quick, --resend 0.1

    def queues_after(value: dict) -> bool:
        queues = value.get("queues") if isinstance(value, dict) else None
        return list_of(lambda q: q.get("queued") == 0 and q.get("dead_letters") == 0, 1)(queues)

    check_report(
        "webhooks.py",
        report,
        {
            "sent": eq(webhooks + resent),
            "accepted": eq(webhooks),
            "refused": eq(0),
            "statuses": eq({"202": webhooks}),
            "resent": eq(resent),
            "resent_same_id": eq(resent),
            "resent_statuses": eq({"202": resent}),
            "delivered_once": eq(webhooks),
            "duplicates": eq(0),
            "lost": eq(0),
            "delivery_attempts": in_range(webhooks, float("inf")),
            "queue_seconds": nonneg,
            "queue_rps": opt(pos),
            "replay_seconds": nonneg,
            "replay_rps": opt(pos),
            "delivered_before_queueing_ended": in_range(0, webhooks),
            "queues_after": queues_after,
            "edge_queue_metrics": list_of(lambda line: line.startswith("edge_queue")),
            "config": lambda v: v["webhooks"] == webhooks and v["app"] == "stampede",
            "machine": machine,
            "quick": is_true,
        },
    )
    delivered = f'edge_queue_events_total{{app="stampede",event="delivered"}} {webhooks:.1f}'
    assert delivered in report["edge_queue_metrics"]
