#!/usr/bin/env python3
"""Hot-path cost: instructions per proxied request under callgrind, edge vs nginx.

Wall-clock throughput on a shared 2-core machine moves by a quarter from run to run;
instructions counted by valgrind's callgrind move by well under 1 %, so a few percent
of hot-path cost can be seen and compared between two checkouts. Loopback only,
bounded: every server binds 127.0.0.1, every load run sends a fixed number of requests.

A fast upstream runs natively (nginx ``return 200`` with a 1 KiB body, else
``bench/fast_upstream.py``); under ``valgrind --tool=callgrind`` (instrumentation off
until the server is ready, so startup costs no instructions and little time), each row:

    edge_unset   the edge's worker process (what ``edge run --workers 1`` starts, run
                 directly so only it is under valgrind; store memory://), one static app
    edge_limit   the same with the app's ``max_concurrency = --max-concurrency`` (10000:
                 it never binds with 4 connections, so this is the limit's bare cost)
    nginx        nginx as reverse proxy with upstream keepalive, one process (no master)

The three start at once; then each in turn: instrumentation on, ``--warmup`` GETs,
then ``--repeats`` runs of ``--requests`` keep-alive GETs (``Host: bench.localhost``)
over ``--connections`` connections opened before the first run, each between
``callgrind_control -z`` (zero) and ``-d`` (dump): no startup, connect or close is
counted. Timers (the edge's sweeper, 4 a second) cost instructions by the second, not by
the request, and a run under valgrind takes seconds: each row's idle rate is measured
(``--idle`` s between a zero and a dump, no requests) and taken off each run before
dividing by its requests. The Python runs with PYTHONHASHSEED=0.

``--tree PATH`` measures another checkout's edge/wake/scheduler_client (PYTHONPATH,
with this venv's Python and packages), e.g. one made with ``git worktree add``; a tree
that predates ``max_concurrency`` refuses the key (``edge check``) and its edge_limit row
records that. ``--compare FILE`` (an earlier report of this script) adds the ratios to
that report's edge_unset figure. Needs valgrind (``scripts/ensure-valgrind``).

    .venv/bin/python bench/hot_path_cost.py --json bench/results/hot_path_cost.json
    .venv/bin/python bench/hot_path_cost.py --json /tmp/base.json --tree /work/base
    .venv/bin/python bench/hot_path_cost.py --json /tmp/now.json --compare /tmp/base.json
    .venv/bin/python bench/hot_path_cost.py --json /tmp/smoke.json --quick

JSON keys (--json FILE):
    edge_unset_instr_per_req   instructions per request of edge_unset (the median of its
                               runs; null when the row failed; so each *_instr_per_req)
    edge_limit_instr_per_req   of edge_limit (null too when the tree refuses the key)
    nginx_instr_per_req        of nginx (null when nginx is not installed)
    limit_vs_unset             edge_limit / edge_unset (null without both)
    edge_vs_nginx              edge_unset / nginx (null without both)
    spread_max                 the largest run-to-run spread of a row that ran:
                               (max - min) / median of its runs
    rows                       each row by name: instr_per_req, runs (each run's
                               instructions per request), raw_runs (before the idle
                               rate is taken off), run_seconds, idle_instr_per_s,
                               spread; or error; null for a row skipped
    before                     with --compare: that report's file, tree, tree_commit,
                               edge_unset_instr_per_req, edge_limit_instr_per_req, and
                               unset_vs_before, limit_vs_before (this edge_unset and
                               edge_limit over its edge_unset); else null
    tree                       the checkout measured
    tree_commit                its HEAD, "+dirty" when edge/, wake/ or scheduler_client/
                               have changes; null outside git
    max_concurrency            the edge_limit row's max_concurrency
    requests                   requests per run
    repeats                    runs per row
    warmup_requests            requests before the first run of a row
    connections                keep-alive connections the requests share
    idle_s                     seconds of the idle measurement per row
    upstream                   what the upstream was
    valgrind                   valgrind --version
    nginx_version              nginx -v, null without nginx
    machine                    nproc, cpu, python, platform, load average at the start
    notes                      what was missing or refused
    quick                      whether --quick sized the run
    elapsed_s                  the whole run's wall time
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
from bench_stack import (
    FAST_UPSTREAM,
    NGINX_PROXY_BODY,
    NGINX_UPSTREAM_BODY,
    REPO,
    Processes,
    accepts,
    add_quick,
    answers_200,
    apply_quick,
    find_tool,
    fmt,
    free_port,
    install_signal_handlers,
    logger,
    machine_info,
    render_toml,
    run_async,
    start_nginx,
    tail,
    tool_version,
    venv_python,
    wait_until,
    write_json,
)

HOST_HEADER = "bench.localhost"
BODY_SIZE = 1024
ROW_ORDER = ("edge_unset", "edge_limit", "nginx")
REQUEST = f"GET / HTTP/1.1\r\nHost: {HOST_HEADER}\r\n\r\n".encode()
# Python's startup under valgrind (uninstrumented) takes 10-30 s on the 2-core machine.
READY_TIMEOUT = 180.0
CONTROL_TIMEOUT = 60.0
QUICK = {"requests": 300, "repeats": 2, "warmup": 100, "idle": 1.0}

log = logger("cost")


# --------------------------------------------------------------------------
# A server under callgrind, zeroed and dumped from outside (callgrind_control)
# --------------------------------------------------------------------------


def callgrind_wrapper(out_file: Path) -> list[str]:
    """valgrind's argv prefix: callgrind, instrumentation off until `instrument()`."""
    return [
        find_tool("valgrind") or "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out_file}",
    ]


