#!/usr/bin/env python3
"""Wake-stampede benchmark: N concurrent GETs for one cold scale-to-zero app.

Starts, all on 127.0.0.1 and free ports, in its own temp dir:

    redis-server        (only with --store redis)
    edge controlplane   one app "stampede": bench/apps/sample_app.py --start-delay S
    edge run            that app scale_to_zero, --workers N, [budget] defaults

then fires --requests GETs at once (one connection each, Host stampede.localhost)
at the cold app. Overhead is first response byte (time.time() when the headers
arrived) minus X-Ready-At, the moment the app began answering 2xx (both clocks are
this machine's); the edge workers' VmRSS and the control plane's allocations are
sampled every 50 ms. The table also splits the overhead into a timeline (app ready
-> control plane ready -> edge hot -> first byte) and shows machine-wide
listen-backlog overflows (TcpExt ListenOverflows), before and after the app became
ready.

The app's `max_held` is raised to --requests by default (the per-app default, 1000
per worker, would answer most of a 5,000-request stampede 503 hold_cap); --max-held
sets it. --client raw uses bare asyncio sockets instead of aiohttp; --dump FILE
writes every response's record as JSON lines. --quick: 50 requests, the app starts
in 0.3 s.

Prints a table, writes JSON (--json FILE). Every process it starts (and every app
process the control plane started) is stopped on the way out, also on errors and
Ctrl-C.

    .venv/bin/python bench/stampede.py --json /tmp/stampede.json
    .venv/bin/python bench/stampede.py --json /tmp/stampede.json --store memory --workers 1

JSON keys (--json FILE; times in ms unless named _s; null where nothing was measured):
    requests                 GETs fired
    store                    redis or memory
    workers                  edge worker processes
    client                   aiohttp or raw
    start_delay_s            the app's start time
    max_held                 the app's max_held
    wakes                    allocations the control plane created for the app (1 wanted)
    errors                   non-200 answers + client exceptions (0 wanted)
    ok                       200 answers
    errors_by_kind           errors by "status X-Edge-Error" or exception name
    statuses                 answers by status
    allocation_ids           the distinct X-Allocation-Id of the 200s
    missing_ready_at         200s without X-Ready-At
    overhead_min_ms          first byte minus X-Ready-At: min, p50, p90, p99, max
    overhead_p50_ms
    overhead_p90_ms
    overhead_p99_ms
    overhead_max_ms
    held                     200s whose Server-Timing says they waited for the wake
    wake_wait_p50_ms         that wait (Server-Timing wake;dur): p50, max
    wake_wait_max_ms
    ready_after_fire_ms      from the fire to the app's first X-Ready-At
    first_byte_spread_ms     from the first answer's first byte to the last's
    peak_concurrent_starts   most allocations planned/pulling/starting at once
    memory_growth_mib        peak minus baseline VmRSS of the edge workers, summed
    memory_growth_max_worker_mib   the largest growth of one worker
    memory_growth_by_worker_mib    growth by worker pid
    rss_before_mib           the workers' VmRSS before, summed; and at its peak
    rss_peak_mib
    rss_samples              VmRSS samples taken
    wall_s                   the stampede's wall time
    allocations              id, state, reason, created_at, updated_at of each
    tcp_counters_delta       machine-wide listen_overflows, listen_drops, tcp_retrans_segs
    listen_overflows_before_app_ready   of those, before the app was ready; and after
    listen_overflows_after_app_ready
    cp_polls                 control-plane polls, and those that failed
    cp_poll_errors
    edge_app_state           the app in /admin/apps after the stampede
    app_ready_at             the first X-Ready-At (unix time)
    cp_ready_after_app_ready_ms    timeline: control plane ready, edge hot, first byte
    edge_hot_after_app_ready_ms
    first_byte_after_edge_hot_ms
    nofile_limit             RLIMIT_NOFILE of the client
    targets                  wakes, errors, memory_growth_mib, overhead_p50_ms, overhead_p99_ms
    targets_met              each target, and all
    edge_log                 error lines of the edge's log when the run had trouble, else []
    controlplane_log         the same of the control plane's
    machine                  nproc, cpu, python, platform, load average at the start
    quick                    whether --quick sized the run
    total_s                  the whole run's wall time
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench_stack import (
    COLD_APP,
    COLD_HOST,
    STOP_SIGNALS,
    Processes,
    add_quick,
    apply_quick,
    http_get,
    install_signal_handlers,
    logger,
    machine_info,
    percentile,
    r3,
    raise_open_file_limit,
    start_cold_app_stack,
    start_redis,
    tail,
    wake_wait_ms,
    write_json,
)

POLL_INTERVAL = 0.05
STARTING_STATES = frozenset({"planned", "pulling", "starting"})
TARGETS: dict[str, float] = {
    "wakes": 1,
    "errors": 0,
    "memory_growth_mib": 64,
    "overhead_p50_ms": 10,
    "overhead_p99_ms": 50,
}
QUICK = {"requests": 50, "start_delay": 0.3, "timeout": 30.0}

log = logger("stampede")


# --------------------------------------------------------------------------
# Samplers (threads, so a busy client event loop does not skew them)
# --------------------------------------------------------------------------


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class MemorySampler(threading.Thread):
    """Peak VmRSS of each edge worker, every 50 ms, from start() until stop()."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pids = pids
        self.baseline = {pid: rss_kib(pid) or 0 for pid in pids}
        self.peak = dict(self.baseline)
        self.peak_sum = sum(self.baseline.values())
        self.samples = 0
        # (time.time(), machine-wide ListenOverflows): when backlogs overflowed.
        self.overflows: list[tuple[float, int]] = []
        self._stop_event = threading.Event()

    def sample(self) -> None:
        self.overflows.append((time.time(), tcp_counters().get("listen_overflows", 0)))
        total = 0
        for pid in self.pids:
            kib = rss_kib(pid)
            if kib is None:
                continue
            total += kib
            self.peak[pid] = max(self.peak[pid], kib)
        self.peak_sum = max(self.peak_sum, total)
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.wait(POLL_INTERVAL):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(2)
        self.sample()

    def result(self) -> dict[str, Any]:
        mib = 1024.0
        base_sum = sum(self.baseline.values())
        per_worker = {
            str(pid): round((self.peak[pid] - self.baseline[pid]) / mib, 1) for pid in self.pids
        }
        return {
            "memory_growth_mib": round((self.peak_sum - base_sum) / mib, 1),
            "memory_growth_max_worker_mib": max(per_worker.values(), default=0.0),
            "memory_growth_by_worker_mib": per_worker,
            "rss_before_mib": round(base_sum / mib, 1),
            "rss_peak_mib": round(self.peak_sum / mib, 1),
            "rss_samples": self.samples,
        }


