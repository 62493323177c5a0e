"""The durable queue against a real redis-server (AOF on): dedupe records, order,
dead letters, claiming abandoned entries, purge; and the replay rules (sans-I/O)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis
from stack import redis_client

from edge.queue.durable_queue import DurableQueue, LeaseLost, QueueFull, lease_value
from edge.queue.replay_policy import (
    Outcome,
    body_key,
    dead_reason,
    header_key,
    identity_of,
    outcome_of,
    retry_delay,
)
from wake.store.protocol import Lease, StoreUnavailable

HEAD = b"POST /hooks/pay HTTP/1.1\r\nHost: shop.localhost\r\n\r\n"


# --------------------------------------------------------------- sans-I/O rules


def test_header_key_follows_the_policy_source() -> None:
    headers = [(b"Idempotency-Key", b"abc"), (b"X-Event-Id", b"evt_1")]
    assert header_key("idempotency-key", headers) == "h:idempotency-key:abc"
    assert header_key("header:X-Event-Id", headers) == "h:x-event-id:evt_1"
    # The configured header wins; without it, Idempotency-Key; without both, no key.
    assert header_key("header:X-Event-Id", headers[:1]) == "h:idempotency-key:abc"
    assert header_key("header:X-Event-Id", []) is None
    assert header_key("hash", headers) is None
    assert header_key("idempotency-key", [(b"idempotency-key", b"  ")]) is None


def test_long_or_binary_header_values_are_hashed() -> None:
    long_key = header_key("idempotency-key", [(b"Idempotency-Key", b"k" * 500)])
    assert long_key is not None and long_key.startswith("hk:") and len(long_key) < 80
    binary = header_key("idempotency-key", [(b"Idempotency-Key", "é".encode())])
    assert binary is not None and binary.startswith("hk:")


def test_body_key_hashes_method_path_and_body() -> None:
    base = body_key(b"POST", b"/hooks/a", b"{}")
    assert base == body_key(b"POST", b"/hooks/a", b"{}")
    assert base != body_key(b"PUT", b"/hooks/a", b"{}")
    assert base != body_key(b"POST", b"/hooks/b", b"{}")
    assert base != body_key(b"POST", b"/hooks/a", b"{ }")
    # Length-prefixed parts: moving bytes between method, path and body changes the key.
    assert body_key(b"POST", b"/a", b"b") != body_key(b"POST", b"/ab", b"")


def head(*lines: str) -> bytes:
    return ("POST /hooks/a HTTP/1.1\r\n" + "".join(f"{x}\r\n" for x in lines) + "\r\n").encode()


def test_body_key_tells_senders_apart() -> None:
    """Issue 12: Host, Authorization and the identity headers are hashed; the rest of the
    head (per-request ids, forwarding headers, signatures) is not."""
    common = ("Host: shop.localhost", "X-Request-Id: 1", "X-Signature: t=1")

    def key(*lines: str, identity: tuple[str, ...] = ("X-Api-Key",)) -> str:
        return body_key(b"POST", b"/hooks/a", b"{}", head(*common, *lines), identity)

    alice = key("Authorization: Bearer alice")
    assert alice == body_key(
        b"POST",
        b"/hooks/a",
        b"{}",
        head("host: shop.localhost", "X-Request-Id: 2", "authorization:  Bearer alice"),
        ("X-Api-Key",),
    )
    assert alice != key("Authorization: Bearer bob")
    assert alice != key()
    assert alice != key("Authorization: Bearer alice", "X-Api-Key: k1")
    assert key("X-Api-Key: k1") != key("X-Api-Key: k2")
    assert key("Cookie: s=1", identity=()) == key("Cookie: s=2", identity=())
    assert key("Cookie: s=1", identity=("cookie",)) != key("Cookie: s=2", identity=("cookie",))
    other_host = body_key(b"POST", b"/hooks/a", b"{}", head("Host: b.localhost"), ())
    assert other_host != body_key(b"POST", b"/hooks/a", b"{}", head("Host: a.localhost"), ())
    assert identity_of(head("Authorization: x", "Cookie: c", "Accept: */*"), ["Cookie"]) == [
        (b"authorization", b"x"),
        (b"cookie", b"c"),
    ]


@pytest.mark.parametrize(
    ("status", "attempts", "expected"),
    [
        (200, 1, Outcome.DONE),
        (204, 5, Outcome.DONE),
        (400, 1, Outcome.DEAD),
        (404, 1, Outcome.DEAD),
        (301, 1, Outcome.DEAD),
        (429, 1, Outcome.RETRY),
        (500, 1, Outcome.RETRY),
        (503, 2, Outcome.RETRY),
        (None, 2, Outcome.RETRY),
        (500, 3, Outcome.DEAD),
        (None, 3, Outcome.DEAD),
    ],
)
def test_outcome_of_a_delivery(status: int | None, attempts: int, expected: Outcome) -> None:
    assert outcome_of(status, attempts, max_attempts=3) is expected


def test_101_1xx_and_garbage_are_final_and_the_reason_says_why() -> None:
    """Issue 12: an answer that is no usable final response dead-letters at once."""
    assert outcome_of(101, 1, max_attempts=3) is Outcome.DEAD
    assert outcome_of(199, 1, max_attempts=3) is Outcome.DEAD
    assert outcome_of(None, 1, max_attempts=3, final=True) is Outcome.DEAD
    assert outcome_of(None, 1, max_attempts=3) is Outcome.RETRY
    assert "switched protocols" in dead_reason(101, "", 1, 3)
    assert "informational" in dead_reason(103, "", 1, 3)
    assert dead_reason(None, "malformed response", 1, 3, final=True).startswith(
        "malformed response"
    )
    assert dead_reason(400, "", 1, 3) == "status 400"
    assert dead_reason(503, "", 3, 3) == "3 attempts: status 503"
    assert dead_reason(None, "connection reset", 3, 3) == "3 attempts: connection reset"


def test_retry_delay_doubles_up_to_the_ceiling() -> None:
    assert [retry_delay(n, 0.5, 3.0) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


# --------------------------------------------------------------------- redis


# The replayer lease the `queue` fixture holds for app "shop" (its token is fixed below).
LEASE = Lease("edge-a/1", 0)


@pytest.fixture(params=["redis", "cluster"])
def queue_url(request: pytest.FixtureRequest) -> str:
    """An empty Redis: the session's redis-server, or its Redis Cluster (redis+cluster://)."""
    if request.param == "cluster":
        return request.getfixturevalue("fresh_cluster").url
    url = request.getfixturevalue("redis_server")
    with redis.Redis.from_url(url) as client:
        client.flushall()
    return url