def dump_total(path: Path) -> int | None:
    """The instruction count of a finished callgrind dump ("summary:"), None if unfinished."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if "\ntotals:" not in text:
        return None  # still being written
    for line in text.splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    return None


@dataclass
class Callgrinded:
    """A server process started under `callgrind_wrapper(out_file)`."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    port: int
    out_file: Path
    dumps: int = 0

    def control(self, *args: str) -> None:
        argv = [find_tool("callgrind_control") or "callgrind_control", *args, str(self.proc.pid)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=CONTROL_TIMEOUT)
        if done.returncode != 0 or "OK" not in done.stdout:
            raise RuntimeError(f"{' '.join(argv)}: {(done.stdout + done.stderr)[-500:]}")

    def instrument(self) -> None:
        self.control("-i", "on")

    def zero(self) -> float:
        """Counts from zero; returns when that happened (the command's midpoint)."""
        started = time.monotonic()
        self.control("-z")
        return (started + time.monotonic()) / 2

    def dump(self) -> tuple[int, float]:
        """(instructions since the last zero, when the dump happened)."""
        started = time.monotonic()
        self.control("-d")
        at = (started + time.monotonic()) / 2
        self.dumps += 1
        path = Path(f"{self.out_file}.{self.dumps}")
        deadline = time.monotonic() + CONTROL_TIMEOUT
        while (total := dump_total(path)) is None:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: no finished dump {path}")
            time.sleep(0.05)
        return total, at


