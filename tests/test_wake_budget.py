"""Wake-budget arithmetic with an explicit clock: slots, rate, tenants, fair order, expiry."""

from __future__ import annotations

from wake.budget import (
    BudgetLimits,
    BudgetState,
    release,
    renew,
    starts_bound_after_failover,
    try_acquire,
    usage,
)

LIMITS = BudgetLimits(
    max_concurrent_wakes=2, max_wakes_per_second=100.0, tenant_max_concurrent_wakes=5, slot_ttl=10
)


def test_concurrent_cap_and_release() -> None:
    state = BudgetState()
    assert try_acquire(state, "a", "t", LIMITS, 0.0, 30.0).granted
    assert try_acquire(state, "b", "t", LIMITS, 0.0, 30.0).granted
    refused = try_acquire(state, "c", "t", LIMITS, 0.0, 30.0)
    assert not refused.granted and refused.reason == "concurrent wakes"
    release(state, "a")
    assert try_acquire(state, "c", "t", LIMITS, 0.1, 30.0).granted
    assert usage(state, LIMITS, 0.1).in_use == 2


def test_waiters_are_served_in_arrival_order() -> None:
    state = BudgetState()
    for holder in ("a", "b"):
        assert try_acquire(state, holder, "t", LIMITS, 0.0, 30.0).granted
    assert not try_acquire(state, "first", "t", LIMITS, 1.0, 30.0).granted
    assert not try_acquire(state, "second", "t", LIMITS, 2.0, 30.0).granted
    release(state, "a")
    # One slot free: the later waiter asks first but must not jump the queue.
    assert not try_acquire(state, "second", "t", LIMITS, 3.0, 30.0).granted
    assert try_acquire(state, "first", "t", LIMITS, 3.0, 30.0).granted
    release(state, "b")
    assert try_acquire(state, "second", "t", LIMITS, 4.0, 30.0).granted


def test_waiter_past_its_deadline_leaves_the_queue() -> None:
    state = BudgetState()
    for holder in ("a", "b"):
        try_acquire(state, holder, "t", LIMITS, 0.0, 30.0)
    try_acquire(state, "early", "t", LIMITS, 1.0, 2.0)  # holds until t=2
    try_acquire(state, "late", "t", LIMITS, 1.5, 30.0)
    release(state, "a")
    assert try_acquire(state, "late", "t", LIMITS, 2.5, 30.0).granted
    assert usage(state, LIMITS, 2.5).waiting == 0


def test_dead_holders_slot_expires() -> None:
    state = BudgetState()
    for holder in ("a", "b"):
        try_acquire(state, holder, "t", LIMITS, 0.0, 30.0)
    assert renew(state, "a", LIMITS, 5.0)  # a keeps renewing, b died
    assert not try_acquire(state, "c", "t", LIMITS, 9.0, 30.0).granted
    assert try_acquire(state, "c", "t", LIMITS, 10.5, 30.0).granted
    assert not renew(state, "b", LIMITS, 10.5)


def test_tenant_cap_does_not_block_other_tenants() -> None:
    limits = BudgetLimits(
        max_concurrent_wakes=3, max_wakes_per_second=100, tenant_max_concurrent_wakes=1
    )
    state = BudgetState()
    assert try_acquire(state, "x1", "acme", limits, 0.0, 30.0).granted
    blocked = try_acquire(state, "x2", "acme", limits, 0.1, 30.0)
    assert not blocked.granted and blocked.reason == "tenant wakes"
    # x2 waits ahead in the queue, but its tenant is full: y1 is not held behind it.
    assert try_acquire(state, "y1", "other", limits, 0.2, 30.0).granted
    assert usage(state, limits, 0.2).by_tenant == {"acme": 1, "other": 1}


def test_rate_limit_refills_over_time() -> None:
    limits = BudgetLimits(
        max_concurrent_wakes=100, max_wakes_per_second=2.0, tenant_max_concurrent_wakes=100
    )
    state = BudgetState()
    assert try_acquire(state, "a", "t", limits, 0.0, 30.0).granted
    assert try_acquire(state, "b", "t", limits, 0.0, 30.0).granted
    refused = try_acquire(state, "c", "t", limits, 0.0, 30.0)
    assert refused.reason == "wake rate" and 0 < refused.retry_after <= 0.5
    assert try_acquire(state, "c", "t", limits, 0.5, 30.0).granted


