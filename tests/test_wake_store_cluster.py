"""The wake store on a real Redis Cluster, beyond the shared contract (test_wake_store.py
runs that over redis+cluster:// too): the seed URL, sharded change notification across
every master, waiters queueing for the capped connections, and config validation.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from helpers import made_hot_for_every_waiter, nodes_with_a_failed_master, run_edge_cli
from redis.exceptions import ConnectionError as RedisConnectionError
from stack import redis_client

from edge.server.config import ConfigError, load_config_text
from scheduler_client.local.loopback import free_port
from scheduler_client.local.redis_cluster import ClusterNode, LocalRedisCluster
from wake.store.protocol import AppWakeState, StoreUnavailable
from wake.store.redis_backend import RedisStore
from wake.store.redis_connection import (
    ClusterState,
    bounded_client,
    close_client,
    cluster_seeds,
    cluster_state,
    on_one_connection,
    summarize_cluster_nodes,
)
from wake.store.url import open_store

WAIT = 5.0
APP = '[[apps]]\nname = "hello"\nhosts = ["hello.localhost"]\nupstreams = ["127.0.0.1:9001"]\n'


def test_cluster_seeds_take_credentials_tls_and_options() -> None:
    seeds, options = cluster_seeds("redis+cluster://10.0.0.1:7000,10.0.0.2:7001")
    assert seeds == [("10.0.0.1", 7000), ("10.0.0.2", 7001)] and options == {}
    seeds, options = cluster_seeds(
        "rediss+cluster://edge:s%40cret@a.example:7000,[::1]:7001/0?socket_timeout=5"
    )
    assert seeds == [("a.example", 7000), ("::1", 7001)]
    assert options == {"username": "edge", "password": "s@cret", "ssl": True, "socket_timeout": 5}
    for bad in ("redis+cluster://a.example", "redis+cluster://a:1,b", "redis+cluster://a:1/2"):
        with pytest.raises(ValueError):
            cluster_seeds(bad)


def test_config_accepts_a_cluster_store_and_refuses_a_bad_one() -> None:
    ok = load_config_text(
        '[edge]\nstore = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"\n' + APP, "edge.toml"
    )
    assert ok.edge.store.startswith("redis+cluster://")
    with pytest.raises(ConfigError, match="expected host:port"):
        load_config_text('[edge]\nstore = "redis+cluster://127.0.0.1"\n' + APP, "edge.toml")


async def test_open_store_by_cluster_url(fresh_cluster: LocalRedisCluster) -> None:
    store = open_store(fresh_cluster.url, key_prefix="other")
    try:
        assert isinstance(store, RedisStore) and await store.ping()
        lease = await store.acquire_lease("shop", "a", 5)
        assert lease is not None
        assert await store.lease_owner("shop") == "a"
    finally:
        await store.close()
    tls = open_store(fresh_cluster.url.replace("redis+", "rediss+", 1))
    try:  # the nodes speak plain TCP: a TLS client is refused, within the store's bounds
        assert not await tls.ping()
    finally:
        await tls.close()


def apps_on_every_master(cluster: LocalRedisCluster, per_master: int = 2) -> list[str]:
    """App names whose `{app}` slots fall on every master, `per_master` on each."""
    import redis

    with cluster.nodes[0].client() as c:
        ranges = [(int(r[0]), int(r[1]), f"{r[2][0]}:{r[2][1]}") for r in c.cluster("SLOTS")]
    picked: dict[str, list[str]] = {}
    for i in range(1000):
        app = f"app-{i}"
        slot = redis.crc.key_slot(f"x:{{{app}}}".encode())
        owner = next(node for low, high, node in ranges if low <= slot <= high)
        if len(picked.setdefault(owner, [])) < per_master:
            picked[owner].append(app)
    assert len(picked) == 3 and all(len(a) == per_master for a in picked.values())
    return [app for apps in picked.values() for app in apps]


async def test_sharded_notification_reaches_other_edges_on_every_master(
    fresh_cluster: LocalRedisCluster,
) -> None:
    """Watchers that never poll (60 s) learn of writes on apps of all three masters."""
    apps = apps_on_every_master(fresh_cluster)
    holder = RedisStore(fresh_cluster.url)
    watchers = [RedisStore(fresh_cluster.url, poll_interval=60.0) for _ in range(2)]
    waiters: list[asyncio.Task[AppWakeState]] = []
    try:
        waiters = [
            asyncio.create_task(w.wait_change(app, 0, timeout=30)) for w in watchers for app in apps
        ]
        await asyncio.sleep(0.5)  # read version 0 and subscribed; only a message wakes them
        for app in apps:
            lease = await holder.acquire_lease(app, "holder", 5)
            assert lease is not None
            assert await holder.write_state(AppWakeState(app=app, state="hot"), lease.token)
            await holder.publish(app)
        done, _ = await asyncio.wait(waiters, timeout=WAIT)
        assert len(done) == len(waiters), f"{len(waiters) - len(done)} waiters not woken"
        assert {w.result().state for w in waiters} == {"hot"}
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        await holder.close()
        for w in watchers:
            await w.close()


async def test_subscriptions_follow_the_watches(fresh_cluster: LocalRedisCluster) -> None:
    """A channel is dropped when its last waiter leaves and taken again for a new one."""
    holder = RedisStore(fresh_cluster.url)
    watcher = RedisStore(fresh_cluster.url, poll_interval=60.0)
    admin = redis_client(fresh_cluster.url, decode_responses=True)
    channel = watcher.app_key("shop", "changed")
    try:
        lease = await holder.acquire_lease("shop", "holder", 30)
        assert lease is not None
        first = asyncio.create_task(watcher.wait_change("shop", 0, timeout=30))

        async def subscribers() -> int:
            counts = await admin.pubsub_shardnumsub(channel, target_nodes=admin.PRIMARIES)
            return sum(n for name, n in counts if name == channel)

        await until(subscribers, 1)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await until(subscribers, 0)
        second = asyncio.create_task(watcher.wait_change("shop", 0, timeout=30))
        await until(subscribers, 1)
        assert await holder.write_state(AppWakeState(app="shop", state="hot"), lease.token)
        await holder.publish("shop")
        assert (await asyncio.wait_for(second, WAIT)).state == "hot"
    finally:
        await admin.aclose()
        await holder.close()
        await watcher.close()


async def until(count, expected: int) -> None:
    """Wait (bounded) until `await count()` is `expected`."""
    async with asyncio.timeout(WAIT):
        while await count() != expected:
            await asyncio.sleep(0.02)


async def test_many_waiters_queue_for_few_connections(fresh_cluster: LocalRedisCluster) -> None:
    """400 waiters over 200 apps polling every 50 ms through 4 connections: they wait
    their turn (no MaxConnectionsError, no StoreUnavailable) and each node sees few
    connections from the store."""
    store = RedisStore(fresh_cluster.url, poll_interval=0.05, max_connections=4)
    writer = RedisStore(fresh_cluster.url)
    apps = [f"app-{i}" for i in range(200)]
    waiters: list[asyncio.Task[AppWakeState]] = []
    try:
        waiters = [
            asyncio.create_task(store.wait_change(app, 0, timeout=30))
            for app in apps
            for _ in (1, 2)
        ]
        await asyncio.sleep(0.5)
        assert not [w for w in waiters if w.done()], "a waiter ended early (an error?)"
        for node in fresh_cluster.nodes:
            with node.client() as c:
                # The store's 4 + its pub/sub, the writer's, the cluster's own bus, ours.
                assert len(c.client_list()) <= 4 + 1 + 4 + 2
        await made_hot_for_every_waiter(writer, apps, waiters, WAIT * 2)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        await writer.close()
        await store.close()


async def test_a_new_store_takes_a_stampede_of_first_commands(
    fresh_cluster: LocalRedisCluster,
) -> None:
    """30 reads at once on a store that has not read the slot map yet, 5 new stores:
    none fails (redis-py 8.1 alone broke a few of them in most rounds)."""
    for _ in range(5):
        store = RedisStore(fresh_cluster.url)
        try:
            apps = [f"app-{i}" for i in range(30)]
            results = await asyncio.gather(
                *(store.read_state(app) for app in apps), return_exceptions=True
            )
        finally:
            await store.close()
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert [r.state for r in results] == ["cold"] * 30


def test_edge_check_reports_the_cluster(fresh_cluster: LocalRedisCluster, tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(f'[edge]\nstore = "{fresh_cluster.url}"\n' + APP)
    done = run_edge_cli("check", str(path))
    assert done.returncode == 0, done.stderr
    assert "# store: Redis Cluster ok: 16384/16384 slots covered, 3 masters, 3 replicas" in (
        done.stdout
    )
    assert "warning" not in done.stderr


def dead_first_url(cluster: LocalRedisCluster, dead: ClusterNode) -> str:
    """The cluster's seed URL with `dead` asked first."""
    rest = [n.address for n in cluster.nodes if n is not dead]
    return "redis+cluster://" + ",".join([dead.address, *rest])


