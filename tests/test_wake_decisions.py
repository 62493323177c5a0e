"""The wake controller's choices (wake/decisions.py) with plain floats for clocks, then
the controller itself on the real memory:// store with injected clocks.

The first part has no sockets, sleeps or event loop. The second drives
`WakeController` against the local control plane the fixtures start: the back-off
refusal and every stored time come from the injected wall clock, a wake whose
holder died is recovered from each half-finished state, and an app the store's
(injected) clock calls idle is put to sleep.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from helpers import eventually
from stack import sample_app_spec

from scheduler_client.client import ControlPlaneClient
from scheduler_client.models import Allocation, AppRoute, RouteSnapshot
from wake import controller as wake_controller
from wake import decisions
from wake.budget import BudgetDecision, BudgetLimits
from wake.controller import WakeAppSpec, WakeController, WakeRefused
from wake.decisions import (
    Adopt,
    FailureBackoff,
    Move,
    Proceed,
    Refuse,
    RefuseKind,
    Wait,
)
from wake.machine import WAKE
from wake.store.memory import MemoryStore
from wake.store.protocol import AppWakeState, WakePhases

NOW = 1_700_000_000.0  # a wall-clock "now" for the pure tests


def state(name: str, **fields: object) -> AppWakeState:
    return AppWakeState(app="shop", state=name, **fields)  # type: ignore[arg-type]


def alloc(state: str = "ready", **fields: object) -> Allocation:
    base: dict[str, object] = {"id": "a-1", "app": "shop", "address": "127.0.0.1:9001"}
    return Allocation(state=state, **{**base, **fields})  # type: ignore[arg-type]


# ------------------------------------------------------------------ back-off


def test_backoff_gate_refuses_before_next_wake_at_and_proceeds_after() -> None:
    failed = state("failed", reason="readiness timeout: a-1", failures=1, next_wake_at=NOW + 30)
    refused = decisions.backoff_gate(failed, NOW)
    assert refused is not None
    assert refused.kind is RefuseKind.WAKE_BACKOFF and refused.kind == "wake_backoff"
    assert refused.retry_after == 30.0
    assert "readiness timeout: a-1" in refused.reason
    assert decisions.begin_attempt(failed, NOW).outcome == refused
    assert decisions.backoff_gate(failed, NOW + 29.5).retry_after == 0.5  # type: ignore[union-attr]
    # At next_wake_at and after it, the wake goes ahead (from `failed`, under the lease).
    for later in (NOW + 30, NOW + 31, NOW + 10_000):
        assert decisions.backoff_gate(failed, later) is None
        assert decisions.begin_attempt(failed, later) == decisions.Plan(Proceed())


def test_backoff_gate_applies_only_to_failed_apps() -> None:
    for name in ("cold", "wake_requested", "starting", "sleeping"):
        assert decisions.backoff_gate(state(name, next_wake_at=NOW + 60), NOW) is None


def test_backoff_doubles_from_one_second_and_caps_at_a_minute() -> None:
    assert [decisions.backoff_after(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert decisions.backoff_after(0) == 1.0
    assert decisions.backoff_after(100_000) == 60.0  # no float overflow after many failures


def test_an_apps_wake_backoff_is_the_first_step_and_a_longer_one_is_its_own_cap() -> None:
    assert [decisions.backoff_after(n, 10.0) for n in range(1, 5)] == [10, 20, 40, 60]
    assert decisions.backoff_after(3, 90.0) == 90.0
    assert decisions.record_failure(0, NOW, 30.0) == decisions.FailureBackoff(1, NOW + 30)
    assert decisions.record_failure(1, NOW, 30.0) == decisions.FailureBackoff(2, NOW + 60)


def test_each_failure_pushes_the_next_wake_further_by_the_injected_clock() -> None:
    now, app = NOW, state("failed")
    waits = []
    for _ in range(8):
        recorded = decisions.record_failure(app.failures, now)
        app = state("failed", failures=recorded.failures, next_wake_at=recorded.next_wake_at)
        waits.append(recorded.next_wake_at - now)
        assert isinstance(decisions.begin_attempt(app, now).outcome, Refuse)
        assert isinstance(
            decisions.begin_attempt(app, recorded.next_wake_at - 0.001).outcome, Refuse
        )
        now = recorded.next_wake_at  # the fake clock reaches the back-off's end
        assert decisions.begin_attempt(app, now).outcome == Proceed()
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60]
    assert decisions.record_failure(0, 5.0) == FailureBackoff(failures=1, next_wake_at=6.0)


# ------------------------------------------------------- start of an attempt


def test_a_hot_app_with_an_address_is_adopted_without_a_wake() -> None:
    hot = state("hot", address="127.0.0.1:9001", allocation_id="a-1")
    assert decisions.begin_attempt(hot, NOW) == decisions.Plan(Adopt())
    assert decisions.begin_attempt(hot, NOW, holding=True) == decisions.Plan(Adopt())


@pytest.mark.parametrize(
    ("stored", "fields", "moves"),
    [
        # The holder died mid-wake (its lease expired): retried from wake_requested.
        ("starting", {"allocation_id": "gone"}, [("wake_requested", decisions.ABANDONED)]),
        (
            "readiness_wait",
            {"allocation_id": "gone", "address": "127.0.0.1:9"},
            [("wake_requested", decisions.ABANDONED)],
        ),
        # A sleeper died mid-drain, or a hot app lost its address: over from cold.
        (
            "sleeping",
            {"allocation_id": "gone", "address": "127.0.0.1:9"},
            [("cold", decisions.TAKEN_OVER), ("wake_requested", decisions.NOT_HOT)],
        ),
        ("hot", {}, [("cold", decisions.TAKEN_OVER), ("wake_requested", decisions.NOT_HOT)]),
        ("cold", {}, [("wake_requested", decisions.NOT_HOT)]),
        ("failed", {"next_wake_at": NOW - 1}, [("wake_requested", decisions.NOT_HOT)]),
        # A holder died after wake_requested, before the budget: nothing to undo.
        ("wake_requested", {}, []),
    ],
)
def test_recovery_of_a_wake_whose_holder_died(
    stored: str, fields: dict[str, object], moves: list[tuple[str, str]]
) -> None:
    app = state(stored, **fields)
    # Before the lease: no adoption, no refusal, take the lease.
    assert decisions.begin_attempt(app, NOW) == decisions.Plan(Proceed())
    plan = decisions.begin_attempt(app, NOW, holding=True)
    assert plan.outcome == Proceed()
    assert [(m.target, m.reason) for m in plan.moves] == moves
    # Every move is one the Wake machine allows, and the wake starts from wake_requested.
    current = stored
    for move in plan.moves:
        WAKE.check(current, move.target)
        current = move.target
    assert current == "wake_requested"


def test_the_holder_does_not_check_the_back_off_again() -> None:
    """Today's behaviour: the gate is before the lease; under it a failed app is re-woken."""
    failed = state("failed", next_wake_at=NOW + 30)
    plan = decisions.begin_attempt(failed, NOW, holding=True)
    assert plan.outcome == Proceed()
    assert plan.moves == (Move("wake_requested", decisions.NOT_HOT),)


