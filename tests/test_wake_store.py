"""The wake store contract, run against memory://, a real redis-server and a real Redis
Cluster (redis+cluster://, 3 masters with a replica each).

Each test gets an empty store (memory: a new one; redis: FLUSHDB; cluster: FLUSHALL on
every master). Redis-only tests
at the end cover what only a shared store can show: one slot per app, a region
budget contended by several edges, and behaviour while Redis is down or hung.
Every wait is bounded; timing assertions only check bounds, never speed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from helpers import made_hot_for_every_waiter
from redis.crc import key_slot
from stack import RedisProcess

from wake.budget import BudgetLimits
from wake.store.memory import MemoryStore
from wake.store.protocol import AppWakeState, Transition, WakePhases, WakeStore
from wake.store.redis_backend import RedisStore, StoreUnavailable
from wake.store.url import open_store

LIMITS = BudgetLimits(
    max_concurrent_wakes=2, max_wakes_per_second=100.0, tenant_max_concurrent_wakes=5, slot_ttl=10
)
WAIT = 5.0  # upper bound on any wait for something that should happen "soon"

StoreFactory = Callable[..., Awaitable[WakeStore]]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = WAIT) -> None:
    """Retry `check` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


async def cancel(*tasks: asyncio.Task[Any]) -> None:
    """Cancel and reap tasks a failed test may have left running."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def publish_until_done(
    store: WakeStore, app: str, waiters: list[asyncio.Task[AppWakeState]]
) -> None:
    """Publish `app` every 0.1 s until every waiter returned; fail after WAIT seconds.

    Repeated because a store may still be subscribing when the first message goes out.
    """
    deadline = time.monotonic() + WAIT
    pending = [w for w in waiters if not w.done()]
    while pending and time.monotonic() < deadline:
        await store.publish(app)
        await asyncio.wait(pending, timeout=0.1)
        pending = [w for w in pending if not w.done()]
    assert not pending, f"{len(pending)} of {len(waiters)} waiters not woken by publish"


@pytest.fixture(params=["memory", "redis", "cluster"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def make_store(backend: str, request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """Factory for stores of the current backend; redis ones share one flushed DB."""
    made: list[WakeStore] = []
    url = ""
    if backend == "cluster":
        url = request.getfixturevalue("fresh_cluster").url
    elif backend == "redis":
        url = request.getfixturevalue("redis_server")
        admin = aioredis.from_url(url)
        try:
            await admin.flushdb()
        finally:
            await admin.aclose()

    async def make(journal_limit: int = 10_000, poll_interval: float = 0.25) -> WakeStore:
        store: WakeStore
        if backend == "memory":
            store = MemoryStore(journal_limit=journal_limit, poll_interval=poll_interval)
        else:
            store = RedisStore(url, journal_limit=journal_limit, poll_interval=poll_interval)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


@pytest.fixture
async def store(make_store: StoreFactory) -> WakeStore:
    return await make_store()


# --------------------------------------------------------------------------- leases


async def test_lease_is_exclusive(store: WakeStore) -> None:
    lease = await store.acquire_lease("shop", "edge-a", 5)
    assert lease is not None and lease.owner == "edge-a" and lease.token > 0
    assert await store.acquire_lease("shop", "edge-b", 5) is None
    assert await store.lease_owner("shop") == "edge-a"
    # Another app's lease is independent.
    assert await store.acquire_lease("blog", "edge-b", 5) is not None


async def test_token_increases_on_each_acquire(store: WakeStore) -> None:
    tokens = []
    for owner in ("a", "b", "c"):
        lease = await store.acquire_lease("shop", owner, 5)
        assert lease is not None
        tokens.append(lease.token)
        await store.release_lease("shop", owner)
    assert tokens == sorted(tokens) and len(set(tokens)) == 3


async def test_token_is_at_least_the_store_clock_in_microseconds(store: WakeStore) -> None:
    """The time floor that keeps tokens rising across a failover (next_fence_token);
    the store's clock is this machine's (redis-server runs here)."""
    before = time.time()
    lease = await store.acquire_lease("shop", "edge-a", 5)
    assert lease is not None
    assert (before - 1.0) * 1e6 <= lease.token <= (time.time() + 1.0) * 1e6


async def test_lease_expires_and_next_owner_gets_higher_token(store: WakeStore) -> None:
    first = await store.acquire_lease("shop", "dead-edge", 1.0)
    assert first is not None
    assert await store.acquire_lease("shop", "edge-b", 5) is None
    second = None

    async def taken() -> bool:
        nonlocal second
        second = await store.acquire_lease("shop", "edge-b", 5)
        return second is not None

    await eventually(taken)
    assert second is not None and second.token > first.token
    assert await store.lease_owner("shop") == "edge-b"
    assert not await store.renew_lease("shop", "dead-edge", 5)


async def test_renew_only_by_owner(store: WakeStore) -> None:
    assert await store.acquire_lease("shop", "a", 1.0) is not None
    assert not await store.renew_lease("shop", "b", 5)
    assert await store.renew_lease("shop", "a", 5)
    await asyncio.sleep(1.2)  # past the original ttl: the renewal is what keeps it
    assert await store.lease_owner("shop") == "a"
    assert await store.acquire_lease("shop", "b", 5) is None


async def test_release_only_by_owner(store: WakeStore) -> None:
    assert await store.acquire_lease("shop", "a", 5) is not None
    await store.release_lease("shop", "b")
    assert await store.lease_owner("shop") == "a"
    await store.release_lease("shop", "a")
    assert await store.lease_owner("shop") is None
    assert await store.acquire_lease("shop", "b", 5) is not None


# --------------------------------------------------------------------------- state


async def test_unknown_app_reads_cold_version_zero(store: WakeStore) -> None:
    state = await store.read_state("never-seen")
    assert state.app == "never-seen" and state.state == "cold" and state.version == 0


async def test_write_bumps_version_and_records_token(store: WakeStore) -> None:
    lease = await store.acquire_lease("shop", "a", 5)
    assert lease is not None
    for expected_version, name in enumerate(("wake_requested", "starting", "hot"), start=1):
        state = AppWakeState(app="shop", state=name, address="127.0.0.1:9", updated_at=1.5)
        assert await store.write_state(state, lease.token)
        read = await store.read_state("shop")
        assert (read.state, read.version, read.token) == (name, expected_version, lease.token)
        assert read.address == "127.0.0.1:9" and read.updated_at == 1.5


async def test_stale_token_refused_after_newer_lease(store: WakeStore) -> None:
    """The paused holder: its lease expired, another edge took over, then it came back."""
    paused = await store.acquire_lease("shop", "paused", 0.2)
    assert paused is not None
    assert await store.write_state(AppWakeState(app="shop", state="starting"), paused.token)
    newer = None

    async def taken() -> bool:
        nonlocal newer
        newer = await store.acquire_lease("shop", "fresh", 5)
        return newer is not None

    await eventually(taken)
    assert newer is not None
    assert await store.write_state(AppWakeState(app="shop", state="hot"), newer.token)
    # The paused holder wakes up and tries to record its (now stale) outcome.
    refused = AppWakeState(app="shop", state="failed", reason="stale")
    assert not await store.write_state(refused, paused.token)
    read = await store.read_state("shop")
    assert (read.state, read.token, read.version) == ("hot", newer.token, 2)


async def test_read_states_in_order_with_last_wake(store: WakeStore) -> None:
    lease = await store.acquire_lease("shop", "a", 5)
    assert lease is not None
    phases = WakePhases(at=2.0, budget_ms=0.5, allocation_ms=900.0, readiness_ms=30.0, total_ms=931)
    hot = AppWakeState(app="shop", state="hot", last_wake=phases)
    assert await store.write_state(hot, lease.token)
    states = await store.read_states(["never-seen", "shop", "never-seen"])
    assert [(s.app, s.state, s.version) for s in states] == [
        ("never-seen", "cold", 0),
        ("shop", "hot", 1),
        ("never-seen", "cold", 0),
    ]
    assert states[1].last_wake == phases and states[0].last_wake is None
    assert await store.read_states([]) == []


async def test_gallery_counts_add_up(store: WakeStore) -> None:
    assert await store.counts() == {}
    await store.add_counts({"gate_passed:wake_budget_available": 2, "failure:wake_stampede": 7})
    await store.add_counts({"failure:wake_stampede": 5})
    await store.add_counts({})
    expected = {"gate_passed:wake_budget_available": 2, "failure:wake_stampede": 12}
    assert await store.counts() == expected


async def test_a_counts_batch_resent_by_its_writer_is_added_once(store: WakeStore) -> None:
    await store.add_counts({"wakes": 1, "failure:wake_stampede": 4}, writer="edge-a:1", seq=1)
    await store.add_counts({"wakes": 1, "failure:wake_stampede": 4}, writer="edge-a:1", seq=1)
    await store.add_counts({"wakes": 9}, writer="edge-a:1", seq=0)  # older than the last one
    await store.add_counts({"wakes": 1}, writer="edge-b:1", seq=1)  # another writer's seq 1
    await store.add_counts({"failure:wake_stampede": 2}, writer="edge-a:1", seq=2)
    await store.add_counts({"wakes": 1})  # no writer: always added
    assert await store.counts() == {"wakes": 3, "failure:wake_stampede": 6}


# --------------------------------------------------------------------------- journal


async def test_journal_is_capped_newest_last_and_filters_by_app(make_store: StoreFactory) -> None:
    store = await make_store(journal_limit=5)
    for i in range(12):
        app = "shop" if i % 2 else "blog"
        await store.append_transition(
            Transition(app=app, from_state="cold", to_state=f"s{i}", token=i, edge_id="e1")
        )
    everything = await store.transitions(limit=100)
    assert [t.to_state for t in everything] == ["s7", "s8", "s9", "s10", "s11"]
    assert [t.to_state for t in await store.transitions(limit=2)] == ["s10", "s11"]
    shop = await store.transitions("shop")
    assert [t.to_state for t in shop] == ["s7", "s9", "s11"]
    assert all(t.app == "shop" and t.edge_id == "e1" for t in shop)
    assert [t.to_state for t in await store.transitions("shop", limit=1)] == ["s11"]
    assert await store.transitions("nobody") == []


# --------------------------------------------------------------------------- change notification


async def test_publish_wakes_wait_change(make_store: StoreFactory) -> None:
    # A poll interval far beyond the bound below: only the notification can wake it.
    store = await make_store(poll_interval=60.0)
    lease = await store.acquire_lease("shop", "a", 5)
    assert lease is not None
    waiter = asyncio.create_task(store.wait_change("shop", 0, timeout=30))
    try:
        await asyncio.sleep(0.3)  # it has read version 0; from here only a message can wake it
        assert await store.write_state(AppWakeState(app="shop", state="hot"), lease.token)
        await publish_until_done(store, "shop", [waiter])
        state = waiter.result()
        assert state.state == "hot" and state.version == 1
    finally:
        await cancel(waiter)


async def test_wait_change_returns_current_state_at_timeout(store: WakeStore) -> None:
    lease = await store.acquire_lease("shop", "a", 5)
    assert lease is not None
    await store.write_state(AppWakeState(app="shop", state="starting"), lease.token)
    started = time.monotonic()
    state = await asyncio.wait_for(store.wait_change("shop", 1, timeout=0.3), WAIT)
    assert time.monotonic() - started >= 0.25
    assert state.state == "starting" and state.version == 1


async def test_wait_change_returns_at_once_when_already_newer(store: WakeStore) -> None:
    lease = await store.acquire_lease("shop", "a", 5)
    assert lease is not None
    await store.write_state(AppWakeState(app="shop", state="hot"), lease.token)
    state = await asyncio.wait_for(store.wait_change("shop", 0, timeout=30), WAIT)
    assert state.version == 1


async def test_lost_notification_is_covered_by_polling(
    make_store: StoreFactory, backend: str, request: pytest.FixtureRequest
) -> None:
    store = await make_store(poll_interval=0.05)
    lease = await store.acquire_lease("shop", "a", 5)
    assert lease is not None
    waiter = asyncio.create_task(store.wait_change("shop", 0, timeout=10))
    try:
        await asyncio.sleep(0.1)
        # The write is never announced, as if the message were lost.
        assert await store.write_state(AppWakeState(app="shop", state="hot"), lease.token)
        done, _ = await asyncio.wait({waiter}, timeout=3)
        assert waiter in done, "a write without publish was not noticed by polling"
        assert waiter.result().version == 1
    finally:
        await cancel(waiter)


# --------------------------------------------------------------------------- budget


async def test_budget_concurrent_cap_and_release(store: WakeStore) -> None:
    assert (await store.acquire_budget("a", "t", LIMITS, 30)).granted
    assert (await store.acquire_budget("b", "t", LIMITS, 30)).granted
    refused = await store.acquire_budget("c", "t", LIMITS, 30)
    assert not refused.granted and refused.reason == "concurrent wakes"
    await store.release_budget("a")
    assert (await store.acquire_budget("c", "t", LIMITS, 30)).granted
    usage = await store.budget_usage(LIMITS)
    assert (usage.in_use, usage.waiting, usage.by_tenant) == (2, 0, {"t": 2})


async def test_budget_grant_is_idempotent_for_a_holder(store: WakeStore) -> None:
    assert (await store.acquire_budget("a", "t", LIMITS, 30)).granted
    assert (await store.acquire_budget("a", "t", LIMITS, 30)).granted
    assert (await store.budget_usage(LIMITS)).in_use == 1


async def test_budget_waiters_served_in_arrival_order(store: WakeStore) -> None:
    for holder in ("a", "b"):
        assert (await store.acquire_budget(holder, "t", LIMITS, 30)).granted
    assert not (await store.acquire_budget("first", "t", LIMITS, 30)).granted
    assert not (await store.acquire_budget("second", "t", LIMITS, 30)).granted
    assert (await store.budget_usage(LIMITS)).waiting == 2
    await store.release_budget("a")
    # One slot free: the later waiter asks first but must not jump the queue.
    assert not (await store.acquire_budget("second", "t", LIMITS, 30)).granted
    assert (await store.acquire_budget("first", "t", LIMITS, 30)).granted
    await store.release_budget("b")
    assert (await store.acquire_budget("second", "t", LIMITS, 30)).granted
    assert (await store.budget_usage(LIMITS)).waiting == 0


async def test_budget_tenant_cap_does_not_block_other_tenants(store: WakeStore) -> None:
    limits = BudgetLimits(
        max_concurrent_wakes=3, max_wakes_per_second=100, tenant_max_concurrent_wakes=1
    )
    assert (await store.acquire_budget("x1", "acme", limits, 30)).granted
    blocked = await store.acquire_budget("x2", "acme", limits, 30)
    assert not blocked.granted and blocked.reason == "tenant wakes"
    # x2 is ahead in the queue, but its tenant is full: y1 is not held behind it.
    assert (await store.acquire_budget("y1", "other", limits, 30)).granted
    usage = await store.budget_usage(limits)
    assert usage.by_tenant == {"acme": 1, "other": 1} and usage.waiting == 1


async def test_budget_rate_limit_with_retry_after(store: WakeStore) -> None:
    limits = BudgetLimits(
        max_concurrent_wakes=100, max_wakes_per_second=2.0, tenant_max_concurrent_wakes=100
    )
    # Three asks inside half a second (one token's refill); a stalled machine tries again.
    for attempt in range(5):
        began = time.monotonic()
        asks = [await store.acquire_budget(f"{n}{attempt}", "t", limits, 30) for n in "abc"]
        if time.monotonic() - began < 0.4:
            break
        await asyncio.sleep(1.1)  # the bucket full again
    a, b, refused = asks
    assert a.granted and b.granted
    assert not refused.granted and refused.reason == "wake rate"
    assert 0 < refused.retry_after <= 0.5
    assert (await store.budget_usage(limits)).tokens < 1
    await asyncio.sleep(refused.retry_after + 0.05)
    assert (await store.acquire_budget(f"c{attempt}", "t", limits, 30)).granted


async def test_budget_dead_holders_slot_is_reclaimed(store: WakeStore) -> None:
    limits = BudgetLimits(
        max_concurrent_wakes=2,
        max_wakes_per_second=100,
        tenant_max_concurrent_wakes=5,
        slot_ttl=2.0,
    )
    assert (await store.acquire_budget("alive", "t", limits, 30)).granted
    assert (await store.acquire_budget("dead", "t", limits, 30)).granted

    async def keep_renewing() -> None:
        while True:
            assert await store.renew_budget("alive", limits)
            await asyncio.sleep(0.1)

    renewer = asyncio.create_task(keep_renewing())
    try:

        async def granted() -> bool:
            return (await store.acquire_budget("next", "t", limits, 30)).granted

        await eventually(granted)
        assert await store.renew_budget("alive", limits)
        assert not await store.renew_budget("dead", limits)
        assert (await store.budget_usage(limits)).in_use == 2
    finally:
        await cancel(renewer)


async def test_budget_waiter_past_its_deadline_leaves_the_queue(store: WakeStore) -> None:
    limits = BudgetLimits(
        max_concurrent_wakes=1, max_wakes_per_second=100, tenant_max_concurrent_wakes=5
    )
    assert (await store.acquire_budget("a", "t", limits, 30)).granted
    assert not (await store.acquire_budget("early", "t", limits, 0.2)).granted
    assert not (await store.acquire_budget("late", "t", limits, 30)).granted
    await asyncio.sleep(0.4)  # "early" gave up waiting
    await store.release_budget("a")
    assert (await store.acquire_budget("late", "t", limits, 30)).granted
    assert (await store.budget_usage(limits)).waiting == 0


async def test_budget_release_leaves_the_queue(store: WakeStore) -> None:
    limits = BudgetLimits(
        max_concurrent_wakes=1, max_wakes_per_second=100, tenant_max_concurrent_wakes=5
    )
    assert (await store.acquire_budget("a", "t", limits, 30)).granted
    assert not (await store.acquire_budget("gone", "t", limits, 30)).granted
    assert not (await store.acquire_budget("next", "t", limits, 30)).granted
    await store.release_budget("gone")  # its request was answered some other way
    await store.release_budget("a")
    assert (await store.acquire_budget("next", "t", limits, 30)).granted


async def test_budget_waiter_past_its_deadline_leaves_its_tenants_turn(store: WakeStore) -> None:
    limits = BudgetLimits(
        max_concurrent_wakes=1, max_wakes_per_second=100, tenant_max_concurrent_wakes=5
    )
    assert (await store.acquire_budget("busy", "a", limits, 30)).granted
    assert not (await store.acquire_budget("a1", "a", limits, 0.2)).granted
    assert not (await store.acquire_budget("b1", "b", limits, 0.2)).granted
    assert not (await store.acquire_budget("a2", "a", limits, 30)).granted
    assert not (await store.acquire_budget("c1", "c", limits, 30)).granted
    await asyncio.sleep(0.4)  # a1 and b1 gave up waiting
    await store.release_budget("busy")
    assert (await store.budget_usage(limits)).waiting == 2
    # a keeps its turn for its next waiter; b, with none left, left the ring.
    assert not (await store.acquire_budget("c1", "c", limits, 30)).granted
    assert (await store.acquire_budget("a2", "a", limits, 30)).granted
    await store.release_budget("a2")
    assert not (await store.acquire_budget("b1", "b", limits, 30)).granted  # back, behind c
    assert (await store.acquire_budget("c1", "c", limits, 30)).granted


async def test_budget_is_fair_across_tenants(store: WakeStore) -> None:
    """Tenant A queues 100 apps, then tenant B one: B is granted second, not 101st, and
    A's apps go in their arrival order. Each round every waiter asks, newest first."""
    limits = BudgetLimits(
        max_concurrent_wakes=1, max_wakes_per_second=1000, tenant_max_concurrent_wakes=5
    )
    assert (await store.acquire_budget("a-busy", "A", limits, 60)).granted
    waiters = [(f"a-{i:03d}", "A") for i in range(100)] + [("b-only", "B")]
    for holder, tenant in waiters:
        refused = await store.acquire_budget(holder, tenant, limits, 60)
        assert (refused.granted, refused.reason) == (False, "concurrent wakes")
    assert (await store.budget_usage(limits)).waiting == 101

    order: list[str] = []
    holding = "a-busy"
    while waiters:
        await store.release_budget(holding)
        for holder, tenant in reversed(waiters):
            if (await store.acquire_budget(holder, tenant, limits, 60)).granted:
                break
        else:
            raise AssertionError(f"no waiter granted after {order[-3:]}")
        waiters.remove((holder, tenant))
        holding = holder
        order.append(holder)
        usage = await store.budget_usage(limits)
        assert (usage.in_use, usage.waiting) == (1, len(waiters))
    assert order == ["a-000", "b-only", *(f"a-{i:03d}" for i in range(1, 100))]


