#!/usr/bin/env python3
"""Run a locust scenario against a whole local stack and write a report folder.

Starts, all on 127.0.0.1 and free ports, in its own temp dir: redis-server (AOF),
the local control plane (one app spec per scenario app), and the edge (redis
store, 2 workers) from configs/stampede.toml; runs locust headless for a
bounded time (bench/locustfile.py); samples the edge's /metrics and the control
plane every 0.5 s meanwhile; stops everything it started; and writes OUT/:

    locust.html, locust_stats.csv, locust_stats_history.csv, ...  locust's own
    outcomes.json       every request by outcome (200, 202, 503 <reason>, lost ...)
    timeline.json       the samples (requests, held, wakes in flight, 503s by reason)
    summary.json        requests, errors by status and reason, wakes per app, peak
                        concurrent starts (control plane journal), peak held,
                        wake durations p50/p99 by phase, lost requests, and
                        why each wake waited (`wake_wait_reasons`: its longest
                        phase, counts by it, p50/p99 ms per phase)
    chart.png           over time: requests/s, held requests, wakes in flight
                        against the budget line, 503s/s by reason

    .venv/bin/python bench/stampede_report.py --scenario stampede --users 2000 \\
        --out bench/results/stampede-single
    .venv/bin/python bench/stampede_report.py --scenario fleet --apps 300 \\
        --max-concurrent-wakes 20 --users 600 --out bench/results/stampede-fleet

--reload-at S --reload-budget N rewrites the running edge config with
max_concurrent_wakes = N after S seconds and runs `edge reload` (the operator's
loop); the summary then splits peak concurrent starts before and after.
--json FILE writes summary.json there too (OUT defaults to FILE's folder, FILE's
name + "-report"). --quick: 20 users for 3 s, 4 apps (fleet, cycling). Exits 1
when a request was lost, unanswered or unaccounted, or the wake budget was exceeded.

JSON keys (summary.json, --json FILE):
    scenario                 stampede, fleet, webhooks or cycling
    users                    locust users
    run_time_s               locust's run time
    apps                     apps of the scenario
    budget                   max_concurrent_wakes, reloaded_to (null without a reload)
    requests                 answered requests, counted by outcome
    sent                     requests sent
    interrupted              requests cut short by locust's own stop, by exception ({} wanted)
    locust_requests          locust's own count of requests
    unanswered               sent - answered (0 wanted)
    unaccounted              locust's count - ours (0 wanted)
    by_status                answers by status ("503" all reasons together)
    refused_503_by_reason    503 + Retry-After answers by X-Edge-Error
    lost                     requests lost: no answer, or not 200/202/503 + Retry-After (0 wanted)
    lost_by_kind             those by status or error
    wakes_total              allocations the control plane created
    apps_woken               apps with at least one
    wakes_per_app_max        most allocations of one app
    wakes_per_app            allocations by app
    peak_held                most requests the edge held at once (/metrics)
    edge_upstream_errors     the edge's upstream errors by kind
    peak_wakes_in_flight     most wake-budget slots in use at once (/metrics)
    peak_concurrent_starts   most allocations starting at once (control plane journal)
    peak_concurrent_starts_before_reload   that peak before a reload, and after (null without)
    peak_concurrent_starts_after_reload
    allocation_start_s       p50, p99 of allocation start times
    wake_wait_ms             count, p50, p99 of Server-Timing wake;dur of held requests
    wake_phase_s             count, p50, p99, mean per wake phase (budget, allocation,
                             readiness), from the edge's histograms
    wake_wait_reasons        why each wake waited: its longest phase per wake (per_wake),
                             wakes by that phase (by_dominant), p50/p99 ms per phase
    locust_exit              locust's exit status
    budget_exceeded          each way the peak went over the wake budget ([] wanted)
    quick                    whether --quick sized the run
"""

from __future__ import annotations

import argparse
import itertools
import json
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

