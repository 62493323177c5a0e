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
        cp.stop()
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
