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
