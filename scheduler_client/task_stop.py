"""The one bounded stop of helper tasks of the project: cancel, wait a bounded time, report.

Theory of operation. `task.cancel()` is a request a task can lose: Python 3.11's
`asyncio.wait_for` returns the wrapped call's result instead of raising when the
cancellation lands after that call finished but before the waiting task resumed
(`except CancelledError: if fut.done(): return fut.result()`, fixed in 3.12), and
redis-py sends every command through it. A task that lost its cancellation goes on,
so nothing awaits a cancelled task without bound: `stop_tasks` cancels, waits at
most `timeout`, logs each one still running at ERROR and returns them for the
caller to count. Such a task is kept referenced here until it ends (the loop holds
tasks only weakly). A loop that must end (a renewer above all: it holds what it
renews) also stops on state of its own, checked each iteration; the cancellation
is only the fast path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

# Long enough for a task that took its cancellation to run its cleanup (one store call
# bounded by its own timeout would not fit, and is not waited for: it ends by itself).
STOP_TIMEOUT = 1.0

logger = logging.getLogger(__name__)

# Tasks that outlived their stop, referenced until they end by their own state check.
_stray: set[asyncio.Task] = set()


async def stop_tasks(
    tasks: Iterable[asyncio.Task | None],
    timeout: float = STOP_TIMEOUT,
    *,
    what: str = "",
    errors: int = logging.WARNING,
) -> set[asyncio.Task]:
    """Cancel `tasks` (None ones skipped) and wait at most `timeout`; returns those still
    running, each logged at ERROR. A task's own error is logged at `errors`, not raised."""
    pending = [task for task in tasks if task is not None]
    if not pending:
        return set()
    for task in pending:
        task.cancel()
    done, stuck = await asyncio.wait(pending, timeout=timeout)
    prefix = f"{what}: " if what else ""
    for task in stuck:
        logger.error(
            "%s%s still running %.1fs after its cancellation; left to stop by itself",
            prefix,
            task.get_name(),
            timeout,
        )
        _stray.add(task)
        task.add_done_callback(_stray.discard)
    for task in done:
        if not task.cancelled() and task.exception() is not None:  # retrieved: no GC warning
            logger.log(errors, "%s%s ended with %r", prefix, task.get_name(), task.exception())
    return stuck
