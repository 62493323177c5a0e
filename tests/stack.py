"""The stack as processes: a throwaway redis-server, upstream servers, the edge, the local
control plane.

Everything binds 127.0.0.1 on a free port, every wait is bounded, and whoever starts a
process here stops it (conftest.py's fixtures do, at teardown). Synchronous (subprocess +
polling), so it works at any fixture scope from both sync and async tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, TESTS, app_entry, free_port, to_toml

from scheduler_client.local.loopback import accepts, redis_pong
from scheduler_client.local.redis_cluster import ClusterNode, LocalRedisCluster

UPSTREAM_APP = TESTS / "upstream_app.py"
SAMPLE_APP = ROOT / "bench" / "apps" / "sample_app.py"
CONTROL_PLANE_TOKEN = "test-control-plane-token"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
# What a process left running at a test's teardown gets between SIGTERM and SIGKILL.
TEARDOWN_GRACE = 0.5


def tail(path: Path, limit: int = 4000) -> str:
    """The last `limit` characters of a process's output file."""
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "<no output>"


def http_get(url: str, timeout: float = 1.0, headers: dict[str, str] | None = None):
    """(status, body) for a GET, or (None, error) if nothing answered."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError) as exc:
        return None, repr(exc).encode()


def stop_process(proc: subprocess.Popen, group: bool) -> None:
    """SIGTERM the process itself, wait, then SIGKILL its process group (ours) if needed."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            proc.wait(5)
    if group:
        # Workers of an edge that exited without stopping them: give them a moment, then kill.
        for _ in range(20):
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


# --------------------------------------------------------------------------- redis


def redis_client(url: str, **options: Any) -> Any:
    """A plain redis-py asyncio client for a store URL: one server, or the whole cluster
    for redis+cluster:// (commands routed by key; FLUSHALL etc. need target_nodes)."""
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import ClusterNode as SeedNode
    from redis.asyncio.cluster import RedisCluster

    from wake.store.redis_connection import cluster_seeds, is_cluster

    if is_cluster(url):
        seeds, parsed = cluster_seeds(url)
        nodes = [SeedNode(host, port) for host, port in seeds]
        return RedisCluster(startup_nodes=nodes, **parsed, **options)
    return aioredis.from_url(url, **options)


class Pausable:
    """A test's own server process that can be frozen: connections stay open, nothing is
    answered (SIGSTOP) until it is resumed (a control plane's apps run on meanwhile)."""

    proc: subprocess.Popen | None

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)


