#!/usr/bin/env python3
"""Wake-stampede benchmark: N concurrent GETs at a cold scale-to-zero app, measured beside
the same N GETs at it hot, in one run, with the same client, app and edge.

Starts, all on 127.0.0.1 and free ports, in its own temp dir:

    the store           --store redis: a redis-server (AOF off); --store cluster: a local
                        Redis Cluster (3 masters, a replica each, AOF appendfsync
                        everysec), redis+cluster:// URL; --store memory: none (memory://)
    edge controlplane   apps "stampede" and "limited": bench/apps/sample_app.py --start-delay S
    edge run            both scale_to_zero, --workers N, [budget] defaults; "stampede" with
                        idle_timeout --idle-timeout (so it goes back to sleep), "limited"
                        with max_concurrency --max-concurrency (32)

then fires, from one asyncio client (the same code every time, `fire`: every GET on a
fresh connection), four rows one after the other. In every row the client first opens
all N connections (waiting at most 8 s, under the edge's header_timeout; a connection
not made by then is an error of its request), then writes all N requests in one pass
(the barrier: the client does nothing else meanwhile). So every row starts with the N
connections made and measures only the requests: in the cold row they are held at the
edge before the app is ready, and in the hot row they meet it hot the same way.

    cold      --requests GETs at "stampede" asleep: one wake releases them all
    hot       at once after, the same --requests GETs at "stampede", now hot (then,
              only for comparison, the same N again old style: `hot_with_connect`)
    limited   --requests GETs at "limited" asleep (max_concurrency = 32)
    small     --small GETs (20) at "stampede" asleep again: the run first waits until the
              edge has put it to sleep (idle for --idle-timeout, drained, `cold` in the
              store) and one upkeep more (1.25 s), so every worker has seen it cold

What each row measures (ms; every time is time.time() on this one machine):

    connect               from the first connect to the barrier (all N connections made,
                          or the 8 s wait over): the client's connection setup, outside
                          every other figure
    wall                  from the fire (the first request written, right after the
                          barrier) to the last response's first byte (its headers; the
                          body is one short line)
    p50, p99              each 200's latency: its first byte minus its own send (the
                          moment its request was written; the pass over N takes some ms)
    app ready             the app's X-Ready-At: the moment it began answering 2xx
    ready_to_hot          app ready -> edge hot: the `at` of the Wake machine's `hot`
                          transition (/admin/apps), stamped by the wake's lease holder just
                          before it writes `hot` and releases the requests it holds (other
                          workers follow on the store's change notification)
    ready_to_first_byte   per held response (Server-Timing wake;dur): first byte - app ready
    release               app ready -> the last held response's first byte
    release_vs_hot        release / the hot row's wall: releasing N held requests against
                          serving N requests sent at once on open connections. Both start
                          with the connections made; the release also with the requests
                          read and held, the hot wall with them in flight on the wire
    wakes                 allocations the control plane created for the row's app in it
    errors                non-200 answers + client exceptions
    memory growth         peak minus baseline VmRSS of the edge workers (sampled every
                          50 ms), summed

Targets: wakes 1 in every cold row (and 0 in the hot row), errors 0 in every row (and
the old-style hot pass),
ready_to_hot_ms <= 10 (the cold row), release_vs_hot <= 1.25 (the cold row; judged only
at --requests >= 5000, null in targets_met below that), small ready_to_first_byte_p50_ms
<= 15. For scale: Knative's activator probes readiness every 200 ms (its queue-proxy
probes the container every 25 ms while it starts), OpenFaaS polls every 100 ms, Sablier
every 5 s.

The apps' `max_held` is raised to --requests by default (the per-app default, 1000 per
worker, would answer most of a 5,000-request stampede 503 hold_cap); --max-held sets it.
`hot_with_connect` (diagnostic, not a row): the hot N again right after the hot row,
old style: all let go at once, each GET written as soon as its own connection is made;
wall and p50/p99 from the let-go, so they hold the client's N connects (and the edge
accepting them while it serves the first ones). --dump FILE writes every
response's record (with its row) as JSON lines. --quick: 50 requests, the app starts in
0.3 s, idle timeout 3 s. The table also shows machine-wide listen-backlog overflows
(TcpExt ListenOverflows) of the cold row, before and after the app became ready.

Prints a table, writes JSON (--json FILE). Every process it starts (and every app
process the control plane started) is stopped on the way out, also on errors and
Ctrl-C.

    .venv/bin/python bench/stampede.py --json /tmp/stampede.json
    .venv/bin/python bench/stampede.py --json /tmp/stampede.json --store memory --workers 1
    .venv/bin/python bench/stampede.py --json /tmp/stampede.json --store cluster

JSON keys (--json FILE; times in ms unless named _s; null where nothing was measured):
    requests                 GETs fired in the cold, hot and limited rows
    store                    redis, memory or cluster
    workers                  edge worker processes
    start_delay_s            the apps' start time
    max_held                 the apps' max_held
    idle_timeout_s           "stampede"'s idle_timeout (it sleeps before the small row)
    max_concurrency          "limited"'s max_concurrency
    hot_wall_ms              the hot row: wall, p50, p99, connect
    hot_p50_ms
    hot_p99_ms
    hot_connect_ms
    hot_with_connect_wall_ms the old-style hot pass (connects in it): wall, p50, p99,
    hot_with_connect_p50_ms  errors (from the let-go)
    hot_with_connect_p99_ms
    hot_with_connect_errors
    release_ms               the cold row: release, release_vs_hot, ready_to_hot,
    release_vs_hot           ready_to_first_byte p50 and p99, wakes, errors, memory growth
    ready_to_hot_ms
    ready_to_first_byte_p50_ms
    ready_to_first_byte_p99_ms
    wakes
    errors
    memory_growth_mib
    cold                     each row: app, requests, max_concurrency, connect_ms, wall_ms,
    hot                          p50_ms, p99_ms, release_ms, release_vs_hot, ready_to_hot_ms,
    small                        ready_to_first_byte_p50_ms, ready_to_first_byte_p99_ms,
    limited                      wakes, errors, errors_by_kind, held, memory_growth_mib
    ok                       the cold row from here on: 200 answers
    errors_by_kind           errors by "status X-Edge-Error" or exception name
    statuses                 answers by status
    allocation_ids           the distinct X-Allocation-Id of the 200s
    missing_ready_at         200s without X-Ready-At
    held                     200s whose Server-Timing says they waited for the wake
    wake_wait_p50_ms         that wait (Server-Timing wake;dur): p50, max
    wake_wait_max_ms
    ready_after_fire_ms      from the fire to the app's X-Ready-At
    peak_concurrent_starts   most allocations planned/pulling/starting at once
    memory_growth_max_worker_mib   the largest growth of one worker
    memory_growth_by_worker_mib    growth by worker pid
    rss_before_mib           the workers' VmRSS before, summed; and at its peak
    rss_peak_mib
    rss_samples              VmRSS samples taken
    allocations              id, state, reason, created_at, updated_at of each (after the
                             hot row)
    tcp_counters_delta       machine-wide listen_overflows, listen_drops, tcp_retrans_segs
    listen_overflows_before_app_ready   of those, before the app was ready; and after
    listen_overflows_after_app_ready
    cp_polls                 control-plane polls, and those that failed
    cp_poll_errors
    edge_app_state           the app in /admin/apps after the cold row
    app_ready_at             X-Ready-At (unix time)
    cp_ready_after_app_ready_ms    timeline: control plane ready; first byte after edge hot
    first_byte_after_edge_hot_ms
    nofile_limit             RLIMIT_NOFILE of the client
    targets                  wakes, errors, ready_to_hot_ms, release_vs_hot,
                             small_ready_to_first_byte_p50_ms
    targets_met              each target (true, false; release_vs_hot null when not
                             judged), and all (of those judged)
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench_stack import (
    COLD_APP,
    COLD_HOST,
    STOP_SIGNALS,
    ControlPlane,
    Edge,
    Processes,
    add_quick,
    apply_quick,
    bench_cluster,
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
# The split client opens its connections for at most this long (s) before it sends:
# under the edge's header_timeout (10 s), so none is closed idle before its request.
CONNECT_WAIT = 8.0
STARTING_STATES = frozenset({"planned", "pulling", "starting"})
# The app with a concurrency limit (its own host, same program as COLD_APP).
LIMITED_APP = "limited"
LIMITED_HOST = f"{LIMITED_APP}.localhost"
TARGETS: dict[str, float] = {
    "wakes": 1,
    "errors": 0,
    "ready_to_hot_ms": 10,
    "release_vs_hot": 1.25,
    "small_ready_to_first_byte_p50_ms": 15,
}
# release_vs_hot is judged from this many requests on (below it, fixed costs dominate).
RELEASE_JUDGED_FROM = 5000
# One pass of every worker's wake upkeep (1 s) and some: each has re-read the store.
UPKEEP_SETTLE_S = 1.25
ROW_KEYS = (
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
)
QUICK = {"requests": 50, "start_delay": 0.3, "idle_timeout": 3.0, "timeout": 30.0}

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
    """GET /v1/allocations?app=APP every 50 ms: peak allocations starting at once, app pids."""

    def __init__(self, port: int, token: str, procs: Processes, app: str) -> None:
        super().__init__(name="cp-poller", daemon=True)
        self.port = port
        self.app = app
        self.headers = {"Authorization": f"Bearer {token}"}
        self.procs = procs
        self.peak_starting = 0
        self.polls = 0
        self.poll_errors = 0
        self.allocations: dict[str, dict[str, Any]] = {}
        # id -> the control plane's `updated_at` when this poller first saw it ready.
        self.ready_seen: dict[str, float] = {}
        self._stop_event = threading.Event()

    def poll(self) -> list[dict[str, Any]] | None:
        status, body = http_get(self.port, f"/v1/allocations?app={self.app}", self.headers, 2.0)
        if status != 200:
            self.poll_errors += 1
            return None
        self.polls += 1
        allocations = json.loads(body)["allocations"]
        starting = sum(1 for a in allocations if a["state"] in STARTING_STATES)
        self.peak_starting = max(self.peak_starting, starting)
        for a in allocations:
            self.allocations[a["id"]] = a
            if a["state"] == "ready":
                self.ready_seen.setdefault(a["id"], a["updated_at"])
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
    sent: float | None = None  # time.time() when the request was written
    first_byte: float | None = None  # time.time() when the response headers arrived
    ready_at: float | None = None  # X-Ready-At
    allocation: str | None = None  # X-Allocation-Id
    server_timing: str | None = None
    edge_error: str | None = None  # X-Edge-Error
    exception: str | None = None


def _result(status: int, sent: float | None, first_byte: float, headers: Any) -> Result:
    ready = headers.get("X-Ready-At")
    try:
        ready_at = float(ready) if ready else None
    except ValueError:
        ready_at = None
    return Result(
        status=status,
        sent=sent,
        first_byte=first_byte,
        ready_at=ready_at,
        allocation=headers.get("X-Allocation-Id"),
        server_timing=headers.get("Server-Timing"),
        edge_error=headers.get("X-Edge-Error"),
    )


class _Caseless(dict):
    """Header lookup by any case (keys stored lower-case)."""

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)


class _Exchange(asyncio.Protocol):
    """One HTTP/1.1 GET on its own connection: `send` writes it (stamping the moment),
    `data_received` stamps the first byte and parses the head. With `send_at_once` the
    request goes out as soon as the connection is made."""

    def __init__(self, request: bytes, done: asyncio.Future[Result], send_at_once: bool) -> None:
        self.request = request
        self.done = done
        self.send_at_once = send_at_once
        self.buffer = bytearray()
        self.sent: float | None = None
        self.first_byte: float | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.send_at_once:
            self.send()

    def send(self) -> None:
        assert self.transport is not None
        self.sent = time.time()
        self.transport.write(self.request)

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
        status = int(lines[0].split()[1])
        self.done.set_result(_result(status, self.sent, self.first_byte, headers))
        assert self.transport is not None
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionResetError("closed before the headers"))


class ConnectError(Exception):
    """The connection of a request was not made (in time)."""


@dataclass
class Fired:
    """What one stampede's client saw: when connecting began, when every connection was
    open (split only), the fire (the first request written) and each request's result."""

    connect_began: float
    connected_at: float | None
    fired_at: float
    results: list[Result]


