"""What the benchmarks share: processes, the local stack, waits, load generators, reports.

Every benchmark in bench/ imports its plumbing from here (none imports another):

- ``Processes``: each process in its own group, all stopped on the way out (and the
  app processes the control plane started, which outlive it by design);
- the local stack: ``start_redis``, ``start_control_plane``, ``start_edge``, with
  ``wait_until``, ``http_get``, ``children`` and the ``edge`` executable;
- nginx: ``start_nginx`` with ``NGINX_UPSTREAM_BODY`` (a fast upstream) or
  ``NGINX_PROXY_BODY`` (a reverse proxy, the peer the edge is compared with);
- replicated stores: ``start_redis_with_replicas`` (a redis-server and its replicas)
  and ``bench_cluster`` (a local Redis Cluster, stopped on the way out);
- load: ``Load`` runs wrk when installed, else this file's own asyncio generator
  (``python bench/bench_stack.py load ...``, a process of its own like wrk), and
  judges the run (``MAX_BAD_SHARE``);
- reports: ``machine_info``, ``percentile``, ``wake_wait_ms`` (Server-Timing),
  ``apply_quick`` (the ``--quick`` presets) and ``write_json``, which refuses a
  report that lacks a key its script's docstring lists under "JSON keys".

Loopback helpers (free_port, accepts, redis_pong) are scheduler_client.local.loopback's
and the TOML writer is scheduler_client.config_file.render_toml.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from scheduler_client.config_file import render_toml
from scheduler_client.local.loopback import accepts, free_port, redis_pong
from scheduler_client.local.redis_cluster import LocalRedisCluster

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
SAMPLE_APP = BENCH / "apps" / "sample_app.py"
TINY_APP = BENCH / "apps" / "tiny_app.py"
FAST_UPSTREAM = BENCH / "fast_upstream.py"
READY_TIMEOUT = 20.0
STOP_GRACE = 5.0
# A load run that saw more non-2xx/3xx answers or socket errors than this share of
# its requests is recorded as an error: a proxy answering 502 fast is not fast.
MAX_BAD_SHARE = 0.01


def logger(prefix: str) -> Callable[[str], None]:
    """A benchmark's progress lines, on stderr (stdout is for its table)."""

    def log(msg: str) -> None:
        print(f"[{prefix}] {msg}", file=sys.stderr, flush=True)

    return log


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


class Processes:
    """Every process a benchmark starts: each in its own group, all stopped on the way out."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: list[tuple[str, subprocess.Popen]] = []
        # Pids of app processes the control plane started (leaders of their own groups).
        self.app_pids: set[int] = set()
        self.cp_state_file: Path | None = None

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen, Path]:
        log_path = self.logdir / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
                # Own process group: worker processes are stopped with their parent.
                start_new_session=True,
            )
        self.running.append((name, proc))
        return proc, log_path

    def stop(self, proc: subprocess.Popen) -> None:
        self.running = [(n, p) for n, p in self.running if p is not proc]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(STOP_GRACE)
        # Sweep stragglers (e.g. workers whose parent exited first) of the
        # group this process led.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def kill_apps(self) -> None:
        """App processes outlive the control plane by design: SIGKILL their groups."""
        pids = set(self.app_pids)
        if self.cp_state_file is not None and self.cp_state_file.exists():
            with (
                contextlib.suppress(sqlite3.Error),
                contextlib.closing(sqlite3.connect(self.cp_state_file, timeout=2)) as db,
            ):
                rows = db.execute("SELECT pid FROM allocations WHERE pid IS NOT NULL")
                pids.update(pid for (pid,) in rows)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self.app_pids.clear()

    def stop_all(self) -> None:
        # Reverse start order (edge, control plane, redis); the apps last of all.
        for _name, proc in reversed(list(self.running)):
            self.stop(proc)
        self.kill_apps()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP end the run through the normal clean-up path (exit 128 + signal)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _exit_on_signal)


def raise_open_file_limit() -> int:
    """One socket per request: use the whole hard limit. Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def children(pid: int) -> list[int]:
    """Child pids of `pid` (pgrep -P, else a /proc scan)."""
    pgrep = shutil.which("pgrep")
    if pgrep is not None:
        out = subprocess.run([pgrep, "-P", str(pid)], capture_output=True, text=True, timeout=5)
        return sorted(int(x) for x in out.stdout.split())
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return sorted(found)


