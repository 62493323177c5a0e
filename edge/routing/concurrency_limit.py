"""Per-allocation concurrency limit: may a request go upstream now or wait in line, who goes
next when one finishes, and the release ramp after a wake. Plain data, no I/O.

Theory of operation. For an app with `max_concurrency`, each worker keeps one `Gate` per
upstream peer (allocation) it forwards to. The gate allows `allowed` requests in flight
at once: the worker's share of the limit (`worker_share`), or less while the release
ramp after a wake has not reached it yet (`ramp_step`). `enter` lets a request through or
gives it a `Ticket`, a place in a FIFO line; `give_back` ends a request's part exactly
once (its slot, or its place in line) and returns the tickets that go now; `pump` does
the same when only time passed (the ramp grew). The front carries the tickets out (each
`item` is what it does when that request's turn comes) and answers a ticket that waited
too long (`wait_bound`) with 503. A 5xx while the ramp climbs restarts its interval.

The hot path asks `take` and `put_back` first: in the common case (a free slot, nobody in
line, no ramp climbing) they do what `enter` and `give_back` would, without the clock;
otherwise they change nothing and the front asks those two.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from collections.abc import Callable

import msgspec

# Unlimited: a gate whose app lost its limit on reload lets everyone through.
UNLIMITED = sys.maxsize
# The line is compacted once it holds this many more entries than are really waiting.
COMPACT_SLACK = 64


class ReleaseRamp(msgspec.Struct, frozen=True):
    """After a wake: start at `start` x the share, double every `double_every` seconds."""

    start: float = 0.25
    double_every: float = 1.0


class ConcurrencyLimit(msgspec.Struct, frozen=True):
    """One app's limit in one worker: its share per allocation, and the ramp after a wake."""

    share: int
    ramp: ReleaseRamp | None = None