def kill_a_replica(cluster: LocalRedisCluster) -> ClusterNode:
    """SIGKILL one replica; returns once the first live node no longer counts it."""
    replica = cluster.node_for(next(iter(cluster.info().masters.values()))[0])
    cluster.kill(replica)
    deadline = time.monotonic() + 15
    while replica.address in {r for rs in cluster.info().masters.values() for r in rs}:
        assert time.monotonic() < deadline, "the killed replica was never flagged failed"
        time.sleep(0.05)
    return replica


async def test_cluster_state_asks_past_a_dead_seed(fresh_cluster: LocalRedisCluster) -> None:
    """The dead replica is the first seed and, until the others flag it failed (node
    timeout 2 s), still in their slot map: every report comes from a node that answers."""
    replica = kill_a_replica(fresh_cluster)
    try:
        url = dead_first_url(fresh_cluster, replica)
        for _ in range(20):  # the old report asked a random node of the map: 1 in 6 dead
            state = await cluster_state(url)
            assert (state.masters, state.replicas, state.masters_without_replica) == (3, 2, 1)
    finally:
        fresh_cluster.start_node(replica)  # it rejoins with its nodes.conf and data
        fresh_cluster.wait_healthy()


async def test_cluster_state_asks_past_a_hung_seed(fresh_cluster: LocalRedisCluster) -> None:
    """A replica frozen (SIGSTOP) is in every node's slot map until flagged failed (node
    timeout 2 s): asked first, it costs its socket timeout, then the next seed answers."""
    replica = fresh_cluster.node_for(next(iter(fresh_cluster.info().masters.values()))[0])
    url = dead_first_url(fresh_cluster, replica) + "?socket_timeout=0.2&socket_connect_timeout=0.2"
    fresh_cluster.pause(replica)
    try:
        for _ in range(15):  # the old report asked random nodes of the map: 1 in 6 hung
            began = time.monotonic()
            state = await cluster_state(url, timeout=1.5)
            assert state.masters == 3 and time.monotonic() - began < 1.0
    finally:
        fresh_cluster.resume(replica)
        fresh_cluster.wait_healthy()


