"""Smoke run of bench/stampede_report.py at --quick size (`make stampede`'s fleet run, small):
locust (bench/locustfile.py, FleetWake) against a real stack whose apps are
bench/apps/tiny_app.py. The report folder is complete, summary.json is the --json file,
every documented key holds a plausible value, and nothing is lost."""

from __future__ import annotations

import json
from pathlib import Path

from bench_smoke import (
    check_report,
    count,
    dict_of,
    eq,
    in_range,
    is_true,
    nonneg,
    pos,
    run_bench,
)

APPS, USERS, BUDGET = 4, 20, 20  # --quick; configs/stampede.toml's budget


def percentiles(value: dict) -> bool:
    return set(value) == {"p50", "p99"} and pos(value["p50"]) and value["p50"] <= value["p99"]


def wake_wait(value: dict) -> bool:
    return set(value) == {"count", "p50", "p99"} and count(value["count"]) and value["count"] >= 1


def phases(value: dict) -> bool:
    return set(value) <= {"budget", "allocation", "readiness"} and all(
        set(p) == {"count", "p50", "p99", "mean"} and in_range(1, APPS)(p["count"])
        for p in value.values()
    )


def wait_reasons(value: dict) -> bool:
    """Every app's wake explained: its dominant phase, and the counts adding up."""
    names = ("budget", "allocation", "readiness")
    per_wake = value["per_wake"]
    return (
        set(value) == {"wakes", "by_dominant", "phase_ms", "per_wake"}
        and in_range(1, APPS)(value["wakes"])
        and len(per_wake) == value["wakes"]
        and all(w["dominant"] in names for w in per_wake)
        and set(value["by_dominant"]) == set(names)
        and sum(value["by_dominant"].values()) == value["wakes"]
        and all(nonneg(value["phase_ms"][p]["p50"]) for p in names)
    )


def test_stampede_report_quick_fleet(tmp_path: Path) -> None:
    summary = run_bench("stampede_report.py", tmp_path / "fleet.json", "--scenario", "fleet")
    out = tmp_path / "fleet-report"
    for name in ("summary.json", "chart.png", "locust.html", "timeline.json", "outcomes.json"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "summary.json").read_text()) == summary
    check_report(
        "stampede_report.py",
        summary,
        {
            "scenario": eq("fleet"),
            "users": eq(USERS),
            "run_time_s": eq(3),
            "apps": eq(APPS),
            "budget": eq({"max_concurrent_wakes": BUDGET, "reloaded_to": None}),
            "requests": pos,
            "sent": pos,
            "interrupted": eq({}),
            "locust_requests": pos,
            "unanswered": eq(0),
            "unaccounted": eq(0),
            "by_status": dict_of(pos),
            "refused_503_by_reason": dict_of(pos),
            "lost": eq(0),
            "lost_by_kind": eq({}),
            "wakes_total": in_range(1, APPS),
            "apps_woken": in_range(1, APPS),
            "wakes_per_app_max": eq(1),
            "wakes_per_app": dict_of(eq(1)),
            "peak_held": nonneg,
            "edge_upstream_errors": eq({}),
            "peak_wakes_in_flight": in_range(0, BUDGET),
            "peak_concurrent_starts": in_range(1, APPS),
            "peak_concurrent_starts_before_reload": eq(None),
            "peak_concurrent_starts_after_reload": eq(None),
            "allocation_start_s": percentiles,
            "wake_wait_ms": wake_wait,
            "wake_phase_s": phases,
            "wake_wait_reasons": wait_reasons,
            "locust_exit": eq(0),
            "budget_exceeded": eq([]),
            "quick": is_true,
        },
    )
    assert summary["sent"] == summary["requests"] == summary["locust_requests"]
    assert sum(summary["by_status"].values()) == summary["requests"]
    assert summary["apps_woken"] == summary["wakes_total"] == len(summary["wakes_per_app"])
    assert pos(summary["wake_wait_ms"]["p50"])