@pytest.fixture
async def queue(queue_url: str) -> AsyncIterator[DurableQueue]:
    """An empty queue whose "shop" lease is held as LEASE, so replay writes pass the fence."""
    client = redis_client(queue_url)
    await client.set("edge:{shop}:replayer", lease_value(LEASE), px=600_000)
    await client.aclose()
    q = DurableQueue(queue_url)
    yield q
    await q.close()


async def put(
    q: DurableQueue, key: str, body: bytes = b"{}", max_queued: int = 100, retention: float = 60
):
    return await q.enqueue(
        "shop",
        method=b"POST",
        path=b"/hooks/pay",
        head=HEAD,
        body=body,
        key=key,
        arrived=1.5,
        retention=retention,
        max_queued=max_queued,
    )


async def test_enqueue_dedupes_by_key_and_keeps_everything(queue: DurableQueue) -> None:
    first = await put(queue, "h:k1", b"payload \x00\xff")
    again = await put(queue, "h:k1", b"other body")
    assert not first.duplicate and again.duplicate and again.id == first.id
    other = await put(queue, "h:k2")
    assert other.id != first.id
    assert await queue.depth("shop") == (2, 0)
    [entry, _] = await queue.next_batch("shop", "edge-a", claim_idle=60, count=10, lease=LEASE)  # type: ignore[misc]
    assert (entry.method, entry.path, entry.head, entry.body, entry.key, entry.arrived) == (
        "POST",
        "/hooks/pay",
        HEAD,
        b"payload \x00\xff",
        "h:k1",
        1.5,
    )


async def test_full_queue_refuses(queue: DurableQueue) -> None:
    await put(queue, "a", max_queued=2)
    await put(queue, "b", max_queued=2)
    with pytest.raises(QueueFull):
        await put(queue, "c", max_queued=2)
    assert (await put(queue, "a", max_queued=2)).duplicate  # a repeat still gets its id
    assert await queue.depth("shop") == (2, 0)


