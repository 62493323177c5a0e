"""The wake controller's choices as plain functions over data, sans-I/O, `now` passed in.

Theory of operation. `wake/controller.py` reads the store and the control plane,
hands what it read to a function here, and carries out the answer: a list of
`Move`s (Wake transitions to write, in order) and an outcome — `Adopt` the
stored hot target, `Proceed` to the next step, `Wait` a while and ask again, or
`Refuse` with a stable `RefuseKind` (the 503's `X-Edge-Error`, a metrics label)
and a Retry-After. Nothing here sleeps, reads a clock or touches a socket, so
each choice is tested with plain floats (tests/test_wake_decisions.py).

Times: `now` is wall-clock seconds wherever the result is stored in the shared
store (`next_wake_at` is compared by other processes); durations and deadlines
local to one wake are the caller's monotonic clock and arrive as `remaining`
or `took`.

Gallery names: the gates "wake budget available" (`budget_step`) and
"allocation passes readiness" (`allocation_passes_readiness`); the failure modes
"readiness timeout" and "old route epoch" are refusal kinds (`GALLERY`), and
"wake stampede" is the coalescing the lease gives (a second caller finds the
lease taken and waits; no decision is needed). "Payment webhook while cold" is
admission's, not the controller's. What each adds to the region-wide counters is
wake/gallery_tally.py's.
"""

from __future__ import annotations

import enum

import msgspec

from scheduler_client import backoff
from scheduler_client.models import Allocation
from wake.budget import BudgetDecision
from wake.store.protocol import AppWakeState, WakePhases

# A failed app is not woken again before 1 s (the app's `wake_backoff`), doubling per
# consecutive failure to 60 s.
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
# Weight of the newest wake in the moving average of wake time.
WAKE_EWMA = 0.3
# A wake attempt (with its coalesced waits) gives up after hold + readiness + this.
GIVE_UP_SLACK = 30.0
# Between budget asks: the store's own hint, else 20 ms; never under 5 ms or over 250 ms.
BUDGET_PAUSE = 0.02
BUDGET_PAUSE_MIN = 0.005
BUDGET_PAUSE_MAX = 0.25
# Readiness probes (`probe_pause`). The dense interval is the app's
# `readiness_probe_interval` (this by default); never sparser than PROBE_MAX.
PROBE_INTERVAL = 0.005
PROBE_MAX = 0.25
# A refused connect (nothing listening yet) is retried this often (or at the interval,
# if shorter): it costs the app nothing and the edge a syscall or two.
PROBE_REFUSED = 0.002
# With no previous wake to go by, a probe comes at most this fraction of the time
# already spent after the previous one: dense (the interval) for the first second at
# 5 ms, 10 ms apart at 2 s, 50 ms at 10 s, PROBE_MAX from 50 s.
PROBE_LATENESS = 0.005
# With one (its readiness phase took R), sparse before R/2, dense from R/2 to R x this,
# then as with none.
PROBE_DENSE_UNTIL = 2.0
# Refusals that carry no timeout of their own ask the client back after this long.
RETRY_SOON = 5.0
# A budget slot the store did not take back is asked for again from 50 ms doubling to 1 s.
GIVE_BACK_FIRST = 0.05
GIVE_BACK_MAX = 1.0
# How long (s) a wake waits for a cancelled helper task (renewer, slot keeper, readiness
# watch) to end: one that took its cancellation ends within a loop turn; one that lost it
# ends by its own state check once its store call returns, and nobody waits for that.
HELPER_STOP_TIMEOUT = 1.0


class RefuseKind(enum.StrEnum):
    """Why a wake was refused: stable identifiers (X-Edge-Error, metrics labels)."""

    WAKE_BACKOFF = "wake_backoff"  # failed recently; still in its back-off
    WAKE_TIMEOUT = "wake_timeout"  # no wake finished within the attempt's time
    BUDGET = "budget"  # gate "wake budget available" never passed within the hold
    OLD_ROUTE_EPOCH = "epoch"  # failure mode "old route epoch", every retry
    READINESS_TIMEOUT = "readiness_timeout"  # failure mode "readiness timeout"
    ALLOCATION = "allocation"  # the control plane failed or stopped the allocation
    CONTROL_PLANE = "control_plane"  # the control plane did not answer


