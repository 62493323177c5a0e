"""Wake-budget arithmetic with an explicit clock: slots, rate, tenants, FIFO, expiry."""

from __future__ import annotations

from wake.budget import BudgetLimits, BudgetState, release, renew, try_acquire, usage

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
