#!/usr/bin/env python3
"""Throughput benchmark: edge vs nginx vs a naive aiohttp proxy, loopback only.

One run, one machine, bounded in time. A fast upstream (nginx ``return 200``
with a 1 KiB body, or ``bench/fast_upstream.py`` when nginx is absent), then in
turn, each under wrk ``-t1 -c<connections> -d<duration>s --latency`` after a
short warm-up, all with ``Host: bench.localhost``:

    direct           straight to the upstream
    nginx_proxy_1w   nginx reverse proxy, 1 worker, upstream keepalive
    naive_1w         bench/naive_proxy.py (aiohttp server + one ClientSession)
    edge_1w          edge run --workers 1
    nginx_proxy_2w   nginx reverse proxy, 2 workers
    edge_2w          edge run --workers 2

Prints a table and the ratios, writes JSON (``--json FILE``). Every process it
starts is stopped on the way out, including on errors and Ctrl-C.

    .venv/bin/python bench/throughput.py --json bench/results/latest.json
    .venv/bin/python bench/throughput.py --json /tmp/smoke.json --duration 3
    .venv/bin/python bench/throughput.py --json /tmp/limit.json --duration 5 \
        --rows nginx_proxy_1w,edge_1w --max-concurrency 10000

``--max-concurrency N`` gives the edge's app that limit (the cost of the limit when it
never binds); ``--rows`` runs only the rows named (the upstream always runs).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_processes import Processes

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
HOST_HEADER = "bench.localhost"
BODY_SIZE = 1024
READY_TIMEOUT = 15.0
TARGETS = {"edge_vs_nginx": 0.40, "edge_vs_naive": 3.0, "edge_p99_ms": 3.0}
ROW_ORDER = ("direct", "nginx_proxy_1w", "naive_1w", "edge_1w", "nginx_proxy_2w", "edge_2w")
# A row whose load run saw more non-2xx/3xx answers or socket errors than this
# share of its requests is recorded as an error: a proxy answering 502 fast is
# not fast.
MAX_BAD_SHARE = 0.01


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_python() -> str:
    candidate = REPO / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


EDGE_OVERRIDE: str | None = None


def edge_binary() -> str | None:
    if EDGE_OVERRIDE:
        return EDGE_OVERRIDE if Path(EDGE_OVERRIDE).exists() else None
    for candidate in (REPO / ".venv" / "bin" / "edge", Path(sys.executable).parent / "edge"):
        if candidate.exists():
            return str(candidate)
    return shutil.which("edge")


def tail(path: Path, limit: int = 1500) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode("utf-8", "replace").strip()


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


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        p = Path(d) / name
        if p.exists():
            return str(p)
    return None


def tool_version(argv: list[str]) -> str | None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (r.stdout + r.stderr).strip().splitlines()
    return out[0].strip() if out else None


# --------------------------------------------------------------------------
# nginx / redis / edge configs
# --------------------------------------------------------------------------

NGINX_COMMON = """\
daemon off;
master_process on;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 100000;
    keepalive_timeout 75s;
{body}
}}
"""

NGINX_UPSTREAM_BODY = """\
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type text/plain;
            return 200 "{payload}";
        }}
    }}