# --------------------------------------------------------------------------- idle


async def test_touch_and_idle_for(store: WakeStore) -> None:
    assert await store.idle_for("shop") is None
    await store.touch("shop")
    await asyncio.sleep(0.2)
    idle = await store.idle_for("shop")
    assert idle is not None and 0.15 <= idle < 60
    await store.touch("shop")
    again = await store.idle_for("shop")
    assert again is not None and again < idle
    assert await store.idle_for("other") is None


async def test_ping(store: WakeStore) -> None:
    assert await store.ping()


# --------------------------------------------------------------------------- open_store


async def test_open_store_by_url(redis_server: str) -> None:
    memory = open_store("memory://")
    assert isinstance(memory, MemoryStore)
    await memory.close()
    shared = open_store(redis_server, key_prefix="other")
    try:
        assert isinstance(shared, RedisStore) and await shared.ping()
        assert shared.app_key("shop", "lease") == "other:{shop}:lease"
    finally:
        await shared.close()
    with pytest.raises(ValueError, match="unknown store"):
        open_store("postgres://127.0.0.1/x")


# --------------------------------------------------------------------------- redis only


@pytest.fixture
async def redis_url(redis_server: str) -> AsyncIterator[str]:
    """The shared test Redis, flushed."""
    admin = aioredis.from_url(redis_server)
    try:
        await admin.flushdb()
    finally:
        await admin.aclose()
    yield redis_server


