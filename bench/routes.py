#!/usr/bin/env python3
"""Route-table benchmark: snapshot apply cost, and the hot path during a route-change storm.

Two parts, one run, loopback only, bounded in time.

1. Snapshot apply (in this process, no I/O). A RouteSnapshot of --apps apps
   (half with one RouteTarget, half with two) is msgspec-encoded as the control
   plane sends it; the median over several runs of decode + ``from_snapshot``
   is ``snapshot_apply_ms``. Memory: tracemalloc, what the applied table keeps
   (``snapshot_memory_mib``) and the peak while applying, plus the RSS growth of
   a fresh subprocess that decodes and applies it. Then ``apply_changes`` with
   a batch of 1,000 changes on that table (copy-on-write: one dict copy, then
   the changes) is ``change_batch_1000_ms``.

2. Storm (real processes). ``edge controlplane`` (state file on /dev/shm when
   it exists) runs one allocation of app "hot" (bench/fast_upstream.py) plus
   --storm-apps route-only apps s0..sN; ``edge run --workers 1`` follows it, all
   apps scale_to_zero. wrk ``-t1 -c<connections> -d<duration>s --latency`` on
   Host hot.localhost measures the hot path quietly, then again while this
   process POSTs /v1/routes/cas (allocation_ids=[], the app's current epoch)
   at --storm-rate per second across the storm apps for the whole wrk run.
   The edge's applied epoch (/admin/routes) is compared with the control
   plane's (GET /v1/routes) at the end, and the edge's acked epoch is sampled
   from the control plane (GET /v1/edges) during the storm. A final quiet run
   shows whether the quiet figure drifted.

Without wrk (or with --python-loadgen) the built-in asyncio load generator
(bench_stack.py) takes its place. --quick: 500 apps, 2 runs, 1 s load runs at 8
connections without warm-up, 50 changes/s over 10 apps.

Prints a table, writes JSON (--json FILE). Every process it starts (and the app
process the control plane started) is stopped on the way out. Exits 1 when the
storm part failed (its keys are then left out of the JSON).

    .venv/bin/python bench/routes.py --json bench/results/routes.json
    .venv/bin/python bench/routes.py --json /tmp/r.json --apps 2000 --duration 3

JSON keys (--json FILE; times in ms unless named _s):
    snapshot_apps                 apps in the applied table (== --apps)
    snapshot_targets              their targets
    snapshot_wire_mib             the snapshot's JSON size
    snapshot_runs                 decode + apply runs
    snapshot_apply_ms             decode + from_snapshot: median, min, max
    snapshot_apply_min_ms
    snapshot_apply_max_ms
    snapshot_decode_ms            of which decoding (median)
    snapshot_build_ms             of which from_snapshot (median)
    snapshot_memory_mib           what the applied table keeps (tracemalloc)
    snapshot_peak_mib             the peak while decoding and applying
    snapshot_rss_delta_mib        RSS growth of a fresh interpreter applying it (null on error)
    snapshot_rss_note             why that probe failed, or null
    change_batch_1000_ms          apply_changes of 1,000 changes (median)
    change_batch_1000_decode_ms   decoding those changes (median)
    change_batch_1_ms             apply_changes of one change (median)
    targets_lookup_ns             one table.targets(app) lookup
    quiet                         the quiet load run: rps, requests, p50..p99_ms, non2xx,
                                  socket_errors, or error
    storm_load                    the load run during the storm (the same keys)
    quiet_after                   the quiet run after the storm (null with --no-after)
    p99_quiet_ms                  p99 of those three runs (null when one failed)
    p99_storm_ms
    p99_quiet_after_ms
    p50_quiet_ms                  p50 quiet and during the storm
    p50_storm_ms
    rps_quiet                     requests/s of the three runs
    rps_storm
    rps_quiet_after
    p99_storm_over_quiet          p99 during the storm / quiet
    storm_rate_requested          route changes/s asked for
    storm_requests                CAS requests sent
    storm_changes_applied         of which applied (200)
    storm_conflicts               of which 409 (another change came first)
    storm_errors                  of which failed otherwise (0 wanted)
    storm_error_examples          up to 5 of those failures
    storm_elapsed_s               the storm's duration
    storm_rate_achieved           applied changes/s
    storm_cas_p50_ms              CAS round trip: p50, p99
    storm_cas_p99_ms
    storm_apps                    apps the storm changed
    storm_concurrency             CAS requests in flight at most
    epoch_before_storm            the control plane's route epoch before the storm
    controlplane_epoch_end        its epoch when the storm ended
    edge_epoch_end                the edge's applied epoch then
    edge_epoch_lag_end            the difference
    edge_caught_up_s              until the edge applied the control plane's epoch (null:
                                  not within 10 s)
    edge_ack_lag_max_epochs       the edge's acked epoch behind the newest: max, p50, samples
    edge_ack_lag_p50_epochs
    edge_ack_lag_samples
    edge_resyncs_during_storm     full resyncs, refused updates and acks of the edge meanwhile
    edge_refused_during_storm
    edge_acks_during_storm
    cpu_percent_quiet             CPU % of edge worker, control plane, upstream, this client
    cpu_percent_storm
    storm_error                   why the storm part failed, or null
    targets                       p99_storm_over_quiet, storm_rate_min, edge_catch_up_s_max
    targets_met                   each target, and all
    machine                       nproc, cpu, python, platform, load average at the start
    duration_s                    seconds per load run
    warmup_s                      seconds of warm-up
    connections                   load connections
    load_generator                wrk and its version, or the built-in generator
    upstream                      what the hot app was
    state_dir                     where the control plane's state lived (/dev/shm or tmp)
    quick                         whether --quick sized the run
    elapsed_s                     the whole run's wall time
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import gc
import http.client
import json
import os
import random
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from bench_stack import (
    FAST_UPSTREAM,
    REPO,
    Load,
    Processes,
    add_load_options,
    add_quick,
    apply_quick,
    cp_app,
    fmt,
    http_get,
    install_signal_handlers,
    load_generator_name,
    logger,
    machine_info,
    percentile,
    r3,
    raise_open_file_limit,
    run_async,
    run_load,
    start_control_plane,
    start_edge,
    token_env,
    use_wrk,
    wait_until,
    warmup_s,
    write_json,
)

from edge.routing.route_table import apply_changes, from_snapshot
from scheduler_client.models import AppRoute, Region, RouteChange, RouteSnapshot, RouteTarget

HOT_APP = "hot"
HOT_HOST = "hot.localhost"
TARGETS: dict[str, float] = {"p99_storm_over_quiet": 2.0}
# The storm counts as delivered at this share of the requested rate.
STORM_RATE_SHARE = 0.95
# The edge has this long after the storm to reach the control plane's epoch.
CATCH_UP_TIMEOUT = 10.0
QUICK = {
    "apps": 500,
    "runs": 2,
    "storm_rate": 50.0,
    "duration": 1.0,
    "connections": 8,
    "storm_apps": 10,
    "storm_concurrency": 4,
    "warmup": 0.0,
}
_CURRENT_EPOCH = re.compile(rb"current (\d+)")


log = logger("routes")


# --------------------------------------------------------------------------
# Part 1: snapshot apply and change batches (sans-I/O)
# --------------------------------------------------------------------------


def build_snapshot(n: int, seed: int = 1) -> RouteSnapshot:
    """N apps, each with one or two ready targets, shaped like the control plane's."""
    rng = random.Random(seed)
    apps = []
    for i in range(n):
        targets = [
            RouteTarget(
                allocation_id=f"a-{rng.getrandbits(40):010x}",
                address=f"127.0.0.1:{rng.randrange(20000, 60000)}",
                state="ready",
            )
            for _ in range(1 + i % 2)
        ]
        apps.append(
            AppRoute(app=f"app-{i:05d}", epoch=i + 1, targets=targets, promoted_epoch=i + 1)
        )
    region = Region(name="local", state="eligible", reason="local region ready", version=5)
    return RouteSnapshot(epoch=n, apps=apps, region=region)