async def test_cluster_state_unreachable_only_when_no_seed_answers(
    fresh_cluster: LocalRedisCluster,
) -> None:
    dead = "redis+cluster://" + ",".join(f"127.0.0.1:{free_port()}" for _ in range(3))
    began = time.monotonic()
    with pytest.raises(StoreUnavailable, match="no seed answered"):
        await cluster_state(dead, timeout=3.0)
    assert time.monotonic() - began < 3.5


def test_edge_check_warns_of_a_master_without_replica(
    fresh_cluster: LocalRedisCluster, tmp_path: Path
) -> None:
    """A replica down (flagged failed by the others): its master's slots have no copy."""
    replica = kill_a_replica(fresh_cluster)
    try:
        path = tmp_path / "edge.toml"
        path.write_text(f'[edge]\nstore = "{dead_first_url(fresh_cluster, replica)}"\n' + APP)
        done = run_edge_cli("check", str(path))
        assert done.returncode == 0, done.stderr
        assert "3 masters, 2 replicas" in done.stdout, done.stdout
        assert "warning: 1 masters have no replica" in done.stderr, done.stderr
    finally:
        fresh_cluster.start_node(replica)  # it rejoins with its nodes.conf and data
        fresh_cluster.wait_healthy()


def test_cluster_state_counts_only_live_nodes() -> None:
    nodes = nodes_with_a_failed_master()
    del nodes["127.0.0.1:5"]  # the failed master's replica is not listed here
    assert summarize_cluster_nodes("fail", nodes) == ClusterState(
        state="fail", slots_covered=10923, masters=2, replicas=1, masters_without_replica=1
    )


async def test_a_batch_on_the_master_starts_no_attempt_past_its_deadline(
    fresh_cluster: LocalRedisCluster,
) -> None:
    """The retries of a one-connection batch stop at the caller's deadline even when the
    guard's cancel never lands (Python 3.11's wait_for inside redis-py can lose it)."""
    client = bounded_client(fresh_cluster.url, decode_responses=True)
    try:
        key = "{deadline}:probe"
        past = asyncio.get_running_loop().time() - 1.0
        with pytest.raises(RedisConnectionError):
            await on_one_connection(client, key, [("SET", key, "1")], past)
        assert await client.get(key) is None  # nothing was sent
        answer = await on_one_connection(client, key, [("SET", key, "2")], None)
        assert answer == ["OK"] or answer == [True], answer
        assert await client.get(key) == "2"
    finally:
        await close_client(client)