# The gallery id (MachineSpec gate or failure-mode id) of each refusal that is one.
GALLERY: dict[RefuseKind, str] = {
    RefuseKind.BUDGET: "wake_budget_available",
    RefuseKind.OLD_ROUTE_EPOCH: "old_route_epoch",
    RefuseKind.READINESS_TIMEOUT: "readiness_timeout",
}

# Reasons written with Wake transitions (the journal shows them).
TAKEN_OVER = "taken over by a new wake"
ABANDONED = "previous wake abandoned"
NOT_HOT = "request while not hot"
BUDGET_GRANTED = "budget granted"
DRAINED = "drained"


class Move(msgspec.Struct, frozen=True):
    """One Wake transition to check, write (fenced) and announce."""

    target: str
    reason: str
    reason_code: str = ""  # the gallery id behind it, if any


class Adopt(msgspec.Struct, frozen=True, tag=True):
    """The stored state is hot with an address: route there, no wake."""


class Proceed(msgspec.Struct, frozen=True, tag=True):
    """Go on with the wake's next step."""


class Wait(msgspec.Struct, frozen=True, tag=True):
    """Wait (sleep or watch) at most `seconds`, then ask again."""

    seconds: float


class Refuse(msgspec.Struct, frozen=True, tag=True):
    """The app cannot be made hot now; drain `drain_allocation` (if any) first."""

    kind: RefuseKind
    reason: str
    retry_after: float
    drain_allocation: str = ""


class Plan(msgspec.Struct, frozen=True):
    """Moves to write in order, then the outcome."""

    outcome: Adopt | Proceed | Refuse
    moves: tuple[Move, ...] = ()


class FailureBackoff(msgspec.Struct, frozen=True):
    """What a failed wake stores: consecutive failures and the earliest next wake."""

    failures: int
    next_wake_at: float


ADOPT = Adopt()
PROCEED = Proceed()

# ------------------------------------------------------------- wake attempt


def is_hot(state: AppWakeState) -> bool:
    """Hot with an address: requests can be routed to it."""
    return state.state == "hot" and bool(state.address)


def give_up_at(now: float, hold_timeout: float, readiness_timeout: float) -> float:
    """When a wake attempt (retries and coalesced waits included) stops trying."""
    return now + hold_timeout + readiness_timeout + GIVE_UP_SLACK


def recovery(state: str) -> tuple[Move, ...]:
    """The moves that bring a stored state back to `wake_requested` under a new lease.

    A sleeper that died mid-drain (or a hot app without an address) restarts from
    cold; a holder that died mid-wake leaves starting/readiness_wait, retried.
    """
    if state in ("sleeping", "hot"):
        return (Move("cold", TAKEN_OVER), Move("wake_requested", NOT_HOT))
    if state in ("starting", "readiness_wait"):
        return (Move("wake_requested", ABANDONED),)
    if state in ("cold", "failed"):
        return (Move("wake_requested", NOT_HOT),)
    return ()  # wake_requested: a holder died before the budget; go on from there


def begin_attempt(state: AppWakeState, now: float, *, holding: bool = False) -> Plan:
    """What a wake attempt does with the app's stored state (`now`: wall clock).

    Before the lease: adopt a hot target, refuse inside the back-off, else take
    the lease. Holding the lease: adopt, or recover to `wake_requested` and go on
    (the back-off was checked before the lease and is not checked again).
    """
    if is_hot(state):
        return Plan(ADOPT)
    if holding:
        return Plan(PROCEED, recovery(state.state))
    refused = backoff_gate(state, now)
    return Plan(refused) if refused is not None else Plan(PROCEED)


def after_change(waited: AppWakeState, seen: AppWakeState) -> AppWakeState | None:
    """What a wake waiting on another's decides on next. `seen`: the state the wait on
    `waited` returned, a store read made after the change was announced (or polled).
    When it moved past `waited`, the next attempt decides on it at once (a hot app is
    adopted without a second read); None: nothing moved, read the store again."""
    return seen if seen.version > waited.version else None


