"""Wake-budget arithmetic, no I/O: leased slots, a token bucket, per-tenant caps, FIFO waiters.

This is the reference both stores follow: `memory_store` calls it directly and
`redis_store`'s Lua script does the same steps atomically in Redis. Slots are
leases (a dead holder's slot expires); waiters keep their hold deadline and are
served in arrival order, skipping those whose tenant is at its cap so one busy
tenant cannot block the rest.
"""

from __future__ import annotations

from collections import OrderedDict

import msgspec


class BudgetLimits(msgspec.Struct, frozen=True, kw_only=True):
    max_concurrent_wakes: int = 20
    max_wakes_per_second: float = 10.0
    tenant_max_concurrent_wakes: int = 5
    # A slot's lease ([budget] wake_slot_ttl); its holder renews it while waking, so a
    # dead holder's slot comes back this long after its last renewal.
    slot_ttl: float = 30.0


class BudgetDecision(msgspec.Struct, frozen=True):
    granted: bool
    # Why not: "concurrent wakes", "tenant wakes", "wake rate"; "" when granted.
    reason: str = ""
    # When asking again could succeed, in seconds (0: as soon as a slot frees).
    retry_after: float = 0.0


class BudgetUsage(msgspec.Struct, frozen=True):
    in_use: int
    waiting: int
    tokens: float
    by_tenant: dict[str, int]


class BudgetState:
    """The mutable budget of one region (the memory store keeps exactly one)."""

    def __init__(self) -> None:
        self.slots: dict[str, tuple[str, float]] = {}  # holder -> (tenant, expires_at)
        self.waiting: OrderedDict[str, tuple[str, float]] = OrderedDict()  # -> (tenant, deadline)
        self.tokens: float | None = None  # None: a full bucket on first use
        self.refilled_at = 0.0


def _burst(limits: BudgetLimits) -> float:
    return max(1.0, limits.max_wakes_per_second)


def expire(state: BudgetState, now: float) -> None:
    for holder in [h for h, (_, expires) in state.slots.items() if expires <= now]:
        del state.slots[holder]
    for holder in [h for h, (_, deadline) in state.waiting.items() if deadline <= now]:
        del state.waiting[holder]


def _refill(state: BudgetState, limits: BudgetLimits, now: float) -> float:
    burst = _burst(limits)
    if state.tokens is None:
        state.tokens = burst
    elif now > state.refilled_at:
        state.tokens = min(
            burst, state.tokens + (now - state.refilled_at) * limits.max_wakes_per_second
        )
    state.refilled_at = max(state.refilled_at, now)
    return state.tokens


def _tenant_count(state: BudgetState, tenant: str) -> int:
    return sum(1 for t, _ in state.slots.values() if t == tenant)


def try_acquire(
    state: BudgetState,
    holder: str,
    tenant: str,
    limits: BudgetLimits,
    now: float,
    deadline: float,
) -> BudgetDecision:
    """Grant `holder` a slot now, or queue it (FIFO, until `deadline`) and say why not."""
    expire(state, now)
    if holder in state.slots:
        state.slots[holder] = (tenant, now + limits.slot_ttl)
        return BudgetDecision(True)
    if holder not in state.waiting:
        state.waiting[holder] = (tenant, deadline)
    if _tenant_count(state, tenant) >= limits.tenant_max_concurrent_wakes:
        return BudgetDecision(False, "tenant wakes")
    free = limits.max_concurrent_wakes - len(state.slots)
    ahead = 0
    for other, (other_tenant, _) in state.waiting.items():
        if other == holder:
            break
        if _tenant_count(state, other_tenant) < limits.tenant_max_concurrent_wakes:
            ahead += 1
    if ahead >= free:
        return BudgetDecision(False, "concurrent wakes")
    tokens = _refill(state, limits, now)
    if tokens < 1.0:
        return BudgetDecision(False, "wake rate", (1.0 - tokens) / limits.max_wakes_per_second)
    state.tokens = tokens - 1.0
    del state.waiting[holder]
    state.slots[holder] = (tenant, now + limits.slot_ttl)
    return BudgetDecision(True)


def renew(state: BudgetState, holder: str, limits: BudgetLimits, now: float) -> bool:
    """Extend a held slot's lease; False when it already expired (and was reclaimed)."""
    expire(state, now)
    slot = state.slots.get(holder)
    if slot is None:
        return False
    state.slots[holder] = (slot[0], now + limits.slot_ttl)
    return True


def release(state: BudgetState, holder: str) -> None:
    """Give back a slot, or leave the queue."""
    state.slots.pop(holder, None)
    state.waiting.pop(holder, None)


def usage(state: BudgetState, limits: BudgetLimits, now: float) -> BudgetUsage:
    expire(state, now)
    by_tenant: dict[str, int] = {}
    for tenant, _ in state.slots.values():
        by_tenant[tenant] = by_tenant.get(tenant, 0) + 1
    return BudgetUsage(
        in_use=len(state.slots),
        waiting=len(state.waiting),
        tokens=_refill(state, limits, now),
        by_tenant=by_tenant,
    )
