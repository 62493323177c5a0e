"""Wake-budget arithmetic, no I/O: leased slots, a token bucket, per-tenant caps, fair waiters.

This is the reference both stores follow: `memory_store` calls it directly and
`redis_store`'s Lua script does the same steps atomically in Redis. Slots are
leases (a dead holder's slot expires); waiters keep their hold deadline.

Fairness: waiters queue per tenant (FIFO), and tenants take turns (round-robin).
The tenants with waiters form a ring in the order they joined it; a tenant whose
waiter is granted goes to the back of the ring, so when a slot frees the next
grant goes to the oldest waiter of the first tenant in the ring that is under its
tenant cap. A tenant at its cap is skipped but keeps its place, and one that has
no waiters left leaves the ring (it joins at the back when it waits again).

Grants are pulled, not pushed: a waiter asks again until granted. So `try_acquire`
grants the asking waiter when the round-robin order above, run over the free
slots, would reach it: counting the waiters that order serves first (`_ahead`).
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
        # The ring: tenants with waiters in turn order (the first is served next), each
        # with its waiters oldest first (holder -> hold deadline).
        self.queues: OrderedDict[str, OrderedDict[str, float]] = OrderedDict()
        self.waiting: dict[str, str] = {}  # holder -> tenant, for every waiter
        self.tokens: float | None = None  # None: a full bucket on first use
        self.refilled_at = 0.0


def _burst(limits: BudgetLimits) -> float:
    return max(1.0, limits.max_wakes_per_second)


def expire(state: BudgetState, now: float) -> None:
    for holder in [h for h, (_, expires) in state.slots.items() if expires <= now]:
        del state.slots[holder]
    for queue in list(state.queues.values()):
        for holder in [h for h, deadline in queue.items() if deadline <= now]:
            _leave_queue(state, holder)


def _join_queue(state: BudgetState, holder: str, tenant: str, deadline: float) -> str:
    """Queue `holder` behind its tenant's waiters (a new tenant joins the ring at the back);
    a waiter already queued keeps its place, deadline and tenant. Returns that tenant."""
    queued = state.waiting.get(holder)
    if queued is not None:
        return queued
    state.waiting[holder] = tenant
    state.queues.setdefault(tenant, OrderedDict())[holder] = deadline
    return tenant


def _leave_queue(state: BudgetState, holder: str) -> None:
    """Drop a waiter; its tenant leaves the ring when no waiter is left."""
    tenant = state.waiting.pop(holder, None)
    if tenant is None:
        return
    queue = state.queues[tenant]
    del queue[holder]
    if not queue:
        del state.queues[tenant]


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


def _tenant_counts(state: BudgetState) -> dict[str, int]:
    counts: dict[str, int] = {}
    for tenant, _ in state.slots.values():
        counts[tenant] = counts.get(tenant, 0) + 1
    return counts


def _ahead(
    state: BudgetState,
    tenant: str,
    position: int,
    counts: dict[str, int],
    limits: BudgetLimits,
    free: int,
) -> int:
    """How many waiters the round-robin order serves before the one at `position` (0: the
    oldest) of `tenant`'s queue; counting stops once they fill the `free` slots.

    Rounds 0..position-1 each serve one waiter of every tenant in the ring that still has
    a waiter and room under its cap; round `position` serves the tenants ahead of
    `tenant` in the ring, then it. So another tenant with room r and w waiters counts
    min(w, r, position + 1) when ahead of `tenant` in the ring, else min(w, r, position).
    """
    ahead = position
    before = 1
    for other, queue in state.queues.items():
        if other == tenant:
            before = 0
            continue
        room = limits.tenant_max_concurrent_wakes - counts.get(other, 0)
        if room > 0:
            ahead += min(len(queue), room, position + before)
            if ahead >= free:
                break
    return ahead


def starts_bound_after_failover(max_concurrent: int, held_on_lost_master: int) -> int:
    """Most wakes starting at once when the master of `{budget}` is lost with
    `held_on_lost_master` slots its replica had not received.

    A node grants only while it holds fewer than `max_concurrent` slots, so the
    promoted replica adds at most `max_concurrent` to the lost holders, who keep
    starting (their renewals are refused, their wakes are not stopped). The lost
    master never held more than `max_concurrent`: at worst twice the budget.
    """
    return max_concurrent + min(held_on_lost_master, max_concurrent)


def try_acquire(
    state: BudgetState,
    holder: str,
    tenant: str,
    limits: BudgetLimits,
    now: float,
    deadline: float,
) -> BudgetDecision:
    """Grant `holder` a slot now, or queue it (until `deadline`) and say why not.

    Granted when the fair order (see the module doc) reaches it within the free slots,
    its tenant has room for it and the bucket has a token.
    """
    expire(state, now)
    if holder in state.slots:
        state.slots[holder] = (tenant, now + limits.slot_ttl)
        return BudgetDecision(True)
    tenant = _join_queue(state, holder, tenant, deadline)
    counts = _tenant_counts(state)
    queue = state.queues[tenant]
    position = next(i for i, waiter in enumerate(queue) if waiter == holder)
    room = limits.tenant_max_concurrent_wakes - counts.get(tenant, 0)
    if room <= 0:
        return BudgetDecision(False, "tenant wakes")
    free = limits.max_concurrent_wakes - len(state.slots)
    if _ahead(state, tenant, position, counts, limits, free) >= free:
        return BudgetDecision(False, "concurrent wakes")
    if position >= room:  # older waiters of its own tenant take the tenant's room
        return BudgetDecision(False, "tenant wakes")
    tokens = _refill(state, limits, now)
    if tokens < 1.0:
        return BudgetDecision(False, "wake rate", (1.0 - tokens) / limits.max_wakes_per_second)
    state.tokens = tokens - 1.0
    _leave_queue(state, holder)
    if tenant in state.queues:
        state.queues.move_to_end(tenant)  # served: its next waiter waits for its next turn
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
    _leave_queue(state, holder)


def usage(state: BudgetState, limits: BudgetLimits, now: float) -> BudgetUsage:
    expire(state, now)
    return BudgetUsage(
        in_use=len(state.slots),
        waiting=len(state.waiting),
        tokens=_refill(state, limits, now),
        by_tenant=_tenant_counts(state),
    )
