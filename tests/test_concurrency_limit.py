"""The per-allocation concurrency limit as plain data: go or wait, FIFO turns, slots given
back exactly once, the worker's share, the release ramp and reloads; no event loop."""

from __future__ import annotations

import copy

import pytest

from edge.routing.concurrency_limit import (
    UNLIMITED,
    ConcurrencyLimit,
    Gate,
    ReleaseRamp,
    Ticket,
    enter,
    give_back,
    pump,
    put_back,
    ramp_begin,
    ramp_step,
    restart_ramp,
    set_limit,
    take,
    wait_bound,
    worker_share,
)

RAMP = ReleaseRamp(start=0.25, double_every=1.0)


def gate(share: int, ramp: ReleaseRamp | None = None, after_wake: bool = False) -> Gate:
    return Gate("shop", ConcurrencyLimit(share, ramp), 0.0, "alloc-1", after_wake)


def line_up(g: Gate, n: int, now: float = 0.0) -> list[Ticket | None]:
    return [enter(g, now) for _ in range(n)]


@pytest.mark.parametrize(
    ("limit", "workers", "share"),
    [(8, 1, 8), (8, 2, 4), (8, 3, 3), (9, 2, 5), (1, 4, 1), (3, 8, 1), (10_000, 2, 5000)],
)
def test_each_worker_takes_ceil_of_its_part_at_least_one(
    limit: int, workers: int, share: int
) -> None:
    assert worker_share(limit, workers) == share
    assert share * workers >= limit  # never less than the limit across the workers


def test_requests_within_the_share_go_at_once_the_rest_wait() -> None:
    g = gate(2)
    first, second, third = line_up(g, 3)
    assert first is None and second is None
    assert isinstance(third, Ticket) and not third.granted
    assert (g.in_flight, g.queued) == (2, 1)


def test_turns_come_in_arrival_order_one_per_slot_given_back() -> None:
    g = gate(1)
    assert enter(g, 0.0) is None
    tickets = line_up(g, 3, now=1.0)
    assert give_back(g, None, 2.0, failed=False) == [tickets[0]]
    assert tickets[0].granted and not tickets[1].granted  # type: ignore[union-attr]
    assert give_back(g, tickets[0], 3.0, failed=False) == [tickets[1]]
    assert give_back(g, tickets[1], 4.0, failed=False) == [tickets[2]]
    assert give_back(g, tickets[2], 5.0, failed=False) == []
    assert (g.in_flight, g.queued, len(g.line)) == (0, 0, 0)


def test_a_newcomer_waits_behind_the_line_even_when_a_slot_frees() -> None:
    g = gate(1, RAMP, after_wake=True)  # share 1: a freed slot goes to the line's head
    assert enter(g, 0.0) is None
    waiting = enter(g, 0.0)
    assert give_back(g, None, 0.5, failed=False) == [waiting]
    assert isinstance(enter(g, 0.5), Ticket)  # the slot went to the one waiting


def test_a_request_that_leaves_the_line_is_skipped_and_gives_back_nothing_twice() -> None:
    g = gate(1)
    assert enter(g, 0.0) is None
    gone, next_one = line_up(g, 2)
    assert give_back(g, gone, 1.0, failed=False) == []  # timed out: leaves the line
    assert give_back(g, gone, 1.0, failed=False) == []  # a second ending changes nothing
    assert (g.in_flight, g.queued) == (1, 1)
    assert give_back(g, None, 2.0, failed=False) == [next_one]
    assert (g.in_flight, g.queued) == (1, 0)


def test_a_granted_ticket_gives_its_slot_back_once() -> None:
    g = gate(1)
    assert enter(g, 0.0) is None
    ticket = enter(g, 0.0)
    assert give_back(g, None, 1.0, failed=False) == [ticket]
    # Its client went before the turn was carried out: the slot it was given comes back.
    assert give_back(g, ticket, 1.0, failed=False) == []
    assert (g.in_flight, g.queued) == (0, 0)