async def test_redis_app_keys_share_one_slot(redis_url: str) -> None:
    store = RedisStore(redis_url)
    admin = aioredis.from_url(redis_url, decode_responses=True)
    try:
        lease = await store.acquire_lease("shop", "a", 5)
        assert lease is not None
        await store.write_state(AppWakeState(app="shop", state="hot"), lease.token)
        await store.touch("shop")
        await store.acquire_budget("shop-wake", "acme", LIMITS, 30)
        await store.acquire_budget("x", "acme", LIMITS, 30)
        await store.acquire_budget("y", "acme", LIMITS, 30)  # queued: waiting keys exist too
        await store.append_transition(Transition(app="shop", from_state="cold", to_state="hot"))

        written = set(await admin.keys("edge:*"))
        app_keys = {k for k in written if k.startswith("edge:{shop}:")}
        assert app_keys == {"edge:{shop}:lease", "edge:{shop}:fence", "edge:{shop}:state"} | {
            "edge:{shop}:seen"
        }
        assert len({key_slot(k.encode()) for k in store.app_keys("shop")}) == 1
        budget = {k for k in written if k.startswith("edge:{budget}:")}
        assert budget <= set(store.budget_keys()) and len(budget) >= 5
        assert len({key_slot(k.encode()) for k in store.budget_keys()}) == 1
        assert written == app_keys | budget | {"edge:{journal}"}
    finally:
        await admin.aclose()
        await store.close()


