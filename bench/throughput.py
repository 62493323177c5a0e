#!/usr/bin/env python3
"""Throughput benchmark: edge vs nginx vs a naive aiohttp proxy, loopback only.

One run, one machine, bounded in time. A fast upstream (nginx ``return 200``
with a 1 KiB body, or ``bench/fast_upstream.py`` when nginx is absent), then in
turn, each under wrk ``-t1 -c<connections> -d<duration>s --latency`` after a
short warm-up, all with ``Host: bench.localhost``:

    direct           straight to the upstream
    nginx_proxy_1w   nginx reverse proxy, 1 worker, upstream keepalive
    naive_1w         bench/naive_proxy.py (aiohttp server + one ClientSession)
    edge_1w          edge run --workers 1 (store memory://)
    nginx_proxy_2w   nginx reverse proxy, 2 workers
    edge_2w          edge run --workers 2 (store: a redis-server of its own)

Without wrk the built-in asyncio load generator runs (bench_stack.py); without
nginx its rows are skipped. When root and not --quick, it installs Debian's nginx
and wrk if missing; --quick installs nothing and uses what is there (``tools``,
``peers``). Prints a table and the ratios, writes JSON (``--json FILE``). Every
process it starts is stopped on the way out, including on errors and Ctrl-C.

    .venv/bin/python bench/throughput.py --json bench/results/latest.json
    .venv/bin/python bench/throughput.py --json /tmp/smoke.json --quick
    .venv/bin/python bench/throughput.py --json /tmp/limit.json --max-concurrency 10000

JSON keys (--json FILE):
    edge_rps         requests/s of edge_1w (null when the row failed; so each *_rps, *_p99_ms)
    nginx_rps        of nginx_proxy_1w (null too when nginx is not installed)
    naive_rps        of naive_1w
    direct_rps       of direct (the upstream alone)
    edge_p99_ms      p99 latency of edge_1w, ms
    nginx_p99_ms     of nginx_proxy_1w
    naive_p99_ms     of naive_1w
    edge_2w_rps      of edge_2w
    nginx_2w_rps     of nginx_proxy_2w
    rows             each row by name: rps, requests, p50..p99_ms, non2xx, socket_errors,
                     or error; null for a row skipped
    peers            the rows that ran, in order
    ratios           edge_1w/nginx_proxy_1w, edge_1w/naive_1w, ... (null without both)
    targets          edge_vs_nginx, edge_vs_naive (rps ratios), edge_p99_ms
    targets_met      each target, and all
    machine          nproc, cpu, python, platform, load average at the start
    duration_s       seconds per measured row
    warmup_s         seconds of warm-up per row
    connections      load connections
    load_generator   wrk and its version, or the built-in generator
    tools            path of wrk and nginx, null when not installed
    upstream         what the upstream was
    nginx_version    nginx -v, null without nginx
    host_header      the Host every request named
    body_bytes       the upstream's response body size
    notes            what was missing, installed or fell back
    quick            whether --quick sized the run
    elapsed_s        the whole run's wall time
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_stack import (
    BENCH,
    FAST_UPSTREAM,
    NGINX_PROXY_BODY,
    NGINX_UPSTREAM_BODY,
    Processes,
    add_load_options,
    add_quick,
    answers_200,
    apply_quick,
    find_edge,
    find_tool,
    fmt,
    free_port,
    install_signal_handlers,
    load_generator_name,
    logger,
    machine_info,
    run_load,
    start_edge,
    start_nginx,
    start_redis,
    tool_version,
    use_wrk,
    venv_python,
    wait_until,
    warmup_s,
    write_json,
)

HOST_HEADER = "bench.localhost"
BODY_SIZE = 1024
READY_TIMEOUT = 15.0
TARGETS = {"edge_vs_nginx": 0.40, "edge_vs_naive": 3.0, "edge_p99_ms": 3.0}
ROW_ORDER = ("direct", "nginx_proxy_1w", "naive_1w", "edge_1w", "nginx_proxy_2w", "edge_2w")
QUICK = {"duration": 1.0, "connections": 8, "warmup": 0.0}

log = logger("bench")


# --------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------


def ensure_tools() -> list[str]:
    notes: list[str] = []
    missing = [t for t in ("nginx", "wrk") if not find_tool(t)]
    if not missing:
        return notes
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        notes.append(f"missing {', '.join(missing)} and cannot apt-get install (not root)")
        return notes
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "nginx-light", "wrk"]
    log(f"installing {' '.join(missing)} with apt-get")
    try:
        if subprocess.run(install, env=env, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=600)
            subprocess.run(install, env=env, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        notes.append(f"apt-get failed: {exc}")
    still = [t for t in ("nginx", "wrk") if not find_tool(t)]
    if still:
        notes.append(f"still missing after apt-get: {', '.join(still)}")
    return notes


# --------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------


@dataclass
class Bench:
    procs: Processes
    tmp: Path
    duration: float
    connections: int
    warmup: float
    wrk: bool
    edge: str | None
    upstream_port: int = 0
    notes: list[str] = field(default_factory=list)
    max_concurrency: int | None = None  # the edge's app limit, for its cost when it never binds

    def measure(self, name: str, port: int) -> dict[str, Any]:
        if self.warmup > 0:
            log(f"{name}: warm-up {self.warmup:g}s")
            run_load(port, self.warmup, self.connections, HOST_HEADER, self.wrk)
        log(f"{name}: measuring {self.duration:g}s at {self.connections} connections")
        return run_load(port, self.duration, self.connections, HOST_HEADER, self.wrk)

    def served(self, name: str, argv: list[str]) -> dict[str, Any]:
        """Start `argv` (a server on `port`), measure it once it answers 200."""
        port = free_port()
        proc, log_path = self.procs.start(name, [a.format(port=port) for a in argv])
        wait_until(name, lambda: answers_200(port, HOST_HEADER, 1.0), proc, log_path, READY_TIMEOUT)
        return self.measure(name, port)

    def own_processes(self, run) -> dict[str, Any]:
        """Run a row; every process it started is stopped after it, whatever happened."""
        before = len(self.procs.running)
        try:
            return run()
        finally:
            for _name, proc in self.procs.running[before:]:
                self.procs.stop(proc)

    # -- individual rows -----------------------------------------------------

    def row_direct(self) -> dict[str, Any]:
        return self.measure("direct", self.upstream_port)

    def row_nginx_proxy(self, name: str, workers: int) -> dict[str, Any]:
        port = free_port()
        body = NGINX_PROXY_BODY.format(port=port, upstream=self.upstream_port)
        proc, log_path = start_nginx(self.procs, self.tmp, name, workers, body)
        wait_until(name, lambda: answers_200(port, HOST_HEADER, 1.0), proc, log_path, READY_TIMEOUT)
        return self.measure(name, port)

    def row_naive(self) -> dict[str, Any]:
        argv = [venv_python(), str(BENCH / "naive_proxy.py"), "--listen", "127.0.0.1:{port}"]
        return self.served("naive_1w", [*argv, "--upstream", f"127.0.0.1:{self.upstream_port}"])

    def row_edge(self, name: str, workers: int) -> dict[str, Any]:
        if self.edge is None:
            return {"error": "edge is not installed (.venv/bin/edge or --edge)"}
        # memory:// lives in one process: several workers need a store they share.
        store = "memory://" if workers == 1 else start_redis(self.procs, self.tmp)
        if workers > 1:
            self.notes.append(f"{name} used store {store}")
        app = {
            "name": "bench",
            "hosts": [HOST_HEADER],
            "upstreams": [f"127.0.0.1:{self.upstream_port}"],
            "max_concurrency": self.max_concurrency,  # None: left out (unlimited)
        }
        config = {"edge": {"workers": workers, "store": store}, "apps": [app]}
        ready = lambda port, _admin: answers_200(port, HOST_HEADER, 1.0)  # noqa: E731
        edge = start_edge(self.procs, self.tmp, None, config, ready, name, self.edge)
        return self.measure(name, edge.port)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def ratio(rows: dict[str, dict[str, Any] | None], a: str, b: str) -> float | None:
    ra, rb = rows.get(a) or {}, rows.get(b) or {}
    if ra.get("error") or rb.get("error") or not ra.get("rps") or not rb.get("rps"):
        return None
    return round(ra["rps"] / rb["rps"], 3)


def print_table(rows: dict[str, dict[str, Any] | None], ratios: dict[str, float | None]) -> None:
    print()
    print(f"{'row':<16}{'rps':>12}{'p50 ms':>10}{'p99 ms':>10}  note")
    for name in ROW_ORDER:
        row = rows.get(name)
        if row is None:
            print(f"{name:<16}{'-':>12}{'-':>10}{'-':>10}  skipped")
            continue
        note = row.get("error") or row.get("note") or ""
        if len(note) > 100:
            note = note[:97] + "..."
        print(
            f"{name:<16}{fmt(row.get('rps'), ',.0f'):>12}{fmt(row.get('p50_ms'), '.3f'):>10}"
            f"{fmt(row.get('p99_ms'), '.3f'):>10}  {note}"
        )
    print()
    for key, value in ratios.items():
        print(f"{key:<28}{fmt(value, '.3f')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path, help="write results here")
    add_load_options(parser, 10.0)
    parser.add_argument(
        "--edge", metavar="PATH", help="edge executable (default: .venv/bin/edge, then PATH)"
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        metavar="N",
        help="give the edge's app max_concurrency = N (set high, it measures the limit's cost)",
    )
    add_quick(parser, QUICK)
    args = parser.parse_args(argv)
    apply_quick(parser, args)
    if args.duration <= 0 or args.connections <= 0:
        parser.error("--duration and --connections must be positive")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error("--max-concurrency must be at least 1")
    warmup = warmup_s(args)

    started = time.monotonic()
    info = machine_info()
    notes = [] if args.quick else ensure_tools()
    tools = {name: find_tool(name) for name in ("wrk", "nginx")}
    have_nginx = tools["nginx"] is not None
    wrk = use_wrk(args.python_loadgen)
    if not wrk:
        why = "asked for" if args.python_loadgen else "wrk unavailable"
        notes.append(
            f"{why}: built-in Python asyncio load generator used; it shares the "
            "CPU with the servers, so figures are not comparable with wrk runs"
        )
    if not have_nginx:
        notes.append("nginx unavailable: upstream is bench/fast_upstream.py; nginx rows skipped")
    for note in notes:
        log(note)

    tmp = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    procs = Processes(tmp)
    atexit.register(procs.stop_all)
    install_signal_handlers()

    if args.max_concurrency is not None:
        notes.append(f"the edge's app has max_concurrency = {args.max_concurrency}")
    bench = Bench(
        procs,
        tmp,
        args.duration,
        args.connections,
        warmup,
        wrk,
        find_edge(args.edge),
        notes=notes,
        max_concurrency=args.max_concurrency,
    )
    rows: dict[str, dict[str, Any] | None] = {}
    upstream_kind: str | None = None
    try:
        bench.upstream_port = free_port()
        if have_nginx:
            body = NGINX_UPSTREAM_BODY.format(port=bench.upstream_port, payload="x" * BODY_SIZE)
            up_proc, up_log = start_nginx(procs, tmp, "upstream", 1, body)
            upstream_kind = "nginx return 200 (1 worker)"
        else:
            argv = [venv_python(), str(FAST_UPSTREAM), "--port", str(bench.upstream_port)]
            up_proc, up_log = procs.start("upstream", argv)
            upstream_kind = "bench/fast_upstream.py"
        up_err = None
        try:
            ready = lambda: answers_200(bench.upstream_port, HOST_HEADER, 1.0)  # noqa: E731
            wait_until("upstream", ready, up_proc, up_log, READY_TIMEOUT)
            log(f"upstream ({upstream_kind}) on 127.0.0.1:{bench.upstream_port}; logs in {tmp}")
        except RuntimeError as exc:
            up_err = f"upstream did not start: {exc}"
            notes.append(up_err)
            log(up_err)

        plan = [
            ("direct", bench.row_direct),
            ("nginx_proxy_1w", lambda: bench.row_nginx_proxy("nginx_proxy_1w", 1)),
            ("naive_1w", bench.row_naive),
            ("edge_1w", lambda: bench.row_edge("edge_1w", 1)),
            ("nginx_proxy_2w", lambda: bench.row_nginx_proxy("nginx_proxy_2w", 2)),
            ("edge_2w", lambda: bench.row_edge("edge_2w", 2)),
        ]
        for name, run in plan:
            if name.startswith("nginx") and not have_nginx:
                rows[name] = None
                continue
            if up_err:
                rows[name] = {"error": "upstream did not start"}
                continue
            try:
                row = bench.own_processes(run)
            except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
                row = {"error": f"{exc.__class__.__name__}: {exc}"}
            rows[name] = row
            if row.get("error"):
                log(f"{name}: ERROR {row['error'][:300]}")
            else:
                log(
                    f"{name}: {row['rps']:,.0f} rps, "
                    f"p50 {row.get('p50_ms')} ms, p99 {row.get('p99_ms')} ms"
                )
    except BaseException:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        procs.stop_all()

    ratios = {
        "edge_1w/nginx_proxy_1w": ratio(rows, "edge_1w", "nginx_proxy_1w"),
        "edge_1w/naive_1w": ratio(rows, "edge_1w", "naive_1w"),
        "edge_2w/nginx_proxy_2w": ratio(rows, "edge_2w", "nginx_proxy_2w"),
        "naive_1w/nginx_proxy_1w": ratio(rows, "naive_1w", "nginx_proxy_1w"),
        "edge_2w/edge_1w": ratio(rows, "edge_2w", "edge_1w"),
    }
    print_table(rows, ratios)

    def pick(row: str, key: str) -> float | None:
        r = rows.get(row) or {}
        return None if r.get("error") else r.get(key)

    edge_p99 = pick("edge_1w", "p99_ms")
    vs_nginx, vs_naive = ratios["edge_1w/nginx_proxy_1w"], ratios["edge_1w/naive_1w"]
    targets_met = {
        "edge_vs_nginx": vs_nginx is not None and vs_nginx >= TARGETS["edge_vs_nginx"],
        "edge_vs_naive": vs_naive is not None and vs_naive >= TARGETS["edge_vs_naive"],
        "edge_p99_ms": edge_p99 is not None and edge_p99 <= TARGETS["edge_p99_ms"],
    }
    targets_met["all"] = all(targets_met.values())
    print()
    for key, met in targets_met.items():
        if key != "all":
            print(f"target {key:<16} {TARGETS[key]:<6} {'met' if met else 'NOT met'}")

    result = {
        "edge_rps": pick("edge_1w", "rps"),
        "nginx_rps": pick("nginx_proxy_1w", "rps"),
        "naive_rps": pick("naive_1w", "rps"),
        "direct_rps": pick("direct", "rps"),
        "edge_p99_ms": edge_p99,
        "nginx_p99_ms": pick("nginx_proxy_1w", "p99_ms"),
        "naive_p99_ms": pick("naive_1w", "p99_ms"),
        "edge_2w_rps": pick("edge_2w", "rps"),
        "nginx_2w_rps": pick("nginx_proxy_2w", "rps"),
        "rows": {name: rows.get(name) for name in ROW_ORDER},
        "peers": [name for name in ROW_ORDER if rows.get(name) is not None],
        "ratios": ratios,
        "targets": TARGETS,
        "targets_met": targets_met,
        "machine": info,
        "duration_s": args.duration,
        "warmup_s": warmup,
        "connections": args.connections,
        "load_generator": load_generator_name(wrk),
        "tools": tools,
        "upstream": upstream_kind,
        "nginx_version": tool_version([tools["nginx"], "-v"]) if tools["nginx"] else None,
        "host_header": HOST_HEADER,
        "body_bytes": BODY_SIZE,
        "notes": notes,
        "quick": args.quick,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    write_json(args.json, result, __doc__)
    log(f"wrote {args.json} ({result['elapsed_s']}s)")
    if any(r and r.get("error") for r in rows.values()):
        log(f"process logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; every process started by the benchmark was stopped")
        sys.exit(130)
