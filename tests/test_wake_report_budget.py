"""The stampede report's budget check: a peak of concurrent starts over the wake budget
makes the report fail (bench/stampede_report.py exits non-zero); and why each wake waited."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import stampede_report


def summary(peak: int, budget: int, **extra: Any) -> dict[str, Any]:
    return {
        "budget": {"max_concurrent_wakes": budget, "reloaded_to": None},
        "peak_concurrent_starts": peak,
        **extra,
    }


@pytest.mark.parametrize(("peak", "exceeded"), [(0, False), (19, False), (20, False), (27, True)])
def test_peak_over_the_budget_is_reported(peak: int, exceeded: bool) -> None:
    problems = stampede_report.over_budget(summary(peak, 20))
    assert bool(problems) is exceeded
    if exceeded:
        assert problems == ["run: 27 concurrent starts, budget 20"]


def test_with_a_reload_each_peak_is_held_to_the_budget_of_its_time() -> None:
    reloaded = summary(
        20,
        20,
        peak_concurrent_starts_before_reload=20,
        peak_concurrent_starts_after_reload=7,
    )
    reloaded["budget"]["reloaded_to"] = 5
    assert stampede_report.over_budget(reloaded) == ["after reload: 7 concurrent starts, budget 5"]
    reloaded["peak_concurrent_starts_after_reload"] = 5
    assert stampede_report.over_budget(reloaded) == []


def test_the_exit_status_fails_when_the_budget_was_exceeded(monkeypatch, tmp_path) -> None:
    base = {
        "lost": 0,
        "unaccounted": 0,
        "unanswered": 0,
        "requests": 1,
        "by_status": {},
        "refused_503_by_reason": {},
        "wakes_total": 1,
        "wakes_per_app_max": 1,
        "peak_held": 0,
        **summary(27, 20),
    }

    def fake_run(args: Any, out: Any, tmp: Any, procs: Any) -> dict[str, Any]:
        return {**base, "budget_exceeded": stampede_report.over_budget(base)}

    monkeypatch.setattr(stampede_report, "run", fake_run)
    monkeypatch.setattr(stampede_report, "install_signal_handlers", lambda: None)
    argv = ["--scenario", "fleet", "--out", str(tmp_path / "out")]
    assert stampede_report.main(argv) == 1
    base["peak_concurrent_starts"] = 20
    assert stampede_report.main(argv) == 0


def test_each_wake_is_reported_with_the_phase_it_waited_longest_in() -> None:
    def phases(budget: float, allocation: float, readiness: float) -> dict[str, float]:
        total = budget + allocation + readiness
        return {
            "at": 1.0,
            "budget_ms": budget,
            "allocation_ms": allocation,
            "readiness_ms": readiness,
            "total_ms": total,
        }

    reasons = stampede_report.wake_wait_reasons(
        {
            "fleet-2": phases(21_000, 40, 800),
            "fleet-1": phases(59_000, 35, 700),
            "fleet-3": phases(5, 30, 900),
            "fleet-4": phases(0, 0, 0),  # a tie goes to the earlier phase
            "never-woken": None,
        }
    )
    assert reasons["wakes"] == 4
    assert reasons["by_dominant"] == {"budget": 3, "allocation": 0, "readiness": 1}
    assert [(w["app"], w["dominant"]) for w in reasons["per_wake"]] == [
        ("fleet-1", "budget"),
        ("fleet-2", "budget"),
        ("fleet-3", "readiness"),
        ("fleet-4", "budget"),
    ]
    assert reasons["per_wake"][0] == {
        "app": "fleet-1",
        "dominant": "budget",
        "budget_ms": 59_000.0,
        "allocation_ms": 35.0,
        "readiness_ms": 700.0,
    }
    # Nearest rank over the 4 wakes: p50 the 2nd smallest, p99 the largest.
    assert reasons["phase_ms"]["budget"] == {"p50": 5.0, "p99": 59_000.0}
    assert reasons["phase_ms"]["readiness"] == {"p50": 700.0, "p99": 900.0}


def test_no_wake_seen_reports_empty_counts() -> None:
    reasons = stampede_report.wake_wait_reasons({})
    assert reasons["wakes"] == 0 and reasons["per_wake"] == []
    assert reasons["by_dominant"] == {"budget": 0, "allocation": 0, "readiness": 0}
    assert reasons["phase_ms"]["allocation"] == {"p50": None, "p99": None}
