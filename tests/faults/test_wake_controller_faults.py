"""One wake per app, and the budget holds, under store and control-plane faults.

Wake controllers are driven in-process against a real redis-server of the test's own
(paused with CLIENT PAUSE WRITE, or SIGKILLed and restarted with its AOF) and the real
local control plane running the sample app with a start delay. Each test counts what
the control plane created for the app (exactly one allocation), what is left ready
afterwards (exactly one, or none for a wake that failed) and the budget slots still
in use (none).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import pytest
import redis.asyncio as aioredis
from helpers import eventually
from stack import ControlPlaneProcess, RedisProcess, sample_app_spec

from scheduler_client.client import ControlPlaneClient
from scheduler_client.models import Allocation
from wake import decisions
from wake.budget import BudgetLimits
from wake.controller import HotTarget, WakeAppSpec, WakeController, WakeRefused, _Attempt
from wake.store.memory import MemoryStore
from wake.store.protocol import AppWakeState, StoreUnavailable, WakeStore
from wake.store.redis_backend import RedisStore

LIMITS = BudgetLimits(max_concurrent_wakes=5, max_wakes_per_second=50, slot_ttl=30.0)


def slow_app(name: str, start_delay: float) -> dict[str, object]:
    spec = sample_app_spec(name, start_timeout="30s", drain_grace="0s")
    spec["command"] = [*spec["command"], "--start-delay", str(start_delay)]  # type: ignore[misc]
    return spec


def redis_store(url: str) -> RedisStore:
    # Short socket and call timeouts: a paused or dead Redis is noticed within a second.
    return RedisStore(url, poll_interval=0.1, socket_timeout=1.0, op_timeout=1.5)


def wake_controller(
    cp: ControlPlaneProcess,
    store: WakeStore,
    edge_id: str,
    *,
    lease_ttl: float = 1.5,
    cp_timeout: float = 5.0,
    cp_retries: int = 3,
) -> WakeController:
    spec = WakeAppSpec(name="shop", hold_timeout=30.0, readiness_timeout=25.0)
    return WakeController(
        store,
        ControlPlaneClient(cp.url, cp.token, timeout=cp_timeout, retries=cp_retries),
        edge_id=edge_id,
        budget=LIMITS,
        apps={"shop": spec},
        lease_ttl=lease_ttl,
        poll_interval=0.1,
    )


async def allocations(cp: ControlPlaneProcess) -> list[Allocation]:
    async with ControlPlaneClient(cp.url, cp.token) as api:
        return await api.list_allocations("shop")


async def hot_eventually(wake: WakeController, within: float) -> HotTarget:
    """ensure_hot, asked again after each refusal or store error, for at most `within` s."""
    async with asyncio.timeout(within):
        while True:
            try:
                return await wake.ensure_hot("shop", within)
            except (WakeRefused, StoreUnavailable):
                await asyncio.sleep(0.2)


async def settled(cp: ControlPlaneProcess, store: WakeStore) -> tuple[list[Allocation], int]:
    """Once nothing is starting and no slot is held: the allocations and slots in use."""

    async def quiet() -> bool:
        starting = [
            a for a in await allocations(cp) if a.state in ("planned", "pulling", "starting")
        ]
        try:
            usage = await store.budget_usage(LIMITS)
        except StoreUnavailable:
            return False
        return not starting and usage.in_use == 0

    with contextlib.suppress(AssertionError):
        await eventually(quiet, timeout=20, interval=0.2, what="starts settled, slots released")
    return await allocations(cp), (await store.budget_usage(LIMITS)).in_use


async def close_all(*controllers: WakeController) -> None:
    for wake in controllers:
        with contextlib.suppress(Exception):
            await wake.close()


async def test_redis_writes_paused_mid_wake_make_one_allocation(
    start_control_plane, own_redis: RedisProcess
) -> None:
    # The case: Redis writes paused for 5 s in the middle of an 8 s wake. The
    # first holder's lease renewal fails meanwhile; the wake must neither be taken over
    # into a second allocation nor leave its own behind, and its slot goes back.
    cp = start_control_plane(apps=[slow_app("shop", 8.0)])
    first = wake_controller(cp, redis_store(own_redis.url), "edge-a")
    second = wake_controller(cp, redis_store(own_redis.url), "edge-b")
    admin = aioredis.from_url(own_redis.url)
    try:
        woken = asyncio.ensure_future(hot_eventually(first, 40))

        async def created() -> bool:
            return bool(await allocations(cp))

        await eventually(created, timeout=10, interval=0.05, what="the first allocation")
        await admin.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
        other = asyncio.ensure_future(hot_eventually(second, 40))
        targets = await asyncio.gather(woken, other)
        assert targets[0].allocation_id == targets[1].allocation_id
        allocs, in_use = await settled(cp, first.store)
        assert len(allocs) == 1, [(a.id, a.state, a.idempotency_key) for a in allocs]
        assert [a.state for a in allocs] == ["ready"]
        assert in_use == 0
    finally:
        with contextlib.suppress(Exception):
            await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
        await close_all(first, second)


async def test_redis_restart_mid_wake_makes_one_allocation(
    start_control_plane, own_redis: RedisProcess
) -> None:
    # Redis SIGKILLed and restarted (AOF, fsync always) while a wake's allocation is
    # starting: whoever wakes the app next finds that allocation and adopts it.
    cp = start_control_plane(apps=[slow_app("shop", 5.0)])
    first = wake_controller(cp, redis_store(own_redis.url), "edge-a")
    second = wake_controller(cp, redis_store(own_redis.url), "edge-b")
    try:
        woken = asyncio.ensure_future(hot_eventually(first, 40))

        async def created() -> bool:
            return bool(await allocations(cp))

        await eventually(created, timeout=10, interval=0.05, what="the first allocation")
        await asyncio.sleep(0.5)
        own_redis.crash()
        await asyncio.sleep(2.5)  # down longer than the 1.5 s lease: it lapses meanwhile
        own_redis.start()
        other = asyncio.ensure_future(hot_eventually(second, 40))
        targets = await asyncio.gather(woken, other)
        assert targets[0].allocation_id == targets[1].allocation_id
        allocs, in_use = await settled(cp, first.store)
        assert len(allocs) == 1, [(a.id, a.state, a.idempotency_key) for a in allocs]
        assert [a.state for a in allocs] == ["ready"]
        assert in_use == 0
    finally:
        await close_all(first, second)


async def test_a_wake_ended_by_a_control_plane_error_keeps_its_slot_until_the_start_settles(
    start_control_plane,
) -> None:
    # The control plane stops answering (SIGSTOP) while the allocation starts: the wake
    # ends early (503 control_plane) but its slot stays taken while the control plane
    # has the allocation starting, and goes back once it is settled. That allocation is
    # not left running unowned, and the next wake makes exactly one app ready.
    cp = start_control_plane(apps=[slow_app("shop", 3.0)])
    store = MemoryStore()
    wake = wake_controller(cp, store, "edge-a", cp_timeout=1.0, cp_retries=0)
    assert cp.proc is not None
    try:
        woken = asyncio.ensure_future(wake.ensure_hot("shop", 40))

        async def started() -> bool:
            return any(a.state == "starting" for a in await allocations(cp))

        await eventually(started, timeout=10, interval=0.05, what="the allocation starting")
        os.kill(cp.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(WakeRefused) as refused:
                await asyncio.wait_for(woken, 30)
            assert refused.value.kind == "control_plane"
            for _ in range(10):  # the control plane still has it starting: slot kept
                assert (await store.budget_usage(LIMITS)).in_use == 1
                await asyncio.sleep(0.2)
        finally:
            os.kill(cp.proc.pid, signal.SIGCONT)
        allocs, in_use = await settled(cp, store)
        assert in_use == 0
        assert len(allocs) == 1
        assert allocs[0].state not in ("starting", "ready"), allocs[0]  # not left unowned
        target = await hot_eventually(wake, 40)
        allocs, in_use = await settled(cp, store)
        assert [a.id for a in allocs if a.state == "ready"] == [target.allocation_id]
        assert in_use == 0
    finally:
        await close_all(wake)


async def test_slots_given_back_while_redis_is_down_go_back_once_it_is_up(
    start_control_plane, own_redis: RedisProcess
) -> None:
    # Two wakes end while Redis is SIGKILLed: one that never asked for an allocation (its
    # slot goes back at once) and one whose allocation the control plane has settled
    # (its slot goes back after that check). Neither give-back may be lost with the
    # outage: once Redis is back (AOF) both slots are free, not held to their 30 s lease.
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    store = redis_store(own_redis.url)
    wake = wake_controller(cp, store, "edge-a")
    spec = wake.apps["shop"]
    try:
        alloc = await wake.client.create_allocation("shop", idempotency_key="wake-shop-2-1")

        async def ready() -> bool:
            return (await wake.client.get_allocation(alloc.id)).state == "ready"

        await eventually(ready, timeout=20, interval=0.1, what="the allocation ready")
        unasked, settled_start = _Attempt("shop#1"), _Attempt("shop#2")
        settled_start.key, settled_start.allocation_id = "wake-shop-2-1", alloc.id
        settled_start.completed = True
        for attempt in (unasked, settled_start):
            granted = await store.acquire_budget(attempt.holder, "default", LIMITS, 5.0)
            assert granted.granted
        assert (await store.budget_usage(LIMITS)).in_use == 2

        own_redis.crash()
        for attempt in (unasked, settled_start):
            await wake._end_attempt("shop", spec, attempt)
        await asyncio.sleep(2.0)  # the settled start is checked with the control plane
        own_redis.start()

        async def slots_free() -> bool:
            try:
                return (await store.budget_usage(LIMITS)).in_use == 0
            except StoreUnavailable:
                return False

        await eventually(slots_free, timeout=10, interval=0.2, what="both slots given back")
    finally:
        await close_all(wake)


class RenewalRacingStore(RedisStore):
    """A real Redis store whose wake, once the app is hot, ends only after the lease renewer
    has begun a renewal: the wake is over while the renewer is inside its Redis call."""

    def __init__(self, url: str, yields: int) -> None:
        super().__init__(url, poll_interval=0.1, socket_timeout=1.0, op_timeout=1.5)
        self.yields = yields  # loop turns between the renewal's start and the wake's end
        self.renewing = asyncio.Event()
        self.hot_written = False
        self.raced = False

    async def write_state(self, state: AppWakeState, token: int) -> bool:
        written = await super().write_state(state, token)
        if written and state.state == "hot":
            self.hot_written = True
            self.renewing.clear()
        return written

    async def renew_lease(self, app: str, owner: str, ttl: float) -> bool:
        self.renewing.set()
        return await super().renew_lease(app, owner, ttl)

    async def read_state(self, app: str) -> AppWakeState:
        state = await super().read_state(app)
        if self.hot_written and not self.raced:  # the hot move's read: the wake's last call
            self.raced = True
            await self.renewing.wait()
            for _ in range(self.yields):
                await asyncio.sleep(0)
        return state


@pytest.mark.parametrize("yields", [0, 1, 2])
async def test_a_wake_that_ends_mid_renewal_lets_its_lease_and_slot_go(
    start_control_plane, own_redis: RedisProcess, yields: int
) -> None:
    # The wake that made the app hot ends while its renewer is in the middle of a Redis
    # call; a cancellation landing there can be lost (Python 3.11's asyncio.wait_for,
    # used by redis-py for every command it sends, returns the finished send instead).
    # The renewer must stop anyway and the flight must end: the lease is released and
    # the slot goes back once the start settled, not renewed until the process exits.
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    store = RenewalRacingStore(own_redis.url, yields)
    wake = wake_controller(cp, store, "edge-a")
    try:
        await asyncio.wait_for(wake.ensure_hot("shop", 30), 30)

        async def let_go() -> bool:
            lease_held = await store.lease_owner("shop") is not None
            in_use = (await store.budget_usage(LIMITS)).in_use
            return store.raced and not wake._flights and not lease_held and in_use == 0

        await eventually(let_go, timeout=10, interval=0.1, what="the lease and the slot let go")
    finally:
        # Bounded: a flight that never ends would hold close() up as well.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(close_all(wake), 15)


async def test_a_helper_that_outlives_its_cancellation_does_not_hold_the_wake_up(
    start_control_plane, caplog: pytest.LogCaptureFixture
) -> None:
    # A helper task that goes on after cancel() (its cancellation lost) is waited for a
    # bounded time only: reported loudly and counted, then left to stop by itself.
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    wake = wake_controller(cp, MemoryStore(), "edge-a")
    over = asyncio.Event()

    async def deaf() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(60)
        await over.wait()  # as a renewer would, until it checks its state

    task = asyncio.get_running_loop().create_task(deaf(), name="deaf helper")
    await asyncio.sleep(0)
    try:
        started = time.monotonic()
        await wake._stop("shop", task)
        assert time.monotonic() - started < 3 * decisions.HELPER_STOP_TIMEOUT
        assert not task.done()
        assert wake.counters.get("helper_stuck") == 1
        assert "deaf helper still running" in caplog.text
        over.set()
        await asyncio.wait_for(task, 1.0)
    finally:
        over.set()
        await close_all(wake)


class StoreClock:
    """The memory store's clock, moved on by the test (lease and slot expiry)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_a_holder_that_lost_its_lease_stops_and_drains_what_nobody_adopted(
    start_control_plane,
) -> None:
    # The holder's lease lapses (by the store's clock) mid-wake; another holder takes it
    # and records a failed wake, not this allocation. The first holder stops at once,
    # drains the allocation it asked for, and its slot goes back once that start settled.
    cp = start_control_plane(apps=[slow_app("shop", 4.0)])
    clock = StoreClock(1000.0)
    store = MemoryStore(clock=clock)
    wake = wake_controller(cp, store, "edge-a")
    try:
        woken = asyncio.ensure_future(wake.ensure_hot("shop", 40))

        async def created() -> bool:
            return bool(await allocations(cp))

        await eventually(created, timeout=10, interval=0.05, what="the allocation")
        clock.now += 2.0  # past the 1.5 s lease
        other = await store.acquire_lease("shop", "other-edge", 60.0)
        assert other is not None
        failed = AppWakeState(app="shop", state="failed", next_wake_at=time.time() + 600)
        assert await store.write_state(failed, other.token)
        with pytest.raises(WakeRefused) as refused:
            await asyncio.wait_for(woken, 3.0)  # stopped within the lease, not the 4 s start
        assert refused.value.kind == "wake_backoff"
        allocs, in_use = await settled(cp, store)
        assert len(allocs) == 1
        assert allocs[0].state in ("draining", "stopped"), allocs[0]
        assert in_use == 0
    finally:
        await close_all(wake)