from bench_stack import (
    BENCH,
    REPO,
    SAMPLE_APP,
    TINY_APP,
    Processes,
    add_quick,
    apply_quick,
    cp_app,
    edge_binary,
    http_get,
    install_signal_handlers,
    logger,
    percentile,
    r3,
    raise_open_file_limit,
    start_control_plane,
    start_edge,
    start_redis,
    token_env,
    write_json,
)

from scheduler_client.config_file import render_toml

LOCUSTFILE = BENCH / "locustfile.py"
BASE_CONFIG = REPO / "configs" / "stampede.toml"
SAMPLE_EVERY = 0.5
STOP_TIMEOUT = 150  # s; the locustfile drains in-flight requests for up to 135 s
STARTING = frozenset({"planned", "pulling", "starting"})
SCENARIOS = {
    "stampede": "SingleAppStampede",
    "fleet": "FleetWake",
    "webhooks": "WebhookWhileCold",
    "cycling": "HotWithSleeps",
}
QUICK = {"users": 20, "run_time": 3, "apps": 4}

log = logger("stampede-report")


# ----------------------------------------------------------------- the stack


def scenario_apps(args: argparse.Namespace) -> list[dict[str, Any]]:
    """(edge app overrides, control-plane app spec) per app of the scenario."""

    def app(edge: dict[str, Any], script: Path, readiness: str) -> dict[str, Any]:
        args_ = ("--name", "{allocation}", "--start-delay", str(args.start_delay))
        spec = cp_app(edge["name"], script, *args_, readiness=readiness, start_timeout="60s")
        return {"edge": edge, "spec": spec}

    if args.scenario == "stampede":
        edge = {"name": "stampede", "hosts": ["stampede.localhost"]}
        return [app(edge, SAMPLE_APP, "/healthz")]
    if args.scenario == "fleet":
        return [
            app({"name": f"fleet-{i}", "hosts": [f"fleet-{i}.localhost"]}, TINY_APP, "/")
            for i in range(args.apps)
        ]
    if args.scenario == "webhooks":
        queue_rule = {"class": "queue", "methods": ["POST"], "path_prefix": "/hooks/"}
        reject_rule = {"class": "reject", "methods": ["POST"], "header": "X-Signature"}
        replay = {
            "max_attempts": 5,
            "retention": "1h",
            "dedupe_key": "header:X-Event-Id",
            "max_body": "64KiB",
        }
        queue = {
            "name": "hooks-queue",
            "hosts": ["hooks-queue.localhost"],
            "rules": [queue_rule],
            "replay": replay,
        }
        reject = {
            "name": "hooks-reject",
            "hosts": ["hooks-reject.localhost"],
            "rules": [reject_rule],
        }
        return [app(queue, SAMPLE_APP, "/healthz"), app(reject, SAMPLE_APP, "/healthz")]
    return [
        app(
            {"name": f"cycle-{i}", "hosts": [f"cycle-{i}.localhost"], "idle_timeout": "2s"},
            TINY_APP,
            "/",
        )
        for i in range(args.apps)
    ]