async def test_batches_keep_order_and_done_entries_are_never_delivered_again(
    queue: DurableQueue,
) -> None:
    ids = [(await put(queue, f"k{i}")).id for i in range(5)]
    batch = await queue.next_batch("shop", "edge-a", claim_idle=60, count=3, lease=LEASE)
    assert [e.id for e in batch] == ids[:3]  # type: ignore[union-attr]
    # The same consumer asking again (say, restarted) gets its own unfinished entries first.
    again = await queue.next_batch("shop", "edge-a", claim_idle=60, count=10, lease=LEASE)
    assert [e.id for e in again] == ids[:3]  # type: ignore[union-attr]
    first = again[0]  # type: ignore[index]
    assert await queue.begin("shop", first, LEASE) == 1
    await queue.finish("shop", first, LEASE)
    # Begun again from a stale batch: begin says "done already".
    assert await queue.begin("shop", first, LEASE) == 0
    assert await queue.depth("shop") == (4, 0)
    second = again[1]  # type: ignore[index]
    assert [await queue.begin("shop", second, LEASE) for _ in range(3)] == [1, 2, 3]
    rest = await queue.next_batch("shop", "edge-a", claim_idle=60, count=10, lease=LEASE)
    assert [e.id for e in rest] == ids[1:3]  # type: ignore[union-attr]
    listed = await queue.list("shop", "queued", 10)
    assert [(s.id, s.attempts) for s in listed][:2] == [(ids[1], 3), (ids[2], 0)]


async def test_other_consumers_pending_entries_wait_then_are_claimed(queue: DurableQueue) -> None:
    ids = [(await put(queue, f"k{i}")).id for i in range(3)]
    taken = await queue.next_batch("shop", "dead-edge", claim_idle=60, count=2, lease=LEASE)
    assert [e.id for e in taken] == ids[:2]  # type: ignore[union-attr]
    # Not idle long enough: no new entries either, or order would break.
    assert await queue.next_batch("shop", "live-edge", claim_idle=60, count=10, lease=LEASE) is None
    await asyncio.sleep(0.3)
    claimed = await queue.next_batch("shop", "live-edge", claim_idle=0.2, count=10, lease=LEASE)
    assert [e.id for e in claimed] == ids[:2]  # type: ignore[union-attr]
    for entry in claimed:  # type: ignore[union-attr]
        await queue.finish("shop", entry, LEASE)
    fresh = await queue.next_batch("shop", "live-edge", claim_idle=0.2, count=10, lease=LEASE)
    assert [e.id for e in fresh] == ids[2:]  # type: ignore[union-attr]


async def test_dead_letters_are_listed_requeued_and_purged(queue: DurableQueue) -> None:
    ids = [(await put(queue, f"k{i}")).id for i in range(3)]
    batch = await queue.next_batch("shop", "edge-a", claim_idle=60, count=10, lease=LEASE)
    await queue.dead_letter("shop", batch[0], LEASE, "status 400", 400, 1, 1000)  # type: ignore[index]
    assert await queue.depth("shop") == (2, 1)
    [dead] = await queue.list("shop", "dead", 10)
    assert (dead.queued_id, dead.reason, dead.status, dead.attempts, dead.key) == (
        ids[0],
        "status 400",
        400,
        1,
        "k0",
    )
    new_id = await queue.requeue_dead("shop", dead.id, retention=60)
    assert new_id is not None and new_id > ids[2]
    assert await queue.depth("shop") == (3, 0)
    assert (await put(queue, "k0")).id == new_id  # the dedupe key follows the entry
    assert await queue.requeue_dead("shop", dead.id, retention=60) is None
    assert await queue.purge("shop", "queued", ids[1]) == 1
    assert await queue.purge("shop", "queued") == 2
    assert await queue.depth("shop") == (0, 0)
    assert await queue.next_batch("shop", "edge-a", claim_idle=60, count=10, lease=LEASE) == []
    # The queue works again after a purge, and a purged request's key queues afresh.
    assert not (await put(queue, "k9")).duplicate
    assert not (await put(queue, "k1")).duplicate
    assert len(await queue.next_batch("shop", "edge-a", claim_idle=60, count=10, lease=LEASE)) == 2  # type: ignore[arg-type]


async def test_purged_entries_are_not_delivered_and_large_purges_page(
    queue: DurableQueue,
) -> None:
    await put(queue, "a")
    [entry] = await queue.next_batch("shop", "edge-a", claim_idle=60, count=10, lease=LEASE)  # type: ignore[misc]
    assert await queue.purge("shop", "queued", entry.id) == 1
    assert await queue.begin("shop", entry, LEASE) == 0  # in a replayer's batch already: skipped
    for i in range(1203):
        await put(queue, f"bulk{i}", max_queued=2000)
    assert await queue.purge("shop", "queued") == 1203
    assert await queue.depth("shop") == (0, 0)