async def fire(port: int, host: str, n: int, timeout: float, *, split: bool) -> Fired:
    """N GETs at `host`, each on its own connection, from one asyncio client.

    split (every row of the table): open all N connections first (at most CONNECT_WAIT),
    then write all N requests in one pass (the barrier: nothing else runs meanwhile);
    the fire is the first write. Not split (`hot_with_connect`, the old-style figure):
    all N let go at once, each written as soon as its own connection is made; the fire
    is the let-go. A connection not made in time counts as an error of its request."""
    loop = asyncio.get_running_loop()
    request = (
        f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: stampede\r\n\r\n"
    ).encode()
    done: list[asyncio.Future[Result]] = [loop.create_future() for _ in range(n)]
    exchanges = [_Exchange(request, future, not split) for future in done]

    async def connect(exchange: _Exchange) -> None:
        try:
            await loop.create_connection(lambda: exchange, "127.0.0.1", port)
        except Exception as exc:  # its request's error; the others go on
            if not exchange.done.done():
                exchange.done.set_exception(ConnectError(type(exc).__name__))

    connect_began = time.time()
    connects = [asyncio.ensure_future(connect(e)) for e in exchanges]
    connected_at = None
    if split:
        await asyncio.wait(connects, timeout=min(CONNECT_WAIT, timeout))
        connected_at = fired_at = time.time()
        for connecting in connects:
            connecting.cancel()  # not made in time: its request is not sent
        for exchange in exchanges:
            if exchange.transport is None and not exchange.done.done():
                exchange.done.set_exception(ConnectError("ConnectTimeout"))
        first = True
        for exchange in exchanges:
            if exchange.transport is not None and not exchange.done.done():
                if first:
                    fired_at, first = time.time(), False
                exchange.send()
    else:
        fired_at = connect_began
    await asyncio.wait(done, timeout=timeout)
    results = []
    for connecting, exchange in zip(connects, exchanges, strict=True):
        connecting.cancel()
        future = exchange.done
        if not future.done():
            future.cancel()
            results.append(Result(sent=exchange.sent, exception="Timeout"))
        elif future.exception() is not None:
            error = future.exception()
            name = f"connect:{error}" if isinstance(error, ConnectError) else type(error).__name__
            results.append(Result(sent=exchange.sent, exception=name))
        else:
            results.append(future.result())
        if exchange.transport is not None:
            exchange.transport.close()
    await asyncio.gather(*connects, return_exceptions=True)
    return Fired(connect_began, connected_at, fired_at, results)