async def test_redis_gallery_counts_are_region_wide(redis_url: str) -> None:
    """Two edges' deltas land in one tally, on a key with its own hash tag."""
    one, two = RedisStore(redis_url), RedisStore(redis_url)
    try:
        await one.add_counts({"failure:wake_stampede": 7, "wakes": 1})
        await two.add_counts({"failure:wake_stampede": 5})
        assert await one.counts() == await two.counts() == {"failure:wake_stampede": 12, "wakes": 1}
    finally:
        await one.close()
        await two.close()


async def test_redis_region_budget_across_edges(redis_url: str) -> None:
    """50 concurrent wakes from 5 edges against max_concurrent_wakes=10: exactly 10 start."""
    limits = BudgetLimits(
        max_concurrent_wakes=10, max_wakes_per_second=1000, tenant_max_concurrent_wakes=100
    )
    edges = [RedisStore(redis_url) for _ in range(5)]
    try:
        decisions = await asyncio.wait_for(
            asyncio.gather(
                *(
                    edges[i % 5].acquire_budget(f"app-{i}", f"tenant-{i % 7}", limits, 30)
                    for i in range(50)
                )
            ),
            WAIT * 2,
        )
        assert sum(d.granted for d in decisions) == 10
        assert {d.reason for d in decisions if not d.granted} == {"concurrent wakes"}
        usage = await edges[0].budget_usage(limits)
        assert (usage.in_use, usage.waiting) == (10, 40)
    finally:
        for edge in edges:
            await edge.close()