def tail(path: Path | None, limit: int = 3000) -> str:
    if path is None:
        return ""
    try:
        return path.read_bytes()[-limit:].decode("utf-8", "replace").strip()
    except OSError:
        return "<no output>"


# --------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """`name` on PATH, or in an sbin directory a non-root PATH lacks (nginx)."""
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


def venv_python() -> str:
    candidate = REPO / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def find_edge(override: str | None = None) -> str | None:
    """The `edge` executable: `override`, else .venv/bin/edge, beside this Python, on PATH."""
    if override:
        return override if Path(override).exists() else None
    for candidate in (REPO / ".venv" / "bin" / "edge", Path(sys.executable).parent / "edge"):
        if candidate.exists():
            return str(candidate)
    return shutil.which("edge")


def edge_binary() -> str:
    found = find_edge()
    if found is None:
        raise RuntimeError("no `edge` executable (run `make venv` first)")
    return found


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


# --------------------------------------------------------------------------
# HTTP and waits
# --------------------------------------------------------------------------


def http_get(
    port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 2.0
) -> tuple[int | None, bytes]:
    """(status, body) of a GET on 127.0.0.1:port, or (None, error text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return None, repr(exc).encode()
    finally:
        conn.close()


def answers_200(port: int, host: str, timeout: float) -> bool:
    """A GET / naming `host` on 127.0.0.1:port answered 200."""
    return http_get(port, "/", {"Host": host}, timeout=timeout)[0] == 200


def fmt(value: Any, spec: str = "") -> str:
    """A table cell: '-' for a missing value."""
    return "-" if value is None else format(value, spec)


def wait_until(
    what: str,
    check: Callable[[], bool],
    proc: subprocess.Popen | None,
    log_path: Path | None,
    timeout: float = READY_TIMEOUT,
) -> None:
    """Poll `check` until true; RuntimeError (with the log's tail) if `proc` exits first
    or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready in {timeout:g}s:\n{tail(log_path)}")
        time.sleep(0.05)


# --------------------------------------------------------------------------
# The local stack: redis, control plane, edge
# --------------------------------------------------------------------------


def start_redis(procs: Processes, tmp: Path, appendfsync: str = "") -> str:
    """redis-server on a free port; with `appendfsync` (always|everysec), AOF is on."""
    binary = find_tool("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    argv = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "yes" if appendfsync else "no",
        "--appendfsync", appendfsync or "everysec",
        "--daemonize", "no",
        "--dir", str(tmp),
        "--maxclients", "10000",
    ]  # fmt: skip
    proc, log_path = procs.start("redis", argv)
    wait_until("redis-server", lambda: redis_pong(port), proc, log_path)
    return f"redis://127.0.0.1:{port}/0"


def cp_app(
    name: str,
    script: Path,
    *args: str,
    readiness: str = "/healthz",
    start_timeout: str = "30s",
    drain_grace: str = "2s",
) -> dict[str, Any]:
    """A control-plane [[apps]] entry running `script` (this Python) on the port it hands out."""
    return {
        "name": name,
        "command": ["{python}", str(script), "--port", "{port}", *args],
        "artifact": str(script),
        "readiness_path": readiness,
        "start_timeout": start_timeout,
        "drain_grace": drain_grace,
    }


@dataclass
class ControlPlane:
    proc: subprocess.Popen
    log_path: Path
    port: int


def start_control_plane(
    procs: Processes,
    tmp: Path,
    env: dict[str, str],
    apps: list[dict[str, Any]],
    state_dir: Path | None = None,
    **settings: Any,
) -> ControlPlane:
    """`edge controlplane` on a free port for `apps` (cp_app entries); `env` has its token."""
    port = free_port()
    state_file = (state_dir or tmp) / "controlplane.sqlite"
    procs.cp_state_file = state_file
    config = {
        "controlplane": {
            "listen": f"127.0.0.1:{port}",
            "state_file": str(state_file),
            **settings,
        },
        "apps": apps,
    }
    config_path = tmp / "controlplane.toml"
    config_path.write_text(render_toml(config))
    argv = [edge_binary(), "controlplane", "--config", str(config_path)]
    proc, log_path = procs.start("controlplane", argv, env)
    healthy = lambda: http_get(port, "/healthz", timeout=0.5)[0] == 200  # noqa: E731
    wait_until("control plane", healthy, proc, log_path)
    return ControlPlane(proc, log_path, port)


@dataclass
class Edge:
    proc: subprocess.Popen
    log_path: Path
    port: int
    admin_port: int
    config_path: Path
    workers: list[int] = field(default_factory=list)


def start_edge(
    procs: Processes,
    tmp: Path,
    env: dict[str, str] | None,
    config: dict[str, Any],
    ready: Callable[[int, int], bool] | None = None,
    name: str = "edge",
    binary: str | None = None,
) -> Edge:
    """`edge run` with `config` on free ports ([edge] listen/admin_listen are filled in).

    Ready when /readyz answers 200, the listener accepts and `ready(port, admin_port)`
    (if given) holds; then waits for its [edge] workers to exist.
    """
    port, admin_port = free_port(), free_port()
    config["edge"].update(listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin_port}")
    workers = int(config["edge"].get("workers", 1))
    config_path = tmp / f"{name}.toml"
    config_path.write_text(render_toml(config))
    argv = [binary or edge_binary(), "run", "--config", str(config_path)]
    argv += ["--workers", str(workers)]
    proc, log_path = procs.start(name, argv, env)
    edge = Edge(proc, log_path, port, admin_port, config_path)

    def is_ready() -> bool:
        if http_get(admin_port, "/readyz", timeout=1.0)[0] != 200 or not accepts(port):
            return False
        return ready is None or ready(port, admin_port)

    wait_until(name, is_ready, proc, log_path)
    deadline = time.monotonic() + READY_TIMEOUT
    while len(edge.workers) < workers and time.monotonic() < deadline:
        edge.workers = children(proc.pid)
        time.sleep(0.05)
    if len(edge.workers) != workers:
        raise RuntimeError(f"expected {workers} edge workers, found pids {edge.workers}")
    return edge


# The one cold app of the stampede and webhooks benchmarks: sample_app.py behind the edge.
COLD_APP = "stampede"
COLD_HOST = "stampede.localhost"


def token_env(token: str) -> dict[str, str]:
    """The environment of a control plane and an edge that share `token`."""
    return {**os.environ, "CONTROL_PLANE_TOKEN": token}


def start_cold_app_stack(
    procs: Processes,
    tmp: Path,
    token: str,
    store: str,
    workers: int,
    start_delay: float,
    app_args: tuple[str, ...] = (),
    app_settings: dict[str, Any] | None = None,
    more_apps: dict[str, dict[str, Any]] | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
) -> tuple[ControlPlane, Edge]:
    """The control plane with one app (bench/apps/sample_app.py, `start_delay` s to start,
    plus `app_args`) and the edge in front on `store` (its URL), the app scale_to_zero with
    `app_settings`.

    `more_apps`: more apps of the same program and start delay, each `name` -> its edge
    settings (host `<name>.localhost`, scale_to_zero like the first). `sections`: more
    sections of the edge's config (e.g. ``{"store": {"min_replicas_acked": 1}}``)."""
    env = token_env(token)
    args = ("--name", "{allocation}", "--start-delay", repr(start_delay), *app_args)
    settings = {COLD_APP: app_settings or {}, **(more_apps or {})}
    cp_apps = [cp_app(name, SAMPLE_APP, *args) for name in settings]
    cp = start_control_plane(procs, tmp, env, cp_apps)
    config = {
        "edge": {"workers": workers, "store": store},
        **(sections or {}),
        "control_plane": {"url": f"http://127.0.0.1:{cp.port}"},
        "apps": [
            {
                "name": name,
                "hosts": [COLD_HOST if name == COLD_APP else f"{name}.localhost"],
                "scale_to_zero": True,
                "hold_timeout": "60s",
                "readiness_timeout": "30s",
                "idle_timeout": "10m",
                **extra,
            }
            for name, extra in settings.items()
        ],
    }
    return cp, start_edge(procs, tmp, env, config)


# --------------------------------------------------------------------------
# nginx: a fast upstream (return 200) or a reverse proxy, as the benchmarks' peer
# --------------------------------------------------------------------------

NGINX_COMMON = """\
daemon off;
master_process {master};
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


def start_nginx(
    procs: Processes,
    tmp: Path,
    name: str,
    workers: int,
    body: str,
    wrapper: Sequence[str] = (),
) -> tuple[subprocess.Popen, Path]:
    """nginx in the foreground with `body` (an http block's servers) under tmp/`name`.

    With a `wrapper` (e.g. valgrind and its options) nginx runs under it as one process,
    without a master: the wrapper's pid is the process that serves."""
    prefix = tmp / name
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    master = "off" if wrapper else "on"
    conf.write_text(NGINX_COMMON.format(workers=workers, prefix=prefix, body=body, master=master))
    argv = [find_tool("nginx") or "nginx", "-p", str(prefix), "-c", str(conf), "-e", "stderr"]
    return procs.start(name, [*wrapper, *argv])


# --------------------------------------------------------------------------
# Replicated stores: a redis with replicas, a local Redis Cluster
# --------------------------------------------------------------------------


def online_replicas(port: int) -> int:
    """Replicas the redis-server on 127.0.0.1:`port` lists online (INFO replication);
    0 when it does not answer."""
    try:
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0) as client:
            info = client.info("replication")
    except redis.RedisError:
        return 0
    return sum(
        1
        for key, value in info.items()
        if key.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
    )


def start_redis_with_replicas(
    procs: Processes, tmp: Path, replicas: int = 1, appendfsync: str = "always"
) -> str:
    """start_redis, plus `replicas` redis-servers replicating it (--replicaof, AOF as the
    primary has, each in a directory of its own); the primary's URL once every replica is
    online (INFO replication), within READY_TIMEOUT. Processes stops them all."""
    url = start_redis(procs, tmp, appendfsync)
    if replicas < 1:
        return url
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0) as primary:
        # A replica's first sync starts at once, not after the default 5 s wait for more.
        primary.config_set("repl-diskless-sync-delay", 0)
    binary = find_tool("redis-server") or "redis-server"
    proc, log_path = None, None
    for i in range(replicas):
        workdir = tmp / f"redis-replica-{i}"
        workdir.mkdir(parents=True, exist_ok=True)
        replica_port = free_port()
        argv = [
            binary,
            "--port", str(replica_port),
            "--bind", "127.0.0.1",
            "--replicaof", "127.0.0.1", str(port),
            "--save", "",
            "--appendonly", "yes" if appendfsync else "no",
            "--appendfsync", appendfsync or "everysec",
            "--daemonize", "no",
            "--dir", str(workdir),
        ]  # fmt: skip
        proc, log_path = procs.start(f"redis-replica-{i}", argv)
        wait_until(f"redis replica {i}", lambda p=replica_port: redis_pong(p), proc, log_path)
    attached = lambda: online_replicas(port) >= replicas  # noqa: E731
    wait_until(f"{replicas} replica(s) online", attached, proc, log_path)
    return url