async def guarded(coro: Any) -> Fired:
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
# One row: a stampede at one app
# --------------------------------------------------------------------------


@dataclass
class Stack:
    args: argparse.Namespace
    procs: Processes
    cp: ControlPlane
    edge: Edge
    token: str


@dataclass
class Run:
    """What one row's stampede left: its answers, and what the samplers saw meanwhile."""

    name: str
    app: str
    requests: int
    max_concurrency: int | None
    fired_at: float
    connect_began: float
    connected_at: float | None
    results: list[Result]
    known: set[str]  # the app's allocation ids before the row
    poller: ControlPlanePoller
    memory: dict[str, Any]
    overflows: list[tuple[float, int]]
    tcp_delta: dict[str, int]
    app_state: dict[str, Any] | None = None
    allocations: list[dict[str, Any]] = field(default_factory=list)

    def new_allocations(self) -> list[dict[str, Any]]:
        return [a for i, a in self.poller.allocations.items() if i not in self.known]


def app_state(edge: Edge, app: str) -> dict[str, Any] | None:
    """The app in the edge's /admin/apps (state, last transitions), or None."""
    status, body = http_get(edge.admin_port, "/admin/apps", timeout=2.0)
    if status != 200:
        return None
    with contextlib.suppress(ValueError, KeyError):
        return {a["name"]: a for a in json.loads(body)["apps"]}.get(app)
    return None