class RedisProcess(Pausable):
    """A redis-server of our own on 127.0.0.1: startable, stoppable, restartable on its port.

    AOF is on (fsync every write), as a production queue needs: a restart keeps the data.
    """

    def __init__(self, workdir: Path, extra_args: tuple[str, ...] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not installed; `make test` installs it "
                "(or: apt-get install redis-server)",
                pytrace=False,
            )
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.extra_args = extra_args  # e.g. ("--replicaof", "127.0.0.1", "6379")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "yes",
                    "--appendfsync", "always",
                    "--daemonize", "no",
                    "--dir", str(self.workdir),
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not redis_pong(self.port):
            if self.proc.poll() is not None:
                pytest.fail(
                    f"redis-server exited with {self.proc.returncode}:\n{tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"redis-server did not answer PING:\n{tail(self.log_path)}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def wipe(self) -> None:
        """Forget the data (while stopped): the next start is an empty server."""
        assert self.proc is None, "stop the server before wiping its data"
        shutil.rmtree(self.workdir / "appendonlydir", ignore_errors=True)

    def pause_writes(self, ms: int) -> None:
        """`CLIENT PAUSE ms WRITE`: reads are served, writes wait (a failover's stall)."""
        subprocess.run(
            ["redis-cli", "-p", str(self.port), "CLIENT", "PAUSE", str(ms), "WRITE"],
            check=True,
            capture_output=True,
            timeout=10,
        )

    def crash(self) -> None:
        """SIGKILL: what the AOF (fsync always) holds is what the next start has."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)
        self.proc = None


# --------------------------------------------------------------------------- upstream


@dataclass
class Upstream:
    """A running tests/upstream_app.py; what it received is readable via .log()."""

    name: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _call(self, method: str, path: str) -> bytes:
        req = urllib.request.Request(self.url + path, method=method)
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.read()

    def log(self) -> list[dict[str, Any]]:
        """Requests seen since the last reset (method, path, headers, complete, body_len)."""
        return json.loads(self._call("GET", "/log"))

    def paths(self) -> list[str]:
        return [entry["path"] for entry in self.log()]

    def reset(self) -> None:
        self._call("POST", "/reset")

    def state(self, key: str) -> str:
        """'waiting', 'finished', 'cancelled' or 'unknown' for a /stream or /hold id."""
        return self._call("GET", f"/state?id={key}").decode()

    def release(self, key: str) -> None:
        self._call("POST", f"/release?id={key}")


def start_upstream(name: str, log_dir: Path) -> Upstream:
    """tests/upstream_app.py named `name`, once it answers /healthz."""
    port = free_port()
    log_path = log_dir / f"upstream-{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(UPSTREAM_APP), "--port", str(port), "--name", name],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=TESTS,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"upstream {name} exited with {proc.returncode}:\n{tail(log_path)}")
        status, _ = http_get(f"http://127.0.0.1:{port}/healthz")
        if status == 200:
            return Upstream(name, port, proc, log_path)
        if time.monotonic() > deadline:
            stop_process(proc, group=False)
            raise RuntimeError(f"upstream {name} did not become healthy:\n{tail(log_path)}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- edge


def listeners(port: int) -> int:
    """How many sockets listen on 127.0.0.1:`port` (/proc/net/tcp)."""
    address = f"0100007F:{port:04X}"
    with contextlib.suppress(OSError), open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
        return sum(1 for row in rows if row[1] == address and row[3] == "0A")  # 0A: LISTEN
    return 0


def _loopback(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "", "localhost"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port)


@dataclass
class EdgeProcess:
    port: int
    admin_port: int
    proc: subprocess.Popen
    config_path: Path
    log_path: Path
    config: dict[str, Any]
    admin_token: str = ""
    stopped: bool = field(default=False)

    @property
    def url(self) -> str:
        scheme = "https" if self.config["edge"].get("tls") else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}

    def admin_get(self, path: str, timeout: float = 5.0) -> tuple[int | None, bytes]:
        return http_get(self.admin_url + path, timeout, self.admin_headers())

    def metrics(self) -> str:
        status, body = self.admin_get("/metrics")
        assert status == 200, f"/metrics answered {status}: {body[:300]!r}"
        return body.decode()

    def output(self) -> str:
        return tail(self.log_path)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to exit (bounded); its exit status."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"edge still running after {timeout}s:\n{self.output()}") from None

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            stop_process(self.proc, group=True)


def _merge(base: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(base)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class EdgeLauncher:
    """Writes a config, starts `python -m edge run`, waits for /readyz, stops on close."""

    def __init__(self, tmp_dir: Path, default_apps: list[dict[str, Any]]) -> None:
        self.tmp_dir = tmp_dir
        self.default_apps = default_apps
        self.started: list[EdgeProcess] = []
        self.count = 0

    def build_config(
        self,
        *,
        apps: list[dict[str, Any]] | None = None,
        edge: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        upstream: dict[str, Any] | None = None,
        sections: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        base_edge = {
            "listen": f"127.0.0.1:{free_port()}",
            "admin_listen": f"127.0.0.1:{free_port()}",
            "workers": 1,
            "store": "memory://",
            "shutdown_timeout": "5s",
        }
        return {
            "edge": _merge(base_edge, edge),
            "limits": dict(limits or {}),
            "upstream": dict(upstream or {}),
            **(sections or {}),
            "apps": self.default_apps if apps is None else apps,
        }

    def __call__(
        self,
        *,
        apps: list[dict[str, Any]] | None = None,
        edge: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        upstream: dict[str, Any] | None = None,
        sections: dict[str, Any] | None = None,
        workers: int | None = None,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> EdgeProcess:
        # Ports picked here were free a moment ago; another process may take one before
        # the edge binds it. Only then, and only for ports picked here, try other ones.
        picked_ports = not edge or ("listen" not in edge and "admin_listen" not in edge)
        for attempt in range(3):
            config = self.build_config(
                apps=apps, edge=edge, limits=limits, upstream=upstream, sections=sections
            )
            edge_proc = self._start(config, workers, env, args)
            count = workers if workers is not None else config["edge"].get("workers", 1)
            if self._wait_ready(edge_proc, count, may_clash=picked_ports and attempt < 2):
                break
        if not edge_proc.admin_token:
            # Mutating admin calls always need a token: the one the edge generated.
            from edge.ops.admin_token import client_admin_token
            from edge.server.config import load_config

            edge_proc.admin_token = client_admin_token(
                load_config(edge_proc.config_path).edge, edge_proc.config_path
            )
        return edge_proc

    def _start(
        self,
        config: dict[str, Any],
        workers: int | None,
        env: dict[str, str] | None,
        args: tuple[str, ...],
    ) -> EdgeProcess:
        self.count += 1
        config_path = self.tmp_dir / f"edge-{self.count}.toml"
        config_path.write_text(to_toml(config))
        log_path = self.tmp_dir / f"edge-{self.count}.log"
        cmd = [sys.executable, "-m", "edge", "run", "--config", str(config_path)]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        cmd += list(args)  # extra `edge run` flags, e.g. --log-level
        full_env = {k: v for k, v in os.environ.items() if k != "EDGE_ADMIN_TOKEN"}
        full_env.update(env or {})
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=full_env,
                start_new_session=True,  # its own process group, so workers can be reaped
            )
        _, port = _loopback(config["edge"]["listen"])
        _, admin_port = _loopback(config["edge"]["admin_listen"])
        token = config["edge"].get("admin_token") or full_env.get("EDGE_ADMIN_TOKEN", "")
        edge_proc = EdgeProcess(port, admin_port, proc, config_path, log_path, config, token)
        self.started.append(edge_proc)
        return edge_proc

    def _wait_ready(self, edge_proc: EdgeProcess, workers: Any, may_clash: bool = False) -> bool:
        """True once ready; False when it could not bind a port, or shares its listen port
        with another edge (below), and `may_clash`."""
        deadline = time.monotonic() + START_TIMEOUT
        last: tuple[int | None, bytes] = (None, b"")
        while True:
            if edge_proc.proc.poll() is not None:
                if may_clash and "address already in use" in edge_proc.output():
                    return False
                pytest.fail(
                    f"edge exited with {edge_proc.proc.returncode} before /readyz answered 200;"
                    f" config {edge_proc.config_path}:\n{edge_proc.output()}",
                    pytrace=False,
                )
            if last[0] != 200:
                last = edge_proc.admin_get("/readyz", timeout=1.0)
                if may_clash and last[0] is None and "address already in use" in edge_proc.output():
                    # A port taken meanwhile: the supervisor would restart its worker on
                    # it again and again.
                    edge_proc.stop()
                    return False
            if last[0] == 200 and accepts(edge_proc.port):
                # Each worker listens with SO_REUSEPORT: an edge of another test given the
                # same port (free a moment ago) binds it too and takes some connections.
                host, _ = _loopback(edge_proc.config["edge"]["listen"])
                shared = host == "127.0.0.1" and listeners(edge_proc.port) > workers
                if not (may_clash and isinstance(workers, int) and shared):
                    return True
                edge_proc.stop()
                return False
            if time.monotonic() > deadline:
                edge_proc.stop()
                pytest.fail(
                    f"edge not ready within {START_TIMEOUT}s (last /readyz: {last[0]} "
                    f"{last[1][:200]!r}):\n{edge_proc.output()}",
                    pytrace=False,
                )
            time.sleep(0.05)

    def close(self) -> None:
        """Teardown: how an edge stops is no test's concern here (a test that checks it
        stops the edge itself), so every edge left running gets SIGTERM at once, a moment
        to exit, then SIGKILL to its process group. A graceful stop can wait out its
        shutdown_timeout (a replayer waiting for a wake that never ends): seconds a test."""
        running = [edge_proc for edge_proc in self.started if not edge_proc.stopped]
        for edge_proc in running:
            edge_proc.stopped = True
            if edge_proc.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    edge_proc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + TEARDOWN_GRACE
        for edge_proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                edge_proc.proc.wait(max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(edge_proc.proc.pid, signal.SIGKILL)  # its workers too
            edge_proc.proc.wait(5)


def default_apps(up: Upstream) -> list[dict[str, Any]]:
    """One app "echo" (hosts app.localhost and *.example.localhost) proxying to `up`."""
    return [app_entry("echo", ["app.localhost", "*.example.localhost"], up)]


# ------------------------------------------------------------------ control plane


@dataclass
class ControlPlaneProcess(Pausable):
    """`python -m edge controlplane` as a subprocess; restartable on the same state file."""

    config_path: Path
    log_path: Path
    port: int
    token: str
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state_file(self) -> Path:
        return self.config_path.with_suffix(".sqlite")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self) -> None:
        env = {**os.environ, "CONTROL_PLANE_TOKEN": self.token}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge", "controlplane", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while http_get(self.url + "/healthz", 0.5)[0] != 200:
            if self.proc.poll() is not None:
                pytest.fail(f"control plane exited {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"control plane not healthy in {START_TIMEOUT}s:\n{self.output()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM the control plane (its app processes live on in their own sessions)."""
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, group=False)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def output(self) -> str:
        return tail(self.log_path)