def worker_share(max_concurrency: int, workers: int) -> int:
    """This worker's part of an allocation's limit: ceil(limit / workers), at least 1."""
    return max(1, -(-max_concurrency // max(1, workers)))


def ramp_begin(share: int, ramp: ReleaseRamp | None) -> int:
    """The limit right after a wake: `start` x the share (at least 1), or the share."""
    if ramp is None:
        return share
    return min(share, max(1, math.ceil(share * ramp.start)))


def ramp_step(
    allowed: int, since: float, share: int, ramp: ReleaseRamp | None, now: float
) -> tuple[int, float]:
    """The ramp at `now`: doubled once per whole interval since `since`, up to the share;
    returns (allowed, since) with `since` moved to the start of the current interval."""
    if allowed >= share or ramp is None:
        return share, since
    steps = int((now - since) // ramp.double_every)
    if steps <= 0:
        return allowed, since
    return min(share, allowed << min(steps, 32)), since + steps * ramp.double_every


class Ticket:
    """A request's place in a gate's line; `item` is run when its turn comes."""

    __slots__ = ("granted", "item", "left", "since")

    def __init__(self, since: float) -> None:
        self.since = since
        self.item: Callable[[], object] | None = None
        self.granted = False  # its turn came: it holds a slot now
        self.left = False  # it gave up first (its client went, it timed out)


class Gate:
    """One allocation's slots in one worker: in flight, the line, and the ramp's state."""

    __slots__ = (
        "allocation",
        "allowed",
        "app",
        "in_flight",
        "limit",
        "line",
        "queued",
        "share",
        "since",
    )

    def __init__(
        self,
        app: str,
        limit: ConcurrencyLimit | None,
        now: float,
        allocation: str = "",
        after_wake: bool = False,
    ) -> None:
        self.app = app
        self.allocation = allocation  # the allocation it was made for ("": a static peer)
        self.limit = limit  # None: unlimited (the app lost its limit on reload)
        self.in_flight = 0
        self.queued = 0  # tickets waiting (the line also keeps ones that left, until reached)
        self.line: deque[Ticket] = deque()
        self.allowed = UNLIMITED
        self.share = UNLIMITED  # what `allowed` climbs to: the limit's share
        self.since = now
        if limit is not None:
            self.share = limit.share
            self.allowed = ramp_begin(limit.share, limit.ramp) if after_wake else limit.share


def _allowed(gate: Gate, now: float) -> int:
    limit = gate.limit
    if limit is None:
        return UNLIMITED
    if gate.allowed < limit.share:
        gate.allowed, gate.since = ramp_step(gate.allowed, gate.since, limit.share, limit.ramp, now)
    return gate.allowed


def enter(gate: Gate, now: float) -> Ticket | None:
    """None: a slot is taken, go now. A ticket: wait in line (behind anyone already there)."""
    if gate.queued == 0 and gate.in_flight < _allowed(gate, now):
        gate.in_flight += 1
        return None
    ticket = Ticket(now)
    gate.line.append(ticket)
    gate.queued += 1
    return ticket


def take(gate: Gate) -> bool:
    """`enter` without the clock, for the common case: nobody waits, a slot is free and no
    ramp climbs (its step needs `now`). True: the slot is taken; False: ask `enter`."""
    # `allowed` never exceeds `share`: equal means no ramp is climbing.
    if gate.queued == 0 and gate.in_flight < gate.allowed == gate.share:
        gate.in_flight += 1
        return True
    return False


def put_back(gate: Gate) -> bool:
    """`give_back` of a slot without the clock, for the common case: the line is empty (not
    even a ticket that left) and no ramp climbs. True: the slot is back; False: ask
    `give_back` (with the ticket, if any)."""
    if gate.line or gate.allowed != gate.share:
        return False
    gate.in_flight -= 1
    return True


def give_back(gate: Gate, ticket: Ticket | None, now: float, failed: bool) -> list[Ticket]:
    """A request ended: its slot (it held one; `failed`: the app answered 5xx or failed) or
    its place in line (it never got a slot). Returns the tickets that go now."""
    if ticket is not None and not ticket.granted:
        if not ticket.left:
            ticket.left = True
            gate.queued -= 1
        if len(gate.line) > 2 * gate.queued + COMPACT_SLACK:
            gate.line = deque(t for t in gate.line if not t.left)
        return []
    gate.in_flight -= 1
    limit = gate.limit
    if failed and limit is not None and gate.allowed < limit.share:
        gate.since = now  # a 5xx holds the ramp back: a clean interval starts again
    if not gate.queued:
        gate.line.clear()  # only tickets that left, if any
        return []
    return pump(gate, now)


def pump(gate: Gate, now: float) -> list[Ticket]:
    """Let the head of the line through while slots are free, in arrival order."""
    allowed = _allowed(gate, now)
    line = gate.line
    released = []
    while line and gate.in_flight < allowed:
        ticket = line.popleft()
        if ticket.left:
            continue
        ticket.granted = True
        gate.queued -= 1
        gate.in_flight += 1
        released.append(ticket)
    while line and line[0].left:
        line.popleft()
    return released


def set_limit(gate: Gate, limit: ConcurrencyLimit | None, now: float) -> list[Ticket]:
    """A reload changed (or removed: None) the app's limit: applies at once, to the slots
    in flight and the line alike; a ramp in progress goes on under the new share."""
    old = gate.limit
    ramping = old is not None and gate.allowed < old.share
    gate.limit = limit
    gate.share = UNLIMITED if limit is None else limit.share
    if limit is None:
        gate.allowed = UNLIMITED
    elif ramping and limit.ramp is not None:
        gate.allowed = min(gate.allowed, limit.share)
    else:
        gate.allowed = limit.share
    return pump(gate, now)


def restart_ramp(gate: Gate, allocation: str, now: float) -> None:
    """A new allocation behind the same address (the app slept and woke): ramp afresh."""
    gate.allocation = allocation
    gate.since = now
    if gate.limit is not None:
        gate.allowed = ramp_begin(gate.limit.share, gate.limit.ramp)


def wait_bound(
    now: float, started_at: float, released_by_wake: bool, hold_timeout: float, upstream: float
) -> float:
    """How long a request may wait in line from `now`: what is left of its hold timeout when
    a wake released it, else the upstream response-header timeout."""
    if released_by_wake:
        return max(0.0, started_at + hold_timeout - now)
    return upstream