def stampede(
    stack: Stack,
    name: str,
    app: str,
    host: str,
    n: int,
    max_concurrency: int | None = None,
    *,
    split: bool = True,
) -> Run:
    """Fire `n` GETs at once at `host` (see `fire`) and sample the edge's memory and the
    app's allocations meanwhile; the analysis is left for later (rows follow each other
    fast)."""
    args = stack.args
    poller = ControlPlanePoller(stack.cp.port, stack.token, stack.procs, app)
    known = {a["id"] for a in poller.poll() or []}
    memory = MemorySampler(stack.edge.workers)
    memory.start()
    poller.start()
    how = "connect all, then send all" if split else "connect and send each at once"
    log(f"{name}: firing {n} GETs at {host} ({how})")
    tcp_before = tcp_counters()
    try:
        fired = asyncio.run(guarded(fire(stack.edge.port, host, n, args.timeout, split=split)))
    finally:
        tcp_after = tcp_counters()
        poller.stop()
        memory.stop()
    return Run(
        name=name,
        app=app,
        requests=n,
        max_concurrency=max_concurrency,
        fired_at=fired.fired_at,
        connect_began=fired.connect_began,
        connected_at=fired.connected_at,
        results=fired.results,
        known=known,
        poller=poller,
        memory=memory.result(),
        overflows=list(memory.overflows),
        # Machine-wide deltas over the row (other processes on the box count too).
        tcp_delta={k: v - tcp_before.get(k, 0) for k, v in tcp_after.items()},
    )