@contextlib.contextmanager
def bench_cluster(
    tmp: Path, replicas: int = 1, appendfsync: str = "always"
) -> Iterator[LocalRedisCluster]:
    """A local Redis Cluster (scheduler_client.local.redis_cluster: 3 masters, `replicas`
    replicas each, AOF with `appendfsync`, 127.0.0.1) under tmp/redis-cluster; `.url` is
    the store URL. Stopped on the way out, also on errors and Ctrl-C (a failed start stops
    what it started)."""
    cluster = LocalRedisCluster(tmp / "redis-cluster", replicas=replicas, appendfsync=appendfsync)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


# --------------------------------------------------------------------------
# Load: wrk, or the built-in asyncio generator (also a process of its own)
# --------------------------------------------------------------------------

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_LAT_RE = re.compile(r"^\s*(50|75|90|99(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
PYTHON_LOADGEN = "python-asyncio (fallback)"


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


def use_wrk(python_loadgen: bool = False) -> bool:
    """Whether load runs use wrk: installed, and the built-in generator not asked for."""
    return not python_loadgen and find_tool("wrk") is not None


def load_generator_name(wrk: bool) -> str:
    if not wrk:
        return PYTHON_LOADGEN
    return " ".join((tool_version([find_tool("wrk") or "wrk", "-v"]) or "wrk").split()[:2])


class Load:
    """One load run on 127.0.0.1:`port` with Host `host`, started at once, bounded in time.

    wrk ``-t1 -c<connections> -d<duration>s --latency`` when `wrk`, else the built-in
    asyncio generator (which shares the CPU with the servers: its figures are not
    comparable with wrk's). ``result()`` waits for it and judges the run.
    """

    def __init__(self, port: int, duration: float, connections: int, host: str, wrk: bool):
        self.duration = max(1, round(duration))
        self.wrk = wrk
        if wrk:
            argv = [find_tool("wrk") or "wrk", "-t1", f"-c{connections}", f"-d{self.duration}s"]
            argv += ["--latency", "-H", f"Host: {host}", f"http://127.0.0.1:{port}/"]
        else:
            argv = [sys.executable, str(Path(__file__).resolve()), "load", "--port", str(port)]
            argv += ["--duration", str(self.duration), "--connections", str(connections)]
            argv += ["--host", host]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
        )

    def result(self) -> dict[str, Any]:
        try:
            out, err = self.proc.communicate(timeout=self.duration + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        if self.wrk:
            result = parse_wrk(out)
        else:
            try:
                result = json.loads(out)
            except ValueError:
                result = {"rps": None, "requests": None}
        total = result.get("requests") or 0
        bad = (result.get("non2xx") or 0) + (result.get("socket_errors") or 0)
        if self.proc.returncode != 0 or result.get("rps") is None:
            tool = "wrk" if self.wrk else "load generator"
            result["error"] = (
                f"{tool} failed (status {self.proc.returncode}): {(err or out)[-300:]}"
            )
        elif not total:
            result["error"] = "no requests completed"
        elif bad > MAX_BAD_SHARE * total:
            result["error"] = f"{bad} of {total} requests failed (non-2xx/3xx or socket errors)"
        return result


def add_load_options(parser: argparse.ArgumentParser, duration: float) -> None:
    """--duration, --connections, --warmup and --python-loadgen of a benchmark's load runs."""
    parser.add_argument(
        "--duration", type=float, default=duration, help=f"seconds per load run ({duration:g})"
    )
    parser.add_argument("--connections", type=int, default=50, help="load connections (50)")
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds of warm-up (2 from 10 s runs, else 1)"
    )
    parser.add_argument(
        "--python-loadgen",
        action="store_true",
        help="use the built-in asyncio load generator even when wrk is installed",
    )