def wake_timeout(app: str, hold_timeout: float) -> Refuse:
    """No wake (this one or another edge's) made the app hot before the attempt gave up."""
    return Refuse(RefuseKind.WAKE_TIMEOUT, f"app {app} did not wake in time", hold_timeout)


# ------------------------------------------------------------------ back-off


def backoff_after(failures: int, base: float = BACKOFF_BASE) -> float:
    """Seconds before the next wake after `failures` consecutive failed ones."""
    return backoff.delay(max(0, failures - 1), base, max(BACKOFF_CAP, base))


def backoff_gate(state: AppWakeState, now: float) -> Refuse | None:
    """Refuse a wake of a failed app before its `next_wake_at` (wall clock `now`)."""
    if state.state == "failed" and now < state.next_wake_at:
        return Refuse(
            RefuseKind.WAKE_BACKOFF,
            f"app {state.app} failed to wake ({state.reason}); next try after a back-off",
            state.next_wake_at - now,
        )
    return None


def record_failure(failures_before: int, now: float, base: float = BACKOFF_BASE) -> FailureBackoff:
    """The failure count and earliest next wake to store when a wake fails at `now`."""
    failures = failures_before + 1
    return FailureBackoff(failures, now + backoff_after(failures, base))


# ------------------------------------------------------------------- budget


def budget_window(remaining: float) -> float:
    """How long the store may queue this ask (it needs a positive window)."""
    return max(0.001, remaining)


def budget_step(
    decision: BudgetDecision, remaining: float, hold_timeout: float
) -> Proceed | Wait | Refuse:
    """Gate "wake budget available": proceed when granted, else pause and ask again
    until the hold runs out (`remaining` seconds left), then refuse."""
    if decision.granted:
        return PROCEED
    if remaining <= 0:
        return Refuse(RefuseKind.BUDGET, f"wake budget exhausted ({decision.reason})", hold_timeout)
    pause = decision.retry_after or BUDGET_PAUSE
    return Wait(min(max(pause, BUDGET_PAUSE_MIN), BUDGET_PAUSE_MAX, max(0.0, remaining)))


# --------------------------------------------------------------- allocation


def until_started(alloc: Allocation, remaining: float) -> Proceed | Wait | Refuse:
    """Proceed once the allocation has an address (starting or later); watch it for at
    most 5 s at a time; refuse when it failed or stopped, or (drained) when time is up."""
    if alloc.address and alloc.state not in ("planned", "pulling"):
        return PROCEED
    if alloc.state in ("failed", "stopped", "draining"):
        return Refuse(
            RefuseKind.ALLOCATION,
            f"allocation {alloc.id} {alloc.state}: {alloc.reason}",
            RETRY_SOON,
        )
    if remaining <= 0:
        return Refuse(
            RefuseKind.READINESS_TIMEOUT,
            f"readiness timeout: {alloc.id} never started",
            RETRY_SOON,
            drain_allocation=alloc.id,
        )
    return Wait(min(remaining, 5.0))


def frees_budget_slot(alloc: Allocation) -> bool:
    """The control plane has the allocation past starting: its wake slot can go back.

    Held until then so the control plane's count of starting allocations never
    exceeds the budget, however early the readiness probe answered."""
    return alloc.state not in ("planned", "pulling", "starting")


# Allocation states the control plane will never route again.
GONE = frozenset({"failed", "stopped", "draining"})


def allocation_key(state: AppWakeState, token: int, recorded: Allocation | None) -> str:
    """The idempotency key to ask for the allocation with.

    The key a previous holder recorded is reused while its allocation may still
    come up (`recorded`: what the control plane has under it, None if nothing yet),
    so the ask adopts that allocation instead of starting a second one. Otherwise a
    new key, unique to this lease (`token`) and state version.
    """
    if state.allocation_key and (recorded is None or recorded.state not in GONE):
        return state.allocation_key
    return f"wake-{state.app}-{token}-{state.version}"