@pytest.mark.parametrize(("max_concurrent", "tenant_max"), [(4, 1), (5, 2)])
async def test_redis_budget_decides_like_the_pure_model(
    redis_url: str, max_concurrent: int, tenant_max: int
) -> None:
    """The Lua and wake/budget.py give the same answer to the same 600 random asks and
    releases (3 tenants, one with most apps; both caps bind); deadlines and leases are
    too long to expire, the rate too high to bind."""
    limits = BudgetLimits(
        max_concurrent_wakes=max_concurrent,
        max_wakes_per_second=1000,
        tenant_max_concurrent_wakes=tenant_max,
    )
    # Names that would share a range of the queue without its length prefix.
    tenants = ["acme", "4:acme", "acme:0"]
    rng = random.Random(14)
    redis_store, memory = RedisStore(redis_url), MemoryStore()
    held: list[str] = []
    try:
        for step in range(600):
            if held and rng.random() < 0.3:
                holder = held.pop(rng.randrange(len(held)))
                await redis_store.release_budget(holder)
                await memory.release_budget(holder)
                continue
            i = rng.randrange(40)
            holder, tenant = f"app-{i}", tenants[i % 3 if i < 30 else 0]
            got = await redis_store.acquire_budget(holder, tenant, limits, 60)
            want = await memory.acquire_budget(holder, tenant, limits, 60)
            assert (got.granted, got.reason) == (want.granted, want.reason), (step, holder)
            if got.granted and holder not in held:
                held.append(holder)
            if step % 50 == 0:
                got_use, want_use = (
                    await redis_store.budget_usage(limits),
                    await memory.budget_usage(limits),
                )
                assert (got_use.in_use, got_use.waiting, got_use.by_tenant) == (
                    want_use.in_use,
                    want_use.waiting,
                    want_use.by_tenant,
                )
    finally:
        await redis_store.close()