def wait_until_cold(stack: Stack, app: str, timeout: float) -> float:
    """Until the edge has put `app` to sleep (idle, drained, `cold` in the store) and one
    upkeep more has passed; the seconds it took. RuntimeError after `timeout`."""
    began = time.monotonic()
    deadline = began + timeout
    while time.monotonic() < deadline:
        state = app_state(stack.edge, app)
        if state is not None and state.get("state") == "cold":
            time.sleep(UPKEEP_SETTLE_S)
            return time.monotonic() - began
        time.sleep(0.1)
    raise RuntimeError(f"app {app} not put to sleep by the edge within {timeout:g}s")


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def ms(later: float | None, earlier: float | None) -> float | None:
    return None if later is None or earlier is None else round((later - earlier) * 1000, 3)


def hot_at(state: dict[str, Any] | None, since: float) -> float | None:
    """The first `hot` transition at or after `since` in the app's journal, as /admin/apps
    shows it (its newest ten)."""
    found = [
        t["at"]
        for t in (state or {}).get("transitions", [])
        if t.get("to_state") == "hot" and t.get("at", 0) >= since
    ]
    return min(found, default=None)


def failures_of(results: list[Result]) -> Counter[str]:
    failures: Counter[str] = Counter()
    for r in results:
        if r.exception is not None:
            failures[f"exception:{r.exception}"] += 1
        elif r.status != 200:
            failures[f"{r.status} {r.edge_error or '-'}"] += 1
    return failures


def row(run: Run, hot_wall_ms: float | None) -> dict[str, Any]:
    """The table's row of one stampede (see ROW_KEYS and the module's docstring)."""
    ok = [r for r in run.results if r.status == 200]
    first_bytes = [r.first_byte for r in run.results if r.first_byte is not None]
    split = run.connected_at is not None  # latency from each request's send, else the fire
    latencies = sorted(
        (r.first_byte - (r.sent if split and r.sent else run.fired_at)) * 1000
        for r in ok
        if r.first_byte
    )
    held = [r for r in ok if wake_wait_ms(r.server_timing) is not None]
    ready_at = min((r.ready_at for r in held if r.ready_at is not None), default=None)
    to_first_byte = sorted(
        (r.first_byte - r.ready_at) * 1000 for r in held if r.first_byte and r.ready_at
    )
    last_held = max((r.first_byte for r in held if r.first_byte), default=None)
    release = ms(last_held, ready_at)
    cold = not run.name.startswith("hot")
    return {
        "app": run.app,
        "requests": run.requests,
        "max_concurrency": run.max_concurrency,
        "connect_ms": ms(run.connected_at, run.connect_began),
        "wall_ms": ms(max(first_bytes, default=None), run.fired_at),
        "p50_ms": r3(percentile(latencies, 50)),
        "p99_ms": r3(percentile(latencies, 99)),
        "release_ms": release,
        "release_vs_hot": (
            round(release / hot_wall_ms, 3) if release is not None and hot_wall_ms else None
        ),
        "ready_to_hot_ms": ms(hot_at(run.app_state, run.fired_at), ready_at) if cold else None,
        "ready_to_first_byte_p50_ms": r3(percentile(to_first_byte, 50)),
        "ready_to_first_byte_p99_ms": r3(percentile(to_first_byte, 99)),
        "wakes": len(run.new_allocations()),
        "errors": len(run.results) - len(ok),
        "errors_by_kind": dict(failures_of(run.results).most_common()),
        "held": len(held),
        "memory_growth_mib": run.memory["memory_growth_mib"],
    }


def cold_details(run: Run) -> dict[str, Any]:
    """The cold row's diagnostics: answers, the wake's timeline, memory, TCP, samplers."""
    results = run.results
    ok = [r for r in results if r.status == 200]
    waits = sorted(w for w in (wake_wait_ms(r.server_timing) for r in ok) if w is not None)
    ready_at = min((r.ready_at for r in ok if r.ready_at is not None), default=None)
    cp_ready = min(
        (
            run.poller.ready_seen[a["id"]]
            for a in run.new_allocations()
            if a["id"] in run.poller.ready_seen
        ),
        default=None,
    )
    first = min((r.first_byte for r in ok if r.first_byte), default=None)
    details: dict[str, Any] = {
        "ok": len(ok),
        "errors_by_kind": dict(failures_of(results).most_common()),
        "statuses": dict(Counter(str(r.status) for r in results if r.status is not None)),
        "allocation_ids": sorted({r.allocation for r in ok if r.allocation}),
        "missing_ready_at": sum(1 for r in ok if r.ready_at is None),
        "held": len(waits),
        "wake_wait_p50_ms": r3(percentile(waits, 50)),
        "wake_wait_max_ms": r3(waits[-1] if waits else None),
        "ready_after_fire_ms": ms(ready_at, run.fired_at),
        "peak_concurrent_starts": run.poller.peak_starting,
        **{k: v for k, v in run.memory.items() if k != "memory_growth_mib"},
        "allocations": [
            {k: a.get(k) for k in ("id", "state", "reason", "created_at", "updated_at")}
            for a in run.allocations
        ],
        "tcp_counters_delta": run.tcp_delta,
        "listen_overflows_before_app_ready": None,
        "listen_overflows_after_app_ready": None,
        "cp_polls": run.poller.polls,
        "cp_poll_errors": run.poller.poll_errors,
        "edge_app_state": run.app_state,
        "app_ready_at": ready_at,
        "cp_ready_after_app_ready_ms": ms(cp_ready, ready_at),
        "first_byte_after_edge_hot_ms": ms(first, hot_at(run.app_state, run.fired_at)),
    }
    if ready_at is not None and run.overflows:
        # Before the app was ready only the edge's listener took connections; after, the
        # app's own listener too (the edge connecting to it for every held request).
        at_ready = max((n for t, n in run.overflows if t <= ready_at), default=None)
        first_n, last_n = run.overflows[0][1], run.overflows[-1][1]
        if at_ready is not None:
            details["listen_overflows_before_app_ready"] = at_ready - first_n
            details["listen_overflows_after_app_ready"] = last_n - at_ready
    return details