def test_a_waiter_decides_on_the_state_its_wait_read_once_it_moved() -> None:
    waited = state("readiness_wait", version=4)
    hot = state("hot", address="127.0.0.1:9001", allocation_id="a-1", version=5)
    assert decisions.after_change(waited, hot) is hot  # adopted without a second read
    assert decisions.after_change(waited, state("readiness_wait", version=4)) is None
    assert decisions.after_change(waited, state("hot", version=3)) is None  # older: read again


def test_an_attempt_gives_up_after_hold_plus_readiness_plus_slack() -> None:
    assert decisions.give_up_at(100.0, 15.0, 10.0) == 100.0 + 25.0 + decisions.GIVE_UP_SLACK
    refused = decisions.wake_timeout("shop", 15.0)
    assert (refused.kind, refused.retry_after) == (RefuseKind.WAKE_TIMEOUT, 15.0)


# -------------------------------------------------------------------- budget


def test_budget_granted_proceeds() -> None:
    assert decisions.budget_step(BudgetDecision(True), 10.0, 15.0) == Proceed()


def test_budget_wait_follows_the_store_hint_within_bounds() -> None:
    step = decisions.budget_step
    assert step(BudgetDecision(False, "wake rate", 0.1), 10.0, 15.0) == Wait(0.1)
    assert step(BudgetDecision(False, "concurrent wakes"), 10.0, 15.0) == Wait(0.02)
    assert step(BudgetDecision(False, "wake rate", 0.0001), 10.0, 15.0) == Wait(0.005)
    assert step(BudgetDecision(False, "wake rate", 3.0), 10.0, 15.0) == Wait(0.25)
    # Never past the hold's end.
    assert step(BudgetDecision(False, "wake rate", 0.2), 0.03, 15.0) == Wait(0.03)