def test_acquire_is_idempotent_for_a_holder() -> None:
    state = BudgetState()
    assert try_acquire(state, "a", "t", LIMITS, 0.0, 30.0).granted
    assert try_acquire(state, "a", "t", LIMITS, 1.0, 30.0).granted
    assert usage(state, LIMITS, 1.0).in_use == 1


# --------------------------------------------------------------------------- fairness

ONE_AT_A_TIME = BudgetLimits(
    max_concurrent_wakes=1, max_wakes_per_second=1000, tenant_max_concurrent_wakes=5, slot_ttl=60
)


def grant_next(
    state: BudgetState, waiters: list[tuple[str, str]], limits: BudgetLimits, now: float
) -> str:
    """Every waiter asks, newest first (so asking order cannot explain who wins); exactly
    one may be granted. Returns it and drops it from `waiters`."""
    granted = [
        holder
        for holder, tenant in reversed(waiters)
        if try_acquire(state, holder, tenant, limits, now, 100.0).granted
    ]
    assert len(granted) == 1, granted
    waiters.remove(next(w for w in waiters if w[0] == granted[0]))
    return granted[0]


def queue_up(
    state: BudgetState, waiters: list[tuple[str, str]], limits: BudgetLimits, now: float
) -> None:
    for holder, tenant in waiters:
        assert not try_acquire(state, holder, tenant, limits, now, 100.0).granted


def test_tenants_take_turns_and_each_tenant_is_fifo() -> None:
    state = BudgetState()
    assert try_acquire(state, "busy", "a", ONE_AT_A_TIME, 0.0, 100.0).granted
    waiters = [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("b2", "b"), ("c1", "c")]
    queue_up(state, waiters, ONE_AT_A_TIME, 1.0)
    order = []
    holding = "busy"
    for step in range(6):
        release(state, holding)
        holding = grant_next(state, waiters, ONE_AT_A_TIME, 2.0 + step)
        order.append(holding)
    # The ring is a, b, c (the order tenants began waiting); a served tenant goes last.
    assert order == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert usage(state, ONE_AT_A_TIME, 9.0).waiting == 0


def test_within_a_tenant_the_oldest_waiter_goes_first_even_with_room_for_two() -> None:
    limits = BudgetLimits(
        max_concurrent_wakes=3, max_wakes_per_second=1000, tenant_max_concurrent_wakes=5
    )
    state = BudgetState()
    for holder in ("h1", "h2", "h3"):
        assert try_acquire(state, holder, "z", limits, 0.0, 100.0).granted
    queue_up(state, [("old", "a"), ("mid", "a"), ("new", "a"), ("b1", "b")], limits, 1.0)
    release(state, "h1")
    release(state, "h2")
    # Two free slots: round-robin gives them to a's oldest and b's; a's later ones wait.
    assert not try_acquire(state, "new", "a", limits, 2.0, 100.0).granted
    assert not try_acquire(state, "mid", "a", limits, 2.0, 100.0).granted
    assert try_acquire(state, "b1", "b", limits, 2.0, 100.0).granted
    assert try_acquire(state, "old", "a", limits, 2.0, 100.0).granted
    release(state, "h3")
    assert not try_acquire(state, "new", "a", limits, 3.0, 100.0).granted
    assert try_acquire(state, "mid", "a", limits, 3.0, 100.0).granted


