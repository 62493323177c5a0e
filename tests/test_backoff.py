"""The one exponential back-off: ceilings, full jitter, injected randomness, and its users
(control-plane client, wake back-off, durable replay). No I/O."""

from __future__ import annotations

import random

import pytest

from edge.queue.replay_policy import retry_delay
from scheduler_client import backoff
from scheduler_client.backoff import Backoff
from wake import decisions


class FixedRandom(random.Random):
    """A Random whose every draw is `value`, to pin delays at the ends of the window."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def test_ceiling_doubles_from_base_until_the_cap() -> None:
    backoff = Backoff(0.1, 2.0)
    ceilings = [backoff.ceiling(attempt) for attempt in range(8)]
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])


def test_huge_attempt_is_capped_not_an_overflow() -> None:
    backoff = Backoff(0.1, 2.0)
    assert backoff.ceiling(10_000) == 2.0
    assert backoff.ceiling(10**20) == 2.0


def test_full_jitter_spans_zero_to_the_ceiling() -> None:
    assert Backoff(0.1, 2.0, FixedRandom(0.0)).delay(3) == 0.0
    # The top of the window: random() just below 1 gives just below the ceiling.
    top = Backoff(0.1, 2.0, FixedRandom(0.999999)).delay(3)
    assert top == pytest.approx(0.8, rel=1e-5)
    assert top <= 0.8
    assert Backoff(0.1, 2.0, FixedRandom(0.5)).delay(20) == pytest.approx(1.0)


def test_delays_are_uniform_draws_from_the_injected_random() -> None:
    backoff = Backoff(0.1, 2.0, random.Random(42))
    reference = random.Random(42)
    for attempt in range(12):
        expected = reference.uniform(0.0, min(2.0, 0.1 * 2**attempt))
        assert backoff.delay(attempt) == expected


def test_delays_stay_inside_the_window_and_use_all_of_it() -> None:
    backoff = Backoff(0.1, 2.0, random.Random(7))
    # Full jitter (not "equal jitter"): draws land near zero as well as near the ceiling.
    draws = [backoff.delay(6) for _ in range(2000)]
    assert all(0.0 <= d <= 2.0 for d in draws)
    assert min(draws) < 0.1
    assert max(draws) > 1.9


def test_same_seed_same_delays() -> None:
    first = Backoff(0.05, 1.0, random.Random(3))
    second = Backoff(0.05, 1.0, random.Random(3))
    assert [first.delay(a) for a in range(10)] == [second.delay(a) for a in range(10)]


def test_zero_base_never_waits() -> None:
    backoff = Backoff(0.0, 2.0, random.Random(1))
    assert [backoff.delay(a) for a in range(5)] == [0.0] * 5


def test_budget_is_the_sum_of_the_ceilings() -> None:
    backoff = Backoff(0.1, 0.5)
    assert backoff.budget(0) == 0.0
    assert backoff.budget(4) == pytest.approx(0.1 + 0.2 + 0.4 + 0.5)


@pytest.mark.parametrize(
    ("base", "cap"), [(-0.1, 1.0), (0.1, -1.0), (float("nan"), 1.0), (0.1, float("inf"))]
)
def test_bad_parameters_are_refused(base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        Backoff(base, cap)


def test_negative_attempt_is_refused() -> None:
    backoff = Backoff(0.1, 1.0)
    with pytest.raises(ValueError):
        backoff.ceiling(-1)
    with pytest.raises(ValueError):
        backoff.budget(-1)


def test_plain_delay_doubles_to_the_cap_without_jitter() -> None:
    delays = [backoff.delay(attempt, 0.5, 3.0) for attempt in range(6)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert backoff.delay(10**20, 0.5, 3.0) == 3.0
    assert backoff.delay(0, 0.0, 3.0) == 0.0


def test_plain_delay_with_jitter_is_the_clients_draw() -> None:
    client = Backoff(0.1, 2.0, random.Random(5))
    reference = random.Random(5)
    for attempt in range(10):
        assert client.delay(attempt) == backoff.delay(attempt, 0.1, 2.0, reference)
    assert backoff.delay(3, 0.1, 2.0, FixedRandom(0.0)) == 0.0


@pytest.mark.parametrize(
    ("attempt", "base", "cap"),
    [(-1, 0.1, 1.0), (0, -0.1, 1.0), (0, 0.1, -1.0), (0, float("nan"), 1.0)],
)
def test_plain_delay_refuses_bad_arguments(attempt: int, base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        backoff.delay(attempt, base, cap)


def test_wake_and_replay_back_off_with_this_one() -> None:
    # The wake: 1 s doubling to 60 s per consecutive failure, no jitter.
    for failures in range(1, 12):
        assert decisions.backoff_after(failures) == backoff.delay(failures - 1, 1.0, 60.0)
    # Durable replay: initial doubling to the ceiling per failed delivery, no jitter.
    for attempts in range(1, 8):
        assert retry_delay(attempts, 0.1, 0.5) == backoff.delay(attempts - 1, 0.1, 0.5)
    assert retry_delay(0, 0.1, 0.5) == 0.1