def test_budget_refused_once_the_hold_is_spent() -> None:
    refused = decisions.budget_step(BudgetDecision(False, "tenant wakes"), 0.0, 15.0)
    assert isinstance(refused, Refuse)
    assert refused.kind is RefuseKind.BUDGET and refused.kind == "budget"
    assert refused.retry_after == 15.0 and "tenant wakes" in refused.reason
    assert isinstance(decisions.budget_step(BudgetDecision(False), -1.0, 15.0), Refuse)
    assert decisions.budget_window(-2.0) == 0.001 and decisions.budget_window(3.0) == 3.0


# --------------------------------------------------------- allocation, probe


def test_until_started_waits_for_an_address() -> None:
    assert decisions.until_started(alloc("planned", address=""), 12.0) == Wait(5.0)
    assert decisions.until_started(alloc("pulling"), 2.0) == Wait(2.0)
    assert decisions.until_started(alloc("starting"), 2.0) == Proceed()
    assert decisions.until_started(alloc("ready"), 0.0) == Proceed()


def test_until_started_refuses_a_dead_allocation_without_draining_it() -> None:
    refused = decisions.until_started(alloc("failed", address="", reason="exit 1"), 5.0)
    assert isinstance(refused, Refuse)
    assert (refused.kind, refused.retry_after, refused.drain_allocation) == ("allocation", 5.0, "")


def test_until_started_times_out_and_drains() -> None:
    refused = decisions.until_started(alloc("pulling", address=""), 0.0)
    assert isinstance(refused, Refuse)
    assert refused.kind is RefuseKind.READINESS_TIMEOUT and refused.drain_allocation == "a-1"
    late = decisions.readiness_timeout(alloc("starting"), 10.0)
    assert (late.kind, late.retry_after, late.drain_allocation) == (
        "readiness_timeout",
        10.0,
        "a-1",
    )


def test_readiness_gate_and_probe_pauses() -> None:
    assert [decisions.allocation_passes_readiness(s) for s in (199, 200, 204, 299, 300, 503)] == [
        False, True, True, True, False, False,
    ]  # fmt: skip


def probe_times(start: float, *, expected: float = 0.0, interval: float = 0.005) -> list[float]:
    """When probes go out (s into the readiness phase) for an app that answers non-2xx
    until `start`, each probe taking no time: the schedule probe_pause makes."""
    times, t = [0.0], 0.0
    while t < start:
        t += decisions.probe_pause(t, refused=False, expected=expected, interval=interval)
        times.append(t)
    return times


def test_a_refused_connect_is_retried_on_a_short_fixed_interval() -> None:
    for elapsed in (0.0, 0.5, 30.0):
        for expected in (0.0, 1.0, 20.0):
            pause = decisions.probe_pause(elapsed, refused=True, expected=expected)
            assert pause == decisions.PROBE_REFUSED == 0.002
    # Never sparser than the app's interval, when that is denser.
    assert decisions.probe_pause(3.0, refused=True, interval=0.001) == 0.001


def test_without_history_the_pause_is_a_small_fraction_of_the_time_spent() -> None:
    def pause(elapsed: float, interval: float = 0.005) -> float:
        return decisions.probe_pause(elapsed, refused=False, interval=interval)

    # Dense for the first second, then about 0.5 % of the time spent, up to 250 ms.
    assert [pause(t) for t in (0.0, 0.3, 1.0)] == [0.005] * 3
    assert [pause(t) for t in (2.0, 10.0, 50.0, 600.0)] == pytest.approx([0.01, 0.05, 0.25, 0.25])
    assert pause(0.3, interval=0.02) == 0.02  # the app's own interval is the floor
    assert pause(900.0, interval=2.0) == 2.0  # and an interval over 250 ms is kept
    assert pause(-1.0) == 0.005  # a clock that went back is no reason to stop