class ControlPlanePoller(threading.Thread):
    """GET /v1/allocations every 50 ms: peak allocations starting at once, app pids."""

    def __init__(self, port: int, token: str, procs: Processes) -> None:
        super().__init__(name="cp-poller", daemon=True)
        self.port = port
        self.headers = {"Authorization": f"Bearer {token}"}
        self.procs = procs
        self.peak_starting = 0
        self.polls = 0
        self.poll_errors = 0
        self.allocations: dict[str, dict[str, Any]] = {}
        self._stop_event = threading.Event()

    def poll(self) -> list[dict[str, Any]] | None:
        status, body = http_get(self.port, f"/v1/allocations?app={COLD_APP}", self.headers, 2.0)
        if status != 200:
            self.poll_errors += 1
            return None
        self.polls += 1
        allocations = json.loads(body)["allocations"]
        starting = sum(1 for a in allocations if a["state"] in STARTING_STATES)
        self.peak_starting = max(self.peak_starting, starting)
        for a in allocations:
            self.allocations[a["id"]] = a
            if a.get("pid"):
                self.procs.app_pids.add(a["pid"])
        return allocations

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.poll()
            self._stop_event.wait(POLL_INTERVAL)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
        self.poll()


def tcp_counters() -> dict[str, int]:
    """Machine-wide TCP counters that show a stampede overflowing listen backlogs."""
    wanted = {
        ("TcpExt", "ListenOverflows"): "listen_overflows",
        ("TcpExt", "ListenDrops"): "listen_drops",
        ("Tcp", "RetransSegs"): "tcp_retrans_segs",
    }
    found: dict[str, int] = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        with contextlib.suppress(OSError, ValueError):
            lines = Path(path).read_text().splitlines()
            for names, values in zip(lines[::2], lines[1::2], strict=False):
                prefix, _, keys = names.partition(":")
                for key, value in zip(keys.split(), values.partition(":")[2].split(), strict=False):
                    if (prefix, key) in wanted:
                        found[wanted[(prefix, key)]] = int(value)
    return found


