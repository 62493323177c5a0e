"""Smoke runs of the wake benchmarks (stampede, webhooks) at --quick size against a real
stack (redis, control plane, edge, bench/apps/sample_app.py): each writes its JSON, every
documented key holds a plausible value, and what each promises holds (one wake, no
error; no webhook lost or delivered twice)."""

from __future__ import annotations

from pathlib import Path

from bench_smoke import (
    check_report,
    count,
    dict_of,
    eq,
    flags,
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

STAMPEDE_TARGETS = {"wakes", "errors", "memory_growth_mib", "overhead_p50_ms", "overhead_p99_ms"}


def test_stampede_quick(tmp_path: Path) -> None:
    report = run_bench("stampede.py", tmp_path / "stampede.json")
    requests = 50  # --quick

    def allocations(value: list) -> bool:
        return list_of(lambda a: text(a.get("id")) and a.get("state") == "ready", 1)(value)

    check_report(
        "stampede.py",
        report,
        {
            "requests": eq(requests),
            "store": eq("redis"),
            "workers": eq(2),
            "client": eq("aiohttp"),
            "start_delay_s": eq(0.3),
            "max_held": eq(1000),
            "wakes": eq(1),
            "errors": eq(0),
            "ok": eq(requests),
            "errors_by_kind": eq({}),
            "statuses": eq({"200": requests}),
            "allocation_ids": list_of(text, 1),
            "missing_ready_at": eq(0),
            # The first byte comes after the app began answering (one machine, one clock).
            "overhead_min_ms": nonneg,
            "overhead_p50_ms": nonneg,
            "overhead_p90_ms": nonneg,
            "overhead_p99_ms": nonneg,
            "overhead_max_ms": nonneg,
            "held": in_range(1, requests),
            "wake_wait_p50_ms": pos,
            "wake_wait_max_ms": pos,
            "ready_after_fire_ms": pos,
            "first_byte_spread_ms": nonneg,
            "peak_concurrent_starts": in_range(0, 1),
            "memory_growth_mib": nonneg,
            "memory_growth_max_worker_mib": nonneg,
            "memory_growth_by_worker_mib": dict_of(nonneg),
            "rss_before_mib": pos,
            "rss_peak_mib": pos,
            "rss_samples": pos,
            "wall_s": pos,
            "allocations": allocations,
            "tcp_counters_delta": dict_of(count),
            "listen_overflows_before_app_ready": opt(count),
            "listen_overflows_after_app_ready": opt(count),
            "cp_polls": pos,
            "cp_poll_errors": count,
            "edge_app_state": lambda v: isinstance(v, dict) and v.get("name") == "stampede",
            "app_ready_at": pos,
            "cp_ready_after_app_ready_ms": opt(num),
            "edge_hot_after_app_ready_ms": opt(num),
            "first_byte_after_edge_hot_ms": opt(num),
            "nofile_limit": in_range(requests + 100, float("inf")),
            "targets": dict_of(num, STAMPEDE_TARGETS),
            "targets_met": flags("wakes", "errors"),
            "edge_log": eq([]),
            "controlplane_log": eq([]),
            "machine": machine,
            "quick": is_true,
            "total_s": pos,
        },
    )
    r = report
    order = ("overhead_min_ms", "overhead_p50_ms", "overhead_p90_ms", "overhead_p99_ms")
    order = (*order, "overhead_max_ms")
    assert [r[k] for k in order] == sorted(r[k] for k in order)
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