def test_with_history_probes_are_sparse_before_half_the_last_readiness_dense_after() -> None:
    def pause(elapsed: float, expected: float = 2.0) -> float:
        return decisions.probe_pause(elapsed, refused=False, expected=expected, interval=0.005)

    # Before 1 s (half of 2 s): doubling from the interval, up to 250 ms...
    assert [pause(t) for t in (0.0, 0.005, 0.01, 0.04, 0.1, 0.5)] == pytest.approx(
        [0.005, 0.005, 0.01, 0.04, 0.1, 0.25]
    )
    # ...the last pause cut short to land on 1 s (never under the interval)...
    assert pause(0.9) == pytest.approx(0.1) and pause(0.999) == 0.005
    # ...dense from there to twice the last readiness, then as with no history.
    assert [pause(t) for t in (1.0, 2.0, 4.0)] == [0.005] * 3
    assert pause(4.5) == pytest.approx(0.0225) and pause(100.0) == 0.25
    # A probe lands on the dense window's start, and every probe after is 5 ms apart.
    times = probe_times(2.0, expected=2.0)
    assert 1.0 in [round(t, 9) for t in times]
    dense = [b - a for a, b in itertools.pairwise(times) if a >= 1.0 - 1e-9]
    assert dense and max(dense) == pytest.approx(0.005)


def test_probes_during_a_start_are_bounded() -> None:
    """How many probes a starting app answers: dense only near the expected moment."""
    # A 1 s start: ~200 probes without history (dense all along); with the last wake's
    # readiness to go by, ~100 dense ones in its second half and a handful before.
    assert 195 <= len(probe_times(1.0)) <= 205
    assert len(probe_times(1.0, expected=1.0)) <= 115
    # The old schedule (5 ms doubling to 250 ms) is late by up to 250 ms; this one by at
    # most its pause at the moment the app becomes ready.
    assert decisions.probe_pause(1.0, refused=False, expected=1.0) == 0.005
    # A 20 s start without history: ~800 probes (40 a second, Knative's startup rate).
    assert len(probe_times(20.0)) <= 820
    # With history, the sparse part stays small however long the start.
    assert len(probe_times(20.0, expected=20.0)) - 10.0 / 0.005 <= 60


def test_the_expected_readiness_is_the_last_wakes_readiness_phase() -> None:
    assert decisions.expected_readiness(AppWakeState(app="a")) == 0.0
    phases = WakePhases(readiness_ms=850.0, total_ms=900.0)
    assert decisions.expected_readiness(AppWakeState(app="a", last_wake=phases)) == 0.85


def test_the_budget_slot_is_held_until_the_allocation_is_past_starting() -> None:
    for held in ("planned", "pulling", "starting"):
        assert not decisions.frees_budget_slot(alloc(held))
    for past in ("ready", "draining", "stopped", "failed"):
        assert decisions.frees_budget_slot(alloc(past))


def test_the_slot_is_kept_for_the_readiness_timeout_or_the_slot_lease_whichever_is_longer() -> None:
    assert decisions.slot_hold_limit(20.0, 30.0) == 30.0
    assert decisions.slot_hold_limit(45.0, 30.0) == 45.0


# ------------------------------------------------- handover between holders


def test_a_recorded_allocation_key_is_reused_while_its_allocation_may_come_up() -> None:
    recorded = state("wake_requested", allocation_key="wake-shop-7-3", version=9)
    # Nothing created under it yet (the previous holder may still ask): claim the key.
    assert decisions.allocation_key(recorded, 8, None) == "wake-shop-7-3"
    for alive in ("planned", "pulling", "starting", "ready"):
        assert decisions.allocation_key(recorded, 8, alloc(alive)) == "wake-shop-7-3"
    # Its allocation is gone: a key of this lease and state version, so a new one.
    for gone in ("draining", "stopped", "failed"):
        assert decisions.allocation_key(recorded, 8, alloc(gone)) == "wake-shop-8-9"
    # No key recorded (a wake from cold): a new one.
    assert decisions.allocation_key(state("cold", version=4), 8, None) == "wake-shop-8-4"