def control_plane_process(
    tmp_dir: Path, index: int, apps: list[dict[str, Any]], **section: Any
) -> ControlPlaneProcess:
    """A control plane (not started yet) on a free port, its files cp-INDEX.* in `tmp_dir`."""
    port = free_port()
    config_path = tmp_dir / f"cp-{index}.toml"
    config = {
        "controlplane": {
            "listen": f"127.0.0.1:{port}",
            "state_file": str(config_path.with_suffix(".sqlite")),
            **section,
        },
        "apps": apps,
    }
    config_path.write_text(to_toml(config))
    return ControlPlaneProcess(config_path, tmp_dir / f"cp-{index}.log", port, CONTROL_PLANE_TOKEN)


def sample_app_spec(name: str = "hello", **overrides: Any) -> dict[str, Any]:
    """An [[apps]] entry running bench/apps/sample_app.py."""
    spec = {
        "name": name,
        "command": ["{python}", str(SAMPLE_APP), "--port", "{port}", "--name", "{allocation}"],
        "artifact": str(SAMPLE_APP),
        "readiness_path": "/healthz",
        "start_timeout": "15s",
        "drain_grace": "2s",
    }
    spec.update(overrides)
    return spec


def cold_app(name: str, **overrides: Any) -> dict[str, Any]:
    """An edge [[apps]] entry for a scale-to-zero app on `<name>.localhost`."""
    app = {
        "name": name,
        "hosts": [f"{name}.localhost"],
        "scale_to_zero": True,
        "hold_timeout": "20s",
        "readiness_timeout": "15s",
    }
    app.update(overrides)
    return app