async def test_redis_publish_reaches_other_edges(redis_url: str) -> None:
    """Edges not holding the lease learn the outcome over pub/sub, not from polling."""
    holder = RedisStore(redis_url)
    watchers = [RedisStore(redis_url, poll_interval=60.0) for _ in range(2)]
    waiters: list[asyncio.Task[AppWakeState]] = []
    try:
        lease = await holder.acquire_lease("shop", "holder", 5)
        assert lease is not None
        waiters = [
            asyncio.create_task(w.wait_change("shop", 0, timeout=30))
            for w in watchers
            for _ in range(10)
        ]
        await asyncio.sleep(0.3)  # they have read version 0; only a message can wake them now
        assert await holder.write_state(AppWakeState(app="shop", state="hot"), lease.token)
        await publish_until_done(holder, "shop", waiters)
        assert {w.result().state for w in waiters} == {"hot"}
    finally:
        await cancel(*waiters)
        await holder.close()
        for w in watchers:
            await w.close()


async def test_redis_many_waiters_share_connections(redis_url: str) -> None:
    """2,000 waiters over 200 apps use a bounded number of Redis connections."""
    store = RedisStore(redis_url, poll_interval=0.05)
    writer = RedisStore(redis_url)
    admin = aioredis.from_url(redis_url, decode_responses=True)
    apps = [f"app-{i}" for i in range(200)]
    waiters: list[asyncio.Task[AppWakeState]] = []
    try:
        waiters = [
            asyncio.create_task(store.wait_change(app, 0, timeout=30))
            for app in apps
            for _ in range(10)
        ]
        await asyncio.sleep(0.5)  # every app polled several times meanwhile
        clients = len(await admin.client_list())
        # One pool (max 64) + one pub/sub connection per store, plus writer and admin.
        assert clients <= 64 + 1 + 2 + 2
        await made_hot_for_every_waiter(writer, apps, waiters, WAIT * 2)
    finally:
        await cancel(*waiters)
        await admin.aclose()
        await writer.close()
        await store.close()