@pytest.mark.parametrize(
    ("stored", "key", "lease_held", "action"),
    [
        # A newer holder recovered the wake and goes on with the recorded key.
        ("wake_requested", "k1", True, decisions.Orphan.LEAVE),
        ("starting", "k1", True, decisions.Orphan.LEAVE),
        ("readiness_wait", "k1", True, decisions.Orphan.LEAVE),
        ("hot", "k1", False, decisions.Orphan.LEAVE),
        # Recorded, but nobody drives the wake (its holder lost the store): wake to adopt.
        ("starting", "k1", False, decisions.Orphan.WAKE),
        ("readiness_wait", "k1", False, decisions.Orphan.WAKE),
        # The wake failed, or the state moved on to another allocation: nobody owns it.
        ("failed", "k1", False, decisions.Orphan.DRAIN),
        ("failed", "k1", True, decisions.Orphan.DRAIN),
        ("starting", "k2", True, decisions.Orphan.DRAIN),
        ("hot", "k2", False, decisions.Orphan.DRAIN),
        ("cold", "", False, decisions.Orphan.DRAIN),
    ],
)
def test_an_allocation_whose_wake_did_not_complete_is_left_adopted_or_drained(
    stored: str, key: str, lease_held: bool, action: decisions.Orphan
) -> None:
    app = state(stored, allocation_key=key)
    assert decisions.orphan_action(app, "k1", lease_held) is action


def test_a_slot_not_taken_back_is_asked_for_again_backing_off_to_a_second() -> None:
    pauses = [decisions.give_back_pause(n, 100.0, 100.0, 30.0) for n in range(7)]
    assert pauses == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_a_slot_is_asked_back_until_it_would_have_expired_by_itself() -> None:
    # Ended at 100 with a 30 s lease: past 130 the store dropped it anyway.
    assert decisions.give_back_pause(9, 129.5, 100.0, 30.0) == pytest.approx(0.5)
    assert decisions.give_back_pause(0, 130.0, 100.0, 30.0) is None
    assert decisions.give_back_pause(0, 150.0, 100.0, 30.0) is None


def test_a_wake_renews_its_lease_only_while_it_runs_and_its_slot_until_given_back() -> None:
    assert decisions.keep(wake_over=False, slot_given_back=False) == decisions.Keep(True, True)
    # Over, its slot kept until the control plane settled the start (the keeper renews it).
    assert decisions.keep(wake_over=True, slot_given_back=False) == decisions.Keep(False, True)
    assert decisions.keep(wake_over=True, slot_given_back=True) == decisions.Keep(False, False)
    assert decisions.keep(wake_over=False, slot_given_back=True).slot is False


def test_lease_renewal_comes_sooner_while_the_store_fails() -> None:
    assert decisions.renew_pause(9.0, failing=False) == 3.0
    assert decisions.renew_pause(9.0, failing=True) == pytest.approx(0.9)
    assert decisions.renew_pause(0.1, failing=True) == 0.05


# ------------------------------------------------------------- route epoch


def test_old_epoch_decided_by_the_control_plane_when_it_saw_ready() -> None:
    routed, replaced = alloc(routed=True, route_epoch=3), alloc(routed=False, route_epoch=3)
    assert not decisions.needs_route_snapshot(routed)
    assert not decisions.epoch_replaced(routed, promoted_epoch=9)  # its answer wins
    assert decisions.epoch_replaced(replaced, promoted_epoch=None)


def test_old_epoch_from_the_snapshot_otherwise() -> None:
    probed = alloc("starting", route_epoch=3)  # the probe answered before the watch
    assert decisions.needs_route_snapshot(probed)
    assert decisions.needs_route_snapshot(alloc("ready", route_epoch=3))  # routed unknown
    assert decisions.epoch_replaced(probed, promoted_epoch=4)
    assert not decisions.epoch_replaced(probed, promoted_epoch=3)
    assert not decisions.epoch_replaced(probed, promoted_epoch=2)
    assert not decisions.epoch_replaced(probed, promoted_epoch=None)  # app not in the snapshot


class SnapshotClient:
    """A control plane whose route snapshot promoted "shop" at `promoted`; counts asks."""

    def __init__(self, promoted: int) -> None:
        self.promoted = promoted
        self.asked = 0

    async def route_snapshot(self) -> RouteSnapshot:
        self.asked += 1
        route = AppRoute(app="shop", epoch=self.promoted, promoted_epoch=self.promoted)
        return RouteSnapshot(epoch=self.promoted, apps=[route])