class Stack:
    """Redis, the control plane and the edge of one report run."""

    def __init__(self, args: argparse.Namespace, tmp: Path, procs: Processes) -> None:
        self.args = args
        self.tmp = tmp
        self.procs = procs
        self.token = secrets.token_urlsafe(24)
        self.env = token_env(self.token)
        self.apps = scenario_apps(args)
        self.edge_config_path = tmp / "edge.toml"
        self.edge_config: dict[str, Any] = {}
        self.cp_port = 0
        self.initial_budget = 0
        self.port = 0
        self.admin_port = 0

    def start(self) -> None:
        store = start_redis(self.procs, self.tmp, appendfsync="everysec")
        specs = [app["spec"] for app in self.apps]
        cp = start_control_plane(
            self.procs, self.tmp, self.env, specs, max_allocations=len(self.apps) + 16
        )
        self.cp_port = cp.port
        self._start_edge(store)

    def _start_edge(self, store: str) -> None:
        base = tomllib.loads(BASE_CONFIG.read_text())
        template = base.pop("apps")[0]
        base["edge"].update(store=store, workers=self.args.workers)
        base["control_plane"]["url"] = f"http://127.0.0.1:{self.cp_port}"
        if self.args.max_concurrent_wakes is not None:
            base["budget"]["max_concurrent_wakes"] = self.args.max_concurrent_wakes
            base["budget"]["tenant_max_concurrent_wakes"] = self.args.max_concurrent_wakes
        base["apps"] = [{**template, **app["edge"]} for app in self.apps]
        self.initial_budget = int(base["budget"]["max_concurrent_wakes"])
        edge = start_edge(self.procs, self.tmp, self.env, base)
        self.edge_config, self.edge_config_path = base, edge.config_path
        self.port, self.admin_port = edge.port, edge.admin_port
        log(f"edge on 127.0.0.1:{self.port}, config {self.edge_config_path}")

    @property
    def budget(self) -> int:
        return int(self.edge_config["budget"]["max_concurrent_wakes"])

    def reload_budget(self, budget: int) -> bool:
        """Rewrite the config with a new budget and `edge reload` it; True once applied."""
        config = json.loads(json.dumps(self.edge_config))
        config["budget"]["max_concurrent_wakes"] = budget
        config["budget"]["tenant_max_concurrent_wakes"] = budget
        self.edge_config_path.write_text(render_toml(config))
        try:
            result = subprocess.run(
                [edge_binary(), "reload", "--config", str(self.edge_config_path)],
                capture_output=True,
                text=True,
                timeout=30,
                env=self.env,
            )
        except subprocess.TimeoutExpired:
            log("reload timed out")
            return False
        applied = result.returncode == 0 and "'reloaded': True" in result.stdout
        log(f"reload to max_concurrent_wakes={budget}: {result.stdout.strip()}{result.stderr}")
        if applied:
            self.edge_config = config
        return applied

    def cp_get(self, path: str) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        status, body = http_get(self.cp_port, path, headers=headers, timeout=10)
        if status != 200:
            raise RuntimeError(f"control plane {path}: {status} {body[:200]!r}")
        return json.loads(body)


# ----------------------------------------------------------------- sampling