def targets_met(report: dict[str, Any]) -> dict[str, bool | None]:
    def at_most(value: float | None, key: str) -> bool:
        return value is not None and value <= TARGETS[key]

    cold_rows = [report[name] for name in ("cold", "small", "limited")]
    rows = [*cold_rows, report["hot"]]
    met: dict[str, bool | None] = {
        # And none in the hot row: had the app gone to sleep before it, it was no hot row.
        "wakes": all(r["wakes"] == TARGETS["wakes"] for r in cold_rows)
        and report["hot"]["wakes"] == 0,
        "errors": all(r["errors"] == TARGETS["errors"] for r in rows)
        and report["hot_with_connect_errors"] == TARGETS["errors"],
        "ready_to_hot_ms": at_most(report["ready_to_hot_ms"], "ready_to_hot_ms"),
        "release_vs_hot": (
            at_most(report["release_vs_hot"], "release_vs_hot")
            if report["requests"] >= RELEASE_JUDGED_FROM
            else None
        ),
        "small_ready_to_first_byte_p50_ms": at_most(
            report["small"]["ready_to_first_byte_p50_ms"], "small_ready_to_first_byte_p50_ms"
        ),
    }
    met["all"] = all(v for v in met.values() if v is not None)
    return met


def print_table(report: dict[str, Any]) -> None:
    columns = [
        ("N", "requests"),
        ("wall ms", "wall_ms"),
        ("p50 ms", "p50_ms"),
        ("p99 ms", "p99_ms"),
        ("release ms", "release_ms"),
        ("rel/hot", "release_vs_hot"),
        ("ready->hot", "ready_to_hot_ms"),
        ("ready->1st p50", "ready_to_first_byte_p50_ms"),
        ("wakes", "wakes"),
        ("errors", "errors"),
        ("mem MiB", "memory_growth_mib"),
    ]
    labels = {
        "hot": "hot",
        "cold": "cold",
        "limited": f"cold max_concurrency={report['max_concurrency']}",
        "small": f"small (N={report['small']['requests']})",
    }
    width = max(len(label) for label in labels.values())
    widths = [max(len(title), 9) for title, _ in columns]

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    print()
    print(
        f"{'':<{width}}  "
        + "  ".join(f"{t:>{w}}" for (t, _), w in zip(columns, widths, strict=True))
    )
    for name in ("hot", "cold", "limited", "small"):
        r = report[name]
        cells = "  ".join(f"{cell(r[k]):>{w}}" for (_, k), w in zip(columns, widths, strict=True))
        print(f"{labels[name]:<{width}}  {cells}")
    print()
    met = report["targets_met"]
    for key, target in TARGETS.items():
        relation = "==" if key in ("wakes", "errors") else "<="
        verdict = {True: "met", False: "NOT met", None: "not judged"}[met[key]]
        extra = f" (from N = {RELEASE_JUDGED_FROM})" if key == "release_vs_hot" else ""
        print(f"target {key} {relation} {target:g}{extra}: {verdict}")
    for name in ("cold", "hot", "limited", "small"):
        if report[name]["errors_by_kind"]:
            print(f"errors ({name}): {report[name]['errors_by_kind']}")
    print(
        f"cold: control plane ready {cell(report['cp_ready_after_app_ready_ms'])} ms after the "
        f"app, first byte {cell(report['first_byte_after_edge_hot_ms'])} ms after edge hot; "
        f"TCP (whole machine) {report['tcp_counters_delta']}"
    )
    print(
        f"hot row: connecting took {cell(report['hot_connect_ms'])} ms before the send; "
        f"old style (each GET connects and sends at once, from the let-go): wall "
        f"{cell(report['hot_with_connect_wall_ms'])} ms, p50 "
        f"{cell(report['hot_with_connect_p50_ms'])} ms, p99 "
        f"{cell(report['hot_with_connect_p99_ms'])} ms, errors "
        f"{report['hot_with_connect_errors']}"
    )
    print(f"all targets met: {met['all']}")