async def test_expired_entries_are_dead_lettered_and_dead_letters_are_capped(
    queue: DurableQueue,
) -> None:
    for i in range(5):
        await put(queue, f"old{i}")
    await asyncio.sleep(1.5)
    fresh = await put(queue, "fresh")
    assert await queue.expire("shop", retention=1.0, max_dead=1000, lease=LEASE) == (5, [])
    assert [e.id for e in await queue.list("shop", "queued", 10)] == [fresh.id]
    dead = await queue.list("shop", "dead", 10)
    assert [d.reason for d in dead] == ["expired"] * 5
    assert await queue.expire("shop", retention=60, max_dead=1000, lease=LEASE) == (0, [])
    for i in range(300):
        await put(queue, f"many{i}", max_queued=1000)
    batch = await queue.next_batch("shop", "edge-a", claim_idle=60, count=400, lease=LEASE)
    for entry in batch:  # type: ignore[union-attr]
        await queue.dead_letter("shop", entry, LEASE, "status 400", 400, 1, 100)
    queued, dead_count = await queue.depth("shop")
    assert queued == 0 and dead_count == 100  # exactly the newest 100


async def test_replayer_lease_is_exclusive(queue: DurableQueue) -> None:
    await queue.release_replayer("shop", LEASE)
    a = await queue.acquire_replayer("shop", "a", 5)
    assert a is not None
    assert await queue.acquire_replayer("shop", "b", 5) is None
    assert await queue.renew_replayer("shop", a, 5)
    assert not await queue.renew_replayer("shop", Lease("b", a.token), 5)
    assert not await queue.renew_replayer("shop", Lease("a", a.token - 1), 5)
    await queue.release_replayer("shop", Lease("a", a.token - 1))  # not the current one
    assert await queue.acquire_replayer("shop", "b", 5) is None
    await queue.release_replayer("shop", a)
    assert await queue.acquire_replayer("shop", "b", 5) is not None


async def test_aof_is_reported(queue: DurableQueue, own_redis) -> None:
    assert await queue.aof_enabled()  # the fixtures run Redis with AOF, as production should
    no_aof = await own_redis_without_aof(own_redis)
    try:
        assert not await no_aof.aof_enabled()
    finally:
        await no_aof.close()


async def own_redis_without_aof(own_redis) -> DurableQueue:
    client = aioredis.from_url(own_redis.url)
    await client.config_set("appendonly", "no")
    await client.aclose()
    return DurableQueue(own_redis.url)


async def test_redis_down_is_store_unavailable(own_redis) -> None:
    q = DurableQueue(own_redis.url, op_timeout=2)
    try:
        await q.enqueue(
            "shop",
            method=b"POST",
            path=b"/",
            head=HEAD,
            body=b"",
            key="k",
            arrived=0,
            retention=60,
            max_queued=10,
        )
        own_redis.stop()
        with pytest.raises(StoreUnavailable):
            await put(q, "k2")
    finally:
        await q.close()


async def test_finish_can_begin_the_next_entry(queue: DurableQueue) -> None:
    ids = [(await put(queue, f"k{i}")).id for i in range(3)]
    batch = await queue.next_batch("shop", "edge-a", claim_idle=60, count=10, lease=LEASE)
    first, second, third = batch  # type: ignore[misc]
    assert await queue.begin("shop", first, LEASE) == 1
    assert await queue.finish("shop", first, LEASE, then=second) == 1
    assert await queue.begin("shop", second, LEASE) == 2  # the finish counted its first attempt
    await queue.finish("shop", second, LEASE)
    # The next entry was delivered already: 0, and acked.
    await queue.finish("shop", third, LEASE)
    assert (await put(queue, "k9")).id > ids[2]
    [fourth] = await queue.next_batch("shop", "edge-a", claim_idle=60, count=10, lease=LEASE)  # type: ignore[misc]
    assert await queue.begin("shop", fourth, LEASE) == 1
    assert await queue.finish("shop", fourth, LEASE, then=third) == 0
    assert await queue.depth("shop") == (0, 0)


async def test_a_resend_answered_as_new_is_delivered_never_silently_retired(
    queue: DurableQueue,
) -> None:
    """Issue 12: one dedupe record, one lifetime from the first arrival. A resend inside
    it is a duplicate (delivered or not); past it the resend is new, and new means delivered."""
    retention = 1.0
    first = await put(queue, "h:evt", retention=retention)
    await asyncio.sleep(0.5)  # delivered half-way through the retention
    [entry] = await queue.next_batch("shop", "edge-a", claim_idle=60, count=10, lease=LEASE)  # type: ignore[misc]
    assert await queue.begin("shop", entry, LEASE) == 1
    await queue.finish("shop", entry, LEASE)
    again = await put(queue, "h:evt", retention=retention)
    assert again.duplicate and again.id == first.id  # within the window, after delivery
    await asyncio.sleep(0.7)  # past the first arrival's retention, not the delivery's
    resend = await put(queue, "h:evt", retention=retention)
    if resend.duplicate:
        assert resend.id == first.id
        assert await queue.depth("shop") == (0, 0)
    else:  # answered 202 "duplicate": false: it must reach the app
        [entry2] = await queue.next_batch("shop", "edge-a", claim_idle=60, count=10, lease=LEASE)  # type: ignore[misc]
        assert entry2.id == resend.id
        assert await queue.begin("shop", entry2, LEASE) == 1, (
            "accepted as new, then silently retired"
        )