def parse_metrics(text: str) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Any] = {"requests": 0.0, "held": 0.0, "budget_in_use": 0.0, "rejections": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "edge_requests_total":
                out["requests"] += sample.value
            elif sample.name == "edge_held_requests":
                out["held"] = sample.value
            elif sample.name == "edge_wake_budget_in_use":
                out["budget_in_use"] = sample.value
            elif sample.name == "edge_upstream_errors_total":
                kind = sample.labels["kind"]
                errors = out.setdefault("upstream_errors", {})
                errors[kind] = errors.get(kind, 0) + sample.value
            elif sample.name == "edge_rejections_total":
                reason = sample.labels["reason"]
                out["rejections"][reason] = out["rejections"].get(reason, 0) + sample.value
            elif sample.name == "edge_wake_phase_seconds_sum":
                out.setdefault("phase_sum", {})[sample.labels["phase"]] = sample.value
            elif sample.name == "edge_wake_phase_seconds_bucket":
                bound = float(sample.labels["le"])
                phase_buckets = out.setdefault("phase_buckets", {})
                phase_buckets.setdefault(sample.labels["phase"], []).append((bound, sample.value))
    return out


class Sampler(threading.Thread):
    """Every 0.5 s: the edge's metrics and the control plane's starting allocations."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.samples: list[dict[str, Any]] = []
        self.stopped = threading.Event()
        self.started_at = time.time()

    def run(self) -> None:
        while not self.stopped.is_set():
            at = time.time()
            status, body = http_get(self.stack.admin_port, "/metrics", timeout=2.0)
            sample: dict[str, Any] = {"t": round(at - self.started_at, 3)}
            if status == 200:
                sample.update(parse_metrics(body.decode(errors="replace")))
            try:
                allocations = self.stack.cp_get("/v1/allocations")["allocations"]
                sample["starting"] = sum(1 for a in allocations if a["state"] in STARTING)
            except (RuntimeError, ValueError):
                sample["starting"] = None
            sample["budget"] = self.stack.budget
            self.samples.append(sample)
            self.stopped.wait(max(0.0, SAMPLE_EVERY - (time.time() - at)))


# ----------------------------------------------------------------- locust


def run_locust(args: argparse.Namespace, stack: Stack, out: Path) -> int:
    scenario_class = SCENARIOS[args.scenario]
    argv = [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILE),
        "--headless",
        "-u", str(args.users),
        "-r", str(args.spawn_rate or args.users),
        "-t", f"{args.run_time}s",
        # Longer than the edge's longest hold, so every request sent gets its answer.
        "--stop-timeout", str(STOP_TIMEOUT),
        "--host", f"http://127.0.0.1:{stack.port}",
        "--csv", str(out / "locust"),
        "--csv-full-history",
        "--html", str(out / "locust.html"),
        "--outcomes-file", str(out / "outcomes.json"),
        "--fleet-size", str(args.apps),
        "--cycling-size", str(args.apps),
        "--only-summary",
        "--exit-code-on-error", "0",
        scenario_class,
    ]  # fmt: skip
    (out / "outcomes.json").unlink(missing_ok=True)  # never read a previous run's
    with open(out / "locust.log", "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            # Bounded even if the edge hangs: run time + stop timeout + a margin.
            return proc.wait(args.run_time + STOP_TIMEOUT + 30)
        except subprocess.TimeoutExpired:
            log("locust did not stop by itself: killed")
            return -9
        finally:
            if proc.poll() is None:  # timed out, or we are being stopped
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


# ----------------------------------------------------------------- report


def journal_stats(entries: list[dict[str, Any]], reload_at: float | None) -> dict[str, Any]:
    """Peak concurrent starts and allocation start times, from the control plane's journal.

    With a reload, "after" counts from the moment every start begun before the
    reload has finished: those were admitted under the old budget.
    """
    starting: set[str] = set()
    began: dict[str, float] = {}
    durations: list[float] = []
    peak = peak_before = peak_after = 0
    carried: set[str] | None = None  # starts in flight at the reload, until they finish
    for entry in entries:
        if entry["machine"] != "allocation":
            continue
        subject = entry["subject"]
        if reload_at is not None and carried is None and entry["at"] >= reload_at:
            carried = set(starting)
        if entry["to_state"] in STARTING:
            starting.add(subject)
            began.setdefault(subject, entry["at"])
        else:
            starting.discard(subject)
            if carried is not None:
                carried.discard(subject)
            if entry["to_state"] == "ready" and subject in began:
                durations.append(entry["at"] - began[subject])
        peak = max(peak, len(starting))
        if reload_at is not None:
            if carried is None:
                peak_before = max(peak_before, len(starting))
            elif not carried:
                peak_after = max(peak_after, len(starting))
    stats: dict[str, Any] = {
        "peak_concurrent_starts": peak,
        "allocation_start_s": {
            "p50": r3(percentile(durations, 50)),
            "p99": r3(percentile(durations, 99)),
        },
        "peak_concurrent_starts_before_reload": None if reload_at is None else peak_before,
        "peak_concurrent_starts_after_reload": None if reload_at is None else peak_after,
    }
    return stats


def over_budget(summary: dict[str, Any]) -> list[str]:
    """Each way the control plane's peak of concurrent starts went over the wake budget.

    With a reload the peaks before and after are held to the budget of their time;
    otherwise the whole run's peak to the initial budget.
    """
    budget = summary["budget"]
    if (
        budget.get("reloaded_to") is not None
        and summary.get("peak_concurrent_starts_after_reload") is not None
    ):
        checks = [
            (
                "before reload",
                "peak_concurrent_starts_before_reload",
                budget["max_concurrent_wakes"],
            ),
            ("after reload", "peak_concurrent_starts_after_reload", budget["reloaded_to"]),
        ]
    else:
        checks = [("run", "peak_concurrent_starts", budget["max_concurrent_wakes"])]
    return [
        f"{when}: {summary[key]} concurrent starts, budget {limit}"
        for when, key, limit in checks
        if limit and summary[key] > limit
    ]


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus-style: linear within the bucket holding the q-th observation."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1.0
            return round(lower_bound + (bound - lower_bound) * share, 3)
        lower_bound, lower_count = bound, count
    return None


def phase_stats(sample: dict[str, Any]) -> dict[str, Any]:
    """p50/p99/mean per wake phase from the edge's last histogram scrape."""
    out = {}
    for phase, buckets in sample.get("phase_buckets", {}).items():
        count = max(n for _, n in buckets)
        if not count:
            continue
        out[phase] = {
            "count": int(count),
            "p50": histogram_quantile(0.5, buckets),
            "p99": histogram_quantile(0.99, buckets),
            "mean": round(sample["phase_sum"][phase] / count, 3),
        }
    return out


WAKE_PHASES = ("budget", "allocation", "readiness")


def wake_wait_reasons(last_wakes: dict[str, dict[str, float] | None]) -> dict[str, Any]:
    """Why each wake waited, from each app's last completed wake (`last_wake` in the
    edge's /admin/gallery, ms per phase; a run waking each app once sees every wake):
    its dominant phase (the longest; a tie goes to the earlier phase), the count of
    wakes by dominant phase, and p50/p99 per phase in ms."""
    per_wake = []
    for app, phases in sorted(last_wakes.items()):
        if not phases:
            continue
        ms = {phase: float(phases.get(f"{phase}_ms", 0.0)) for phase in WAKE_PHASES}
        dominant = max(WAKE_PHASES, key=lambda phase: ms[phase])
        per_wake.append({"app": app, "dominant": dominant, **{f"{k}_ms": v for k, v in ms.items()}})
    return {
        "wakes": len(per_wake),
        "by_dominant": {
            phase: sum(1 for w in per_wake if w["dominant"] == phase) for phase in WAKE_PHASES
        },
        "phase_ms": {
            phase: {
                "p50": percentile([w[f"{phase}_ms"] for w in per_wake], 50),
                "p99": percentile([w[f"{phase}_ms"] for w in per_wake], 99),
            }
            for phase in WAKE_PHASES
        },
        "per_wake": per_wake,
    }


def summarize(
    args: argparse.Namespace,
    stack: Stack,
    out: Path,
    samples: list[dict[str, Any]],
    reload_wall: float | None,
    locust_status: int,
) -> dict[str, Any]:
    if locust_status != 0 or not (out / "outcomes.json").exists():
        raise RuntimeError(f"locust failed (exit {locust_status}); see {out / 'locust.log'}")
    counted = json.loads((out / "outcomes.json").read_text())
    outcomes = counted["outcomes"]
    requests = sum(outcomes.values())
    by_status: Counter[str] = Counter()
    refused_by_reason: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    for outcome, n in outcomes.items():
        if outcome.startswith("503 "):
            by_status["503"] += n
            refused_by_reason[outcome[4:]] += n
        elif outcome.startswith("lost "):
            lost[outcome[5:]] += n
        else:
            by_status[outcome] += n
    allocations = stack.cp_get("/v1/allocations")["allocations"]
    wakes = Counter(a["app"] for a in allocations)
    journal = stack.cp_get("/v1/journal")["entries"]
    locust_total = int(counted["locust_requests"])
    last = next((s for s in reversed(samples) if "requests" in s), {})
    status, body = http_get(stack.admin_port, "/admin/gallery", timeout=10)
    gallery_apps = json.loads(body)["apps"] if status == 200 else []
    summary: dict[str, Any] = {
        "scenario": args.scenario,
        "users": args.users,
        "run_time_s": args.run_time,
        "apps": len(stack.apps),
        "budget": {
            "max_concurrent_wakes": stack.initial_budget,
            "reloaded_to": args.reload_budget if reload_wall is not None else None,
        },
        "requests": requests,
        "sent": counted["sent"],
        # Cut short by the load generator itself (its stop came before the answer).
        "interrupted": counted["interrupted"],
        "locust_requests": locust_total,
        # Sent but never answered (not 200/202/503, not lost with an error either).
        "unanswered": counted["sent"] - requests,
        # Our count against locust's own: the two must agree.
        "unaccounted": locust_total - requests,
        "by_status": dict(by_status),
        "refused_503_by_reason": dict(refused_by_reason),
        "lost": sum(lost.values()),
        "lost_by_kind": dict(lost),
        "wakes_total": sum(wakes.values()),
        "apps_woken": len(wakes),
        "wakes_per_app_max": max(wakes.values(), default=0),
        "wakes_per_app": dict(sorted(wakes.items())),
        "peak_held": max((s.get("held", 0) for s in samples), default=0),
        # Why the edge answered 502/504 (its upstream errors by kind), if it did.
        "edge_upstream_errors": last.get("upstream_errors", {}),
        "peak_wakes_in_flight": max((s.get("budget_in_use", 0) for s in samples), default=0),
        **journal_stats(journal, reload_wall),
        # Server-Timing wake;dur of every request that waited (locust's WAKE rows).
        "wake_wait_ms": counted["wake_wait_ms"],
        # Per wake phase, from the edge's histograms (seconds): budget wait,
        # allocation (control plane call), readiness (app start to ready).
        "wake_phase_s": phase_stats(last),
        # Per wake (each app's last), the phase it waited longest in, and counts by it.
        "wake_wait_reasons": wake_wait_reasons({a["name"]: a["last_wake"] for a in gallery_apps}),
        "locust_exit": locust_status,
    }
    return summary


def chart(samples: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in samples if "requests" in s]
    if len(rows) < 2:
        return
    t = [s["t"] for s in rows[1:]]
    rate = [
        (b["requests"] - a["requests"]) / max(1e-6, b["t"] - a["t"])
        for a, b in itertools.pairwise(rows)
    ]
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    fig.suptitle(title)
    axes[0].plot(t, rate, color="tab:blue")
    axes[0].set_ylabel("requests/s")
    axes[1].plot([s["t"] for s in rows], [s["held"] for s in rows], color="tab:orange")
    axes[1].set_ylabel("held requests")
    axes[2].plot(
        [s["t"] for s in rows], [s["budget_in_use"] for s in rows], label="wakes in flight"
    )
    starting = [(s["t"], s["starting"]) for s in rows if s.get("starting") is not None]
    if starting:
        axes[2].plot(*zip(*starting, strict=True), label="allocations starting", alpha=0.7)
    axes[2].step(
        [s["t"] for s in rows], [s["budget"] for s in rows], where="post", color="red",
        linestyle="--", label="max_concurrent_wakes",
    )  # fmt: skip
    axes[2].set_ylabel("wakes")
    axes[2].legend(loc="upper right", fontsize="small")
    reasons = sorted({r for s in rows for r in s["rejections"]})
    for reason in reasons:
        values = [
            (b["rejections"].get(reason, 0) - a["rejections"].get(reason, 0))
            / max(1e-6, b["t"] - a["t"])
            for a, b in itertools.pairwise(rows)
        ]
        axes[3].plot(t, values, label=reason)
    axes[3].set_ylabel("503/s by reason")
    if reasons:
        axes[3].legend(loc="upper right", fontsize="small")
    else:
        axes[3].text(0.5, 0.5, "no 503s", transform=axes[3].transAxes, ha="center")
    axes[3].set_xlabel("seconds since the run started")
    for axis in axes:
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------- main


def run(args: argparse.Namespace, out: Path, tmp: Path, procs: Processes) -> dict[str, Any]:
    stack = Stack(args, tmp, procs)
    stack.start()
    sampler = Sampler(stack)
    sampler.start()
    reload_wall: list[float] = []
    reloader = None
    if args.reload_at is not None and args.reload_budget is not None:

        def reload_later() -> None:
            time.sleep(args.reload_at)
            if stack.reload_budget(args.reload_budget):
                # From the moment every worker has the new budget (SIGHUP is forwarded
                # after `edge reload` returns): starts admitted before it are carried over.
                time.sleep(0.2)
                reload_wall.append(time.time())

        reloader = threading.Thread(target=reload_later, daemon=True)
        reloader.start()
    log(f"locust: {SCENARIOS[args.scenario]}, {args.users} users, {args.run_time}s")
    status = run_locust(args, stack, out)
    if reloader is not None:
        reloader.join(5)
    sampler.stopped.set()
    sampler.join(5)
    (out / "timeline.json").write_text(json.dumps(sampler.samples, indent=1) + "\n")
    summary = summarize(
        args, stack, out, sampler.samples, reload_wall[0] if reload_wall else None, status
    )
    summary["budget_exceeded"] = over_budget(summary)
    summary["quick"] = args.quick
    write_json(out / "summary.json", summary, __doc__)
    budget = f"{args.max_concurrent_wakes or stack.budget}"
    if reload_wall:
        budget = f"{summary['budget']['max_concurrent_wakes']} -> {args.reload_budget}"
    title = f"{args.scenario}: {args.users} users, {len(stack.apps)} apps, budget {budget}"
    chart(sampler.samples, out / "chart.png", title)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="stampede")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--spawn-rate", type=float, default=None, help="default: all at once")
    parser.add_argument("--run-time", type=int, default=30, help="seconds")
    parser.add_argument("--apps", type=int, default=300, help="fleet / cycling apps")
    parser.add_argument("--start-delay", type=float, default=0.5, help="app start time, s")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-concurrent-wakes", type=int, default=None)
    parser.add_argument("--reload-at", type=float, default=None, help="seconds into the run")
    parser.add_argument("--reload-budget", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="the report folder")
    parser.add_argument("--json", type=Path, default=None, help="summary.json, also here")
    add_quick(parser, QUICK)
    args = parser.parse_args(argv)
    apply_quick(parser, args)
    if args.out is None:
        if args.json is None:
            parser.error("--out or --json is required")
        args.out = args.json.parent / f"{args.json.stem}-report"
    if args.scenario in ("stampede", "webhooks"):
        args.apps = 1 if args.scenario == "stampede" else 2
    raise_open_file_limit()
    install_signal_handlers()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stampede-report-") as tmp_dir:
        procs = Processes(Path(tmp_dir))
        try:
            summary = run(args, args.out, Path(tmp_dir), procs)
        finally:
            procs.stop_all()
    keys = (
        "requests", "unanswered", "unaccounted", "by_status", "refused_503_by_reason", "lost",
        "wakes_total", "wakes_per_app_max", "peak_concurrent_starts", "peak_held",
    )  # fmt: skip
    for key in keys:
        print(f"{key:<24} {summary[key]}")
    print(f"report: {args.out}/ (summary.json, chart.png, locust.html)")
    if args.json is not None:
        write_json(args.json, summary, __doc__)
    exceeded = summary["budget_exceeded"]
    for problem in exceeded:
        print(f"wake budget exceeded     {problem}")
    clean = summary["lost"] == 0 and summary["unaccounted"] == 0 and summary["unanswered"] == 0
    return 0 if clean and not exceeded else 1


if __name__ == "__main__":
    sys.exit(main())
