"""The worker's release line: held requests let go in arrival order, a batch per loop pass,
only once their own wake's outcome is done, and one failing release strands no other."""

from __future__ import annotations

import asyncio

from edge.http.release_line import ReleaseLine


async def passes(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_released_in_order_a_batch_per_pass_once_the_wake_ends() -> None:
    loop = asyncio.get_running_loop()
    line = ReleaseLine(loop, batch=64)
    outcome: asyncio.Future[str] = loop.create_future()
    released: list[tuple[int, str]] = []
    for i in range(150):
        line.hold(outcome, lambda done, i=i: released.append((i, done.result())))
    await passes(3)
    assert released == [] and line.held() == 150, "released before the wake ended"
    outcome.set_result("hot")
    counts = []
    for _ in range(5):
        await asyncio.sleep(0)
        counts.append(len(released))
    # One pass runs the outcome's callback; each later pass lets at most 64 go.
    steps = [b - a for a, b in zip([0, *counts], counts, strict=False)]
    assert max(steps) <= 64 and counts[-1] == 150, counts
    assert [i for i, _ in released] == list(range(150))
    assert {value for _, value in released} == {"hot"}
    assert line.held() == 0


async def test_each_wake_releases_only_its_own_and_a_failing_release_strands_none() -> None:
    loop = asyncio.get_running_loop()
    line = ReleaseLine(loop, batch=4)
    first: asyncio.Future[str] = loop.create_future()
    second: asyncio.Future[str] = loop.create_future()
    released: list[str] = []

    def boom(_done: asyncio.Future[str]) -> None:
        raise RuntimeError("a bug in one request's release")

    for i in range(6):
        line.hold(first, boom if i == 2 else lambda done, i=i: released.append(f"a{i}"))
    for i in range(3):
        line.hold(second, lambda done, i=i: released.append(f"b{i}"))
    second.cancel()  # e.g. the worker shutting down: released all the same, to answer
    await passes(4)
    assert released == ["b0", "b1", "b2"]
    assert line.held() == 6
    first.set_result("hot")
    await passes(4)
    assert released == ["b0", "b1", "b2", "a0", "a1", "a3", "a4", "a5"]
    assert line.held() == 0