class Orphan(enum.StrEnum):
    """What becomes of an allocation asked for by a wake that did not complete."""

    LEAVE = "leave"  # the stored state records it and a holder is on it (or it is hot)
    WAKE = "wake"  # the state records it but nobody holds the lease: wake to adopt it
    DRAIN = "drain"  # nobody records it, or its wake failed: it would run unowned


# Stored states in which a recorded allocation is on its way to being routed.
_ADOPTABLE = frozenset({"wake_requested", "starting", "readiness_wait", "hot"})


def orphan_action(state: AppWakeState, key: str, lease_held: bool) -> Orphan:
    """Who takes care of the allocation asked for under `key` after its wake ended early."""
    if state.allocation_key != key or state.state not in _ADOPTABLE:
        return Orphan.DRAIN
    if state.state == "hot" or lease_held:
        return Orphan.LEAVE
    return Orphan.WAKE


def slot_hold_limit(readiness_timeout: float, slot_ttl: float) -> float:
    """How long a wake's slot is kept, at most, waiting for its start to settle."""
    return max(readiness_timeout, slot_ttl)


def give_back_pause(tries: int, now: float, ended_at: float, slot_ttl: float) -> float | None:
    """The pause before asking the store again to take back a slot it did not take after
    `tries` asks; None once past `ended_at + slot_ttl`, when it has expired by itself.

    Nothing renews a slot once its attempt ended (`ended_at`), so by then its lease
    runs out: retrying longer frees nothing, retrying less leaves it held to its lease."""
    remaining = ended_at + slot_ttl - now
    if remaining <= 0:
        return None
    return min(backoff.delay(tries, GIVE_BACK_FIRST, GIVE_BACK_MAX), remaining)


class Keep(msgspec.Struct, frozen=True):
    """What a wake's renewers may still renew."""

    lease: bool
    slot: bool


def keep(wake_over: bool, slot_given_back: bool) -> Keep:
    """The lease only while the wake holding it runs, the slot until it is being given back.

    Renewers stop on this, checked before each renewal, not on a cancellation landing: one
    can be lost (Python 3.11's asyncio.wait_for, in every command redis-py sends, returns a
    finished send instead of raising it), and a renewal of what was let go holds it a term."""
    return Keep(lease=not wake_over, slot=not slot_given_back)


def renew_pause(lease_ttl: float, failing: bool) -> float:
    """The pause before the next lease renewal: a third of the lease, or while the store
    fails a tenth (at least 50 ms), so a renewal lands as soon as the store answers."""
    return max(0.05, lease_ttl / 10) if failing else lease_ttl / 3


def allocation_passes_readiness(status: int) -> bool:
    """Gate "allocation passes readiness": the readiness path answered 2xx."""
    return 200 <= status < 300


def probe_pause(
    elapsed: float,
    *,
    refused: bool,
    expected: float = 0.0,
    interval: float = PROBE_INTERVAL,
) -> float:
    """The pause after a readiness probe that did not pass, `elapsed` seconds into the
    readiness phase (monotonic, from `readiness_wait`).

    `refused`: the connect was refused (nothing bound yet): retried every PROBE_REFUSED
    (or `interval` if shorter) however long that lasts. Otherwise something answered
    (non-2xx, like an app answering 503 "starting" while it warms up) or failed, and the
    probe itself costs the app: `expected` is how long the readiness phase of the app's
    previous wake took (0: unknown). Dense (`interval`) from half of it until
    PROBE_DENSE_UNTIL times it, sparse before (doubling from `interval`, the last pause
    cut to land on the dense window's start). Past that window, or with no history,
    about PROBE_LATENESS of `elapsed` (at least `interval`): a probe is never later than
    that fraction of the start, and a long start costs probes in the log of its length.
    Never over PROBE_MAX.
    """
    if refused:
        return min(PROBE_REFUSED, interval)
    elapsed = max(0.0, elapsed)
    sparsest = max(interval, PROBE_MAX)
    if expected > 0:
        dense_from = expected / 2
        if elapsed < dense_from:
            doubling = min(max(elapsed, interval), sparsest)
            return max(interval, min(doubling, dense_from - elapsed))
        if elapsed <= expected * PROBE_DENSE_UNTIL:
            return interval
    return min(max(elapsed * PROBE_LATENESS, interval), sparsest)