def test_a_tenant_at_its_cap_is_skipped_without_losing_its_place() -> None:
    limits = BudgetLimits(
        max_concurrent_wakes=3, max_wakes_per_second=1000, tenant_max_concurrent_wakes=2
    )
    state = BudgetState()
    for holder, tenant in (("a0", "a"), ("a00", "a"), ("z0", "z")):
        assert try_acquire(state, holder, tenant, limits, 0.0, 100.0).granted
    waiters = [("a1", "a"), ("b1", "b"), ("b2", "b"), ("c1", "c")]
    queue_up(state, waiters, limits, 1.0)
    at_cap = try_acquire(state, "a1", "a", limits, 1.5, 100.0)
    assert at_cap.reason == "tenant wakes"
    release(state, "z0")
    # a is first in the ring but at its cap: b, next in the ring, gets the slot.
    assert grant_next(state, waiters, limits, 2.0) == "b1"
    release(state, "a0")
    # a has room again and is still first: it goes before c, which waited longer than b2.
    assert grant_next(state, waiters, limits, 3.0) == "a1"
    release(state, "a00")
    assert grant_next(state, waiters, limits, 4.0) == "c1"
    release(state, "b1")
    assert grant_next(state, waiters, limits, 5.0) == "b2"


def test_a_waiter_past_its_deadline_leaves_its_tenants_queue() -> None:
    state = BudgetState()
    assert try_acquire(state, "busy", "a", ONE_AT_A_TIME, 0.0, 100.0).granted
    assert not try_acquire(state, "a1", "a", ONE_AT_A_TIME, 1.0, 3.0).granted  # holds until 3
    assert not try_acquire(state, "b1", "b", ONE_AT_A_TIME, 1.0, 3.0).granted  # so does b's only
    assert not try_acquire(state, "a2", "a", ONE_AT_A_TIME, 2.0, 100.0).granted
    assert not try_acquire(state, "c1", "c", ONE_AT_A_TIME, 2.0, 100.0).granted
    assert usage(state, ONE_AT_A_TIME, 2.5).waiting == 4
    release(state, "busy")
    # At 3.5 a1 and b1 are gone: a's next waiter moves up and a keeps its turn; b, with
    # nobody left, leaves the ring, so c is next after a.
    assert usage(state, ONE_AT_A_TIME, 3.5).waiting == 2
    waiters = [("a2", "a"), ("c1", "c")]
    assert grant_next(state, waiters, ONE_AT_A_TIME, 3.5) == "a2"
    release(state, "a2")
    # b1 asks again: a new arrival, so b joins the ring behind c.
    assert not try_acquire(state, "b1", "b", ONE_AT_A_TIME, 4.0, 100.0).granted
    waiters.append(("b1", "b"))
    assert grant_next(state, waiters, ONE_AT_A_TIME, 4.5) == "c1"
    release(state, "c1")
    assert grant_next(state, waiters, ONE_AT_A_TIME, 5.0) == "b1"


def test_a_new_tenant_waits_for_at_most_one_turn_of_each_other_tenant() -> None:
    state = BudgetState()
    assert try_acquire(state, "busy", "big", ONE_AT_A_TIME, 0.0, 100.0).granted
    waiters = [(f"big-{i:03d}", "big") for i in range(200)] + [("small", "small")]
    queue_up(state, waiters, ONE_AT_A_TIME, 1.0)
    release(state, "busy")
    first = grant_next(state, waiters, ONE_AT_A_TIME, 2.0)
    release(state, first)
    assert (first, grant_next(state, waiters, ONE_AT_A_TIME, 2.0)) == ("big-000", "small")


def test_a_lost_budget_master_at_most_doubles_the_starts() -> None:
    """The master granted every slot, its replica got none of it and is promoted: the
    replica grants a full budget again, and no more."""
    master, replica = BudgetState(), BudgetState()
    lost = [
        f"a{i}" for i in range(5) if try_acquire(master, f"a{i}", "t", LIMITS, 0.0, 30.0).granted
    ]
    fresh = [
        f"b{i}" for i in range(5) if try_acquire(replica, f"b{i}", "t", LIMITS, 1.0, 30.0).granted
    ]
    assert not renew(replica, lost[0], LIMITS, 1.0)  # the lost holders' slots are not back
    assert len(lost) == 2 and len(lost) + len(fresh) == 4
    assert starts_bound_after_failover(2, len(lost)) == 4
    assert starts_bound_after_failover(2, 0) == 2 and starts_bound_after_failover(2, 9) == 4