async def test_the_next_holder_adopts_the_allocation_of_a_holder_whose_lease_lapsed(
    start_control_plane,
) -> None:
    # The first holder's lease lapses (by the store's clock) while its allocation starts;
    # a second edge takes the lease: it asks with the key the first one recorded, so it
    # adopts that allocation instead of creating a second, and the first stops.
    cp = start_control_plane(apps=[slow_app("shop", 3.0)])
    clock = StoreClock(1000.0)
    store = MemoryStore(clock=clock)
    first = wake_controller(cp, store, "edge-a")
    second = wake_controller(cp, store, "edge-b")
    try:
        woken = asyncio.ensure_future(first.ensure_hot("shop", 40))

        async def created() -> bool:
            return bool(await allocations(cp))

        await eventually(created, timeout=10, interval=0.05, what="the first allocation")
        clock.now += 2.0  # past the 1.5 s lease
        other = asyncio.ensure_future(second.ensure_hot("shop", 40))
        targets = await asyncio.wait_for(asyncio.gather(woken, other), 30)
        assert targets[0].allocation_id == targets[1].allocation_id
        allocs, in_use = await settled(cp, store)
        assert len(allocs) == 1, [(a.id, a.state, a.idempotency_key) for a in allocs]
        assert [a.state for a in allocs] == ["ready"]
        assert in_use == 0
    finally:
        await close_all(first, second)