def test_a_burst_with_every_kind_of_ending_leaves_nothing_behind() -> None:
    g = gate(3)
    outcomes = line_up(g, 40)
    holding = [t for t in outcomes if t is None]
    waiting = [t for t in outcomes if t is not None]
    assert len(holding) == 3 and len(waiting) == 37
    for i, ticket in enumerate(waiting):
        if i % 3 == 0:
            give_back(g, ticket, 1.0, failed=False)  # gave up waiting
    running = [None] * len(holding)
    while running:
        running.pop()
        for released in give_back(g, None, 2.0, failed=len(running) % 2 == 0):
            running.append(None)
            assert released.granted and not released.left
    assert (g.in_flight, g.queued) == (0, 0)
    assert not g.line


def test_the_line_is_compacted_when_most_of_it_left() -> None:
    g = gate(1)
    assert enter(g, 0.0) is None
    tickets = line_up(g, 500)
    for ticket in tickets[:-1]:
        give_back(g, ticket, 1.0, failed=False)
    assert g.queued == 1 and len(g.line) < 100
    assert give_back(g, None, 2.0, failed=False) == [tickets[-1]]


def test_ramp_begins_at_a_quarter_and_doubles_every_interval_up_to_the_share() -> None:
    assert ramp_begin(8, RAMP) == 2
    assert ramp_begin(8, None) == 8
    assert ramp_begin(2, RAMP) == 1  # at least one
    assert ramp_step(2, 0.0, 8, RAMP, 0.9) == (2, 0.0)
    assert ramp_step(2, 0.0, 8, RAMP, 1.0) == (4, 1.0)
    assert ramp_step(2, 0.0, 8, RAMP, 2.5) == (8, 2.0)
    assert ramp_step(2, 0.0, 8, RAMP, 3600.0) == (8, 3600.0)
    assert ramp_step(8, 0.0, 8, RAMP, 0.1) == (8, 0.0)  # done: stays at the share


def test_a_fresh_allocation_ramps_as_time_passes_and_lets_the_line_through() -> None:
    g = gate(8, RAMP, after_wake=True)
    outcomes = line_up(g, 20)
    assert sum(t is None for t in outcomes) == 2  # a quarter of 8
    assert pump(g, 0.5) == []
    assert len(pump(g, 1.0)) == 2  # doubled to 4
    assert len(pump(g, 2.0)) == 4  # doubled to 8
    assert len(pump(g, 10.0)) == 0  # the share is the ceiling
    assert (g.in_flight, g.queued) == (8, 12)


def test_a_5xx_holds_the_ramp_back_for_a_whole_interval() -> None:
    g = gate(8, RAMP, after_wake=True)
    assert [enter(g, 0.0), enter(g, 0.0)] == [None, None]
    waiting = line_up(g, 10)
    # A 5xx before the first doubling: its slot goes to the next one in line, no more.
    assert give_back(g, None, 0.5, failed=True) == waiting[:1]
    assert g.allowed == 2 and g.since == 0.5
    assert pump(g, 1.25) == []  # without the 5xx this would have doubled at 1.0
    assert len(pump(g, 1.5)) == 2  # one clean interval after the 5xx: 4 allowed
    assert g.allowed == 4
    assert all(isinstance(t, Ticket) for t in waiting)


def test_a_5xx_after_the_ramp_changes_nothing() -> None:
    g = gate(4)
    assert enter(g, 0.0) is None
    give_back(g, None, 1.0, failed=True)
    assert g.allowed == 4


def test_a_new_allocation_at_the_same_address_ramps_afresh() -> None:
    g = gate(8, RAMP, after_wake=True)
    pump(g, 100.0)
    assert g.allowed == 8
    restart_ramp(g, "alloc-2", 200.0)
    assert (g.allocation, g.allowed, g.since) == ("alloc-2", 2, 200.0)


def test_reload_raises_the_limit_and_lets_waiters_through_at_once() -> None:
    g = gate(1)
    assert enter(g, 0.0) is None
    tickets = line_up(g, 3)
    released = set_limit(g, ConcurrencyLimit(3), 1.0)
    assert released == tickets[:2]
    assert (g.in_flight, g.queued) == (3, 1)


def test_reload_lowers_the_limit_and_later_turns_respect_it() -> None:
    g = gate(4)
    line_up(g, 4)
    waiting = enter(g, 0.0)
    assert set_limit(g, ConcurrencyLimit(2), 1.0) == []
    assert give_back(g, None, 2.0, failed=False) == []  # 3 in flight, 2 allowed
    assert give_back(g, None, 2.0, failed=False) == []
    assert give_back(g, None, 2.0, failed=False) == [waiting]