async def test_the_old_epoch_check_reads_the_followed_route_table_before_a_snapshot() -> None:
    """Between the app answering and `hot`: the route table this process follows when it
    trusts one, no control-plane round trip; a snapshot only without one."""
    client = SnapshotClient(promoted=5)
    cp: Any = client  # only route_snapshot is called
    wake = WakeController(MemoryStore(), cp, edge_id="e", budget=BudgetLimits(), apps={})
    probed = alloc("starting", route_epoch=4)  # the edge's probe saw it ready first
    assert await wake._epoch_replaced("shop", probed)  # no table: the snapshot's 5 > 4
    assert client.asked == 1
    for table, replaced in (({"shop": 4}, False), ({"shop": 6}, True), ({}, False)):
        wake.promoted_epochs = lambda table=table: table
        assert await wake._epoch_replaced("shop", probed) is replaced, table
    # The control plane's own verdict (it saw the allocation ready) needs neither.
    assert not await wake._epoch_replaced("shop", alloc("ready", route_epoch=4, routed=True))
    assert client.asked == 1


def test_old_epoch_goes_back_to_wake_requested_and_is_refused_when_it_keeps_moving() -> None:
    move = decisions.old_epoch_move(alloc("ready", route_epoch=3))
    assert move.target == "wake_requested" and move.reason.startswith("old route epoch")
    WAKE.check("readiness_wait", move.target)
    refused = decisions.old_epoch_retries_exhausted("shop", 15.0)
    assert (refused.kind, refused.retry_after) == ("epoch", 15.0)


# --------------------------------------------------------------- wake time


def test_moving_average_of_wake_time() -> None:
    assert decisions.expected_wake(0.0, 2.0) == 2.0  # the first wake sets it
    assert decisions.expected_wake(2.0, 4.0) == pytest.approx(2.6)
    assert decisions.expected_wake(2.0, 1.0) == pytest.approx(1.7)
    assert decisions.expected_wake(2.0, 4.0, weight=1.0) == 4.0
    average = 0.0
    for _ in range(40):
        average = decisions.expected_wake(average, 1.5)
    assert average == pytest.approx(1.5)
    average = decisions.expected_wake(average, 10.0)  # one slow wake moves it 30 %
    assert average == pytest.approx(1.5 + 0.3 * 8.5)


# --------------------------------------------------------------------- idle


def test_idle_decision() -> None:
    hot = state("hot", address="127.0.0.1:9001")
    assert decisions.should_sleep(hot, idle=300.0, idle_timeout=300.0)
    assert decisions.should_sleep(hot, idle=301.0, idle_timeout=300.0, in_flight=0, seen=False)
    assert not decisions.should_sleep(hot, idle=299.9, idle_timeout=300.0)
    assert not decisions.should_sleep(hot, idle=None, idle_timeout=300.0)  # never seen
    assert not decisions.should_sleep(hot, idle=900.0, idle_timeout=300.0, in_flight=1)
    assert not decisions.should_sleep(hot, idle=900.0, idle_timeout=300.0, seen=True)
    for other in ("cold", "sleeping", "starting", "failed"):
        assert not decisions.should_sleep(state(other), idle=900.0, idle_timeout=300.0)
    assert decisions.may_sleep(hot) and not decisions.may_sleep(hot, in_flight=2)
    assert not decisions.may_sleep(hot, seen=True)


# ------------------------------------------------------------------ gallery


def test_refusal_kinds_are_stable_and_name_the_gallery() -> None:
    assert {kind.value for kind in RefuseKind} == {
        "wake_backoff", "wake_timeout", "budget", "epoch", "readiness_timeout",
        "allocation", "control_plane",
    }  # fmt: skip
    names = {g.id for g in WAKE.gates} | {f.id for f in WAKE.failure_modes}
    assert set(decisions.GALLERY.values()) <= names
    assert decisions.GALLERY[RefuseKind.OLD_ROUTE_EPOCH] == "old_route_epoch"
    assert decisions.GALLERY[RefuseKind.READINESS_TIMEOUT] == "readiness_timeout"
    assert decisions.GALLERY[RefuseKind.BUDGET] == "wake_budget_available"


def test_wake_refused_carries_the_plain_kind() -> None:
    refused = WakeRefused.of(decisions.wake_timeout("shop", 0.2))
    assert type(refused.kind) is str and refused.kind == "wake_timeout"
    assert refused.retry_after == 1.0  # never below a second


class ClosingClient:
    async def close(self) -> None:
        pass


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def read_state(self, app: str) -> AppWakeState:
        self.reads += 1
        return await super().read_state(app)


