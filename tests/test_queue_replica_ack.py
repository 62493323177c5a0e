"""`[store] min_replicas_acked`: a 202 only once a replica confirmed the entry (WAIT on
the connection that wrote it). The decisions sans-I/O; the queue on a real redis-server
with and without a replica (and one SIGSTOPped), and on the real cluster; an edge that
answers 503 queue_unavailable + Retry-After, then 202, each event delivered once."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import eventually, metric_sum, run_edge_cli
from stack import RedisProcess, shard_of
from webhooks import HOST, WebhookApp, shop, start_queue_edge

from edge.queue.durable_queue import DurableQueue, Enqueued, NotReplicated
from edge.queue.replica_ack import (
    REPLY_MARGIN,
    ReplicaAck,
    acks_unmet,
    replicated,
    wait_timeout_ms,
)
from edge.server.config import ConfigError, load_config_text
from scheduler_client.local.redis_cluster import LocalRedisCluster

ACK = ReplicaAck(1, 0.3)
SYNC_TIMEOUT = 15.0

# --------------------------------------------------------------- sans-I/O decisions


def test_wait_timeout_is_the_configured_one_within_the_call_deadline() -> None:
    assert wait_timeout_ms(0.5, 5.0) == 500
    assert wait_timeout_ms(0.5, 0.3) == int(
        (0.3 - REPLY_MARGIN) * 1000
    )  # floored: never past the deadline
    # Nothing left: no WAIT at all (never WAIT 0, which blocks for ever).
    assert wait_timeout_ms(0.5, REPLY_MARGIN) is None
    assert wait_timeout_ms(0.5, 0.0) is None
    assert wait_timeout_ms(0.0001, 5.0) is None


def test_enough_replicas() -> None:
    assert replicated(1, 1) and replicated(2, 1) and replicated(0, 0)
    assert not replicated(0, 1) and not replicated(1, 2)


def test_acks_unmet_when_a_master_has_fewer_replicas() -> None:
    assert acks_unmet(0, 0) is None
    assert acks_unmet(1, 1) is None
    assert acks_unmet(1, 2) is None
    assert "min_replicas_acked = 2" in (acks_unmet(2, 1) or "")
    assert "0 connected" in (acks_unmet(1, 0) or "")


def test_store_section_is_validated() -> None:
    base = '[edge]\nstore = "redis://127.0.0.1:6379/0"\n'
    config = load_config_text(base + "[store]\nmin_replicas_acked = 1\n")
    assert config.store.min_replicas_acked == 1 and config.store.replica_ack_timeout == 0.5
    assert load_config_text(base).store.min_replicas_acked == 0  # today's behaviour
    cases = {
        '[edge]\nstore = "memory://"\n[store]\nmin_replicas_acked = 1\n': "no replicas",
        base + "[store]\nmin_replicas_acked = -1\n": "min_replicas_acked",
        base + '[store]\nreplica_ack_timeout = "0s"\n': "replica_ack_timeout",
        base + '[store]\nreplica_ack_timeout = "2s"\n': "replica_ack_timeout",
        base + "[store]\nmin_replicas = 1\n": "min_replicas",
    }
    for text, expected in cases.items():
        with pytest.raises(ConfigError, match=expected):
            load_config_text(text)


# --------------------------------------------------------------- the queue, real Redis


async def enqueue(queue: DurableQueue, key: str, ack: ReplicaAck = ACK) -> Enqueued:
    return await queue.enqueue(
        "shop",
        method=b"POST",
        path=b"/hooks/pay",
        head=b"POST /hooks/pay HTTP/1.1\r\n\r\n",
        body=b"{}",
        key=key,
        arrived=time.time(),
        retention=3600,
        max_queued=100,
        ack=ack,
    )


def start_replica(master: RedisProcess, workdir: Path) -> RedisProcess:
    """A second redis-server replicating `master`, returned once it acknowledges writes."""
    workdir.mkdir()
    with redis.Redis(port=master.port, decode_responses=True) as admin:
        # The first sync at once, not after the default 5 s wait for more replicas.
        admin.config_set("repl-diskless-sync-delay", 0)
        replica = RedisProcess(workdir, ("--replicaof", "127.0.0.1", str(master.port)))
        replica.start()
        deadline = time.monotonic() + SYNC_TIMEOUT
        # Online is not enough: a master streams writes to a new replica only after its
        # first REPLCONF ACK (up to a second later), so until a write of ours is acked.
        while admin.set("{replica}:check", "1") and admin.execute_command("WAIT", 1, 50) < 1:
            if time.monotonic() > deadline:
                replica.stop()
                pytest.fail(f"replica never acknowledged a write: {admin.info('replication')}")
        admin.delete("{replica}:check")
    return replica


@pytest.fixture
async def queue(own_redis: RedisProcess) -> AsyncIterator[DurableQueue]:
    q = DurableQueue(own_redis.url, op_timeout=3.0)
    yield q
    await q.close()


async def test_no_replica_is_not_replicated_and_the_entry_stays(
    queue: DurableQueue, own_redis: RedisProcess, tmp_path: Path
) -> None:
    began = time.monotonic()
    with pytest.raises(NotReplicated) as refused:
        await enqueue(queue, "evt_1")
    assert ACK.timeout <= time.monotonic() - began < 2.0  # WAIT waited its timeout, no more
    first_id = refused.value.entry_id
    assert first_id and "0 of 1 replicas" in str(refused.value)
    assert (await queue.depth("shop"))[0] == 1  # queued on the master all the same
    # Without min_replicas_acked: today's behaviour, the master's word is enough.
    plain = await enqueue(queue, "evt_plain", ReplicaAck())
    assert not plain.duplicate

    replica = start_replica(own_redis, tmp_path / "replica")
    try:
        # The resend maps to the first entry, and is 202 only now that a replica has it.
        again = await enqueue(queue, "evt_1")
        assert (again.id, again.duplicate) == (first_id, True)
        fresh = await enqueue(queue, "evt_2")
        assert not fresh.duplicate

        replica.pause()  # SIGSTOP: connected, acknowledging nothing
        try:
            with pytest.raises(NotReplicated) as paused:
                await enqueue(queue, "evt_3")
            # A duplicate waits for the replica too: its record rewrite is not acked.
            with pytest.raises(NotReplicated):
                await enqueue(queue, "evt_2")
        finally:
            replica.resume()
        retried = await enqueue(queue, "evt_3")
        assert (retried.id, retried.duplicate) == (paused.value.entry_id, True)
        assert (await queue.depth("shop"))[0] == 4  # evt_1, evt_plain, evt_2, evt_3: once each
    finally:
        replica.stop()


async def test_full_queue_is_full_not_a_replica_timeout(queue: DurableQueue) -> None:
    from edge.queue.durable_queue import QueueFull

    with pytest.raises(NotReplicated):
        await enqueue(queue, "evt_a")
    with pytest.raises(QueueFull):
        await queue.enqueue(
            "shop",
            method=b"POST",
            path=b"/",
            head=b"",
            body=b"",
            key="evt_b",
            arrived=0.0,
            retention=60,
            max_queued=1,
            ack=ACK,
        )


async def test_cluster_master_waits_for_its_replica(fresh_cluster: LocalRedisCluster) -> None:
    queue = DurableQueue(fresh_cluster.url, op_timeout=3.0)
    try:
        assert not (await enqueue(queue, "evt_1")).duplicate  # every master has a replica
        with pytest.raises(NotReplicated, match="1 of 2 replicas"):
            await enqueue(queue, "evt_2", ReplicaAck(2, 0.2))
        _, replica = shard_of(fresh_cluster, queue.key("shop", "queue"))
        fresh_cluster.pause(replica)
        try:
            with pytest.raises(NotReplicated) as refused:
                await enqueue(queue, "evt_3")
        finally:
            fresh_cluster.resume(replica)
        again = await enqueue(queue, "evt_3")
        assert (again.id, again.duplicate) == (refused.value.entry_id, True)
    finally:
        await queue.close()


# --------------------------------------------------------------- through a real edge


async def post(client, edge, event: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    headers = {"Host": HOST, "X-Event-Id": event, "Content-Type": "application/json"}
    body = json.dumps({"event": event}).encode()
    async with client.post(edge.url + "/hooks/pay", data=body, headers=headers) as resp:
        raw = await resp.read()
        answer = json.loads(raw) if resp.status == 202 else {"text": raw.decode()}
        return resp.status, dict(resp.headers), answer


def refused_for_replicas(status: int, headers: dict[str, str]) -> bool:
    return (
        status == 503
        and headers.get("X-Edge-Error") == "queue_unavailable"
        and int(headers.get("Retry-After", "0")) >= 1
    )


async def test_edge_answers_202_only_once_a_replica_has_the_request(
    start_control_plane, start_edge, client, own_redis: RedisProcess, tmp_path: Path
) -> None:
    # The app stays asleep while the webhooks are sent (awake, they would be proxied: 200).
    hooks = WebhookApp(tmp_path, start_delay=0.5, gated=True)
    cp = start_control_plane(apps=[hooks.spec])
    store = {"min_replicas_acked": 1, "replica_ack_timeout": "1s"}
    app = shop(readiness_timeout="60s")
    edge = start_queue_edge(start_edge, cp, own_redis.url, app, store_section=store)

    # No replica: every webhook 503, none 202 (each is queued on the master all the same).
    lonely = [f"evt_a{i}" for i in range(5)]
    answers = await asyncio.gather(*(post(client, edge, e) for e in lonely))
    assert all(refused_for_replicas(s, h) for s, h, _ in answers), answers

    replica = start_replica(own_redis, tmp_path / "replica")
    try:
        # A replica attached: 202, the resends mapping to the entries already queued.
        ids: dict[str, str] = {}
        for event in [*lonely, "evt_b0"]:
            status, _, answer = await post(client, edge, event)
            assert status == 202, answer
            assert answer["duplicate"] == (event != "evt_b0"), (event, answer)
            ids[event] = answer["queued_id"]

        # The replica frozen: 503, yet the entry stays; one is resent, one never is.
        replica.pause()
        try:
            for event in ("evt_c0", "evt_c1"):
                status, headers, answer = await post(client, edge, event)
                assert refused_for_replicas(status, headers), (status, headers, answer)
        finally:
            replica.resume()
        status, _, answer = await post(client, edge, "evt_c0")
        assert status == 202 and answer["duplicate"], answer
        ids["evt_c0"] = answer["queued_id"]
        hooks.open()

        events = {*lonely, "evt_b0", "evt_c0", "evt_c1"}

        def all_delivered() -> bool:
            got = {json.loads(d["body"])["event"] for d in hooks.successes()}
            return events <= got

        await eventually(all_delivered, timeout=30, interval=0.2, what="every event delivered")
        await asyncio.sleep(1.0)  # a second delivery would show now
        done = hooks.successes()
        counts = Counter(json.loads(d["body"])["event"] for d in done)
        assert counts == Counter(events), counts  # once each, the one never resent too
        for d in done:
            event = json.loads(d["body"])["event"]
            assert d["queued_id"] == ids.get(event, d["queued_id"]), (event, d, ids)
        metrics = edge.metrics()
        assert metric_sum(metrics, "edge_queue_events_total", event="replica_ack_timeout") == 7
    finally:
        replica.stop()


def test_edge_check_warns_when_acks_cannot_be_met(own_redis: RedisProcess, tmp_path: Path) -> None:
    """No replica connected and min_replicas_acked = 1: said before the edge refuses them all."""
    app = '[[apps]]\nname = "a"\nhosts = ["a.localhost"]\nupstreams = ["127.0.0.1:9"]\n'
    for wanted, warned in ((1, True), (0, False)):
        path = tmp_path / f"edge-{wanted}.toml"
        path.write_text(
            f'[edge]\nstore = "{own_redis.url}"\n[store]\nmin_replicas_acked = {wanted}\n' + app
        )
        done = run_edge_cli("check", str(path))
        assert done.returncode == 0, done.stderr
        assert ("min_replicas_acked = 1 but a master has 0" in done.stderr) == warned, done.stderr
    replica = start_replica(own_redis, tmp_path / "replica")
    try:
        done = run_edge_cli("check", str(tmp_path / "edge-1.toml"))
        assert done.returncode == 0 and "min_replicas_acked" not in done.stderr, done.stderr
    finally:
        replica.stop()