def test_reload_removing_the_limit_lets_everyone_through() -> None:
    g = gate(1)
    line_up(g, 5)
    assert len(set_limit(g, None, 1.0)) == 4
    assert g.allowed == UNLIMITED and g.queued == 0
    assert enter(g, 1.0) is None


def test_reload_keeps_a_ramp_in_progress_under_the_new_share() -> None:
    g = gate(8, RAMP, after_wake=True)
    set_limit(g, ConcurrencyLimit(16, RAMP), 0.5)
    assert g.allowed == 2
    pump(g, 1.0)
    assert g.allowed == 4
    set_limit(g, ConcurrencyLimit(16, None), 1.5)  # the ramp switched off: full share
    assert g.allowed == 16


def test_wait_bound_is_the_rest_of_the_hold_or_the_upstream_timeout() -> None:
    assert wait_bound(15.0, 10.0, True, 30.0, 60.0) == 25.0
    assert wait_bound(45.0, 10.0, True, 30.0, 60.0) == 0.0
    assert wait_bound(15.0, 10.0, False, 30.0, 60.0) == 60.0


def gates_in_every_state() -> list[tuple[str, Gate]]:
    """Gates as the hot path meets them: free or full, a line (even one only of tickets
    that left), a ramp climbing or done, a limit a reload removed."""
    found = []
    for share in (1, 3):
        for busy in range(share + 1):
            g = gate(share)
            line_up(g, busy)
            found.append((f"{busy} of {share} in flight", g))
    g = gate(1)
    line_up(g, 3)
    found.append(("two waiting", g))
    g = gate(1)
    _, gone = line_up(g, 2)
    give_back(g, gone, 0.0, failed=False)
    found.append(("only a ticket that left in line", g))
    g = gate(8, RAMP, after_wake=True)
    line_up(g, 1)
    found.append(("ramp climbing, a slot free", g))
    g = gate(8, RAMP, after_wake=True)
    line_up(g, 1)
    pump(g, 10.0)
    found.append(("ramp done", g))
    g = gate(2)
    line_up(g, 1)
    set_limit(g, None, 0.0)
    found.append(("limit removed", g))
    return found


def state(g: Gate) -> tuple:
    return (
        g.in_flight,
        g.queued,
        g.allowed,
        g.since,
        g.share,
        [(t.granted, t.left) for t in g.line],
    )


@pytest.mark.parametrize(("name", "g"), gates_in_every_state())
def test_take_does_what_enter_would_or_nothing(name: str, g: Gate) -> None:
    for now in (0.0, 0.4, 5.0):
        fast, full = copy.deepcopy(g), copy.deepcopy(g)
        if take(fast):
            assert enter(full, now) is None
            assert state(fast) == state(full)
        else:
            assert state(fast) == state(g)  # untouched: `enter` decides
    if name in ("0 of 1 in flight", "2 of 3 in flight", "ramp done", "limit removed"):
        assert take(copy.deepcopy(g))  # the common case needs no clock


@pytest.mark.parametrize(("name", "g"), gates_in_every_state())
def test_put_back_does_what_give_back_would_or_nothing(name: str, g: Gate) -> None:
    if g.in_flight == 0:
        return  # no slot to give back
    for now in (0.0, 0.4, 5.0):
        for failed in (False, True):
            fast, full = copy.deepcopy(g), copy.deepcopy(g)
            if put_back(fast):
                assert give_back(full, None, now, failed) == []
                assert state(fast) == state(full)
            else:
                assert state(fast) == state(g)  # untouched: `give_back` decides
    if name in ("1 of 1 in flight", "3 of 3 in flight", "ramp done", "limit removed"):
        assert put_back(copy.deepcopy(g))


def test_the_fast_pair_leaves_a_gate_as_enter_and_give_back_do() -> None:
    fast, full = gate(2), gate(2)
    for now in (0.0, 1.0, 2.0):
        assert take(fast) and enter(full, now) is None
        assert take(fast) and enter(full, now) is None
        assert not take(fast)  # full: the line is `enter`'s
        assert put_back(fast) and give_back(full, None, now, failed=True) == []
        assert put_back(fast) and give_back(full, None, now, failed=False) == []
        assert state(fast) == state(full)
