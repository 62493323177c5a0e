"""A local Redis Cluster of throwaway redis-server processes, for tests and benchmarks.

`LocalRedisCluster(workdir).start()` runs `masters * (1 + replicas)` nodes on free
127.0.0.1 ports (cluster-enabled, AOF on, each in its own directory), joins them with
`redis-cli --cluster create --cluster-replicas N --cluster-yes`, and returns once every
node says cluster_state:ok and every replica's link to its master is up. Every wait is
bounded; `stop()` (also run when starting fails) terminates every node it started.
Nodes can be killed, paused and restarted on their port and data, for failover tests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from scheduler_client.local.loopback import HOST, free_port, redis_pong

log = logging.getLogger(__name__)

SLOTS = 16384
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# A free port may be taken between our probe and redis-server's bind: try a few.
PORT_ATTEMPTS = 3


class ClusterStartError(RuntimeError):
    """The cluster did not come up in time (the message carries the nodes' log tails)."""


@dataclass
class ClusterNode:
    """One redis-server of the cluster: its port, data directory and process."""

    port: int
    bus_port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def client(self, timeout: float = 2.0) -> redis.Redis:
        """A plain (non-cluster) connection to this node alone."""
        return redis.Redis(
            host=HOST,
            port=self.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
        )

    def tail(self, limit: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return "<no log>"


@dataclass
class ClusterInfo:
    """What the running cluster looks like, from one node's CLUSTER NODES."""

    masters: dict[str, list[str]] = field(default_factory=dict)  # master address -> replicas
    slots_covered: int = 0


class LocalRedisCluster:
    """`masters` masters with `replicas` replicas each, every node on 127.0.0.1."""

    def __init__(
        self,
        workdir: Path,
        *,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 2000,
        appendfsync: str = "everysec",
    ) -> None:
        binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if binary is None or cli is None:
            raise ClusterStartError(
                "a Redis Cluster needs redis-server and redis-cli on PATH "
                "(scripts/ensure-redis installs the Debian package redis-server, "
                "which brings redis-tools)"
            )
        self.binary, self.cli = binary, cli
        self.workdir = workdir
        self.node_timeout_ms = node_timeout_ms
        self.appendfsync = appendfsync
        self.replicas = replicas
        self.nodes = [
            ClusterNode(0, 0, workdir / f"node-{i}") for i in range(masters * (1 + replicas))
        ]
        self.start_seconds = 0.0

    @property
    def url(self) -> str:
        """The seed URL the store takes: every node, so any one can answer first."""
        return "redis+cluster://" + ",".join(n.address for n in self.nodes)

    # ---------------------------------------------------------------- lifecycle

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start every node, create the cluster, wait until it is whole; stop all on failure."""
        began = time.monotonic()
        deadline = began + timeout
        try:
            for node in self.nodes:
                node.workdir.mkdir(parents=True, exist_ok=True)
                self._first_start(node, deadline)
            self._create(deadline)
            self.wait_healthy(deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        log.info("redis cluster up in %.2fs: %s", self.start_seconds, self.url)

    def _first_start(self, node: ClusterNode, deadline: float) -> None:
        for attempt in range(PORT_ATTEMPTS):
            node.port, node.bus_port = free_port(), free_port()
            self.start_node(node, deadline)
            if node.proc is not None and node.proc.poll() is None:
                return
            if attempt + 1 < PORT_ATTEMPTS:
                log.info("redis node on %s exited at start; new ports", node.address)
        raise ClusterStartError(f"redis-server {node.address} did not start:\n{node.tail()}")

    def start_node(self, node: ClusterNode, deadline: float | None = None) -> None:
        """(Re)start one node on its port and data; it rejoins with its nodes.conf."""
        if deadline is None:
            deadline = time.monotonic() + START_TIMEOUT
        argv = [
            self.binary,
            "--port", str(node.port),
            "--bind", HOST,
            "--cluster-enabled", "yes",
            # The bus port is chosen too: port + 10000 may be above 65535 or taken.
            "--cluster-port", str(node.bus_port),
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            # A new replica's first sync starts at once, not after the default 5 s
            # wait for more replicas to share one diskless transfer.
            "--repl-diskless-sync-delay", "0",
            "--daemonize", "no",
            "--dir", str(node.workdir),
        ]  # fmt: skip
        with open(node.log_path, "ab") as out:
            node.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        node.paused = False
        while not redis_pong(node.port, timeout=0.5):
            if node.proc.poll() is not None:
                return  # the caller decides: retry on new ports, or fail
            if time.monotonic() > deadline:
                raise ClusterStartError(f"redis-server {node.address} did not answer PING")
            time.sleep(0.02)

    def _create(self, deadline: float) -> None:
        argv = [self.cli, "--cluster", "create", *(n.address for n in self.nodes)]
        argv += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterStartError(f"redis-cli --cluster create timed out: {exc.stdout}") from exc
        if done.returncode != 0:
            raise ClusterStartError(
                f"redis-cli --cluster create failed ({done.returncode}):\n"
                f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            )

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Until every running node says cluster_state:ok and every replica's link is up."""
        deadline = time.monotonic() + timeout
        problem = "not checked yet"
        while time.monotonic() < deadline:
            problem = self._health_problem()
            if not problem:
                return
            time.sleep(0.05)
        tails = "\n".join(f"--- {n.address}\n{n.tail(800)}" for n in self.nodes)
        raise ClusterStartError(f"cluster not healthy after {timeout:.1f}s: {problem}\n{tails}")

    def _health_problem(self) -> str:
        """'' when healthy, else what is not yet so."""
        running = [n for n in self.nodes if self.running(n)]
        for node in running:
            try:
                with node.client(timeout=0.5) as c:
                    info = c.cluster("INFO")
                    if info.get("cluster_state") != "ok":
                        return f"{node.address}: cluster_state {info.get('cluster_state')}"
                    if int(info.get("cluster_slots_ok", 0)) != SLOTS:
                        return f"{node.address}: {info.get('cluster_slots_ok')} slots ok"
                    if int(info.get("cluster_known_nodes", 0)) < len(self.nodes):
                        return f"{node.address}: knows {info.get('cluster_known_nodes')} nodes"
                    repl = c.info("replication")
                    if repl["role"] == "slave" and repl.get("master_link_status") != "up":
                        return f"{node.address}: replica link {repl.get('master_link_status')}"
            except redis.RedisError as exc:
                return f"{node.address}: {exc}"
        info = self.info()
        if len(info.masters) * (1 + self.replicas) != len(running):
            return f"roles not settled: {info.masters}"
        if any(len(r) != self.replicas for r in info.masters.values()):
            return f"replicas not attached: {info.masters}"
        return ""

    def info(self) -> ClusterInfo:
        """Masters (with their connected replicas) and slots covered, per the first node up."""
        for node in self.nodes:
            if not self.running(node):
                continue
            with contextlib.suppress(redis.RedisError), node.client(timeout=0.5) as c:
                return parse_cluster_nodes(c.cluster("NODES"))
        return ClusterInfo()

    def stop(self) -> None:
        """Terminate every node (resumed first if paused); kill any that linger."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    node.proc.send_signal(signal.SIGCONT)
                    node.proc.terminate()
        for node in self.nodes:
            self._reap(node)

    def _reap(self, node: ClusterNode) -> None:
        if node.proc is None:
            return
        try:
            node.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait(5)
        node.proc = None
        node.paused = False

    # ---------------------------------------------------------------- faults

    def running(self, node: ClusterNode) -> bool:
        return node.proc is not None and node.proc.poll() is None and not node.paused

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL: the node vanishes without a goodbye, as in a host crash."""
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
        self._reap(node)

    def pause(self, node: ClusterNode) -> None:
        """SIGSTOP: the node holds its sockets but answers nothing (a hung host)."""
        assert node.proc is not None
        os.kill(node.proc.pid, signal.SIGSTOP)
        node.paused = True

    def resume(self, node: ClusterNode) -> None:
        assert node.proc is not None
        os.kill(node.proc.pid, signal.SIGCONT)
        node.paused = False

    def flush(self) -> None:
        """Empty every master (replicas follow): a clean slate between tests."""
        for node in self.nodes:
            if not self.running(node):
                continue
            with node.client() as c:
                if c.info("replication")["role"] == "master":
                    c.flushall()

    def node_for(self, address: str) -> ClusterNode:
        return next(n for n in self.nodes if n.address == address)

    def owner_of(self, key: str) -> tuple[ClusterNode, ClusterNode]:
        """The master serving `key`'s slot (CLUSTER KEYSLOT, CLUSTER SLOTS), and its replica."""
        node = next(n for n in self.nodes if self.running(n))
        with node.client() as c:
            slot = int(c.cluster("KEYSLOT", key))
            ranges = c.cluster("SLOTS")
        master = next(r[2] for r in ranges if int(r[0]) <= slot <= int(r[1]))
        address = f"{master[0]}:{master[1]}"
        return self.node_for(address), self.node_for(self.info().masters[address][0])

    def take_over(self, replica: ClusterNode, timeout: float = START_TIMEOUT) -> None:
        """Promote `replica` now (CLUSTER FAILOVER TAKEOVER: no vote, no node timeout) and
        wait until it says it is a master."""
        with replica.client() as c:
            c.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
        deadline = time.monotonic() + timeout
        while True:
            with replica.client() as c:
                if c.info("replication")["role"] == "master":
                    return
            if time.monotonic() > deadline:
                raise ClusterStartError(f"{replica.address} not promoted after {timeout:.1f}s")
            time.sleep(0.02)


def parse_cluster_nodes(nodes: dict[str, dict[str, Any]]) -> ClusterInfo:
    """ClusterInfo from redis-py's parsed CLUSTER NODES (failed, disconnected nodes left out)."""
    masters: dict[str, list[str]] = {}
    address_of = {node["node_id"]: address for address, node in nodes.items()}
    covered = 0
    live = {
        address: node
        for address, node in nodes.items()
        if node["connected"] and not {"fail", "noaddr"} & set(node["flags"].split(","))
    }
    for address, node in live.items():
        if "master" in node["flags"].split(","):
            masters[address] = []
            covered += sum(int(high) - int(low) + 1 for low, high in node["slots"])
    for address, node in live.items():
        master = address_of.get(node["master_id"])
        if "slave" in node["flags"].split(",") and master in masters:
            masters[master].append(address)
    return ClusterInfo(masters=masters, slots_covered=covered)
