"""Locust scenarios and the stampede report, each run headless for a few seconds against a
real stack (redis, control plane, edge, apps), bounded in users and time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

REPORT = ROOT / "bench" / "stampede_report.py"
SUMMARY_KEYS = {
    "requests",
    "sent",
    "unanswered",
    "by_status",
    "refused_503_by_reason",
    "lost",
    "unaccounted",
    "wakes_total",
    "wakes_per_app_max",
    "peak_concurrent_starts",
    "peak_held",
    "wake_wait_ms",
    "allocation_start_s",
    "wake_phase_s",
}


def report(out: Path, *args: str, timeout: float = 150) -> dict:
    proc = subprocess.Popen(
        [sys.executable, str(REPORT), "--out", str(out), "--workers", "2", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the report stops everything it started on SIGTERM
        stdout, stderr = proc.communicate(timeout=30)
        raise AssertionError(f"report still running after {timeout}s:\n{stderr[-3000:]}") from None
    assert proc.returncode == 0, stdout + stderr[-3000:]
    for name in ("summary.json", "chart.png", "locust.html", "timeline.json", "outcomes.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS, SUMMARY_KEYS - set(summary)
    assert summary["requests"] > 0
    assert summary["unaccounted"] == 0  # locust's count equals the outcomes counted
    assert summary["unanswered"] == 0 and summary["sent"] == summary["requests"]
    assert summary["interrupted"] == {}
    assert summary["lost"] == 0, summary["lost_by_kind"]
    assert summary["wakes_total"] >= 1
    return summary


def test_locustfile_lists_every_scenario() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py"), "--list"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for scenario in ("SingleAppStampede", "FleetWake", "WebhookWhileCold", "HotWithSleeps"):
        assert scenario in result.stdout


def test_locustfile_refuses_a_host_off_loopback() -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py"),
            "--headless", "-u", "1", "-t", "1s", "--host", "http://example.com",
            "SingleAppStampede",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "127.0.0.1" in result.stdout + result.stderr


def test_single_app_stampede_is_one_wake(tmp_path: Path) -> None:
    summary = report(tmp_path, "--scenario", "stampede", "--users", "60", "--run-time", "6")
    assert summary["wakes_total"] == 1 and summary["peak_concurrent_starts"] == 1
    assert summary["by_status"].get("200", 0) == summary["requests"]
    assert summary["wake_wait_ms"]["count"] >= 1 and summary["peak_held"] >= 1
    phases = summary["wake_phase_s"]
    assert set(phases) == {"budget", "allocation", "readiness"}
    for phase in phases.values():
        assert phase["count"] == 1 and 0 <= phase["p50"] <= phase["p99"]


def test_fleet_wake_stays_within_the_budget(tmp_path: Path) -> None:
    summary = report(
        tmp_path, "--scenario", "fleet", "--apps", "30", "--max-concurrent-wakes", "4",
        "--users", "60", "--run-time", "8",
    )  # fmt: skip
    assert 1 <= summary["peak_concurrent_starts"] <= 4
    assert summary["wakes_per_app_max"] == 1
    assert summary["apps_woken"] >= 5


def test_webhooks_while_cold_queue_and_reject(tmp_path: Path) -> None:
    summary = report(
        tmp_path, "--scenario", "webhooks", "--users", "30", "--run-time", "6",
        "--start-delay", "2",
    )  # fmt: skip
    statuses = summary["by_status"]
    assert statuses.get("202", 0) >= 1  # queued while hooks-queue was starting
    assert summary["refused_503_by_reason"].get("not_safe_to_hold", 0) >= 1  # hooks-reject
    assert summary["wakes_total"] == 2


def test_hot_traffic_with_periodic_sleeps_cycles_apps(tmp_path: Path) -> None:
    summary = report(
        tmp_path, "--scenario", "cycling", "--apps", "2", "--users", "10", "--run-time", "16",
    )  # fmt: skip
    # Traffic moves between the two apps every 6 s and each sleeps after 2 s idle,
    # so at least one app is woken a second time.
    assert summary["wakes_per_app_max"] >= 2, summary["wakes_per_app"]


@pytest.mark.timeout(300)
def test_reload_that_tightens_the_budget_shows_fewer_concurrent_starts(tmp_path: Path) -> None:
    summary = report(
        tmp_path, "--scenario", "fleet", "--apps", "40", "--max-concurrent-wakes", "6",
        "--users", "80", "--run-time", "10", "--reload-at", "3", "--reload-budget", "2",
    )  # fmt: skip
    before = summary["peak_concurrent_starts_before_reload"]
    after = summary["peak_concurrent_starts_after_reload"]
    assert before > 2 and 1 <= after <= 2, (before, after)
    assert summary["budget"] == {"max_concurrent_wakes": 6, "reloaded_to": 2}
    timeline = json.loads((tmp_path / "timeline.json").read_text())
    assert {sample["budget"] for sample in timeline} == {6, 2}
