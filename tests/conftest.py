"""Fixtures: a throwaway redis-server, real upstream servers, the edge as a subprocess,
the local control plane, and HTTP client sessions.

The processes and their helpers live in stack.py (and controlplane_client.py for the
control plane's API); every process a fixture starts is stopped at its teardown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from controlplane_client import Api, app
from stack import (
    ControlPlaneProcess,
    EdgeLauncher,
    RedisProcess,
    Upstream,
    control_plane_process,
    default_apps,
    kill_leftover_apps,
    start_upstream,
    stop_process,
)

from scheduler_client.local.redis_cluster import ClusterStartError, LocalRedisCluster

# ---------------------------------------------------------------------- ordering

# The slowest files, slowest first (as measured on a 2-core machine). `make
# test` runs `-n 4 --dist loadfile`: a worker takes a whole file, the next one once it is
# nearly done. Started last, a minute-long file keeps one worker busy after the others
# have finished; started first, the many short files fill in around it.
SLOWEST_FILES = [
    "tests/test_queue_edge.py",
    "tests/test_routes_edge.py",
    "tests/test_wake_edge.py",
    "tests/test_locust.py",
    "tests/test_wake_region.py",
    "tests/faults/test_wake_faults.py",
    "tests/test_wake_gallery.py",
    "tests/faults/test_queue_faults.py",
    "tests/test_demo.py",
    "tests/test_bench_smoke_wake.py",
    "tests/test_concurrency_edge.py",
    "tests/test_controlplane.py",
    "tests/faults/test_wake_controller_faults.py",
    "tests/test_idle_in_flight.py",
    "tests/test_admin.py",
    "tests/faults/test_wake_cluster_faults.py",
    "tests/test_proxy_limits.py",
    "tests/test_cli.py",
    "tests/test_bench_smoke_load.py",
    "tests/test_gallery_admin.py",
    "tests/test_proxy_cold_front.py",
    "tests/faults/test_queue_failover.py",
    "tests/test_reload.py",
]


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist would hand out files by their number of tests, most first: the slow
    # files of a few long tests would come last. Keep the order collected (below).
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slowest files first; the rest after them as collected (a stable sort)."""
    rank = {path: i for i, path in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


# --------------------------------------------------------------------------- redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[str]:
    """A throwaway redis-server (AOF on) on a free 127.0.0.1 port; yields redis://127.0.0.1:P/0."""
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
async def fresh_redis(redis_server: str) -> str:
    """The session's redis-server, emptied for this test."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_server)
    await client.flushall()
    await client.aclose()
    return redis_server


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test's own, to stop, pause or restart."""
    server = RedisProcess(tmp_path / "own-redis")
    server.workdir.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[LocalRedisCluster]:
    """A Redis Cluster (3 masters, 3 replicas, AOF on) on free 127.0.0.1 ports; `.url` is
    the redis+cluster:// seed URL, `.nodes` the processes to kill, pause or restart."""
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
    except ClusterStartError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def fresh_cluster(redis_cluster: LocalRedisCluster) -> LocalRedisCluster:
    """The session's cluster, emptied and whole (a test before may have killed a node)."""
    for node in redis_cluster.nodes:
        if node.paused:
            redis_cluster.resume(node)
        elif not redis_cluster.running(node):
            redis_cluster.start_node(node)
    redis_cluster.wait_healthy()
    redis_cluster.flush()
    return redis_cluster


# --------------------------------------------------------------------------- upstream


@pytest.fixture(scope="session")
def upstream_server(tmp_path_factory) -> Iterator[Upstream]:
    up = start_upstream("a", tmp_path_factory.mktemp("upstream-a"))
    yield up
    stop_process(up.proc, group=False)


@pytest.fixture(scope="session")
def upstream2_server(tmp_path_factory) -> Iterator[Upstream]:
    up = start_upstream("b", tmp_path_factory.mktemp("upstream-b"))
    yield up
    stop_process(up.proc, group=False)


@pytest.fixture
def upstream(upstream_server: Upstream) -> Upstream:
    """Upstream 'a' (one process per session) with an empty request log."""
    upstream_server.reset()
    return upstream_server


@pytest.fixture
def upstream2(upstream2_server: Upstream) -> Upstream:
    """Upstream 'b' with an empty request log."""
    upstream2_server.reset()
    return upstream2_server


# --------------------------------------------------------------------------- edge


@pytest.fixture
def start_edge(tmp_path: Path, upstream: Upstream) -> Iterator[EdgeLauncher]:
    """Factory: start_edge(apps=, edge=, limits=, upstream=, sections=, workers=, env=)
    -> EdgeProcess, once it is ready.

    By default one app "echo" (hosts app.localhost and *.example.localhost) proxies
    to the `upstream` fixture. Every edge started is SIGTERMed at teardown.
    """
    launcher = EdgeLauncher(tmp_path, default_apps(upstream))
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def module_edge_launcher(tmp_path_factory, upstream_server: Upstream) -> Iterator[EdgeLauncher]:
    """Like start_edge, for edges shared by the tests of one module."""
    launcher = EdgeLauncher(tmp_path_factory.mktemp("edge"), default_apps(upstream_server))
    yield launcher
    launcher.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp client session: a bounded total timeout, no cap on open connections
    (a stampede test sends thousands of requests at once)."""
    timeout = aiohttp.ClientTimeout(total=90)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        yield session


# ------------------------------------------------------------------ control plane


@pytest.fixture
def start_control_plane(tmp_path: Path) -> Iterator[Callable[..., ControlPlaneProcess]]:
    """Factory: start_control_plane(apps=[...], **controlplane_section) -> ControlPlaneProcess.

    Each one is healthy when returned and stopped at teardown, and the app processes it
    left behind are killed.
    """
    started: list[ControlPlaneProcess] = []

    def start(apps: list[dict[str, Any]] | None = None, **section: Any) -> ControlPlaneProcess:
        cp = control_plane_process(tmp_path, len(started), apps or [], **section)
        started.append(cp)
        cp.start()
        return cp

    yield start
    for cp in started:
        # SIGKILL: a graceful stop only ends its tasks (apps live on either way), after
        # waiting up to 2 s for long-polls whose edges are gone; nothing checks it here.
        cp.kill()
        kill_leftover_apps(cp.state_file)


@pytest.fixture
def control_plane(start_control_plane: Any) -> Iterator[Callable[..., ControlPlaneProcess]]:
    """start_control_plane with the sample app by default; at the end, its output must
    show no internal error and no traceback (a crashed background task included)."""
    started: list[ControlPlaneProcess] = []

    def start(apps: list[dict[str, Any]] | None = None, **section: Any) -> ControlPlaneProcess:
        cp = start_control_plane(apps=[app()] if apps is None else apps, **section)
        started.append(cp)
        return cp

    yield start
    for cp in started:
        output = cp.output()
        assert "internal error" not in output, output
        assert "Traceback" not in output, output


@pytest.fixture
async def api_for(
    control_plane: Callable[..., ControlPlaneProcess], client: aiohttp.ClientSession
) -> Callable[..., Api]:
    """api_for(apps=None, **controlplane_section) -> Api on a freshly started control plane."""

    def make(apps: list[dict[str, Any]] | None = None, **section: Any) -> Api:
        return Api(client, control_plane(apps, **section))

    return make