# ------------------------------------------------------------ redis stopped / hung


def _calls(store: RedisStore) -> dict[str, Callable[[], Awaitable[Any]]]:
    """One call of every store method that talks to Redis."""
    return {
        "acquire_lease": lambda: store.acquire_lease("shop", "a", 5),
        "renew_lease": lambda: store.renew_lease("shop", "a", 5),
        "release_lease": lambda: store.release_lease("shop", "a"),
        "lease_owner": lambda: store.lease_owner("shop"),
        "read_state": lambda: store.read_state("shop"),
        "write_state": lambda: store.write_state(AppWakeState(app="shop"), 99),
        "append_transition": lambda: store.append_transition(
            Transition(app="shop", from_state="cold", to_state="hot")
        ),
        "transitions": lambda: store.transitions("shop"),
        "publish": lambda: store.publish("shop"),
        "wait_change": lambda: store.wait_change("shop", 10**9, timeout=30),
        "acquire_budget": lambda: store.acquire_budget("h", "t", LIMITS, 30),
        "renew_budget": lambda: store.renew_budget("h", LIMITS),
        "release_budget": lambda: store.release_budget("h"),
        "budget_usage": lambda: store.budget_usage(LIMITS),
        "touch": lambda: store.touch("shop"),
        "idle_for": lambda: store.idle_for("shop"),
        "read_states": lambda: store.read_states(["shop", "cart"]),
        "add_counts": lambda: store.add_counts({"failure:wake_stampede": 1}),
        "add_counts_batch": lambda: store.add_counts({"wakes": 1}, writer="w", seq=1),
        "counts": lambda: store.counts(),
    }


