"""The worker's release line: held requests let go in arrival order, a batch per loop pass,
only once their own wake's outcome is done; one failing release strands no other; those
that stopped waiting are skipped, and a long wake's line does not grow with them."""

from __future__ import annotations

import asyncio

from edge.http.exchange import Exchange
from edge.http.release_line import COMPACT_SLACK, ReleaseLine


class Owner:
    """Records each release: the request's path and the outcome's value."""

    def __init__(self, fail_on: str = "") -> None:
        self.released: list[tuple[str, str]] = []
        self.fail_on = fail_on

    def hold_ended(self, ex: Exchange, outcome: asyncio.Future[str]) -> None:
        name = ex.path.decode()
        if name == self.fail_on:
            raise RuntimeError("a bug in one request's release")
        self.released.append((name, "cancelled" if outcome.cancelled() else outcome.result()))


def held(loop: asyncio.AbstractEventLoop, name: str) -> Exchange:
    ex = Exchange(b"GET", loop.time())
    ex.path = name.encode()
    ex.hold_timer = loop.call_later(3600, lambda: None)
    return ex


def stop_waiting(ex: Exchange) -> None:
    """What the front does when a hold times out or its client leaves."""
    timer, ex.hold_timer = ex.hold_timer, None
    timer.cancel()  # type: ignore[union-attr]


async def passes(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_released_in_order_a_batch_per_pass_once_the_wake_ends() -> None:
    loop = asyncio.get_running_loop()
    line = ReleaseLine(loop, batch=64)
    outcome: asyncio.Future[str] = loop.create_future()
    owner = Owner()
    for i in range(150):
        line.hold(outcome, owner, held(loop, str(i)))
    await passes(3)
    assert owner.released == [] and line.entries() == 150, "released before the wake ended"
    outcome.set_result("hot")
    counts = []
    for _ in range(5):
        await asyncio.sleep(0)
        counts.append(len(owner.released))
    # One pass runs the outcome's callback; each later pass lets at most 64 go.
    steps = [b - a for a, b in zip([0, *counts], counts, strict=False)]
    assert max(steps) <= 64 and counts[-1] == 150, counts
    assert [name for name, _ in owner.released] == [str(i) for i in range(150)]
    assert {value for _, value in owner.released} == {"hot"}
    assert line.entries() == 0


async def test_each_wake_releases_only_its_own_and_a_failing_release_strands_none() -> None:
    loop = asyncio.get_running_loop()
    line = ReleaseLine(loop, batch=4)
    first: asyncio.Future[str] = loop.create_future()
    second: asyncio.Future[str] = loop.create_future()
    owner = Owner(fail_on="a2")
    for i in range(6):
        line.hold(first, owner, held(loop, f"a{i}"))
    for i in range(3):
        line.hold(second, owner, held(loop, f"b{i}"))
    second.cancel()  # e.g. the worker shutting down: released all the same, to be answered
    await passes(4)
    assert owner.released == [("b0", "cancelled"), ("b1", "cancelled"), ("b2", "cancelled")]
    assert line.entries() == 6
    first.set_result("hot")
    await passes(4)
    assert [name for name, _ in owner.released[3:]] == ["a0", "a1", "a3", "a4", "a5"]
    assert line.entries() == 0


async def test_requests_that_stopped_waiting_are_skipped_and_compacted_away() -> None:
    """A wake that 5,000 impatient requests pass through (each times out before the next
    is held) keeps at most about twice what is still held, and releases only those."""
    loop = asyncio.get_running_loop()
    line = ReleaseLine(loop)
    outcome: asyncio.Future[str] = loop.create_future()
    owner = Owner()
    patient = [held(loop, f"patient-{i}") for i in range(10)]
    for ex in patient:
        line.hold(outcome, owner, ex)
    most = 0
    for i in range(5000):
        ex = held(loop, f"impatient-{i}")
        line.hold(outcome, owner, ex)
        stop_waiting(ex)
        most = max(most, line.entries())
    assert most <= 2 * (len(patient) + 1) + COMPACT_SLACK + 1, most
    outcome.set_result("hot")
    await passes(3)
    assert [name for name, _ in owner.released] == [f"patient-{i}" for i in range(10)]
    assert line.entries() == 0