"""

NGINX_PROXY_BODY = """\
    upstream bench_up {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 100000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://bench_up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
"""

EDGE_TOML = """\
[edge]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
workers = {workers}
store = "{store}"

[[apps]]
name = "bench"
hosts = ["{host}"]
upstreams = ["127.0.0.1:{upstream}"]
{app_extra}"""


def start_nginx(
    procs: Processes, tmp: Path, name: str, workers: int, body: str
) -> tuple[subprocess.Popen, Path]:
    prefix = tmp / name
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_COMMON.format(workers=workers, prefix=prefix, body=body))
    argv = [find_tool("nginx") or "nginx", "-p", str(prefix), "-c", str(conf), "-e", "stderr"]
    return procs.start(name, argv)


# --------------------------------------------------------------------------
# Readiness
# --------------------------------------------------------------------------


def http_status(port: int, timeout: float = 1.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Host": HOST_HEADER})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def wait_ready(
    port: int, proc: subprocess.Popen | None, timeout: float = READY_TIMEOUT
) -> str | None:
    """None when GET / answers 200 through ``port``; else an error string."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return f"process exited with status {proc.returncode}"
        try:
            status = http_status(port)
            if status == 200:
                return None
            last = f"GET / answered {status}"
        except (OSError, http.client.HTTPException) as exc:
            last = f"{exc.__class__.__name__}: {exc}"
        time.sleep(0.1)
    return f"not ready after {timeout:.0f}s ({last})"


def wait_redis(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


# --------------------------------------------------------------------------
# Load generation
# --------------------------------------------------------------------------

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_LAT_RE = re.compile(r"^\s*(50|75|90|99(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)


def parse_wrk(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rps"] = float(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text)
    out["requests"] = int(m.group(1)) if m else None
    for pct, value, unit in _LAT_RE.findall(text):
        out[f"p{pct}_ms"] = round(float(value) * _UNIT_MS[unit], 4)
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return out


def run_wrk(port: int, duration: float, connections: int) -> dict[str, Any]:
    argv = [
        find_tool("wrk") or "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "-H",
        f"Host: {HOST_HEADER}",
        f"http://127.0.0.1:{port}/",
    ]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    result = parse_wrk(r.stdout)
    if r.returncode != 0 or result["rps"] is None:
        result["error"] = f"wrk failed (status {r.returncode}): {(r.stderr or r.stdout)[-500:]}"
    return result


async def _py_load(port: int, duration: float, connections: int, max_requests: int):
    import httptools

    loop = asyncio.get_running_loop()
    request = f"GET / HTTP/1.1\r\nHost: {HOST_HEADER}\r\n\r\n".encode()
    deadline = loop.time() + duration
    latencies: list[float] = []
    stats = {"non2xx": 0, "socket_errors": 0}
    perf = time.perf_counter

    class Client(asyncio.Protocol):
        def __init__(self) -> None:
            self.done = loop.create_future()
            self.sent_at = 0.0
            self.keep_alive = True

        def connection_made(self, transport) -> None:
            self.transport = transport
            self.parser = httptools.HttpResponseParser(self)
            self.send()

        def send(self) -> None:
            if loop.time() >= deadline or len(latencies) >= max_requests:
                self.transport.close()
                return
            self.sent_at = perf()
            self.transport.write(request)

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                stats["socket_errors"] += 1
                self.transport.close()

        def on_message_complete(self) -> None:
            latencies.append(perf() - self.sent_at)
            status = self.parser.get_status_code()
            if not 200 <= status < 400:
                stats["non2xx"] += 1
            if self.parser.should_keep_alive():
                self.send()
            else:
                self.transport.close()

        def connection_lost(self, exc) -> None:
            if not self.done.done():
                self.done.set_result(exc)

    async def worker() -> None:
        while loop.time() < deadline and len(latencies) < max_requests:
            try:
                _, proto = await loop.create_connection(Client, "127.0.0.1", port)
                if await proto.done is not None:
                    stats["socket_errors"] += 1
            except OSError:
                stats["socket_errors"] += 1
                await asyncio.sleep(0.01)

    started = perf()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = perf() - started
    latencies.sort()
    n = len(latencies)

    def pct(q: float) -> float | None:
        return round(latencies[min(n - 1, int(q * n))] * 1000, 4) if n else None

    return {
        "rps": round(n / elapsed, 2) if elapsed > 0 else None,
        "requests": n,
        "p50_ms": pct(0.50),
        "p75_ms": pct(0.75),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        **stats,
    }


def run_py_load(port: int, duration: float, connections: int) -> dict[str, Any]:
    """Fallback load generator (wrk absent): asyncio + httptools, bounded by time and count."""
    coro = _py_load(port, duration, connections, max_requests=5_000_000)
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


# --------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------


@dataclass
class Bench:
    procs: Processes
    tmp: Path
    duration: float
    connections: int
    use_wrk: bool
    upstream_port: int = 0
    notes: list[str] = field(default_factory=list)
    redis_port: int | None = None
    max_concurrency: int = 0  # 0: the edge's app has no max_concurrency

    @property
    def warmup(self) -> float:
        return 2.0 if self.duration >= 10 else 1.0

    def load(self, port: int, duration: float) -> dict[str, Any]:
        if self.use_wrk:
            return run_wrk(port, duration, self.connections)
        return run_py_load(port, duration, self.connections)

    def measure(self, name: str, port: int) -> dict[str, Any]:
        log(f"{name}: warm-up {self.warmup:.0f}s")
        self.load(port, self.warmup)
        log(f"{name}: measuring {self.duration:g}s at {self.connections} connections")
        result = self.load(port, self.duration)
        total = result.get("requests") or 0
        bad = (result.get("non2xx") or 0) + (result.get("socket_errors") or 0)
        if "error" not in result and total and bad > MAX_BAD_SHARE * total:
            result["error"] = f"{bad} of {total} requests failed (non-2xx/3xx or socket errors)"
        if "error" not in result and not total:
            result["error"] = "no requests completed"
        return result

    def served_row(self, name: str, proc, log_path: Path | None, port: int) -> dict[str, Any]:
        err = wait_ready(port, proc)
        if err:
            detail = tail(log_path) if log_path else ""
            return {"error": err + (f": {detail}" if detail else "")}
        return self.measure(name, port)

    # -- individual rows -----------------------------------------------------

    def row_direct(self) -> dict[str, Any]:
        return self.served_row("direct", None, None, self.upstream_port)

    def row_nginx_proxy(self, name: str, workers: int) -> dict[str, Any]:
        port = free_port()
        body = NGINX_PROXY_BODY.format(port=port, upstream=self.upstream_port)
        proc, log_path = start_nginx(self.procs, self.tmp, name, workers, body)
        try:
            return self.served_row(name, proc, log_path, port)
        finally:
            self.procs.stop(proc)

    def row_naive(self) -> dict[str, Any]:
        port = free_port()
        argv = [
            venv_python(),
            str(BENCH / "naive_proxy.py"),
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            f"127.0.0.1:{self.upstream_port}",
        ]
        proc, log_path = self.procs.start("naive_1w", argv)
        try:
            return self.served_row("naive_1w", proc, log_path, port)
        finally:
            self.procs.stop(proc)

    def _start_edge(self, name: str, workers: int, store: str):
        binary = edge_binary()
        port, admin_port = free_port(), free_port()
        cfg = self.tmp / f"{name}.toml"
        cfg.write_text(
            EDGE_TOML.format(
                port=port,
                admin_port=admin_port,
                workers=workers,
                store=store,
                host=HOST_HEADER,
                upstream=self.upstream_port,
                app_extra=(
                    f"max_concurrency = {self.max_concurrency}\n" if self.max_concurrency else ""
                ),
            )
        )
        argv = [binary, "run", "--config", str(cfg), "--workers", str(workers)]
        proc, log_path = self.procs.start(name, argv)
        return proc, log_path, port

    def row_edge(self, name: str, workers: int) -> dict[str, Any]:
        if edge_binary() is None:
            return {"error": f"edge is not installed ({EDGE_OVERRIDE or '.venv/bin/edge'} missing)"}
        proc, log_path, port = self._start_edge(name, workers, "memory://")
        try:
            err = wait_ready(port, proc)
            if err and proc.returncode == 2 and "store" in tail(log_path).lower():
                log(f"{name}: edge refused store memory:// ({tail(log_path, 300)!r}); using redis")
                self.procs.stop(proc)
                store = self.redis_store()
                if store is None:
                    return {"error": "edge needs a shared store and redis-server did not start"}
                proc, log_path, port = self._start_edge(name, workers, store)
                err = wait_ready(port, proc)
            if err:
                detail = tail(log_path)
                return {"error": err + (f": {detail}" if detail else "")}
            return self.measure(name, port)
        finally:
            self.procs.stop(proc)

    def redis_store(self) -> str | None:
        if self.redis_port is None:
            binary = find_tool("redis-server")
            if binary is None:
                return None
            port = free_port()
            argv = [binary, "--port", str(port), "--bind", "127.0.0.1"]
            argv += ["--save", "", "--appendonly", "no", "--dir", str(self.tmp)]
            proc, _ = self.procs.start("redis", argv)
            if not wait_redis(port, proc):
                self.procs.stop(proc)
                return None
            self.redis_port = port
            self.notes.append(f"edge_2w used store redis://127.0.0.1:{port}/0")
        return f"redis://127.0.0.1:{self.redis_port}/0"


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def ratio(rows: dict[str, dict[str, Any] | None], a: str, b: str) -> float | None:
    ra, rb = rows.get(a) or {}, rows.get(b) or {}
    if ra.get("error") or rb.get("error") or not ra.get("rps") or not rb.get("rps"):
        return None
    return round(ra["rps"] / rb["rps"], 3)


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


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


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(AttributeError):
        info["nproc_available"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = list(os.getloadavg())
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path, help="write results here")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per row")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--python-loadgen",
        action="store_true",
        help="use the built-in asyncio load generator even when wrk is installed",
    )
    parser.add_argument(
        "--edge", metavar="PATH", help="edge executable (default: .venv/bin/edge, then PATH)"
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=0,
        metavar="N",
        help="give the edge's app max_concurrency = N (default: no limit)",
    )
    parser.add_argument(
        "--rows",
        default=",".join(ROW_ORDER),
        help=f"comma-separated rows to run (default: all of {','.join(ROW_ORDER)})",
    )
    args = parser.parse_args(argv)
    rows_wanted = [row.strip() for row in args.rows.split(",") if row.strip()]
    if unknown := [row for row in rows_wanted if row not in ROW_ORDER]:
        parser.error(f"unknown rows: {', '.join(unknown)}")
    if args.max_concurrency < 0:
        parser.error("--max-concurrency must be 0 or more")
    global EDGE_OVERRIDE
    EDGE_OVERRIDE = args.edge
    if args.duration <= 0 or args.connections <= 0:
        parser.error("--duration and --connections must be positive")

    started = time.monotonic()
    info = machine_info()
    notes = ensure_tools()
    have_nginx = find_tool("nginx") is not None
    use_wrk = find_tool("wrk") is not None and not args.python_loadgen
    if not use_wrk:
        notes.append(
            "wrk unavailable: built-in Python asyncio load generator used; it shares the "
            "CPU with the servers, so figures are not comparable with wrk runs"
        )
    if not have_nginx:
        notes.append("nginx unavailable: upstream is bench/fast_upstream.py; nginx rows skipped")
    for note in notes:
        log(note)

    tmp = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    procs = Processes(tmp)
    atexit.register(procs.stop_all)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    bench = Bench(procs, tmp, args.duration, args.connections, use_wrk, notes=notes)
    bench.max_concurrency = args.max_concurrency
    rows: dict[str, dict[str, Any] | None] = {}
    upstream_kind: str | None = None
    try:
        bench.upstream_port = free_port()
        if have_nginx:
            body = NGINX_UPSTREAM_BODY.format(port=bench.upstream_port, payload="x" * BODY_SIZE)
            up_proc, up_log = start_nginx(procs, tmp, "upstream", 1, body)
            upstream_kind = "nginx return 200 (1 worker)"
        else:
            argv = [venv_python(), str(BENCH / "fast_upstream.py"), "--port"]
            up_proc, up_log = procs.start("upstream", [*argv, str(bench.upstream_port)])
            upstream_kind = "bench/fast_upstream.py"
        up_err = wait_ready(bench.upstream_port, up_proc)
        if up_err:
            up_err = f"upstream did not start: {up_err}: {tail(up_log)}"
            notes.append(up_err)
            log(up_err)
        else:
            log(f"upstream ({upstream_kind}) on 127.0.0.1:{bench.upstream_port}; logs in {tmp}")

        plan = [
            ("direct", bench.row_direct),
            ("nginx_proxy_1w", lambda: bench.row_nginx_proxy("nginx_proxy_1w", 1)),
            ("naive_1w", bench.row_naive),
            ("edge_1w", lambda: bench.row_edge("edge_1w", 1)),
            ("nginx_proxy_2w", lambda: bench.row_nginx_proxy("nginx_proxy_2w", 2)),
            ("edge_2w", lambda: bench.row_edge("edge_2w", 2)),
        ]
        for name, run in plan:
            if name not in rows_wanted:
                rows[name] = None
                continue
            if name.startswith("nginx") and not have_nginx:
                rows[name] = None
                continue
            if up_err:
                rows[name] = {"error": "upstream did not start"}
                continue
            try:
                row = run()
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
        "ratios": ratios,
        "targets": TARGETS,
        "targets_met": targets_met,
        "machine": info,
        "duration_s": args.duration,
        "warmup_s": bench.warmup,
        "connections": args.connections,
        "max_concurrency": args.max_concurrency or None,
        "load_generator": (
            " ".join((tool_version(["wrk", "-v"]) or "wrk").split()[:2])
            if use_wrk
            else "python-asyncio (fallback)"
        ),
        "upstream": upstream_kind,
        "nginx_version": tool_version(["nginx", "-v"]) if have_nginx else None,
        "host_header": HOST_HEADER,
        "body_bytes": BODY_SIZE,
        "notes": notes,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
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