def kill_leftover_apps(state_file: Path) -> None:
    """App processes outlive the control plane by design; reap the ones a test left: those
    its state file names, and any other process working in its folder (apps run there),
    such as one spawned just before the control plane was killed, its pid not recorded."""
    if state_file.exists():
        with contextlib.suppress(sqlite3.Error), sqlite3.connect(state_file) as db:
            for (pid,) in db.execute("SELECT pid FROM allocations WHERE pid IS NOT NULL"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)  # an app leads a process group of its own
    folder = state_file.parent.resolve()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (os.getpid(), os.getppid()):
            continue
        with contextlib.suppress(OSError):
            if Path(os.readlink(entry / "cwd")).is_relative_to(folder):
                os.kill(int(entry.name), signal.SIGKILL)


def shard_of(cluster: LocalRedisCluster, key: str) -> tuple[ClusterNode, ClusterNode]:
    """The (master, replica) harness nodes serving `key`'s slot now."""
    live = next(n for n in cluster.nodes if cluster.running(n))
    with live.client() as c:
        slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
        nodes = c.cluster("NODES")
    master = next(
        (address, node)
        for address, node in nodes.items()
        if "master" in node["flags"]
        and "fail" not in node["flags"]
        and any(int(low) <= slot <= int(high) for low, high in node["slots"])
    )
    replica = next(
        address
        for address, node in nodes.items()
        if node["master_id"] == master[1]["node_id"] and "fail" not in node["flags"]
    )
    return cluster.node_for(master[0]), cluster.node_for(replica)
