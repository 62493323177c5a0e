"""stop_tasks: cancel, wait a bounded time, report the tasks that outlived their cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest

from scheduler_client.task_stop import stop_tasks


async def test_tasks_that_take_their_cancellation_are_all_stopped() -> None:
    tasks = [asyncio.get_running_loop().create_task(asyncio.sleep(60)) for _ in range(3)]
    assert await stop_tasks([*tasks, None], timeout=1.0) == set()
    assert all(task.cancelled() for task in tasks)


async def test_a_task_that_outlives_its_cancellation_is_reported_not_awaited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    over = asyncio.Event()

    async def deaf() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(60)
        await over.wait()  # as a renewer whose cancellation was lost, until its state check

    task = asyncio.get_running_loop().create_task(deaf(), name="deaf renewer")
    await asyncio.sleep(0)
    started = time.monotonic()
    assert await stop_tasks([task], timeout=0.2, what="replay of app shop") == {task}
    assert time.monotonic() - started < 1.0
    assert "replay of app shop: deaf renewer still running" in caplog.text
    over.set()
    await asyncio.wait_for(task, 1.0)


async def test_a_task_error_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    task = asyncio.get_running_loop().create_task(broken(), name="broken")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING):
        assert await stop_tasks([task]) == set()
    assert "broken ended with RuntimeError('boom')" in caplog.text