async def test_dead_letters_over_the_cap_are_trimmed_exactly_and_reported(
    queue: DurableQueue,
) -> None:
    """Issue 12: the cap is exact, and each dead letter it drops is handed back (for the
    metric and the log), whether a delivery or an expiry dead-lettered the newcomer."""
    ids = [(await put(queue, f"k{i}")).id for i in range(5)]
    batch = await queue.next_batch("shop", "edge-a", claim_idle=60, count=10, lease=LEASE)
    dropped = []
    for entry in batch[:4]:  # type: ignore[index]
        dropped += await queue.dead_letter("shop", entry, LEASE, "status 400", 400, 1, 2)
    assert [(d.queued_id, d.key, d.reason) for d in dropped] == [
        (ids[0], "k0", "status 400"),
        (ids[1], "k1", "status 400"),
    ]
    assert [d.queued_id for d in await queue.list("shop", "dead", 10)] == ids[2:4]
    await asyncio.sleep(0.3)
    moved, dropped = await queue.expire("shop", retention=0.2, max_dead=2, lease=LEASE)
    assert moved == 1 and [d.queued_id for d in dropped] == [ids[2]]
    assert [d.queued_id for d in await queue.list("shop", "dead", 10)] == [ids[3], ids[4]]


async def test_replay_writes_are_fenced_by_the_lease(queue: DurableQueue, queue_url: str) -> None:
    """Issue 12: after a lease lapse (a failover that lost it, a long pause) and a takeover,
    the first holder's read, begin, dead letter and expiry are refused in the script, its
    finish records the delivery it made but begins nothing, and renew/release miss."""
    for i in range(4):
        await put(queue, f"k{i}")
    await queue.release_replayer("shop", LEASE)
    lease_a = await queue.acquire_replayer("shop", "edge-a", 5)
    assert lease_a is not None
    batch = await queue.next_batch("shop", "edge-a", claim_idle=60, count=10, lease=lease_a)
    first, second = batch[0], batch[1]  # type: ignore[index]
    assert await queue.begin("shop", first, lease_a) == 1
    raw = redis_client(queue_url)
    try:
        assert await raw.get(queue.key("shop", "replayer")) == f"edge-a#{lease_a.token}".encode()
        await raw.pexpire(queue.key("shop", "replayer"), 1)  # the lease lapses
        await asyncio.sleep(0.05)
    finally:
        await raw.aclose()
    lease_b = await queue.acquire_replayer("shop", "edge-b", 5)
    assert lease_b is not None and lease_b.token > lease_a.token
    with pytest.raises(LeaseLost):  # reading claims entries: fenced too
        await queue.next_batch("shop", "edge-a", claim_idle=0.001, count=10, lease=lease_a)
    with pytest.raises(LeaseLost):
        await queue.begin("shop", second, lease_a)
    with pytest.raises(LeaseLost):
        await queue.dead_letter("shop", second, lease_a, "status 400", 400, 1, 100)
    with pytest.raises(LeaseLost):
        await queue.expire("shop", retention=0.001, max_dead=100, lease=lease_a)
    # Without a lease, expiry runs only while nobody replays the app.
    assert await queue.expire("shop", retention=0.001, max_dead=100) == (0, [])
    with pytest.raises(LeaseLost):  # the app answered 2xx to A: recorded, nothing begun
        await queue.finish("shop", first, lease_a, then=second)
    assert await queue.depth("shop") == (3, 0)
    assert not await queue.renew_replayer("shop", lease_a, 5)
    await queue.release_replayer("shop", lease_a)
    # B, the holder now, sees the first delivered and has the rest untouched.
    assert await queue.begin("shop", first, lease_b) == 0
    assert await queue.begin("shop", second, lease_b) == 1
    assert await queue.renew_replayer("shop", lease_b, 5)
    await queue.release_replayer("shop", lease_b)
    # Nobody replays the app now: expiry without a lease runs.
    assert (await queue.expire("shop", retention=0.001, max_dead=100))[0] == 3
    assert await queue.acquire_replayer("shop", "edge-a", 5) is not None