async def test_a_waiter_is_released_by_the_hot_state_its_wait_read_without_a_second_read() -> None:
    """Another process holds the wake: this one's flight waits on the store's change and
    adopts the hot state that wait read, with no read between `hot` and the release."""
    store = CountingStore()
    lease = await store.acquire_lease("shop", "other-edge", 30.0)
    assert lease is not None
    assert await store.write_state(state("readiness_wait", address="127.0.0.1:9"), lease.token)
    cp: Any = ClosingClient()  # a waiter never calls the control plane
    spec = WakeAppSpec(name="shop", hold_timeout=15.0, readiness_timeout=10.0)
    wake = WakeController(store, cp, edge_id="e", budget=BudgetLimits(), apps={"shop": spec})
    try:
        waiter = asyncio.create_task(wake.ensure_hot("shop", 10.0))
        await eventually(lambda: store.reads >= 2, timeout=5, interval=0.005, what="the wait")
        hot = state("hot", address="127.0.0.1:9001", allocation_id="a-1")
        assert await store.write_state(hot, lease.token)
        reads = store.reads  # the wait's own poll reads the hot state; nothing after it
        await store.publish("shop")
        target = await asyncio.wait_for(waiter, 5)
        assert (target.address, target.allocation_id) == ("127.0.0.1:9001", "a-1")
        assert store.reads == reads + 1
        assert wake.hot_target("shop") == target
    finally:
        await wake.close()


# -------------------------------------------- the controller, injected clocks


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def controller(cp, store: MemoryStore, wall: FakeClock, *apps: str) -> WakeController:
    specs = {
        name: WakeAppSpec(name=name, hold_timeout=15.0, readiness_timeout=10.0, idle_timeout=60.0)
        for name in apps
    }
    return WakeController(
        store,
        ControlPlaneClient(cp.url, cp.token),
        edge_id="test-edge",
        budget=BudgetLimits(),
        apps=specs,
        wall_clock=wall,
    )


async def write(store: MemoryStore, app: AppWakeState, holder_ttl: float) -> None:
    """Store `app` as a lease holder would, then leave that lease to expire (it died)."""
    lease = await store.acquire_lease(app.app, "dead-holder", holder_ttl)
    assert lease is not None
    assert await store.write_state(app, lease.token)


async def journal_of(store: MemoryStore, app: str) -> list[tuple[str, str, str]]:
    """The app's transitions once its flight wrote the last one (hot follows its release)."""

    async def written() -> bool:
        rows = await store.transitions(app)
        return bool(rows) and rows[-1].to_state == "hot"

    await eventually(written, timeout=5, interval=0.01, what=f"{app}'s hot transition")
    return [(t.from_state, t.to_state, t.reason) for t in await store.transitions(app)]


async def test_controller_backoff_refusal_and_stored_times_use_the_injected_wall_clock(
    start_control_plane,
) -> None:
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    wall = FakeClock(NOW)
    store = MemoryStore()
    failed = AppWakeState(
        app="shop", state="failed", reason="readiness timeout", failures=2, next_wake_at=NOW + 30
    )
    await write(store, failed, holder_ttl=0.0)
    wake = controller(cp, store, wall, "shop")
    try:
        with pytest.raises(WakeRefused) as refused:
            await wake.ensure_hot("shop", 5.0)
        assert refused.value.kind == "wake_backoff"
        assert refused.value.retry_after == 30.0  # next_wake_at - the injected wall clock
        wall.now = NOW + 29
        with pytest.raises(WakeRefused) as refused:
            await wake.ensure_hot("shop", 5.0)
        assert refused.value.retry_after == 1.0
        assert await store.transitions("shop") == []  # refused before any move

        wall.now = NOW + 30  # the back-off is over: a real wake
        target = await wake.ensure_hot("shop", 20.0)
        assert target.address and target.allocation_id
        assert wake.hot_target("shop") == target
        stored = await store.read_state("shop")
        assert stored.state == "hot" and (stored.failures, stored.next_wake_at) == (0, 0.0)
        assert stored.updated_at == stored.wake_started_at == NOW + 30
        assert wake.expected_wake("shop") == stored.expected_wake_s > 0
        journal = await journal_of(store, "shop")
        assert [t[:2] for t in journal] == [
            ("failed", "wake_requested"),
            ("wake_requested", "starting"),
            ("starting", "readiness_wait"),
            ("readiness_wait", "hot"),
        ]
        assert {t.at for t in await store.transitions("shop")} == {NOW + 30}
    finally:
        await wake.close()