def warmup_s(args: argparse.Namespace) -> float:
    """--warmup, or its default for --duration."""
    if args.warmup is not None:
        return args.warmup
    return 2.0 if args.duration >= 10 else 1.0


def run_load(port: int, duration: float, connections: int, host: str, wrk: bool) -> dict[str, Any]:
    return Load(port, duration, connections, host, wrk).result()


async def py_load(port: int, duration: float, connections: int, host: str) -> dict[str, Any]:
    """Keep-alive GETs from `connections` connections for `duration` s; wrk's figures."""
    import httptools

    loop = asyncio.get_running_loop()
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    deadline = loop.time() + duration
    latencies: list[float] = []
    stats = {"non2xx": 0, "socket_errors": 0}
    perf = time.perf_counter

    class Client(asyncio.Protocol):
        def __init__(self) -> None:
            self.done = loop.create_future()
            self.sent_at = 0.0

        def connection_made(self, transport) -> None:
            self.transport = transport
            self.parser = httptools.HttpResponseParser(self)
            self.send()

        def send(self) -> None:
            if loop.time() >= deadline:
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
            if not 200 <= self.parser.get_status_code() < 400:
                stats["non2xx"] += 1
            if self.parser.should_keep_alive():
                self.send()
            else:
                self.transport.close()

        def connection_lost(self, exc) -> None:
            if not self.done.done():
                self.done.set_result(exc)

    async def worker() -> None:
        while loop.time() < deadline:
            try:
                _, proto = await loop.create_connection(Client, "127.0.0.1", port)
                if await proto.done is not None:
                    stats["socket_errors"] += 1
            except OSError:
                stats["socket_errors"] += 1
                await asyncio.sleep(0.01)

    started = perf()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(connections))), duration + 10)
    elapsed = perf() - started
    latencies_ms = [x * 1000 for x in latencies]
    return {
        "rps": round(len(latencies) / elapsed, 2) if elapsed > 0 and latencies else None,
        "requests": len(latencies),
        **{f"p{q}_ms": r3(percentile(latencies_ms, q)) for q in (50, 75, 90, 99)},
        **stats,
    }