def expected_readiness(state: AppWakeState) -> float:
    """How long (s) the readiness phase of the app's previous wake took; 0: unknown."""
    return state.last_wake.readiness_ms / 1000 if state.last_wake is not None else 0.0


def readiness_timeout(alloc: Allocation, readiness_timeout: float) -> Refuse:
    """Failure mode "readiness timeout": never ready in time; the allocation is drained."""
    return Refuse(
        RefuseKind.READINESS_TIMEOUT,
        f"readiness timeout: {alloc.id} not ready within {readiness_timeout:g}s",
        readiness_timeout,
        drain_allocation=alloc.id,
    )


def needs_route_snapshot(alloc: Allocation) -> bool:
    """Whether the old-epoch check needs the route snapshot (the control plane did not
    already decide `routed` when it saw the allocation ready)."""
    return not (alloc.state == "ready" and alloc.routed is not None)


def epoch_replaced(alloc: Allocation, promoted_epoch: int | None) -> bool:
    """Failure mode "old route epoch": a promotion replaced the app's route after this
    allocation was granted. `promoted_epoch`: the snapshot's (None: app not in it)."""
    if not needs_route_snapshot(alloc):
        return not alloc.routed
    return promoted_epoch is not None and alloc.route_epoch < promoted_epoch


def old_epoch_move(alloc: Allocation) -> Move:
    """Back to `wake_requested`: the allocation is never routed to, the wake retried."""
    return Move(
        "wake_requested",
        f"old route epoch: {alloc.id} granted under {alloc.route_epoch}, replaced since",
        GALLERY[RefuseKind.OLD_ROUTE_EPOCH],
    )


def old_epoch_retries_exhausted(app: str, hold_timeout: float) -> Refuse:
    """Every retry under a new epoch was replaced again: give up this wake."""
    return Refuse(
        RefuseKind.OLD_ROUTE_EPOCH,
        f"app {app}: route epoch kept moving during the wake",
        hold_timeout,
    )


def control_plane_error(app: str) -> Refuse:
    """The control plane failed a call the wake needed (the app is marked failed)."""
    return Refuse(RefuseKind.CONTROL_PLANE, f"app {app}: control plane error", RETRY_SOON)


# -------------------------------------------------------------- wake time


def expected_wake(previous: float, took: float, weight: float = WAKE_EWMA) -> float:
    """The moving average of wake time after a wake that `took` seconds (0: unknown)."""
    return took if previous <= 0 else previous + weight * (took - previous)


def wake_phases(
    at: float, *, budget: float, allocation: float, readiness: float, total: float
) -> WakePhases:
    """What a wake that went hot at `at` (wall clock) stores of its phases (seconds in;
    ms out, 0.1 ms resolution, never negative; total: from the budget ask to hot)."""

    def ms(seconds: float) -> float:
        return round(max(0.0, seconds) * 1000, 1)

    parts = ms(budget), ms(allocation), ms(readiness)
    return WakePhases(
        at=at,
        budget_ms=parts[0],
        allocation_ms=parts[1],
        readiness_ms=parts[2],
        total_ms=max(ms(total), round(sum(parts), 1)),
    )


# --------------------------------------------------------------------- idle


def may_sleep(state: AppWakeState, in_flight: int = 0, seen: bool = False) -> bool:
    """What is known without asking the store: hot, nothing in flight, not seen since
    the last flush of last-seen times."""
    return state.state == "hot" and in_flight <= 0 and not seen


def should_sleep(
    state: AppWakeState,
    *,
    idle: float | None,
    idle_timeout: float,
    in_flight: int = 0,
    seen: bool = False,
) -> bool:
    """Put the app to sleep: `may_sleep` and idle (by the store's clock) >= idle_timeout."""
    return may_sleep(state, in_flight, seen) and idle is not None and idle >= idle_timeout