def build_changes(table_epoch: int, app_names: list[str], count: int, seed: int = 2) -> list:
    rng = random.Random(seed)
    changes = []
    for k in range(1, count + 1):
        app = rng.choice(app_names)
        target = RouteTarget(
            allocation_id=f"a-{rng.getrandbits(40):010x}",
            address=f"127.0.0.1:{rng.randrange(20000, 60000)}",
            state="ready",
        )
        route = AppRoute(app=app, epoch=table_epoch + k, targets=[target])
        changes.append(RouteChange(epoch=table_epoch + k, app=app, route=route))
    return changes


def timed_ms(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        gc.collect()
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def rss_probe(wire_path: str) -> int:
    """Subprocess mode: RSS growth of decode + from_snapshot in a fresh interpreter."""
    decoder = msgspec.json.Decoder(RouteSnapshot)
    raw = Path(wire_path).read_bytes()
    gc.collect()
    before = _rss_bytes()
    table = from_snapshot(decoder.decode(raw))
    gc.collect()
    after = _rss_bytes()
    print(json.dumps({"rss_before": before, "rss_after": after, "apps": len(table.apps)}))
    return 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def snapshot_part(n: int, runs: int, tmp: Path) -> dict[str, Any]:
    log(f"snapshot: building {n:,} apps")
    snapshot = build_snapshot(n)
    raw = msgspec.json.encode(snapshot)
    del snapshot
    decoder = msgspec.json.Decoder(RouteSnapshot)
    changes_decoder = msgspec.json.Decoder(list[RouteChange])

    decode_ms, build_ms, apply_ms = [], [], []
    for _ in range(runs):
        gc.collect()
        t0 = time.perf_counter()
        decoded = decoder.decode(raw)
        t1 = time.perf_counter()
        table = from_snapshot(decoded)
        t2 = time.perf_counter()
        decode_ms.append((t1 - t0) * 1000)
        build_ms.append((t2 - t1) * 1000)
        apply_ms.append((t2 - t0) * 1000)
        del decoded, table

    # What the applied table keeps, and the peak while decoding and applying.
    gc.collect()
    tracemalloc.start()
    decoded = decoder.decode(raw)
    table = from_snapshot(decoded)
    del decoded
    gc.collect()
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    rss: dict[str, Any] = {}
    wire_path = tmp / "snapshot.json"
    wire_path.write_bytes(raw)
    probe = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--rss-probe", str(wire_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    if probe.returncode == 0:
        rss = json.loads(probe.stdout)
        if rss.get("apps") != n:
            rss = {"error": f"probe applied {rss.get('apps')} apps, expected {n}"}
    else:
        rss = {"error": f"rss probe failed ({probe.returncode}): {probe.stderr[-300:]}"}
    wire_path.unlink(missing_ok=True)

    # Change batches on that table: copy-on-write of the app dict, then the changes.
    names = list(table.apps)
    batch = build_changes(table.epoch, names, 1000)
    one = batch[:1]
    results = [apply_changes(table, batch), apply_changes(table, one)]
    if any(r.outcome.value != "applied" or r.refused for r in results):
        raise RuntimeError(f"change batch not applied cleanly: {results[0].outcome}")
    if results[0].table.epoch != table.epoch + 1000:
        raise RuntimeError("change batch applied to the wrong epoch")
    batch_ms = timed_ms(lambda: apply_changes(table, batch), runs * 3)
    single_ms = timed_ms(lambda: apply_changes(table, one), runs * 3)
    batch_wire = msgspec.json.encode(batch)
    batch_decode_ms = timed_ms(lambda: changes_decoder.decode(batch_wire), runs * 3)

    # The per-request lookup the hot path does.
    lookups = 200_000
    name = names[len(names) // 2]
    started = time.perf_counter()
    for _ in range(lookups):
        table.targets(name)
    lookup_ns = (time.perf_counter() - started) / lookups * 1e9

    mib = 1024 * 1024
    return {
        "snapshot_apps": len(table.apps),
        "snapshot_targets": sum(len(r.targets) for r in table.apps.values()),
        "snapshot_wire_mib": r3(len(raw) / mib),
        "snapshot_runs": runs,
        "snapshot_apply_ms": r3(statistics.median(apply_ms)),
        "snapshot_apply_min_ms": r3(min(apply_ms)),
        "snapshot_apply_max_ms": r3(max(apply_ms)),
        "snapshot_decode_ms": r3(statistics.median(decode_ms)),
        "snapshot_build_ms": r3(statistics.median(build_ms)),
        "snapshot_memory_mib": r3(retained / mib),
        "snapshot_peak_mib": r3(peak / mib),
        "snapshot_rss_delta_mib": (
            r3((rss["rss_after"] - rss["rss_before"]) / mib) if "error" not in rss else None
        ),
        "snapshot_rss_note": rss.get("error"),
        "change_batch_1000_ms": r3(statistics.median(batch_ms)),
        "change_batch_1000_decode_ms": r3(statistics.median(batch_decode_ms)),
        "change_batch_1_ms": r3(statistics.median(single_ms)),
        "targets_lookup_ns": round(lookup_ns, 1),
    }


# --------------------------------------------------------------------------
# Part 2: processes
# --------------------------------------------------------------------------


def api(
    port: int, token: str, method: str, path: str, body: Any = None, timeout: float = 5.0
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def app_spec(name: str) -> dict[str, Any]:
    return cp_app(name, FAST_UPSTREAM, readiness="/", start_timeout="15s", drain_grace="1s")


@dataclass
class Setup:
    cp_port: int
    cp_proc: subprocess.Popen
    edge_port: int
    admin_port: int
    edge_proc: subprocess.Popen
    edge_workers: list[int]
    allocation_id: str
    app_pid: int | None
    token: str
    storm_apps: list[str]


def start_all(procs: Processes, tmp: Path, state_dir: Path, storm_apps: int) -> Setup:
    token = secrets.token_hex(16)
    env = token_env(token)
    names = [f"s{i}" for i in range(storm_apps)]

    apps = [app_spec(HOT_APP), *(app_spec(n) for n in names)]
    cp = start_control_plane(procs, tmp, env, apps, state_dir, max_allocations=4)
    status, alloc = api(cp.port, token, "POST", "/v1/allocations", {"app": HOT_APP})
    if status not in (200, 201):
        raise RuntimeError(f"POST /v1/allocations answered {status}: {alloc}")
    allocation_id = alloc["id"]

    def ready() -> bool:
        nonlocal alloc
        _, alloc = api(cp.port, token, "GET", f"/v1/allocations/{allocation_id}")
        if alloc["pid"]:
            procs.app_pids.add(alloc["pid"])
        if alloc["state"] in ("failed", "stopped"):
            raise RuntimeError(f"allocation {allocation_id} {alloc['state']}: {alloc['reason']}")
        return alloc["state"] == "ready"

    wait_until("hot allocation", ready, cp.proc, cp.log_path)
    log(f"control plane on :{cp.port}, allocation {allocation_id} at {alloc['address']}")

    entry = {"scale_to_zero": True, "hold_timeout": "10s", "readiness_timeout": "10s"}
    edge_config = {
        "edge": {"workers": 1, "store": "memory://"},
        "control_plane": {"url": f"http://127.0.0.1:{cp.port}"},
        "apps": [
            {"name": HOT_APP, "hosts": [HOT_HOST], **entry},
            *({"name": n, "hosts": [f"{n}.localhost"], **entry} for n in names),
        ],
    }

    def hot_and_routed(port: int, admin_port: int) -> bool:
        status, body = http_get(admin_port, "/readyz", timeout=1.0)
        if status != 200 or json.loads(body).get("route_epoch") is None:
            return False
        return http_get(port, "/", headers={"Host": HOT_HOST}, timeout=2.0)[0] == 200

    edge = start_edge(procs, tmp, env, edge_config, hot_and_routed)
    log(f"edge on :{edge.port} (admin :{edge.admin_port}), worker pids {edge.workers}")
    return Setup(
        cp.port,
        cp.proc,
        edge.port,
        edge.admin_port,
        edge.proc,
        edge.workers,
        allocation_id,
        alloc.get("pid"),
        token,
        names,
    )


def stop_allocation(setup: Setup) -> None:
    """Stop the hot app through the control plane (it outlives the control plane by design)."""
    with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
        api(setup.cp_port, setup.token, "POST", f"/v1/allocations/{setup.allocation_id}/stop")
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            _, alloc = api(
                setup.cp_port, setup.token, "GET", f"/v1/allocations/{setup.allocation_id}"
            )
            if alloc["state"] in ("stopped", "failed"):
                return
            time.sleep(0.1)


# --------------------------------------------------------------------------
# CPU accounting (context for the figures on a small box)
# --------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    def __init__(self, setup: Setup) -> None:
        self.groups = {
            "edge_worker": setup.edge_workers or [setup.edge_proc.pid],
            "controlplane": [setup.cp_proc.pid],
            "upstream": [setup.app_pid] if setup.app_pid else [],
        }

    def read(self) -> dict[str, float]:
        now = {name: cpu_seconds(pids) for name, pids in self.groups.items()}
        now["bench_client"] = self_cpu()
        now["wall"] = time.monotonic()
        return now

    @staticmethod
    def percent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        wall = after["wall"] - before["wall"]
        return {
            k: round(100 * (after[k] - before[k]) / wall, 1) for k in before if k != "wall" and wall
        }


# --------------------------------------------------------------------------
# Storm client: keep-alive HTTP/1.1 on asyncio streams (cheap, so the client
# takes as little CPU from the system under test as it can)
# --------------------------------------------------------------------------


class Conn:
    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.auth = f"Authorization: Bearer {token}\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + self.auth
        if body:
            head += b"Content-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n".encode()
        try:
            self.writer.write(head + body)
            raw_head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(raw_head.split(b" ", 2)[1])
            length = 0
            close = False
            for line in raw_head.split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                key = key.strip().lower()
                if key == b"content-length":
                    length = int(value)
                elif key == b"connection" and value.strip().lower() == b"close":
                    close = True
            payload = await self.reader.readexactly(length)
        except BaseException:
            self.close()
            raise
        if close:
            self.close()
        return status, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@dataclass
class StormResult:
    requested: int = 0
    applied: int = 0
    conflicts: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    last_epoch: int = 0
    cas_latencies: list[float] | None = None
    lag_samples: list[int] | None = None
    error_examples: list[str] | None = None


async def storm(
    port: int,
    token: str,
    apps: list[str],
    rate: float,
    duration: float,
    concurrency: int,
    epochs: dict[str, int],
) -> StormResult:
    loop = asyncio.get_running_loop()
    result = StormResult(cas_latencies=[], lag_samples=[], error_examples=[])
    encoder = msgspec.json.Encoder()
    started = loop.time()
    end = started + duration
    next_slot = 0
    stop_sampling = asyncio.Event()

    async def worker() -> None:
        nonlocal next_slot
        conn = Conn(port, token)
        try:
            while True:
                slot = next_slot
                next_slot += 1
                due = started + slot / rate
                if due >= end:
                    return
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                # Behind schedule: go straight on; the concurrency bounds the catch-up.
                app = apps[slot % len(apps)]
                body = encoder.encode(
                    {"app": app, "expected_epoch": epochs[app], "allocation_ids": []}
                )
                result.requested += 1
                sent = time.perf_counter()
                try:
                    status, payload = await asyncio.wait_for(
                        conn.request("POST", "/v1/routes/cas", body), 5.0
                    )
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                    result.errors += 1
                    if len(result.error_examples) < 5:
                        result.error_examples.append(repr(exc))
                    continue
                result.cas_latencies.append(time.perf_counter() - sent)
                if status == 200:
                    epoch = msgspec.json.decode(payload)["epoch"]
                    epochs[app] = epoch
                    result.applied += 1
                    result.last_epoch = max(result.last_epoch, epoch)
                elif status == 409:
                    result.conflicts += 1
                    m = _CURRENT_EPOCH.search(payload)
                    if m:
                        epochs[app] = int(m.group(1))
                else:
                    result.errors += 1
                    if len(result.error_examples) < 5:
                        result.error_examples.append(f"{status}: {payload[:200]!r}")
        finally:
            conn.close()

    async def sample_lag() -> None:
        """The edge's acked epoch vs the newest epoch the storm saw, from the control plane."""
        conn = Conn(port, token)
        try:
            while not stop_sampling.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop_sampling.wait(), 0.25)
                newest = result.last_epoch
                try:
                    status, payload = await asyncio.wait_for(conn.request("GET", "/v1/edges"), 5.0)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                    continue
                if status == 200 and newest:
                    edges = msgspec.json.decode(payload)["edges"]
                    acked = min((e["acked_epoch"] for e in edges if e["live"]), default=0)
                    result.lag_samples.append(max(0, newest - acked))
        finally:
            conn.close()

    sampler = loop.create_task(sample_lag())
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        result.elapsed_s = loop.time() - started
        stop_sampling.set()
        await sampler
    return result


def pct(values: list[float], q: float) -> float | None:
    return percentile(values, q * 100)


def storm_part(args: argparse.Namespace, procs: Processes, tmp: Path, state_dir: Path):
    setup = start_all(procs, tmp, state_dir, args.storm_apps)
    try:
        return _measure(args, setup)
    finally:
        stop_allocation(setup)


def _edge_routes(setup: Setup) -> dict[str, Any]:
    status, body = http_get(setup.admin_port, "/admin/routes", timeout=5.0)
    if status != 200:
        raise RuntimeError(f"/admin/routes answered {status}: {body[:200]!r}")
    return json.loads(body)


def _cp_epoch(setup: Setup) -> int:
    status, snap = api(setup.cp_port, setup.token, "GET", "/v1/routes")
    if status != 200:
        raise RuntimeError(f"GET /v1/routes answered {status}: {snap}")
    return snap["epoch"]


def _measure(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    meter = CpuMeter(setup)
    duration, conns, wrk = args.duration, args.connections, args.wrk
    if args.warmup > 0:
        log(f"warm-up {args.warmup:g}s")
        run_load(setup.edge_port, args.warmup, conns, HOT_HOST, wrk)

    log(f"quiet: {duration:g}s at {conns} connections")
    before = meter.read()
    quiet = run_load(setup.edge_port, duration, conns, HOT_HOST, wrk)
    quiet_cpu = CpuMeter.percent(before, meter.read())
    log(f"quiet: {quiet.get('rps')} rps, p99 {quiet.get('p99_ms')} ms")

    status, snap = api(setup.cp_port, setup.token, "GET", "/v1/routes")
    if status != 200:
        raise RuntimeError(f"GET /v1/routes answered {status}: {snap}")
    epochs = {a: 0 for a in setup.storm_apps}
    for route in snap["apps"]:
        if route["app"] in epochs:
            epochs[route["app"]] = route["epoch"]
    start_epoch = snap["epoch"]
    routes_before = _edge_routes(setup)

    log(f"storm: {args.storm_rate:g} CAS/s on {len(setup.storm_apps)} apps during {duration:g}s")
    before = meter.read()
    load = Load(setup.edge_port, duration, conns, HOT_HOST, wrk)
    try:
        result: StormResult = run_async(
            storm(
                setup.cp_port,
                setup.token,
                setup.storm_apps,
                args.storm_rate,
                # The load generator counts its own start-up; end the storm with it.
                float(load.duration),
                args.storm_concurrency,
                epochs,
            )
        )
    finally:
        loaded = load.result()
    storm_cpu = CpuMeter.percent(before, meter.read())

    # Where the edge stands the moment the storm ends, then how long it takes to catch up.
    cp_epoch_end = _cp_epoch(setup)
    edge_end = _edge_routes(setup)
    edge_epoch_end = edge_end["applied_epoch"]
    caught_up_s: float | None = 0.0 if edge_epoch_end == cp_epoch_end else None
    t0 = time.monotonic()
    edge_now = edge_end
    while caught_up_s is None and time.monotonic() - t0 < CATCH_UP_TIMEOUT:
        time.sleep(0.05)
        edge_now = _edge_routes(setup)
        if edge_now["applied_epoch"] >= cp_epoch_end:
            caught_up_s = time.monotonic() - t0
    log(
        f"storm: {result.applied} applied in {result.elapsed_s:.1f}s, "
        f"{loaded.get('rps')} rps, p99 {loaded.get('p99_ms')} ms; "
        f"edge epoch {edge_epoch_end} vs control plane {cp_epoch_end}"
    )

    after_quiet: dict[str, Any] = {}
    if not args.no_after:
        time.sleep(1.0)
        log(f"quiet again: {duration:g}s")
        after_quiet = run_load(setup.edge_port, duration, conns, HOT_HOST, wrk)
        log(f"quiet again: {after_quiet.get('rps')} rps, p99 {after_quiet.get('p99_ms')} ms")

    lags = result.lag_samples or []
    latencies = result.cas_latencies or []
    applied_rate = result.applied / result.elapsed_s if result.elapsed_s else 0.0
    p99_quiet = None if quiet.get("error") else quiet.get("p99_ms")
    p99_storm = None if loaded.get("error") else loaded.get("p99_ms")
    return {
        "quiet": quiet,
        "storm_load": loaded,
        "quiet_after": after_quiet or None,
        "p99_quiet_ms": p99_quiet,
        "p99_storm_ms": p99_storm,
        "p99_quiet_after_ms": after_quiet.get("p99_ms") if after_quiet else None,
        "p50_quiet_ms": quiet.get("p50_ms"),
        "p50_storm_ms": loaded.get("p50_ms"),
        "rps_quiet": quiet.get("rps"),
        "rps_storm": loaded.get("rps"),
        "rps_quiet_after": after_quiet.get("rps") if after_quiet else None,
        "p99_storm_over_quiet": (
            round(p99_storm / p99_quiet, 3) if p99_quiet and p99_storm is not None else None
        ),
        "storm_rate_requested": args.storm_rate,
        "storm_requests": result.requested,
        "storm_changes_applied": result.applied,
        "storm_conflicts": result.conflicts,
        "storm_errors": result.errors,
        "storm_error_examples": result.error_examples,
        "storm_elapsed_s": round(result.elapsed_s, 3),
        "storm_rate_achieved": round(applied_rate, 1),
        "storm_cas_p50_ms": r3((pct(latencies, 0.5) or 0) * 1000) if latencies else None,
        "storm_cas_p99_ms": r3((pct(latencies, 0.99) or 0) * 1000) if latencies else None,
        "storm_apps": len(setup.storm_apps),
        "storm_concurrency": args.storm_concurrency,
        "epoch_before_storm": start_epoch,
        "controlplane_epoch_end": cp_epoch_end,
        "edge_epoch_end": edge_epoch_end,
        "edge_epoch_lag_end": cp_epoch_end - edge_epoch_end,
        "edge_caught_up_s": r3(caught_up_s),
        "edge_ack_lag_max_epochs": max(lags) if lags else None,
        "edge_ack_lag_p50_epochs": pct(lags, 0.5) if lags else None,
        "edge_ack_lag_samples": len(lags),
        "edge_resyncs_during_storm": edge_now["resyncs"] - routes_before["resyncs"],
        "edge_refused_during_storm": edge_now["refused_updates"] - routes_before["refused_updates"],
        "edge_acks_during_storm": edge_now["acks"] - routes_before["acks"],
        "cpu_percent_quiet": quiet_cpu,
        "cpu_percent_storm": storm_cpu,
        "warmup_s": args.warmup,
    }


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def print_table(report: dict[str, Any]) -> None:
    rows = [
        ("snapshot apps", fmt(report.get("snapshot_apps"), ",")),
        ("snapshot wire MiB", fmt(report.get("snapshot_wire_mib"))),
        ("snapshot apply ms (median)", fmt(report.get("snapshot_apply_ms"))),
        (
            "  decode / build ms",
            f"{fmt(report.get('snapshot_decode_ms'))} / {fmt(report.get('snapshot_build_ms'))}",
        ),
        ("snapshot memory MiB (kept)", fmt(report.get("snapshot_memory_mib"))),
        (
            "  peak / RSS delta MiB",
            f"{fmt(report.get('snapshot_peak_mib'))} / {fmt(report.get('snapshot_rss_delta_mib'))}",
        ),
        ("change batch 1000 ms", fmt(report.get("change_batch_1000_ms"))),
        ("change batch 1 ms", fmt(report.get("change_batch_1_ms"))),
        ("targets() lookup ns", fmt(report.get("targets_lookup_ns"))),
        ("", ""),
        (
            "hot path quiet rps / p99 ms",
            f"{fmt(report.get('rps_quiet'), ',.0f')} / {fmt(report.get('p99_quiet_ms'))}",
        ),
        (
            "hot path storm rps / p99 ms",
            f"{fmt(report.get('rps_storm'), ',.0f')} / {fmt(report.get('p99_storm_ms'))}",
        ),
        (
            "quiet again rps / p99 ms",
            f"{fmt(report.get('rps_quiet_after'), ',.0f')} / "
            f"{fmt(report.get('p99_quiet_after_ms'))}",
        ),
        ("p99 storm / quiet", fmt(report.get("p99_storm_over_quiet"))),
        (
            "storm rate requested/achieved",
            f"{fmt(report.get('storm_rate_requested'))} / {fmt(report.get('storm_rate_achieved'))}",
        ),
        (
            "storm applied/conflicts/errors",
            f"{fmt(report.get('storm_changes_applied'))} / "
            f"{fmt(report.get('storm_conflicts'))} / {fmt(report.get('storm_errors'))}",
        ),
        (
            "CAS latency p50 / p99 ms",
            f"{fmt(report.get('storm_cas_p50_ms'))} / {fmt(report.get('storm_cas_p99_ms'))}",
        ),
        (
            "epoch end: control plane/edge",
            f"{fmt(report.get('controlplane_epoch_end'))} / {fmt(report.get('edge_epoch_end'))}",
        ),
        ("edge caught up after s", fmt(report.get("edge_caught_up_s"))),
        ("edge ack lag max epochs", fmt(report.get("edge_ack_lag_max_epochs"))),
        ("edge resyncs during storm", fmt(report.get("edge_resyncs_during_storm"))),
        ("CPU % quiet", json.dumps(report.get("cpu_percent_quiet"))),
        ("CPU % storm", json.dumps(report.get("cpu_percent_storm"))),
    ]
    print()
    for name, value in rows:
        print(f"{name:<32}{value}")
    print()
    for key, met in (report.get("targets_met") or {}).items():
        if key != "all":
            print(f"target {key:<24} {'met' if met else 'NOT met'}")


def targets_met(report: dict[str, Any], rate: float) -> dict[str, bool]:
    ratio = report.get("p99_storm_over_quiet")
    achieved = report.get("storm_rate_achieved") or 0
    met = {
        "p99_storm_over_quiet": ratio is not None and ratio <= TARGETS["p99_storm_over_quiet"],
        "storm_rate": achieved >= STORM_RATE_SHARE * rate,
        "edge_caught_up": report.get("edge_caught_up_s") is not None,
    }
    met["all"] = all(met.values())
    return met


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--rss-probe":
        return rss_probe(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path, help="write results here")
    parser.add_argument("--apps", type=int, default=10_000, help="apps in the snapshot")
    parser.add_argument("--storm-rate", type=float, default=1000.0, help="route changes/s")
    add_load_options(parser, 10.0)
    parser.add_argument("--storm-apps", type=int, default=300, help="apps the storm changes")
    parser.add_argument(
        "--storm-concurrency", type=int, default=16, help="CAS requests in flight at most"
    )
    parser.add_argument("--runs", type=int, default=7, help="snapshot apply runs (median)")
    parser.add_argument("--no-after", action="store_true", help="skip the final quiet run")
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs (logs, configs)")
    add_quick(parser, QUICK)
    args = parser.parse_args(argv)
    apply_quick(parser, args)
    positive = (args.apps, args.storm_rate, args.duration, args.connections, args.runs)
    if min(positive) <= 0 or args.storm_apps < 1 or args.storm_concurrency < 1:
        parser.error("counts, rates and durations must be positive")
    if args.storm_apps <= args.storm_concurrency:
        parser.error("--storm-apps must exceed --storm-concurrency (or CAS requests collide)")
    args.warmup = warmup_s(args)
    args.wrk = use_wrk(args.python_loadgen)
    if not args.wrk:
        log("built-in asyncio load generator (no wrk, or --python-loadgen): not comparable")

    started = time.monotonic()
    info = machine_info()
    raise_open_file_limit()
    tmp = Path(tempfile.mkdtemp(prefix="edge-routes-"))
    shm = Path("/dev/shm")
    state_dir = Path(tempfile.mkdtemp(prefix="edge-routes-", dir=shm if shm.is_dir() else tmp))
    procs = Processes(tmp)
    atexit.register(procs.stop_all)
    install_signal_handlers()

    report: dict[str, Any] = {"storm_error": None}
    failed = False
    try:
        report.update(snapshot_part(args.apps, args.runs, tmp))
        log(
            f"snapshot: {report['snapshot_apps']:,} apps applied in {report['snapshot_apply_ms']} "
            f"ms, {report['snapshot_memory_mib']} MiB; 1000 changes in "
            f"{report['change_batch_1000_ms']} ms"
        )
        try:
            report.update(storm_part(args, procs, tmp, state_dir))
        except (RuntimeError, OSError, subprocess.SubprocessError, KeyError, ValueError) as exc:
            failed = True
            report["storm_error"] = f"{exc.__class__.__name__}: {exc}"
            log(f"storm failed: {report['storm_error']}")
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        procs.stop_all()
        if args.keep or failed:
            log(f"kept {tmp} and {state_dir}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(state_dir, ignore_errors=True)

    report["targets"] = {
        **TARGETS,
        "storm_rate_min": STORM_RATE_SHARE * args.storm_rate,
        "edge_catch_up_s_max": CATCH_UP_TIMEOUT,
    }
    report["targets_met"] = targets_met(report, args.storm_rate)
    report.update(
        {
            "machine": info,
            "duration_s": args.duration,
            "connections": args.connections,
            "load_generator": load_generator_name(args.wrk),
            "upstream": "bench/fast_upstream.py (allocation of the control plane)",
            "state_dir": "/dev/shm" if shm.is_dir() else "tmp",
            "quick": args.quick,
            "elapsed_s": round(time.monotonic() - started, 1),
        }
    )
    print_table(report)
    # A failed storm leaves its keys out: the file says why (storm_error).
    write_json(args.json, report, __doc__, strict=not failed)
    log(f"wrote {args.json} ({report['elapsed_s']}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