def run_async(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


# --------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def r3(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def wake_wait_ms(server_timing: str | None) -> float | None:
    """The `wake;dur=` the edge reports in Server-Timing, in ms; None when the request did
    not wait for a wake."""
    for part in (server_timing or "").split(","):
        name, _, params = part.strip().partition(";")
        if name != "wake":
            continue
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur":
                try:
                    return float(value)
                except ValueError:
                    return None
    return None


def doc_keys(doc: str | None) -> list[str]:
    """The keys listed under a "JSON keys" line of a docstring: one per line indented four
    spaces (its description may follow on the line and on lines indented further), up to
    the first blank line."""
    keys: list[str] = []
    lines = (doc or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("JSON keys")), None)
    if start is None:
        return keys
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        m = re.match(r"    (\w+)(\s|$)", line)
        if m:
            keys.append(m.group(1))
    return keys


def write_json(path: Path, report: dict[str, Any], doc: str | None, strict: bool = True) -> None:
    """Write `report`; then, when `strict`, RuntimeError if it lacks a key `doc` lists or
    has one it does not (the file is written all the same, so the run is not lost)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    if not strict:
        return
    listed = doc_keys(doc)
    missing = [k for k in listed if k not in report]
    extra = [k for k in report if k not in listed]
    if missing or extra:
        raise RuntimeError(
            f"{path}: keys differ from the docstring's: missing {missing}, extra {extra}"
        )


def add_quick(parser: argparse.ArgumentParser, presets: dict[str, Any]) -> None:
    """--quick: the smoke-test size (`presets`, for the options left at their defaults)."""
    sizes = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in presets.items())
    parser.add_argument(
        "--quick", action="store_true", help=f"seconds, not minutes (the smoke test): {sizes}"
    )
    parser.set_defaults(_quick_presets=presets)


def apply_quick(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """With --quick, each preset replaces its option's default (options given win)."""
    if args.quick:
        for name, value in args._quick_presets.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    del args._quick_presets


def main(argv: list[str] | None = None) -> int:
    """`load`: the built-in load generator, as a process of its own; JSON on stdout."""
    parser = argparse.ArgumentParser(description="bench helpers: the built-in load generator")
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="keep-alive GETs to 127.0.0.1:PORT for DURATION s")
    load.add_argument("--port", type=int, required=True)
    load.add_argument("--duration", type=float, required=True)
    load.add_argument("--connections", type=int, default=50)
    load.add_argument("--host", default="localhost", help="the Host header")
    args = parser.parse_args(argv)
    result = run_async(py_load(args.port, args.duration, args.connections, args.host))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