# --------------------------------------------------------------------------
# The stampede itself
# --------------------------------------------------------------------------


@dataclass
class Result:
    status: int | None = None
    first_byte: float | None = None  # time.time() when the response headers arrived
    ready_at: float | None = None  # X-Ready-At
    allocation: str | None = None  # X-Allocation-Id
    server_timing: str | None = None
    edge_error: str | None = None  # X-Edge-Error
    exception: str | None = None


def _result(status: int, first_byte: float, headers: Any) -> Result:
    ready = headers.get("X-Ready-At")
    try:
        ready_at = float(ready) if ready else None
    except ValueError:
        ready_at = None
    return Result(
        status=status,
        first_byte=first_byte,
        ready_at=ready_at,
        allocation=headers.get("X-Allocation-Id"),
        server_timing=headers.get("Server-Timing"),
        edge_error=headers.get("X-Edge-Error"),
    )


async def fire_aiohttp(port: int, n: int, timeout: float) -> list[Result]:
    import aiohttp

    url = f"http://127.0.0.1:{port}/"
    connector = aiohttp.TCPConnector(limit=n, limit_per_host=0, force_close=True)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    results = [Result() for _ in range(n)]
    async with aiohttp.ClientSession(
        connector=connector, timeout=client_timeout, auto_decompress=False
    ) as session:
        start = asyncio.Event()

        async def one(i: int) -> None:
            await start.wait()
            try:
                async with session.get(url, headers={"Host": COLD_HOST}) as resp:
                    first_byte = time.time()
                    results[i] = _result(resp.status, first_byte, resp.headers)
                    await resp.read()
            except Exception as exc:
                results[i].exception = type(exc).__name__

        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        await asyncio.sleep(0)  # every task is parked on the event: release them together
        start.set()
        await asyncio.wait(tasks, timeout=timeout + 5)
        for i, task in enumerate(tasks):
            if not task.done():
                task.cancel()
                results[i].exception = results[i].exception or "Unfinished"
    return results


class _RawResponse(asyncio.Protocol):
    """One HTTP/1.1 GET on its own connection; stamps the first byte, parses the head."""

    def __init__(self, request: bytes, done: asyncio.Future[Result]) -> None:
        self.request = request
        self.done = done
        self.buffer = bytearray()
        self.first_byte: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.first_byte is None:
            self.first_byte = time.time()
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.done.done():
            return
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        headers = _Caseless()
        for line in lines[1:]:
            name, _, val = line.partition(":")
            headers[name.strip().lower()] = val.strip()
        self.done.set_result(_result(int(lines[0].split()[1]), self.first_byte, headers))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionResetError("closed before the headers"))


class _Caseless(dict):
    """Header lookup by any case (keys stored lower-case)."""

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)


async def fire_raw(port: int, n: int, timeout: float) -> list[Result]:
    loop = asyncio.get_running_loop()
    request = (
        f"GET / HTTP/1.1\r\nHost: {COLD_HOST}\r\nConnection: close\r\nUser-Agent: stampede\r\n\r\n"
    ).encode()
    results = [Result() for _ in range(n)]
    start = asyncio.Event()

    async def one(i: int) -> None:
        await start.wait()
        done: asyncio.Future[Result] = loop.create_future()
        transport = None
        try:
            transport, _ = await loop.create_connection(
                lambda: _RawResponse(request, done), "127.0.0.1", port
            )
            results[i] = await done
        except Exception as exc:
            results[i].exception = type(exc).__name__
        finally:
            if transport is not None:
                transport.close()

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    await asyncio.sleep(0)
    start.set()
    await asyncio.wait(tasks, timeout=timeout)
    for i, task in enumerate(tasks):
        if not task.done():
            task.cancel()
            results[i].exception = results[i].exception or "Timeout"
    return results


