"""memory:// — the embedded wake store: one process, real semantics, nothing shared.

Leases, fencing, the journal, notifications and the budget behave exactly as in
redis://, only scoped to this process (config refuses it with several workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable

import msgspec

from wake import budget
from wake.budget import BudgetDecision, BudgetLimits, BudgetUsage
from wake.store.protocol import AppWakeState, Lease, Transition, next_fence_token

JOURNAL_LIMIT = 10_000


class MemoryStore:
    def __init__(
        self,
        journal_limit: int = JOURNAL_LIMIT,
        clock: Callable[[], float] = time.time,
        poll_interval: float = 0.25,
    ) -> None:
        self._clock = clock
        self._poll_interval = poll_interval
        self._leases: dict[str, tuple[str, float]] = {}  # app -> (owner, expires_at)
        self._fences: dict[str, int] = {}
        self._states: dict[str, AppWakeState] = {}
        self._journal: deque[Transition] = deque(maxlen=journal_limit)
        self._changed: dict[str, asyncio.Event] = {}
        self._budget = budget.BudgetState()
        self._last_seen: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._count_batches: dict[str, int] = {}  # writer -> last batch seq added

    def _live_lease(self, app: str) -> tuple[str, float] | None:
        lease = self._leases.get(app)
        if lease is not None and lease[1] <= self._clock():
            del self._leases[app]
            return None
        return lease

    async def acquire_lease(self, app: str, owner: str, ttl: float) -> Lease | None:
        if self._live_lease(app) is not None:
            return None
        self._leases[app] = (owner, self._clock() + ttl)
        token = next_fence_token(self._fences.get(app, 0), self._clock())
        self._fences[app] = token
        return Lease(owner, token)

    async def renew_lease(self, app: str, owner: str, ttl: float) -> bool:
        lease = self._live_lease(app)
        if lease is None or lease[0] != owner:
            return False
        self._leases[app] = (owner, self._clock() + ttl)
        return True

    async def release_lease(self, app: str, owner: str) -> None:
        lease = self._live_lease(app)
        if lease is not None and lease[0] == owner:
            del self._leases[app]

    async def lease_owner(self, app: str) -> str | None:
        lease = self._live_lease(app)
        return lease[0] if lease else None

    async def read_state(self, app: str) -> AppWakeState:
        state = self._states.get(app)
        return msgspec.structs.replace(state) if state else AppWakeState(app=app)

    async def read_states(self, apps: list[str]) -> list[AppWakeState]:
        return [await self.read_state(app) for app in apps]

    async def write_state(self, state: AppWakeState, token: int) -> bool:
        if token < self._fences.get(state.app, 0):
            return False
        current = self._states.get(state.app)
        version = (current.version if current else 0) + 1
        self._states[state.app] = msgspec.structs.replace(state, token=token, version=version)
        return True

    async def append_transition(self, transition: Transition) -> None:
        self._journal.append(transition)

    async def transitions(self, app: str | None = None, limit: int = 100) -> list[Transition]:
        rows = [t for t in self._journal if app is None or t.app == app]
        return rows[-limit:]

    async def publish(self, app: str) -> None:
        event = self._changed.pop(app, None)
        if event is not None:
            event.set()

    async def wait_change(self, app: str, version: int, timeout: float) -> AppWakeState:
        deadline = time.monotonic() + timeout
        while True:
            state = await self.read_state(app)
            remaining = deadline - time.monotonic()
            if state.version > version or remaining <= 0:
                return state
            # Polled as well, like redis://: a write nobody announced is still seen.
            event = self._changed.setdefault(app, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(remaining, self._poll_interval))

    async def acquire_budget(
        self, holder: str, tenant: str, limits: BudgetLimits, wait_for: float
    ) -> BudgetDecision:
        now = self._clock()
        return budget.try_acquire(self._budget, holder, tenant, limits, now, now + wait_for)

    async def renew_budget(self, holder: str, limits: BudgetLimits) -> bool:
        return budget.renew(self._budget, holder, limits, self._clock())

    async def release_budget(self, holder: str) -> None:
        budget.release(self._budget, holder)

    async def budget_usage(self, limits: BudgetLimits) -> BudgetUsage:
        return budget.usage(self._budget, limits, self._clock())

    async def touch(self, app: str) -> None:
        self._last_seen[app] = self._clock()

    async def idle_for(self, app: str) -> float | None:
        seen = self._last_seen.get(app)
        return None if seen is None else max(0.0, self._clock() - seen)

    async def add_counts(self, deltas: dict[str, int], *, writer: str = "", seq: int = 0) -> None:
        if writer:
            if seq <= self._count_batches.get(writer, 0):
                return
            self._count_batches[writer] = seq
        for key, n in deltas.items():
            self._counts[key] = self._counts.get(key, 0) + n

    async def counts(self) -> dict[str, int]:
        return dict(self._counts)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        for event in self._changed.values():
            event.set()
        self._changed.clear()