# --------------------------------------------------------------------------
# Load: a fixed number of keep-alive GETs over connections opened beforehand
# --------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    def __init__(self, client: KeepAliveClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.client.fail(f"bad response: {exc!r}")

    def on_message_complete(self) -> None:
        self.client.answered(self, self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.fail(f"connection closed by the server ({exc!r})")


class KeepAliveClient:
    """`connections` keep-alive connections; `run(n)` sends exactly n GETs over them, each
    connection one at a time, and fails on any answer but 200 or a lost connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conns: list[_Connection] = []
        self.left = 0
        self.pending = 0
        self.done: asyncio.Future[None] | None = None

    async def open(self, connections: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(connections):
            _, conn = await loop.create_connection(
                lambda: _Connection(self), "127.0.0.1", self.port
            )
            self.conns.append(conn)

    async def run(self, n: int) -> float:
        """Seconds the n requests took."""
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        self.left = self.pending = n
        started = time.monotonic()
        for conn in self.conns:
            self._send(conn)
        # Bounded: even at 20 requests/s under valgrind this is generous.
        await asyncio.wait_for(self.done, 120 + n * 0.05)
        return time.monotonic() - started

    def _send(self, conn: _Connection) -> None:
        if self.left > 0 and conn.transport is not None:
            self.left -= 1
            conn.transport.write(REQUEST)

    def answered(self, conn: _Connection, status: int) -> None:
        if status != 200:
            self.fail(f"answered {status}")
            return
        self.pending -= 1
        if self.pending == 0:
            if self.done is not None and not self.done.done():
                self.done.set_result(None)
        else:
            self._send(conn)

    def fail(self, why: str) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(RuntimeError(why))

    def close(self) -> None:
        for conn in self.conns:
            if conn.transport is not None:
                conn.client = _Closed()  # type: ignore[assignment]
                conn.transport.close()


class _Closed:
    """What a connection reports to once its client closed it: nothing matters any more."""

    def answered(self, conn: _Connection, status: int) -> None:
        pass

    def fail(self, why: str) -> None:
        pass


# --------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------


@dataclass
class Settings:
    requests: int
    repeats: int
    warmup: int
    connections: int
    idle: float


async def measure(server: Callgrinded, s: Settings) -> dict[str, Any]:
    """Instrument, warm up, measure the idle rate, then the runs; instructions per request."""
    server.instrument()
    client = KeepAliveClient(server.port)
    try:
        await client.open(s.connections)
        if s.warmup:
            await client.run(s.warmup)
        since = server.zero()
        await asyncio.sleep(s.idle)
        idle, at = server.dump()
        idle_rate = idle / (at - since)
        raw, runs, seconds = [], [], []
        for _ in range(s.repeats):
            since = server.zero()
            await client.run(s.requests)
            total, at = server.dump()
            raw.append(total / s.requests)
            runs.append((total - idle_rate * (at - since)) / s.requests)
            seconds.append(at - since)
    finally:
        client.close()
    median = statistics.median(runs)
    return {
        "instr_per_req": round(median, 1),
        "runs": [round(r, 1) for r in runs],
        "raw_runs": [round(r, 1) for r in raw],
        "run_seconds": [round(x, 2) for x in seconds],
        "idle_instr_per_s": round(idle_rate),
        "spread": round((max(runs) - min(runs)) / median, 5),
    }


def edge_config(port: int, admin_port: int, upstream: int, limit: int | None) -> dict[str, Any]:
    app = {
        "name": "bench",
        "hosts": [HOST_HEADER],
        "upstreams": [f"127.0.0.1:{upstream}"],
        "max_concurrency": limit,  # None: left out (unlimited)
    }
    return {
        "edge": {
            "workers": 1,
            "store": "memory://",
            "listen": f"127.0.0.1:{port}",
            "admin_listen": f"127.0.0.1:{admin_port}",
        },
        "apps": [app],
    }


@dataclass
class Bench:
    procs: Processes
    tmp: Path
    tree: Path
    upstream_port: int = 0
    notes: list[str] = field(default_factory=list)

    def tree_env(self) -> dict[str, str]:
        # -P below keeps the working directory off sys.path: PYTHONPATH picks the tree.
        return {**os.environ, "PYTHONPATH": str(self.tree), "PYTHONHASHSEED": "0"}

    def start_edge(self, name: str, limit: int | None) -> Callgrinded | str:
        """The edge's worker under callgrind; or why the tree refused the config."""
        port, admin_port = free_port(), free_port()
        config_path = self.tmp / f"{name}.toml"
        config_path.write_text(
            render_toml(edge_config(port, admin_port, self.upstream_port, limit))
        )
        python = [venv_python(), "-P", "-m", "edge"]
        check = subprocess.run(
            [*python, "check", str(config_path)],
            capture_output=True,
            text=True,
            env=self.tree_env(),
            timeout=60,
        )
        if check.returncode != 0:
            return f"edge check refused the config: {(check.stderr or check.stdout)[-300:]}"
        out_file = self.tmp / f"{name}.callgrind"
        stats_dir = self.tmp / f"{name}-stats"  # the supervisor's to make, when there is one
        stats_dir.mkdir(exist_ok=True)
        argv = [*callgrind_wrapper(out_file), *python, "worker", "--config", str(config_path)]
        argv += ["--index", "0", "--workers", "1", "--stats-dir", str(stats_dir)]
        proc, log_path = self.procs.start(name, argv, self.tree_env())
        return Callgrinded(name, proc, log_path, port, out_file)

    def start_nginx(self) -> Callgrinded:
        port = free_port()
        out_file = self.tmp / "nginx.callgrind"
        body = NGINX_PROXY_BODY.format(port=port, upstream=self.upstream_port)
        proc, log_path = start_nginx(
            self.procs, self.tmp, "nginx", 1, body, callgrind_wrapper(out_file)
        )
        return Callgrinded("nginx", proc, log_path, port, out_file)

    def row(self, server: Callgrinded, s: Settings) -> dict[str, Any]:
        """Measure one started server, then stop it, whatever happened."""
        try:
            ready = lambda: accepts(server.port) and answers_200(server.port, HOST_HEADER, 5.0)  # noqa: E731
            wait_until(server.name, ready, server.proc, server.log_path, READY_TIMEOUT)
            log(f"{server.name}: ready; {s.repeats} x {s.requests} requests")
            result = run_async(measure(server, s))
            log(f"{server.name}: {result['instr_per_req']:,.0f} instructions/request")
            return result
        except (RuntimeError, OSError, TimeoutError, subprocess.TimeoutExpired) as exc:
            log(f"{server.name} failed: {exc}")
            return {"error": f"{exc}"[-500:] + f"\n{tail(server.log_path, 500)}"}
        finally:
            self.procs.stop(server.proc)


def tree_commit(tree: Path) -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    head = subprocess.run(
        [git, "-C", str(tree), "rev-parse", "--short=12", "HEAD"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if head.returncode != 0:
        return None
    status = subprocess.run(
        [git, "-C", str(tree), "status", "--porcelain", "--", "edge", "wake", "scheduler_client"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 4)


def compared(path: Path, unset: float | None, limit: float | None) -> dict[str, Any]:
    before = json.loads(path.read_text())
    base = before.get("edge_unset_instr_per_req")
    return {
        "file": str(path),
        "tree": before.get("tree"),
        "tree_commit": before.get("tree_commit"),
        "edge_unset_instr_per_req": base,
        "edge_limit_instr_per_req": before.get("edge_limit_instr_per_req"),
        "unset_vs_before": ratio(unset, base),
        "limit_vs_before": ratio(limit, base),
    }


def print_table(rows: dict[str, dict[str, Any] | None], report: dict[str, Any]) -> None:
    print()
    print(f"{'row':<12}{'instr/req':>12}{'spread':>9}{'idle instr/s':>14}  runs / note")
    for name in ROW_ORDER:
        row = rows.get(name)
        if row is None:
            print(f"{name:<12}{'-':>12}{'-':>9}{'-':>14}  skipped")
        elif row.get("error"):
            note = row["error"].splitlines()[0][:90]
            print(f"{name:<12}{'-':>12}{'-':>9}{'-':>14}  {note}")
        else:
            runs = " / ".join(f"{r:,.0f}" for r in row["runs"])
            print(
                f"{name:<12}{row['instr_per_req']:>12,.0f}{row['spread']:>9.2%}"
                f"{row['idle_instr_per_s']:>14,}  {runs}"
            )
    print()
    print(f"{'limit_vs_unset':<20}{fmt(report['limit_vs_unset'], '.4f')}")
    print(f"{'edge_vs_nginx':<20}{fmt(report['edge_vs_nginx'], '.2f')}")
    before = report["before"]
    if before is not None:
        print(f"before: {before['tree']} ({before['tree_commit']})")
        print(f"{'unset_vs_before':<20}{fmt(before['unset_vs_before'], '.4f')}")
        print(f"{'limit_vs_before':<20}{fmt(before['limit_vs_before'], '.4f')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path, help="write results here")
    parser.add_argument("--requests", type=int, default=4000, help="requests per run (4000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row (3)")
    parser.add_argument("--warmup", type=int, default=1000, help="warm-up requests (1000)")
    parser.add_argument("--connections", type=int, default=4, help="connections (4)")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle measurement (5)")
    parser.add_argument(
        "--max-concurrency", type=int, default=10000, help="edge_limit's max_concurrency (10000)"
    )
    parser.add_argument(
        "--tree", type=Path, default=REPO, help="the checkout to measure (default: this one)"
    )
    parser.add_argument(
        "--compare", type=Path, metavar="FILE", help="an earlier report: ratios to its edge_unset"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the logs and callgrind dumps (ROW.callgrind.N, for callgrind_annotate)",
    )
    add_quick(parser, QUICK)
    args = parser.parse_args(argv)
    apply_quick(parser, args)
    if min(args.requests, args.repeats, args.connections, args.max_concurrency) < 1:
        parser.error("--requests, --repeats, --connections, --max-concurrency must be positive")
    if args.warmup < 0 or args.idle <= 0:
        parser.error("--warmup must not be negative, --idle must be positive")
    tree = args.tree.resolve()
    if not (tree / "edge" / "__init__.py").exists():
        parser.error(f"--tree {tree}: no edge/ package there")
    if args.compare is not None and not args.compare.exists():
        parser.error(f"--compare {args.compare}: no such file")
    for tool in ("valgrind", "callgrind_control"):
        if find_tool(tool) is None:
            log(f"{tool} is not installed (scripts/ensure-valgrind, or apt-get install valgrind)")
            return 2

    started = time.monotonic()
    info = machine_info()
    settings = Settings(args.requests, args.repeats, args.warmup, args.connections, args.idle)
    have_nginx = find_tool("nginx") is not None
    tmp = Path(tempfile.mkdtemp(prefix="edge-cost-"))
    procs = Processes(tmp)
    atexit.register(procs.stop_all)
    install_signal_handlers()
    bench = Bench(procs, tmp, tree)
    notes = bench.notes
    rows: dict[str, dict[str, Any] | None] = dict.fromkeys(ROW_ORDER)

    bench.upstream_port = free_port()
    if have_nginx:
        body = NGINX_UPSTREAM_BODY.format(port=bench.upstream_port, payload="x" * BODY_SIZE)
        up_proc, up_log = start_nginx(procs, tmp, "upstream", 1, body)
        upstream = "nginx return 200 (1 worker, not under valgrind)"
    else:
        argv = [venv_python(), str(FAST_UPSTREAM), "--port", str(bench.upstream_port)]
        up_proc, up_log = procs.start("upstream", argv)
        upstream = "bench/fast_upstream.py (not under valgrind)"
        notes.append("nginx unavailable: upstream is bench/fast_upstream.py; nginx row skipped")
    wait_until(
        "upstream", lambda: answers_200(bench.upstream_port, HOST_HEADER, 5.0), up_proc, up_log
    )

    # All start at once (startup under valgrind is the slow part); measured one by one.
    servers: dict[str, Callgrinded | str] = {
        "edge_unset": bench.start_edge("edge_unset", None),
        "edge_limit": bench.start_edge("edge_limit", args.max_concurrency),
    }
    if have_nginx:
        servers["nginx"] = bench.start_nginx()
    refused = []  # rows the tree's `edge check` refused: nothing ran, no log to keep
    for name, server in servers.items():
        if isinstance(server, str):
            notes.append(f"{name}: {server}")
            rows[name] = {"error": server}
            refused.append(name)
        else:
            rows[name] = bench.row(server, settings)
    for note in notes:
        log(note)

    def pick(row: str) -> float | None:
        return (rows.get(row) or {}).get("instr_per_req")

    unset, limit, nginx = pick("edge_unset"), pick("edge_limit"), pick("nginx")
    spreads = [r["spread"] for r in rows.values() if r is not None and "spread" in r]
    report = {
        "edge_unset_instr_per_req": unset,
        "edge_limit_instr_per_req": limit,
        "nginx_instr_per_req": nginx,
        "limit_vs_unset": ratio(limit, unset),
        "edge_vs_nginx": ratio(unset, nginx),
        "spread_max": max(spreads) if spreads else None,
        "rows": rows,
        "before": compared(args.compare, unset, limit) if args.compare else None,
        "tree": str(tree),
        "tree_commit": tree_commit(tree),
        "max_concurrency": args.max_concurrency,
        "requests": args.requests,
        "repeats": args.repeats,
        "warmup_requests": args.warmup,
        "connections": args.connections,
        "idle_s": args.idle,
        "upstream": upstream,
        "valgrind": tool_version([find_tool("valgrind") or "valgrind", "--version"]),
        "nginx_version": tool_version([find_tool("nginx") or "nginx", "-v"])
        if have_nginx
        else None,
        "machine": info,
        "notes": notes,
        "quick": args.quick,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    print_table(rows, report)
    write_json(args.json, report, __doc__)
    log(f"wrote {args.json} ({report['elapsed_s']}s)")
    if args.keep or any(r and r.get("error") and name not in refused for name, r in rows.items()):
        log(f"process logs and callgrind dumps kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; every process started by the benchmark was stopped")
        sys.exit(130)
