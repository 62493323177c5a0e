"""Requests held for wakes, let go in arrival order a batch per loop pass once a wake ends.

A wake may hold thousands of requests in one worker. Releasing them all in one loop pass
would run every forward before the first connect to the new allocation even begins; a
batch per pass lets the first ones connect, send and be answered while the rest are still
being let go. One callback per wake outcome, not one per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

logger = logging.getLogger(__name__)

# Held requests let go per loop pass: a pass of this many forwards takes well under a
# millisecond, so connects and responses are never kept waiting long behind a release.
RELEASE_BATCH = 64

Outcome = asyncio.Future
Release = Callable[[Outcome], None]


class ReleaseLine:
    """One worker's held requests, by the wake outcome each waits for."""

    __slots__ = ("_due", "_scheduled", "_waiting", "batch", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, batch: int = RELEASE_BATCH) -> None:
        self.loop = loop
        self.batch = batch
        self._waiting: dict[Outcome, deque[Release]] = {}
        self._due: deque[tuple[deque[Release], Outcome]] = deque()
        self._scheduled = False

    def hold(self, outcome: Outcome, release: Release) -> None:
        """Call `release(outcome)` once `outcome` is done, after those held before it."""
        line = self._waiting.get(outcome)
        if line is None:
            line = self._waiting[outcome] = deque()
            outcome.add_done_callback(self._ended)
        line.append(release)

    def held(self) -> int:
        """Releases not carried out yet (those whose request ended meanwhile included)."""
        return sum(map(len, self._waiting.values())) + sum(len(line) for line, _ in self._due)

    def _ended(self, outcome: Outcome) -> None:
        line = self._waiting.pop(outcome, None)
        if not line:
            return
        self._due.append((line, outcome))
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._run)

    def _run(self) -> None:
        left = self.batch
        due = self._due
        while due and left:
            line, outcome = due[0]
            while line and left:
                release = line.popleft()
                left -= 1
                try:
                    release(outcome)
                except Exception:  # one request's bug must not strand the rest of the line
                    logger.exception("releasing a held request failed")
            if not line:
                due.popleft()
        if due:
            self.loop.call_soon(self._run)
        else:
            self._scheduled = False