async def _raises_unavailable_promptly(name: str, call: Callable[[], Awaitable[Any]]) -> float:
    started = time.monotonic()
    try:
        # The outer bound only catches a hang; the store's own bound must fire first.
        await asyncio.wait_for(call(), 15)
    except StoreUnavailable:
        return time.monotonic() - started
    except TimeoutError:
        raise AssertionError(f"{name} hung while Redis was unavailable") from None
    raise AssertionError(f"{name} succeeded while Redis was unavailable")


async def test_redis_down_raises_store_unavailable_then_recovers(own_redis: RedisProcess) -> None:
    # A poll interval beyond every bound here: waiters learn of the outage, and of
    # changes after the restart, only through the store's pub/sub connection.
    store = RedisStore(
        own_redis.url, socket_timeout=0.5, connect_timeout=0.5, op_timeout=3, poll_interval=60
    )
    waiter: asyncio.Task[AppWakeState] | None = None
    try:
        lease = await store.acquire_lease("shop", "a", 5)
        assert lease is not None  # the pool now holds a live connection to the old server
        watcher = asyncio.create_task(store.wait_change("shop", 10**9, timeout=30))
        await asyncio.sleep(0.2)  # the watcher has read once and the store has subscribed

        own_redis.stop()
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(watcher, 10)  # a waiter learns promptly, not at its timeout
        for name, call in _calls(store).items():
            assert await _raises_unavailable_promptly(name, call) < 10, name
        assert not await store.ping()

        own_redis.wipe()
        own_redis.start()  # same port, empty data
        assert await store.ping()
        lease = await store.acquire_lease("shop", "b", 5)
        assert lease is not None
        assert await store.write_state(AppWakeState(app="shop", state="hot"), lease.token)
        assert (await store.read_state("shop")).state == "hot"
        assert (await store.acquire_budget("h", "t", LIMITS, 30)).granted
        # The store's pub/sub connection came back: an announced change reaches a waiter.
        waiter = asyncio.create_task(store.wait_change("shop", 1, timeout=30))
        await asyncio.sleep(0.2)  # its first read (version 1) is done
        assert await store.write_state(AppWakeState(app="shop", state="sleeping"), lease.token)
        await publish_until_done(store, "shop", [waiter])
        assert waiter.result().state == "sleeping"
    finally:
        if waiter is not None:
            await cancel(waiter)
        await store.close()


async def test_redis_hung_times_out_with_store_unavailable(own_redis: RedisProcess) -> None:
    store = RedisStore(own_redis.url, socket_timeout=0.5, connect_timeout=0.5, op_timeout=2)
    try:
        assert await store.ping()
        own_redis.pause()  # accepts nothing, answers nothing: only timeouts can help
        try:
            for name in ("read_state", "acquire_lease", "acquire_budget", "touch"):
                assert await _raises_unavailable_promptly(name, _calls(store)[name]) < 10, name
        finally:
            own_redis.resume()
        assert await store.ping()
        assert (await store.read_state("shop")).state == "cold"
    finally:
        await store.close()


async def test_closed_store_refuses_and_releases_waiters(redis_url: str) -> None:
    store = RedisStore(redis_url)
    waiter = asyncio.create_task(store.wait_change("shop", 10**9, timeout=30))
    await asyncio.sleep(0.1)
    await store.close()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(waiter, WAIT)
    with pytest.raises(StoreUnavailable):
        await store.read_state("shop")
