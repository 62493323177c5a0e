"""Requests held for wakes, let go in arrival order a batch per loop pass once a wake ends.

A wake may hold thousands of requests in one worker. Releasing them all in one loop pass
would run every forward before the first connect to the new allocation even begins; a
batch per pass lets the first ones connect, send and be answered while the rest are still
being let go. One callback per wake outcome, not one per request. A request that stops
waiting (its hold timed out, its client left) stays in its line until the line next grows
past twice what is still held, then the line is compacted, so a long wake that many
impatient requests pass through keeps no more than about twice what it holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from edge.http.exchange import Exchange

logger = logging.getLogger(__name__)

# Held requests let go per loop pass: a pass of this many forwards takes well under a
# millisecond, so connects and responses are never kept waiting long behind a release.
RELEASE_BATCH = 64

# Entries past the live ones a line may carry before it is compacted.
COMPACT_SLACK = 64

Outcome = asyncio.Future


class HeldOwner(Protocol):
    """The client connection a held request came in on."""

    def hold_ended(self, ex: Exchange, outcome: Outcome) -> None: ...


def still_held(ex: Exchange) -> bool:
    """A held request stops waiting when its hold timer goes (timed out, answered, gone)."""
    return ex.hold_timer is not None


class _Line:
    """The requests held in this worker for one wake outcome, in arrival order."""

    __slots__ = ("compact_at", "entries")

    def __init__(self) -> None:
        self.entries: deque[tuple[HeldOwner, Exchange]] = deque()
        self.compact_at = COMPACT_SLACK


class ReleaseLine:
    """One worker's held requests, by the wake outcome each waits for."""

    __slots__ = ("_due", "_scheduled", "_waiting", "batch", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, batch: int = RELEASE_BATCH) -> None:
        self.loop = loop
        self.batch = batch
        self._waiting: dict[Outcome, _Line] = {}
        self._due: deque[tuple[deque[tuple[HeldOwner, Exchange]], Outcome]] = deque()
        self._scheduled = False

    def hold(self, outcome: Outcome, owner: HeldOwner, ex: Exchange) -> None:
        """`owner.hold_ended(ex, outcome)` once `outcome` is done, after those held before
        it, if `ex` is still held then."""
        line = self._waiting.get(outcome)
        if line is None:
            line = self._waiting[outcome] = _Line()
            outcome.add_done_callback(self._ended)
        entries = line.entries
        entries.append((owner, ex))
        if len(entries) > line.compact_at:
            line.entries = entries = deque(e for e in entries if still_held(e[1]))
            line.compact_at = 2 * len(entries) + COMPACT_SLACK

    def entries(self) -> int:
        """Entries not carried out yet (of requests that stopped waiting meanwhile too)."""
        waiting = sum(len(line.entries) for line in self._waiting.values())
        return waiting + sum(len(entries) for entries, _ in self._due)

    def _ended(self, outcome: Outcome) -> None:
        line = self._waiting.pop(outcome, None)
        if line is None or not line.entries:
            return
        self._due.append((line.entries, outcome))
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._run)

    def _run(self) -> None:
        left = self.batch
        due = self._due
        while due and left:
            entries, outcome = due[0]
            while entries and left:
                owner, ex = entries.popleft()
                if not still_held(ex):
                    continue  # stopped waiting: costs no pass its place
                left -= 1
                try:
                    owner.hold_ended(ex, outcome)
                except Exception:  # one request's bug must not strand the rest of the line
                    logger.exception("releasing a held request failed")
            if not entries:
                due.popleft()
        if due:
            self.loop.call_soon(self._run)
        else:
            self._scheduled = False