def edge_log_excerpt(log_path: Path, limit: int = 40) -> list[str]:
    lines = tail(log_path, 200_000).splitlines()
    keep = [
        line
        for line in lines
        if any(word in line.lower() for word in ("error", "fail", "refus", "traceback", "exc"))
    ]
    return keep[-limit:]


# --------------------------------------------------------------------------


def start_store(
    args: argparse.Namespace, procs: Processes, tmp: Path, stack: contextlib.ExitStack
) -> str:
    """The store's URL: a redis-server (`procs` stops it), a local Redis Cluster (`stack`
    stops it), or memory://."""
    if args.store == "redis":
        return start_redis(procs, tmp)
    if args.store == "cluster":
        cluster = stack.enter_context(bench_cluster(tmp, replicas=1, appendfsync="everysec"))
        log(f"redis cluster up in {cluster.start_seconds:.1f}s: {len(cluster.nodes)} nodes")
        return cluster.url
    return "memory://"


def run(
    args: argparse.Namespace, procs: Processes, tmp: Path, stack: contextlib.ExitStack
) -> dict[str, Any]:
    started = time.monotonic()
    nofile = raise_open_file_limit()
    if nofile < args.requests + 100:
        log(f"RLIMIT_NOFILE is {nofile}: fewer than --requests + 100 sockets; expect errors")
    token = secrets.token_hex(16)
    store = start_store(args, procs, tmp, stack)
    max_held = args.max_held if args.max_held is not None else max(1000, args.requests)
    idle = f"{args.idle_timeout:g}s"
    cp, edge = start_cold_app_stack(
        procs,
        tmp,
        token,
        store,
        args.workers,
        args.start_delay,
        (),
        {"max_held": max_held, "idle_timeout": idle},
        {LIMITED_APP: {"max_held": max_held, "max_concurrency": args.max_concurrency}},
    )
    log(f"edge ready: workers {edge.workers}, store {store}, max_held {max_held}")
    stack = Stack(args, procs, cp, edge, token)
    for app in (COLD_APP, LIMITED_APP):
        before = ControlPlanePoller(cp.port, token, procs, app).poll() or []
        if before:
            raise RuntimeError(f"app {app} is not cold: {len(before)} allocations already exist")

    # cold, then hot at once (nothing in between: "stampede" must not go idle meanwhile).
    cold = stampede(stack, "cold", COLD_APP, COLD_HOST, args.requests)
    hot = stampede(stack, "hot", COLD_APP, COLD_HOST, args.requests)
    # The same N again, old style (each connects and sends at once): the hot figure
    # with the client's connection setup in it, for comparison only.
    hot_connect = stampede(
        stack, "hot_with_connect", COLD_APP, COLD_HOST, args.requests, split=False
    )
    cold.app_state = hot.app_state = app_state(edge, COLD_APP)
    cold.allocations = list(hot.poller.allocations.values())
    if hot.new_allocations() or hot_connect.new_allocations():
        log(f"{COLD_APP} went to sleep before the hot row: raise --idle-timeout")
    # The limited row while "stampede" idles toward its sleep (which then takes the
    # edge's drain deadline, 5 s, too): the run is shorter, and nothing of it is timed.
    limited = stampede(
        stack, "limited", LIMITED_APP, LIMITED_HOST, args.requests, args.max_concurrency
    )
    limited.app_state = app_state(edge, LIMITED_APP)
    slept = wait_until_cold(stack, COLD_APP, args.idle_timeout + 30.0)
    log(f"{COLD_APP} asleep again {slept:.1f}s after the limited row")
    small = stampede(stack, "small", COLD_APP, COLD_HOST, args.small)
    small.app_state = app_state(edge, COLD_APP)
    runs = (cold, hot, hot_connect, small, limited)
    if args.dump:
        with open(args.dump, "w") as f:
            for r in runs:
                for result in r.results:
                    f.write(json.dumps({"row": r.name, **asdict(result)}) + "\n")

    hot_row = row(hot, None)
    hot_connect_row = row(hot_connect, None)
    rows = {r.name: row(r, hot_row["wall_ms"]) for r in (cold, small, limited)}
    small_row = rows["small"]
    small_row["release_vs_hot"] = None  # no hot row of that size to compare with
    cold_row = rows["cold"]
    report: dict[str, Any] = {
        "requests": args.requests,
        "store": args.store,
        "workers": args.workers,
        "start_delay_s": args.start_delay,
        "max_held": max_held,
        "idle_timeout_s": args.idle_timeout,
        "max_concurrency": args.max_concurrency,
        "hot_wall_ms": hot_row["wall_ms"],
        "hot_p50_ms": hot_row["p50_ms"],
        "hot_p99_ms": hot_row["p99_ms"],
        "hot_connect_ms": hot_row["connect_ms"],
        "hot_with_connect_wall_ms": hot_connect_row["wall_ms"],
        "hot_with_connect_p50_ms": hot_connect_row["p50_ms"],
        "hot_with_connect_p99_ms": hot_connect_row["p99_ms"],
        "hot_with_connect_errors": hot_connect_row["errors"],
        **{
            k: cold_row[k]
            for k in (
                "release_ms",
                "release_vs_hot",
                "ready_to_hot_ms",
                "ready_to_first_byte_p50_ms",
                "ready_to_first_byte_p99_ms",
                "wakes",
                "errors",
                "memory_growth_mib",
            )
        },
        "cold": cold_row,
        "hot": hot_row,
        "small": small_row,
        "limited": rows["limited"],
        **cold_details(cold),
        "nofile_limit": nofile,
        "targets": TARGETS,
    }
    report["targets_met"] = targets_met(report)
    rows_run = (cold_row, hot_row, hot_connect_row, small_row, rows["limited"])
    troubled = any(r["errors"] for r in rows_run) or not (
        report["targets_met"]["wakes"] and len(report["allocation_ids"]) == 1
    )
    report["edge_log"] = edge_log_excerpt(edge.log_path) if troubled else []
    report["controlplane_log"] = edge_log_excerpt(cp.log_path) if troubled else []
    report["machine"] = machine_info()
    report["quick"] = args.quick
    report["total_s"] = round(time.monotonic() - started, 3)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, metavar="FILE", help="write results here")
    parser.add_argument("--requests", type=int, default=5000, help="concurrent GETs (5000)")
    parser.add_argument("--small", type=int, default=20, help="GETs of the small row (20)")
    parser.add_argument("--start-delay", type=float, default=0.5, help="app start delay s (0.5)")
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=10.0,
        help="the app's idle_timeout s before the small row (10): longer than the gap "
        "from the cold row's last answer to the hot row's first request (seconds at 5,000)",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=32,
        help="max_concurrency of the limited row's app (32)",
    )
    parser.add_argument("--workers", type=int, default=2, help="edge worker processes (2)")
    parser.add_argument(
        "--store",
        choices=("redis", "memory", "cluster"),
        default="redis",
        help="redis: one redis-server (redis://); cluster: a local Redis Cluster "
        "(redis+cluster://); memory: memory://, --workers 1 only",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="bound on each stampede s")
    parser.add_argument(
        "--max-held",
        type=int,
        default=None,
        help="the apps' max_held per worker (default: max(1000, --requests))",
    )
    parser.add_argument(
        "--dump", metavar="FILE", help="also write every response's record (JSON lines)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    add_quick(parser, QUICK)
    args = parser.parse_args(argv)
    apply_quick(parser, args)
    if min(args.requests, args.small, args.workers, args.max_concurrency) < 1:
        parser.error("--requests, --small, --workers and --max-concurrency must be positive")
    if args.timeout <= 0 or args.idle_timeout <= 0:
        parser.error("--timeout and --idle-timeout must be positive")
    if args.store == "memory" and args.workers != 1:
        parser.error("--store memory needs --workers 1 (memory:// lives in one process)")

    tmp = Path(tempfile.mkdtemp(prefix="edge-stampede-"))
    procs = Processes(tmp)
    stack = contextlib.ExitStack()  # the cluster (--store cluster): stopped after the edge
    atexit.register(stack.close)  # atexit runs last in, first out: the processes first
    atexit.register(procs.stop_all)

    install_signal_handlers()
    try:
        report = run(args, procs, tmp, stack)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except RuntimeError as exc:
        log(f"failed: {exc}")
        return 1
    finally:
        procs.stop_all()
        stack.close()
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