async def guarded(coro: Any) -> list[Result]:
    """Run the stampede; SIGTERM/SIGHUP cancel it cleanly, then exit as the handler would."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def stop(signum: int) -> None:
        received.append(signum)
        task.cancel()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await coro
    except asyncio.CancelledError:
        if received:
            raise SystemExit(128 + received[0]) from None
        raise
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        install_signal_handlers()  # remove_signal_handler left the default action


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def summarize(results: list[Result], fired_at: float) -> dict[str, Any]:
    ok = [r for r in results if r.status == 200]
    statuses = Counter(str(r.status) for r in results if r.status is not None)
    failures: Counter[str] = Counter()
    for r in results:
        if r.exception is not None:
            failures[f"exception:{r.exception}"] += 1
        elif r.status != 200:
            failures[f"{r.status} {r.edge_error or '-'}"] += 1
    overhead = sorted(
        (r.first_byte - r.ready_at) * 1000
        for r in ok
        if r.first_byte is not None and r.ready_at is not None
    )
    waits = sorted(w for w in (wake_wait_ms(r.server_timing) for r in ok) if w is not None)
    first_bytes = sorted(r.first_byte for r in results if r.first_byte is not None)
    ready_ats = sorted({r.ready_at for r in ok if r.ready_at is not None})
    return {
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "errors_by_kind": dict(failures.most_common()),
        "statuses": dict(statuses),
        "allocation_ids": sorted({r.allocation for r in ok if r.allocation}),
        "missing_ready_at": sum(1 for r in ok if r.ready_at is None),
        "overhead_min_ms": r3(overhead[0] if overhead else None),
        "overhead_p50_ms": r3(percentile(overhead, 50)),
        "overhead_p90_ms": r3(percentile(overhead, 90)),
        "overhead_p99_ms": r3(percentile(overhead, 99)),
        "overhead_max_ms": r3(overhead[-1] if overhead else None),
        "held": len(waits),
        "wake_wait_p50_ms": r3(percentile(waits, 50)),
        "wake_wait_max_ms": r3(waits[-1] if waits else None),
        "ready_after_fire_ms": r3((ready_ats[0] - fired_at) * 1000 if ready_ats else None),
        "first_byte_spread_ms": r3(
            (first_bytes[-1] - first_bytes[0]) * 1000 if first_bytes else None
        ),
    }


def timeline(
    results: list[Result], allocations: list[dict[str, Any]], app_state: dict[str, Any] | None
) -> dict[str, Any]:
    """Where the overhead goes: app ready -> control plane ready -> edge hot -> first byte."""
    ready_at = min((r.ready_at for r in results if r.ready_at is not None), default=None)
    cp_ready = min(
        (a["updated_at"] for a in allocations if a.get("state") == "ready"), default=None
    )
    hot_at = None
    for t in (app_state or {}).get("transitions", []):
        if t.get("to_state") == "hot":
            hot_at = t["at"] if hot_at is None else min(hot_at, t["at"])
    first = min((r.first_byte for r in results if r.status == 200 and r.first_byte), default=None)

    def ms(later: float | None, earlier: float | None) -> float | None:
        return None if later is None or earlier is None else round((later - earlier) * 1000, 3)

    return {
        "app_ready_at": ready_at,
        "cp_ready_after_app_ready_ms": ms(cp_ready, ready_at),
        "edge_hot_after_app_ready_ms": ms(hot_at, ready_at),
        "first_byte_after_edge_hot_ms": ms(first, hot_at),
    }


def print_table(report: dict[str, Any]) -> None:
    # (label, report key); keys in TARGETS also show their target and verdict.
    rows = [
        ("requests", "requests"),
        ("store", "store"),
        ("edge workers", "workers"),
        ("client", "client"),
        ("app start delay s", "start_delay_s"),
        ("wakes", "wakes"),
        ("errors", "errors"),
        ("overhead p50 ms", "overhead_p50_ms"),
        ("overhead p90 ms", "overhead_p90_ms"),
        ("overhead p99 ms", "overhead_p99_ms"),
        ("overhead max ms", "overhead_max_ms"),
        ("peak concurrent starts", "peak_concurrent_starts"),
        ("memory growth MiB (sum)", "memory_growth_mib"),
        ("memory growth MiB (max worker)", "memory_growth_max_worker_mib"),
        ("held (Server-Timing)", "held"),
        ("wake wait p50 ms", "wake_wait_p50_ms"),
        ("app ready after fire ms", "ready_after_fire_ms"),
        ("control plane ready after app ms", "cp_ready_after_app_ready_ms"),
        ("edge hot after app ready ms", "edge_hot_after_app_ready_ms"),
        ("first byte after edge hot ms", "first_byte_after_edge_hot_ms"),
        ("stampede wall s", "wall_s"),
    ]
    width = max(len(label) for label, _ in rows)
    print()
    for label, key in rows:
        line = f"{label:<{width}}  {report[key]!s:>14}"
        if key in TARGETS:
            relation = "==" if key in ("wakes", "errors") else "<="
            verdict = "met" if report["targets_met"][key] else "NOT met"
            line += f"   target {relation} {TARGETS[key]:g}: {verdict}"
        print(line)
    if report["errors_by_kind"]:
        print(f"{'errors by kind':<{width}}  {report['errors_by_kind']}")
    if report.get("tcp_counters_delta"):
        print(f"{'TCP counters (whole machine)':<{width}}  {report['tcp_counters_delta']}")
    print(f"{'all targets met':<{width}}  {report['targets_met']['all']!s:>14}")


def targets_met(report: dict[str, Any]) -> dict[str, bool]:
    def at_most(key: str) -> bool:
        value = report.get(key)
        return value is not None and value <= TARGETS[key]

    met = {
        "wakes": report["wakes"] == TARGETS["wakes"],
        "errors": report["errors"] == TARGETS["errors"],
        "memory_growth_mib": at_most("memory_growth_mib"),
        "overhead_p50_ms": at_most("overhead_p50_ms"),
        "overhead_p99_ms": at_most("overhead_p99_ms"),
    }
    met["all"] = all(met.values())
    return met


def edge_log_excerpt(log_path: Path, limit: int = 40) -> list[str]:
    lines = tail(log_path, 200_000).splitlines()
    keep = [
        line
        for line in lines
        if any(word in line.lower() for word in ("error", "fail", "refus", "traceback", "exc"))
    ]
    return keep[-limit:]


# --------------------------------------------------------------------------


def run(args: argparse.Namespace, procs: Processes, tmp: Path) -> dict[str, Any]:
    started = time.monotonic()
    nofile = raise_open_file_limit()
    if nofile < args.requests + 100:
        log(f"RLIMIT_NOFILE is {nofile}: fewer than --requests + 100 sockets; expect errors")
    token = secrets.token_hex(16)
    store = start_redis(procs, tmp) if args.store == "redis" else "memory://"
    max_held = args.max_held if args.max_held is not None else max(1000, args.requests)
    cp, edge = start_cold_app_stack(
        procs, tmp, token, store, args.workers, args.start_delay, (), {"max_held": max_held}
    )
    log(f"edge ready: workers {edge.workers}, store {store}, max_held {max_held}")

    poller = ControlPlanePoller(cp.port, token, procs)
    before = poller.poll() or []
    if before:
        raise RuntimeError(f"the app is not cold: {len(before)} allocations already exist")
    memory = MemorySampler(edge.workers)
    memory.start()
    poller.start()
    fire = fire_raw if args.client == "raw" else fire_aiohttp
    log(f"firing {args.requests} GETs ({args.client})")
    tcp_before = tcp_counters()
    fired_at = time.time()
    t0 = time.monotonic()
    try:
        results = asyncio.run(guarded(fire(edge.port, args.requests, args.timeout)))
    finally:
        wall = time.monotonic() - t0
        tcp_after = tcp_counters()
        poller.stop()
        memory.stop()

    summary = summarize(results, fired_at)
    if args.dump:
        with open(args.dump, "w") as f:
            for r in results:
                f.write(json.dumps(asdict(r)) + "\n")
    allocations = poller.poll() or list(poller.allocations.values())
    # The control plane's own readiness probe can lag behind a saturated app: give it a
    # moment, so the timeline below has its `ready` time (diagnostic only, bounded).
    settle = time.monotonic() + 3.0
    while any(a["state"] in STARTING_STATES for a in allocations) and time.monotonic() < settle:
        time.sleep(0.05)
        allocations = poller.poll() or allocations
    admin_status, admin_body = http_get(edge.admin_port, "/admin/apps", timeout=2.0)
    app_state = None
    if admin_status == 200:
        with contextlib.suppress(ValueError, KeyError):
            app_state = {a["name"]: a for a in json.loads(admin_body)["apps"]}.get(COLD_APP)
    report: dict[str, Any] = {
        "requests": args.requests,
        "store": args.store,
        "workers": args.workers,
        "client": args.client,
        "start_delay_s": args.start_delay,
        "max_held": max_held,
        "wakes": len(allocations),
        "errors": summary["errors"],
        "overhead_p50_ms": summary["overhead_p50_ms"],
        "overhead_p99_ms": summary["overhead_p99_ms"],
        "peak_concurrent_starts": poller.peak_starting,
        **memory.result(),
        "wall_s": round(wall, 3),
        **{k: v for k, v in summary.items() if k not in ("errors",)},
        "allocations": [
            {k: a.get(k) for k in ("id", "state", "reason", "created_at", "updated_at")}
            for a in allocations
        ],
        # Machine-wide deltas over the stampede (other processes on the box count too).
        "tcp_counters_delta": {k: v - tcp_before.get(k, 0) for k, v in tcp_after.items()},
        "cp_polls": poller.polls,
        "cp_poll_errors": poller.poll_errors,
        "edge_app_state": app_state,
        "nofile_limit": nofile,
        "machine": machine_info(),
        "quick": args.quick,
    }
    report.update(timeline(results, allocations, app_state))
    ready_at = report["app_ready_at"]
    report["listen_overflows_before_app_ready"] = None
    report["listen_overflows_after_app_ready"] = None
    if ready_at is not None and memory.overflows:
        # Before the app was ready only the edge's listener took connections; after, the
        # app's own listener too (the edge connecting to it for every held request).
        at_ready = max((n for t, n in memory.overflows if t <= ready_at), default=None)
        first, last = memory.overflows[0][1], memory.overflows[-1][1]
        if at_ready is not None:
            report["listen_overflows_before_app_ready"] = at_ready - first
            report["listen_overflows_after_app_ready"] = last - at_ready
    report["targets"] = TARGETS
    report["targets_met"] = targets_met(report)
    troubled = report["errors"] or report["wakes"] != 1 or len(summary["allocation_ids"]) > 1
    report["edge_log"] = edge_log_excerpt(edge.log_path) if troubled else []
    report["controlplane_log"] = edge_log_excerpt(cp.log_path) if troubled else []
    report["total_s"] = round(time.monotonic() - started, 3)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, metavar="FILE", help="write results here")
    parser.add_argument("--requests", type=int, default=5000, help="concurrent GETs (5000)")
    parser.add_argument("--start-delay", type=float, default=0.5, help="app start delay s (0.5)")
    parser.add_argument("--workers", type=int, default=2, help="edge worker processes (2)")
    parser.add_argument("--store", choices=("redis", "memory"), default="redis")
    parser.add_argument("--timeout", type=float, default=60.0, help="bound on the stampede s")
    parser.add_argument(
        "--client",
        choices=("aiohttp", "raw"),
        default="aiohttp",
        help="aiohttp client, or raw asyncio sockets stamping the first byte in data_received",
    )
    parser.add_argument(
        "--max-held",
        type=int,
        default=None,
        help="the app's max_held per worker (default: max(1000, --requests))",
    )
    parser.add_argument(
        "--dump", metavar="FILE", help="also write every response's record (JSON lines)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    add_quick(parser, QUICK)
    args = parser.parse_args(argv)
    apply_quick(parser, args)
    if args.requests < 1 or args.workers < 1 or args.timeout <= 0:
        parser.error("--requests, --workers and --timeout must be positive")
    if args.store == "memory" and args.workers != 1:
        parser.error("--store memory needs --workers 1 (memory:// lives in one process)")

    tmp = Path(tempfile.mkdtemp(prefix="edge-stampede-"))
    procs = Processes(tmp)
    atexit.register(procs.stop_all)

    install_signal_handlers()
    try:
        report = run(args, procs, tmp)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except RuntimeError as exc:
        log(f"failed: {exc}")
        return 1
    finally:
        procs.stop_all()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print_table(report)
    for line in report["edge_log"]:
        log(f"edge log: {line}")
    out = Path(args.json)
    write_json(out, report, __doc__)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
