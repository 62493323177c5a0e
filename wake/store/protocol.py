"""The wake state store: one small interface, two backends (memory://, redis://).

Everything the wake controller shares between processes goes through here: the
per-app wake lease with its fencing token, the app's wake state (every write
fenced), the capped transition journal, change notifications, the region-wide
budget and the app's last-seen time. Backends must pass tests/test_wake_store.py.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from wake.budget import BudgetDecision, BudgetLimits, BudgetUsage


class StoreUnavailable(Exception):
    """The shared store did not answer (down, timed out, or refused the command)."""


class WakePhases(msgspec.Struct, frozen=True, kw_only=True):
    """How long one completed wake spent in each phase (ms), and when it went hot."""

    at: float = 0.0
    budget_ms: float = 0.0
    allocation_ms: float = 0.0
    readiness_ms: float = 0.0
    total_ms: float = 0.0


class AppWakeState(msgspec.Struct, kw_only=True):
    app: str
    state: str = "cold"
    # Fencing token of the lease holder that wrote this; a lower token never overwrites.
    token: int = 0
    allocation_id: str = ""
    # The idempotency key of the allocation this wake asked for, written before the ask:
    # the next holder asks with the same key, so it adopts that allocation, never a second.
    allocation_key: str = ""
    address: str = ""
    route_epoch: int = 0
    reason: str = ""
    updated_at: float = 0.0
    wake_started_at: float = 0.0
    # Consecutive failed wakes, and no new wake before `next_wake_at` (back-off).
    failures: int = 0
    next_wake_at: float = 0.0
    # Moving average of recent wake durations, for deadline-aware admission.
    expected_wake_s: float = 0.0
    # The phases of the wake that last made the app hot (for Server-Timing and the gallery).
    last_wake: WakePhases | None = None
    version: int = 0


class Transition(msgspec.Struct, kw_only=True):
    app: str
    from_state: str
    to_state: str
    reason: str = ""
    reason_code: str = ""  # the gallery id (gate or failure mode) behind it, if any
    edge_id: str = ""
    token: int = 0
    at: float = 0.0


class Lease(msgspec.Struct, frozen=True):
    owner: str
    token: int


def next_fence_token(last: int, now: float) -> int:
    """The token a new lease gets: above the last one issued, and at least `now` in µs.

    The time floor keeps tokens rising when the store lost its last few (a promoted
    replica that missed them), assuming its clock is not behind the lost node's by
    more than the failover took (seconds); redis_scripts.ACQUIRE_LEASE does the same.
    """
    return max(last + 1, int(now * 1_000_000))


class WakeStore(Protocol):
    """What the wake controller needs from shared state; every method is bounded in time."""

    async def acquire_lease(self, app: str, owner: str, ttl: float) -> Lease | None:
        """Take the app's wake lease if free (SET NX PX) and issue the next fencing token."""
        ...

    async def renew_lease(self, app: str, owner: str, ttl: float) -> bool:
        """Extend the lease if `owner` still holds it."""
        ...

    async def release_lease(self, app: str, owner: str) -> None: ...

    async def lease_owner(self, app: str) -> str | None: ...

    async def read_state(self, app: str) -> AppWakeState:
        """The app's state; a never-seen app is `cold` with version 0."""
        ...

    async def read_states(self, apps: list[str]) -> list[AppWakeState]:
        """Several apps' states in one round trip, in the order asked."""
        ...

    async def write_state(self, state: AppWakeState, token: int) -> bool:
        """Store `state` unless a newer fencing token was issued since `token`; bumps version."""
        ...

    async def append_transition(self, transition: Transition) -> None:
        """Add to the capped journal."""
        ...

    async def transitions(self, app: str | None = None, limit: int = 100) -> list[Transition]:
        """Newest last."""
        ...

    async def publish(self, app: str) -> None:
        """Tell every waiter of `app` that its state changed."""
        ...

    async def wait_change(self, app: str, version: int, timeout: float) -> AppWakeState:
        """Return once the app's version exceeds `version`, or at `timeout` with the current one.

        Notifications may be lost (pub/sub); implementations also poll.
        """
        ...

    async def acquire_budget(
        self, holder: str, tenant: str, limits: BudgetLimits, wait_for: float
    ) -> BudgetDecision:
        """Try to take a wake slot now; not granted means queued for `wait_for` seconds,
        FIFO within `tenant` and round-robin across tenants (wake/budget.py).

        Times are the store's own clock (Redis server time for redis://), so edges'
        clocks never disagree about a deadline.
        """
        ...

    async def renew_budget(self, holder: str, limits: BudgetLimits) -> bool: ...

    async def release_budget(self, holder: str) -> None: ...

    async def budget_usage(self, limits: BudgetLimits) -> BudgetUsage: ...

    async def touch(self, app: str) -> None:
        """Record that a request for `app` was seen now (callers rate-limit this)."""
        ...

    async def idle_for(self, app: str) -> float | None:
        """Seconds since any edge last touched `app`, by the store's clock; None if never."""
        ...

    async def add_counts(self, deltas: dict[str, int], *, writer: str = "", seq: int = 0) -> None:
        """Add to the region-wide gallery counters (gates passed/refused, failure modes).

        With `writer`, batch `seq` is added at most once: a batch of that writer with a
        seq not above the last one added is ignored (a resend after a lost answer).
        """
        ...

    async def counts(self) -> dict[str, int]:
        """The region-wide gallery counters, by key."""
        ...

    async def ping(self) -> bool:
        """True when the backend answers."""
        ...

    async def close(self) -> None: ...