async def test_controller_recovers_wakes_whose_holders_died(start_control_plane) -> None:
    half_done = {
        "a-starting": AppWakeState(app="a-starting", state="starting", allocation_id="gone"),
        "a-readiness": AppWakeState(
            app="a-readiness", state="readiness_wait", allocation_id="gone", address="127.0.0.1:9"
        ),
        "a-sleeping": AppWakeState(
            app="a-sleeping", state="sleeping", allocation_id="gone", address="127.0.0.1:9"
        ),
        "a-hot-no-address": AppWakeState(app="a-hot-no-address", state="hot"),
    }
    cp = start_control_plane(apps=[sample_app_spec(name) for name in half_done])
    store_clock = FakeClock(1000.0)
    store = MemoryStore(clock=store_clock)
    for app in half_done.values():
        await write(store, app, holder_ttl=10.0)
    wake = controller(cp, store, FakeClock(NOW), *half_done)
    try:
        store_clock.now += 11.0  # the dead holders' leases expire, by the store's clock
        targets = await asyncio.gather(*(wake.ensure_hot(name, 20.0) for name in half_done))
        assert all(target.allocation_id != "gone" for target in targets)
        for name, app in half_done.items():
            moves = await journal_of(store, name)
            recovered, current = [], app.state
            for move in decisions.recovery(app.state):
                recovered.append((current, move.target, move.reason))
                current = move.target
            assert moves[: len(recovered)] == recovered, name
            assert [m[:2] for m in moves[len(recovered) :]] == [
                ("wake_requested", "starting"),
                ("starting", "readiness_wait"),
                ("readiness_wait", "hot"),
            ], name
    finally:
        await wake.close()


async def test_controller_sleeps_an_app_the_store_clock_calls_idle(
    start_control_plane, monkeypatch
) -> None:
    # The drain's own deadline is not under test: stop the app at once.
    monkeypatch.setattr(wake_controller, "SLEEP_DRAIN_DEADLINE", 0.0)
    cp = start_control_plane(apps=[sample_app_spec("shop", drain_grace="0s")])
    store_clock = FakeClock(1000.0)
    store = MemoryStore(clock=store_clock)
    wake = controller(cp, store, FakeClock(NOW), "shop")
    try:
        await wake.ensure_hot("shop", 20.0)
        wake.seen("shop")
        await wake.upkeep()  # flushes last-seen at store time 1000; seen, so not idle
        store_clock.now += 59.0
        await wake.upkeep()
        assert (await store.read_state("shop")).state == "hot"
        store_clock.now += 1.0  # idle for exactly idle_timeout
        slept = (await store.read_state("shop")).allocation_id
        await wake.upkeep()
        assert (await store.read_state("shop")).state == "cold"
        assert wake.hot_target("shop") is None
        # Fenced here from before "sleeping" was stored until the route table says so.
        assert wake.draining == {"shop": slept}
        journal = [(t.from_state, t.to_state) for t in await store.transitions("shop")]
        assert journal[-2:] == [("hot", "sleeping"), ("sleeping", "cold")]
        woken = await wake.ensure_hot("shop", 20.0)
        assert woken.allocation_id != slept and wake.hot_target("shop") == woken
    finally:
        await wake.close()


async def test_a_sleep_whose_drain_the_control_plane_never_got_leaves_it_routable(
    start_control_plane,
) -> None:
    """The drain call fails (control plane gone): the allocation was not put to drain and
    still serves what the route table sends it, so this process does not fence it."""
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    store_clock = FakeClock(1000.0)
    store = MemoryStore(clock=store_clock)
    wake = controller(cp, store, FakeClock(NOW), "shop")
    wake.client = ControlPlaneClient(cp.url, cp.token, timeout=0.5, retries=0)
    try:
        await wake.ensure_hot("shop", 20.0)
        wake.seen("shop")
        await wake.upkeep()
        cp.kill()
        store_clock.now += 61.0
        await wake.upkeep()
        assert (await store.read_state("shop")).state == "cold"
        assert wake.draining == {}
    finally:
        await wake.close()
