"""The circuit breaker's states and transitions, driven by an injected clock. No I/O."""

from __future__ import annotations

import pytest

from scheduler_client.circuit_breaker import CircuitBreaker, Ticket


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def granted(breaker: CircuitBreaker) -> Ticket:
    ticket = breaker.allow()
    assert ticket is not None, f"expected a ticket from {breaker!r}"
    return ticket


def fail_times(breaker: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        breaker.failure(granted(breaker))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=3, cooldown=5.0, clock=clock)


def test_starts_closed_and_allows_calls(breaker: CircuitBreaker) -> None:
    assert breaker.state == "closed"
    ticket = granted(breaker)
    assert not ticket.probe
    breaker.success(ticket)
    assert breaker.state == "closed"
    assert breaker.retry_after() == 0.0


def test_opens_after_n_consecutive_failures(breaker: CircuitBreaker) -> None:
    fail_times(breaker, 2)
    assert breaker.state == "closed"
    assert breaker.consecutive_failures == 2
    fail_times(breaker, 1)
    assert breaker.state == "open"
    assert breaker.opened_count == 1


def test_a_success_resets_the_failure_count(breaker: CircuitBreaker) -> None:
    fail_times(breaker, 2)
    breaker.success(granted(breaker))
    assert breaker.consecutive_failures == 0
    fail_times(breaker, 2)
    assert breaker.state == "closed"


def test_open_rejects_until_the_cooldown(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail_times(breaker, 3)
    assert breaker.allow() is None
    assert breaker.retry_after() == pytest.approx(5.0)
    clock.advance(4.9)
    assert breaker.allow() is None
    assert breaker.retry_after() == pytest.approx(0.1)
    assert breaker.state == "open"
    assert breaker.rejected_count == 2


def test_one_probe_after_the_cooldown_others_rejected(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    fail_times(breaker, 3)
    clock.advance(5.0)
    probe = granted(breaker)
    assert probe.probe
    assert breaker.state == "half_open"
    # While the probe is in flight, everyone else fails fast, however long it takes.
    assert breaker.allow() is None
    clock.advance(60.0)
    assert breaker.allow() is None


def test_probe_success_closes(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail_times(breaker, 3)
    clock.advance(5.0)
    breaker.success(granted(breaker))
    assert breaker.state == "closed"
    assert breaker.consecutive_failures == 0
    assert not granted(breaker).probe


def test_probe_failure_reopens_for_a_fresh_cooldown(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    fail_times(breaker, 3)
    clock.advance(7.0)
    breaker.failure(granted(breaker))
    assert breaker.state == "open"
    assert breaker.opened_count == 2
    # The cool-down counts from the re-opening, not from the first opening.
    clock.advance(4.0)
    assert breaker.allow() is None
    clock.advance(1.0)
    assert granted(breaker).probe


def test_released_probe_lets_the_next_caller_probe(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    fail_times(breaker, 3)
    clock.advance(5.0)
    breaker.release(granted(breaker))  # e.g. the probing call was cancelled
    assert breaker.state == "half_open"
    second = granted(breaker)
    assert second.probe
    breaker.success(second)
    assert breaker.state == "closed"


def test_stale_outcomes_are_ignored(breaker: CircuitBreaker, clock: FakeClock) -> None:
    slow = granted(breaker)  # a call that started while closed and is still running
    slow_failing = granted(breaker)
    fail_times(breaker, 3)
    assert breaker.state == "open"
    # Its late success proves nothing about now: the breaker stays open.
    breaker.success(slow)
    assert breaker.state == "open"
    clock.advance(5.0)
    probe = granted(breaker)
    # A late failure from before is not the probe failing.
    breaker.failure(slow_failing)
    assert breaker.state == "half_open"
    breaker.success(probe)
    assert breaker.state == "closed"


def test_each_ticket_counts_once(breaker: CircuitBreaker) -> None:
    ticket = granted(breaker)
    breaker.failure(ticket)
    breaker.failure(ticket)
    breaker.failure(ticket)
    assert breaker.consecutive_failures == 1
    assert breaker.state == "closed"


def test_failures_before_a_recovery_do_not_count_after_it(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    fail_times(breaker, 3)
    clock.advance(5.0)
    breaker.success(granted(breaker))
    fail_times(breaker, 2)
    assert breaker.state == "closed"


def test_on_change_sees_every_transition(clock: FakeClock) -> None:
    seen: list[tuple[str, str]] = []
    breaker = CircuitBreaker(1, 1.0, clock, on_change=lambda a, b: seen.append((a, b)))
    fail_times(breaker, 1)
    clock.advance(1.0)
    breaker.failure(granted(breaker))
    clock.advance(1.0)
    breaker.success(granted(breaker))
    assert seen == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


def test_zero_cooldown_probes_at_once(clock: FakeClock) -> None:
    breaker = CircuitBreaker(1, 0.0, clock)
    fail_times(breaker, 1)
    assert granted(breaker).probe


@pytest.mark.parametrize(("failures", "cooldown"), [(0, 1.0), (1, -1.0), (1, float("nan"))])
def test_bad_parameters_are_refused(failures: int, cooldown: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failures, cooldown)
