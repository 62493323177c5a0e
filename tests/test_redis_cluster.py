"""The local Redis Cluster the cluster tests run on: whole, on loopback, AOF on, and
nodes that can be killed and brought back.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import nodes_with_a_failed_master

from scheduler_client.local.redis_cluster import (
    SLOTS,
    ClusterStartError,
    LocalRedisCluster,
    parse_cluster_nodes,
)


def test_cluster_is_three_masters_each_with_a_replica(fresh_cluster: LocalRedisCluster) -> None:
    info = fresh_cluster.info()
    assert len(info.masters) == 3 and info.slots_covered == SLOTS
    assert all(len(replicas) == 1 for replicas in info.masters.values())
    addresses = {n.address for n in fresh_cluster.nodes}
    assert set(info.masters) | {r for rs in info.masters.values() for r in rs} == addresses
    seeds = ",".join(n.address for n in fresh_cluster.nodes)
    assert fresh_cluster.url == f"redis+cluster://{seeds}"
    assert fresh_cluster.start_seconds < 20


def test_every_node_binds_loopback_with_aof(fresh_cluster: LocalRedisCluster) -> None:
    for node in fresh_cluster.nodes:
        assert node.address.startswith("127.0.0.1:")
        with node.client() as c:
            assert c.config_get("bind")["bind"] == "127.0.0.1"
            assert c.config_get("appendonly")["appendonly"] == "yes"
            assert c.cluster("INFO")["cluster_state"] == "ok"


def test_a_killed_replica_restarts_and_rejoins(fresh_cluster: LocalRedisCluster) -> None:
    replica = fresh_cluster.node_for(next(iter(fresh_cluster.info().masters.values()))[0])
    fresh_cluster.kill(replica)
    assert replica.proc is None
    fresh_cluster.start_node(replica)
    fresh_cluster.wait_healthy()
    info = fresh_cluster.info()
    assert any(replica.address in rs for rs in info.masters.values())


def test_a_cluster_that_cannot_form_is_stopped_in_bounded_time(tmp_path: Path) -> None:
    """Too short a deadline: start fails, and no node is left running."""
    cluster = LocalRedisCluster(tmp_path, masters=3, replicas=1)
    began = time.monotonic()
    with pytest.raises(ClusterStartError):
        cluster.start(timeout=0.5)
    assert time.monotonic() - began < 15
    assert all(node.proc is None for node in cluster.nodes)


def test_parse_cluster_nodes_leaves_out_failed_nodes() -> None:
    nodes = nodes_with_a_failed_master()
    info = parse_cluster_nodes(nodes)
    assert info.masters == {"127.0.0.1:1": ["127.0.0.1:4"], "127.0.0.1:2": []}
    assert info.slots_covered == 10923
