"""The wake controller of one edge process: coalesced wakes, budget, readiness, idle-to-sleep.

Theory of operation. The hot path asks `hot_target(app)`, a dict lookup. A
request for an app that is not hot waits on `hot_or_outcome(app)` (a callback
on the outcome; `ensure_hot(app, wait_for)` for a task): every
caller in this process shares one flight per app (single-flight), and every
process shares one wake per app through the store's lease (SET NX PX + a
fencing token). The lease holder drives the Wake machine — wake_requested,
budget, starting (allocation), readiness_wait (probe), hot — writing each state
fenced by its token before acting; others wait on the store's change
notifications (with polling). Failures leave the app `failed` with a back-off,
so a broken app is not woken in a loop. A periodic `upkeep` flushes last-seen
times, refreshes what this process believes is hot, and puts idle apps to sleep.

Gallery counters. Gates passed and refused, failure modes, wakes started (their
meaning: wake/gallery_tally.py) are added to `tally` in memory, the front's admissions
included (`admitted`, `request_wake`), and a small task sends them to the store in
one call every ~0.5 s while any are pending (and at `close`); a store that is down
keeps them pending. The wake that makes an app hot stores its phases (`last_wake`),
which every edge hands to the requests that wake releases (`HotTarget.phases`).

Under faults. The renewer rides out store errors (the fencing token, not the
lease key, guards every write) and stops the wake once another holder has the
lease. The allocation's idempotency key is stored before the allocation is asked
for, so the next holder asks with the same key and adopts that allocation, never
a second. A wake that did not complete leaves its allocation to the holder the
state records it for, wakes the app to adopt it, or drains it; and its budget
slot is kept until the control plane has that start settled. A slot given back
while the store is down is asked back again until the store takes it or its lease
would have run out (`_give_back`); a slot being given back is never renewed. The
helper tasks of a wake (lease renewer, slot keeper, readiness watch) stop on the
attempt's state, not only on cancel(), which a redis-py call can lose; they are waited
for a bounded time (`_stop`), so a wake always lets its lease and slot go.

Every choice (recovery of a half-finished wake, the back-off, the budget pauses,
the readiness probe's pauses, the old-epoch check, the moving average of wake time,
idleness) is a plain function in `wake/decisions.py`; this module only carries them
out. Two injected clocks: `clock` (monotonic) for deadlines and durations inside this process,
`wall_clock` for times written to the store, which other processes compare.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import NoReturn

import msgspec

from scheduler_client.client import ControlPlaneClient
from scheduler_client.http_probe import http_get
from scheduler_client.machine_move import plan_move
from scheduler_client.models import Allocation, ControlPlaneError
from scheduler_client.task_stop import stop_tasks
from wake import decisions, gallery_tally
from wake.budget import BudgetLimits
from wake.decisions import Adopt, Refuse, Wait
from wake.gallery_tally import Admitted, GalleryTally
from wake.machine import WAKE
from wake.store.protocol import (
    AppWakeState,
    Lease,
    StoreUnavailable,
    Transition,
    WakePhases,
    WakeStore,
)

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 1.0
# The readiness probe's User-Agent (an app can tell the edge's probes from the control
# plane's).
PROBE_USER_AGENT = "edge-wake-probe"
OLD_EPOCH_RETRIES = 3
SLEEP_DRAIN_DEADLINE = 5.0
# At close, pending gallery counts get this long (s) to reach the store.
CLOSE_FLUSH_TIMEOUT = 2.0
# At close, cancelled flights and helpers get this long (s) to run their cleanup (a flight
# lets its helpers go, at most HELPER_STOP_TIMEOUT, then its lease and slot).
CLOSE_STOP_TIMEOUT = 5.0
# Upper bounds (s) of the wake phase histograms: budget wait, allocation, readiness.
PHASE_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip


class WakeAppSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    tenant: str = "default"
    hold_timeout: float = 30.0
    readiness_path: str = "/healthz"
    readiness_timeout: float = 20.0
    readiness_probe_interval: float = decisions.PROBE_INTERVAL
    idle_timeout: float = 300.0
    wake_backoff: float = decisions.BACKOFF_BASE


class HotTarget(msgspec.Struct, frozen=True):
    address: str
    allocation_id: str
    # The phases of the wake that made the app hot (None: not known, e.g. an older edge's).
    phases: WakePhases | None = None


class WakeRefused(Exception):
    """The app cannot be made hot for this request; answer 503 with Retry-After."""

    def __init__(self, reason: str, retry_after: float, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = max(1.0, retry_after)
        self.kind = str(kind)  # a decisions.RefuseKind arrives as its plain value

    @classmethod
    def of(cls, refusal: Refuse) -> WakeRefused:
        return cls(refusal.reason, refusal.retry_after, refusal.kind)


class _LeaseLost(Exception):
    """A newer wake took over (our fencing token is stale)."""


class _Attempt:
    """One holder's wake attempt: its budget slot and the allocation it asked for."""

    __slots__ = (
        "allocation_id",
        "began",
        "budget_s",
        "completed",
        "ended",
        "holder",
        "key",
        "over",
    )

    def __init__(self, holder: str) -> None:
        self.holder = holder  # the budget slot's holder name
        self.key = ""  # idempotency key of the allocation asked for ("" before the ask)
        self.allocation_id = ""  # its id once the control plane answered
        self.completed = False  # the app went hot through this attempt
        self.began = 0.0  # monotonic, when the attempt asked for its budget
        self.budget_s = 0.0  # how long the budget took
        self.ended = False  # its slot is being given back: never renewed again
        self.over = False  # the wake holding the lease for it ended: the lease is let go

    def keep(self) -> decisions.Keep:
        """What its renewers may still renew (checked before each renewal)."""
        return decisions.keep(self.over, self.ended)


def _going_on(attempt: _Attempt) -> None:
    """Before asking for a slot or an allocation: a wake's work whose cancellation was lost
    (see `_stop`) must not take what nobody would give back."""
    if attempt.over:
        raise asyncio.CancelledError


class _Flight:
    """One flight's part in the stampede count: started for a request, and what it found."""

    __slots__ = ("by_request", "coalesced", "started")

    def __init__(self, by_request: bool) -> None:
        self.by_request = by_request  # started by a request's wake ask (not a replay, a retry)
        self.started = False  # this flight started a wake (cold/failed -> wake_requested)
        self.coalesced = False  # its request was counted as joining another's wake


class WakeController:
    def __init__(
        self,
        store: WakeStore,
        client: ControlPlaneClient,
        *,
        edge_id: str,
        budget: BudgetLimits,
        apps: dict[str, WakeAppSpec],
        lease_ttl: float = 10.0,
        poll_interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        in_flight: Callable[[str], int] = lambda app: 0,
        promoted_epochs: Callable[[], Mapping[str, int] | None] = lambda: None,
    ) -> None:
        self.store = store
        self.client = client
        self.edge_id = edge_id
        self.budget = budget
        self.apps = apps
        self.lease_ttl = lease_ttl
        self.poll_interval = poll_interval
        self.clock = clock  # deadlines and durations in this process
        self.wall_clock = wall_clock  # times stored for other processes to compare
        self._hot: dict[str, HotTarget] = {}
        # app -> the allocation this process last put to drain (a sleep, a refusal, an
        # orphan): no new requests to it from here, even while the control plane's route
        # table, followed a moment behind, still lists it ready. Other processes stop
        # when their table shows it draining.
        self.draining: dict[str, str] = {}
        self._flights: dict[str, asyncio.Task[None]] = {}
        self._outcomes: dict[str, asyncio.Future[HotTarget]] = {}
        self._seen: set[str] = set()  # apps with requests since the last flush
        self.in_flight = in_flight  # requests and tunnels open to the app in this process
        # Each app's promoted route epoch in the route table this process follows; None
        # when it has none it trusts (not synced, or the control plane unreachable).
        self.promoted_epochs = promoted_epochs
        self._expected: dict[str, float] = {}
        self._background: set[asyncio.Task] = set()
        self.counters: dict[str, int] = {}
        # Region-wide gallery counts not yet in the store; one writer per process.
        self.tally = GalleryTally(f"{edge_id}:{os.getpid()}:{os.urandom(4).hex()}")
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        # phase -> [seconds, count, one count per PHASE_BUCKETS bound, +Inf]:
        # budget wait, allocation start, readiness.
        self.phases: dict[str, list[float]] = {}

    # ---------------------------------------------------------------- hot path

    def hot_target(self, app: str) -> HotTarget | None:
        """What this process believes: the app's address when hot (no I/O)."""
        return self._hot.get(app)

    def seen(self, app: str) -> None:
        self._seen.add(app)

    def forget_hot(self, app: str, address: str) -> None:
        """The address stopped answering: the next request re-reads the store."""
        target = self._hot.get(app)
        if target is not None and target.address == address:
            del self._hot[app]

    def stop_routing(self, app: str, allocation_id: str) -> None:
        """The allocation is put to drain: this process sends it no new requests."""
        if allocation_id:
            self.draining[app] = allocation_id
        target = self._hot.get(app)
        if target is not None and target.allocation_id == allocation_id:
            del self._hot[app]

    def resume_routing(self, app: str, allocation_id: str) -> None:
        """Lift the fence `stop_routing` put on the allocation (if it is still the one)."""
        if self.draining.get(app) == allocation_id:
            del self.draining[app]

    def apply(self, budget: BudgetLimits, apps: dict[str, WakeAppSpec]) -> None:
        """Adopt reloaded budgets and app settings; flights in progress keep their own."""
        self.budget = budget
        self.apps = apps

    # ------------------------------------------------------------- wake entry

    def waking(self, app: str) -> bool:
        """Whether asking for `app` would join a wake (or a hot app) instead of starting one."""
        return app in self._hot or app in self._flights

    def start_wake(self, app: str, by_request: bool = False) -> asyncio.Future[HotTarget]:
        """The outcome of the app's flight in this process, started if none is running.

        The outcome resolves the moment the app is known hot; the flight itself
        then finishes its bookkeeping (journal, lease) without holding anyone up.
        """
        outcome = self._outcomes.get(app)
        if outcome is None or outcome.done():
            loop = asyncio.get_running_loop()
            outcome = loop.create_future()
            self._outcomes[app] = outcome
            flight = loop.create_task(self._fly(app, outcome, _Flight(by_request)))
            self._flights[app] = flight
            flight.add_done_callback(lambda task, app=app: self._flight_done(app, task))
        return outcome

    def request_wake(self, app: str) -> None:
        """A request for a not-hot app asks for its wake: it joins this process's flight
        (failure mode "wake stampede") or starts one."""
        outcome = self._outcomes.get(app)
        if outcome is not None and not outcome.done():
            self._coalesced()
            return
        self.start_wake(app, by_request=True)

    def admitted(self, admitted: Admitted) -> None:
        """What the front did with a request for a not-hot app (gate "request class safe to
        hold"; failure mode "payment webhook while cold" when it was not held)."""
        if admitted is not Admitted.HELD:
            self._count(f"gallery:{gallery_tally.PAYMENT_WEBHOOK}")
        self._tally(gallery_tally.admission_keys(admitted))

    def gate_checked(self, gate_id: str, passed: bool) -> None:
        """A gate checked outside a wake, e.g. "unsafe replay policy exists" at config load."""
        if not passed:
            self._count(f"gallery:{gate_id}")
        self._tally(gallery_tally.gate_keys(gate_id, passed))

    async def _fly(self, app: str, outcome: asyncio.Future[HotTarget], flight: _Flight) -> None:
        try:
            target = await self._wake(app, flight)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                outcome.cancel()
            elif not outcome.done():
                outcome.set_exception(exc)
                outcome.exception()  # retrieved here; waiters may all have gone
            if not isinstance(exc, Exception):
                raise
            self._count(f"wake_error:{type(exc).__name__}")
        else:
            if not outcome.done():
                outcome.set_result(target)

    def _flight_done(self, app: str, task: asyncio.Task[None]) -> None:
        if self._flights.get(app) is task:
            del self._flights[app]

    def hot_or_outcome(self, app: str) -> HotTarget | asyncio.Future[HotTarget]:
        """The app's target when hot, else the outcome of its wake (started if none runs):
        a held request waits on it with a callback, thousands at once without a task each."""
        target = self._hot.get(app)
        if target is not None:
            return target
        return self.start_wake(app)

    async def ensure_hot(self, app: str, wait_for: float) -> HotTarget:
        """Wait (at most `wait_for`) until the app is hot; raises WakeRefused or TimeoutError."""
        outcome = self.hot_or_outcome(app)
        if isinstance(outcome, HotTarget):
            return outcome
        async with asyncio.timeout(wait_for):
            return await asyncio.shield(outcome)

    def expected_wake(self, app: str) -> float:
        """The moving average of this app's wakes as last read (0 when unknown)."""
        return self._expected.get(app, 0.0)

    # ------------------------------------------------------------ the wake

    async def _wake(self, app: str, flight: _Flight) -> HotTarget:
        spec = self.apps[app]
        give_up = decisions.give_up_at(self.clock(), spec.hold_timeout, spec.readiness_timeout)
        seen: AppWakeState | None = None  # the state another's wake moved to, as read
        while self.clock() < give_up:
            state = seen if seen is not None else await self.store.read_state(app)
            seen = None
            self._expected[app] = state.expected_wake_s
            plan = decisions.begin_attempt(state, self.wall_clock())
            if isinstance(plan.outcome, Adopt):
                self._joined(flight)
                return self._adopt(app, state)
            if isinstance(plan.outcome, Refuse):
                raise WakeRefused.of(plan.outcome)
            owner = f"{self.edge_id}:{os.getpid()}"
            lease = await self.store.acquire_lease(app, owner, self.lease_ttl)
            if lease is None:
                # Another process is waking (or sleeping) the app: wait for its outcome,
                # and decide on the state the wait read (hot: released without a re-read).
                self._joined(flight)
                changed = await self.store.wait_change(
                    app, state.version, min(self.poll_interval * 4, give_up - self.clock())
                )
                seen = decisions.after_change(state, changed)
                continue
            try:
                return await self._wake_holding(app, spec, lease, flight)
            except _LeaseLost:
                continue
            finally:
                await self.store.release_lease(app, owner)
        raise WakeRefused.of(decisions.wake_timeout(app, spec.hold_timeout))

    def _joined(self, flight: _Flight) -> None:
        """The flight found another's wake (the lease taken, or the app made hot): the
        request that started it joined that wake, counted once."""
        if flight.by_request and not flight.started and not flight.coalesced:
            flight.coalesced = True
            self._coalesced()

    def _coalesced(self) -> None:
        self._count(f"gallery:{gallery_tally.STAMPEDE}")
        self._tally(gallery_tally.coalesced_keys())

    def _adopt(self, app: str, state: AppWakeState) -> HotTarget:
        target = HotTarget(state.address, state.allocation_id, state.last_wake)
        self._hot[app] = target
        self.resume_routing(app, target.allocation_id)  # a failed drain left it ready
        outcome = self._outcomes.get(app)
        if outcome is not None and not outcome.done():
            outcome.set_result(target)
        return target

    async def _move(
        self,
        state: AppWakeState,
        target: str,
        lease: Lease,
        reason: str = "",
        reason_code: str = "",
        **changes: object,
    ) -> AppWakeState:
        """Check, write (fenced) and announce one Wake transition."""
        move = plan_move(
            WAKE,
            state,
            target,
            subject=state.app,
            now=self.wall_clock(),
            reason=reason,
            reason_code=reason_code,
            **changes,
        )
        if not await self.store.write_state(move.record, lease.token):
            raise _LeaseLost()
        # Counted once written (the journal append below may still fail): it happened.
        self._tally(gallery_tally.transition_keys(state.state, target, reason_code))
        if target == "hot":
            # Every process releases what it holds at once: the notification goes out
            # first (the others' flights wait on it; its task runs before the release
            # this process's requests then get, which keeps the loop busy for tens of ms
            # at a stampede), this process releases its own without waiting for the
            # notification's answer, and the bookkeeping (journal) comes last.
            announce = asyncio.get_running_loop().create_task(self.store.publish(state.app))
            self._adopt(state.app, move.record)
            with contextlib.suppress(Exception):  # a lost notification: the others poll
                await announce
        entry = move.entry
        await self.store.append_transition(
            Transition(
                app=entry.subject,
                from_state=entry.from_state,
                to_state=entry.to_state,
                reason=entry.reason,
                reason_code=entry.reason_code,
                edge_id=self.edge_id,
                token=lease.token,
                at=entry.at,
            )
        )
        if target != "hot":
            await self.store.publish(state.app)
        self._count(f"transition:{state.state}->{target}")
        if reason_code:
            self._count(f"gallery:{reason_code}")
        return await self.store.read_state(state.app)

    async def _wake_holding(
        self, app: str, spec: WakeAppSpec, lease: Lease, flight: _Flight
    ) -> HotTarget:
        state = await self.store.read_state(app)
        plan = decisions.begin_attempt(state, self.wall_clock(), holding=True)
        if isinstance(plan.outcome, Adopt):
            self._joined(flight)
            return self._adopt(app, state)
        for move in plan.moves:  # recovery of a wake or sleep whose holder died
            if gallery_tally.starts_wake(state.state, move.target):
                flight.started = True
            state = await self._move(state, move.target, lease, move.reason)
        attempt = _Attempt(f"{app}#{lease.token}")
        loop = asyncio.get_running_loop()
        work = loop.create_task(self._drive(app, spec, lease, state, attempt), name="wake work")
        renewer = loop.create_task(self._renew(app, lease, attempt), name="wake lease renewer")
        try:
            await asyncio.wait((work, renewer), return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the renewer returned: another holder has the lease
                self._count("lease_lost")
                raise _LeaseLost()
            target = work.result()
            attempt.completed = True
            return target
        except WakeRefused as refused:
            await self._fail(app, lease, refused.reason, decisions.GALLERY.get(refused.kind, ""))
            raise
        except ControlPlaneError as exc:
            await self._fail(app, lease, f"control plane: {exc.message}")
            raise WakeRefused.of(decisions.control_plane_error(app)) from exc
        finally:
            attempt.over = True  # the renewer stops on this even if its cancellation is lost
            try:
                await self._stop(app, work, renewer)
            finally:
                await self._end_attempt(app, spec, attempt)

    async def _stop(self, app: str, *tasks: asyncio.Task) -> None:
        """Cancel a wake's helper tasks and wait for them, at most HELPER_STOP_TIMEOUT: one
        whose cancellation was lost stops by its own state check, the wake goes on."""
        # The work's error was raised where it was awaited; the others' only end them.
        stuck = await stop_tasks(
            tasks, decisions.HELPER_STOP_TIMEOUT, what=f"wake {app}", errors=logging.DEBUG
        )
        for task in stuck:
            self._count("helper_stuck")
            self._background.add(task)  # close() waits for it; its own check ends it
            task.add_done_callback(self._background.discard)

    async def _drive(
        self, app: str, spec: WakeAppSpec, lease: Lease, state: AppWakeState, attempt: _Attempt
    ) -> HotTarget:
        """Budget, then allocation and readiness (retried under a new route epoch)."""
        attempt.began = self.clock()
        await self._take_budget(app, spec, attempt)
        attempt.budget_s = self.clock() - attempt.began
        self._phase("budget", attempt.budget_s)
        for _ in range(OLD_EPOCH_RETRIES):
            state, target = await self._start_allocation(app, spec, lease, state, attempt)
            if target is not None:
                return target
        raise WakeRefused.of(decisions.old_epoch_retries_exhausted(app, spec.hold_timeout))

    async def _end_attempt(self, app: str, spec: WakeAppSpec, attempt: _Attempt) -> None:
        """Give the budget slot back, at once if no allocation was asked for, else once the
        control plane has settled that start: the budget counts starts not yet settled."""
        if not attempt.key:
            attempt.ended = True
            try:
                await self.store.release_budget(attempt.holder)
            except Exception:  # any: asked again in the background, the flight goes on
                self._spawn(self._give_back(attempt, self.clock()))
            return
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            return  # shutting down: the slot expires by its lease, the next holder adopts
        self._spawn(self._settle(app, spec, attempt))

    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _settle(self, app: str, spec: WakeAppSpec, attempt: _Attempt) -> None:
        """Hold the attempt's slot (renewing it) until the control plane has its allocation
        past starting, then give it back. The allocation of a wake that did not complete is
        left to the holder its key is recorded for, adopted by a new wake, or drained."""
        keeper = asyncio.get_running_loop().create_task(
            self._keep_slot(attempt), name="wake slot keeper"
        )
        limit = decisions.slot_hold_limit(spec.readiness_timeout, self.budget.slot_ttl)
        try:
            async with asyncio.timeout(limit):
                alloc = await self._find_allocation(app, attempt)
                if alloc is not None and not attempt.completed:
                    action = await self._orphan_action(app, attempt.key)
                    self._count(f"orphan:{action}")
                    if action is decisions.Orphan.DRAIN:
                        alloc = await self._drain_retrying(app, alloc.id)
                    elif action is decisions.Orphan.WAKE:
                        self.start_wake(app)
                if alloc is not None:
                    step = max(0.5, min(self.lease_ttl, self.budget.slot_ttl) / 3)
                    await self._until_settled(alloc, step)
        except TimeoutError:
            log.warning("wake %s: start of %s not settled in %.0fs", app, attempt.key, limit)
        finally:
            attempt.ended = True  # the keeper stops on this even if its cancellation is lost
            try:
                await self._stop(app, keeper)
            finally:
                await self._give_back(attempt, self.clock())

    async def _give_back(self, attempt: _Attempt, ended_at: float) -> None:
        """Give the attempt's slot back, asked again while the store fails, until the slot
        would have expired by itself: one lost answer must not hold it for its whole lease."""
        attempt.ended = True
        tries = 0
        while True:
            try:
                await self.store.release_budget(attempt.holder)
                return
            except Exception as exc:  # any: the slot is region-wide capacity
                pause = decisions.give_back_pause(
                    tries, self.clock(), ended_at, self.budget.slot_ttl
                )
                if pause is None:
                    log.warning("wake slot %s not given back (%r); expired", attempt.holder, exc)
                    self._count("budget_release_expired")
                    return
                if not tries:
                    log.warning("wake slot %s not given back (%r); retrying", attempt.holder, exc)
                self._count("budget_release_retry")
                tries += 1
                await asyncio.sleep(pause)

    async def _find_allocation(self, app: str, attempt: _Attempt) -> Allocation | None:
        """The allocation asked for under the attempt's key; None if the control plane
        never created one. Asked again until the control plane answers."""
        while True:
            try:
                if attempt.allocation_id:
                    return await self.client.get_allocation(attempt.allocation_id)
                return await self._recorded_allocation(app, attempt.key)
            except ControlPlaneError:
                await asyncio.sleep(0.5)

    async def _recorded_allocation(self, app: str, key: str) -> Allocation | None:
        if not key:
            return None
        found = [a for a in await self.client.list_allocations(app) if a.idempotency_key == key]
        return found[0] if found else None

    async def _orphan_action(self, app: str, key: str) -> decisions.Orphan:
        """Read (until the store answers) who, if anyone, takes over the allocation."""
        while True:
            try:
                state = await self.store.read_state(app)
                holder = await self.store.lease_owner(app)
                return decisions.orphan_action(state, key, holder is not None)
            except StoreUnavailable:
                await asyncio.sleep(0.5)

    async def _drain_retrying(self, app: str, allocation_id: str) -> Allocation:
        self.stop_routing(app, allocation_id)
        while True:
            try:
                return await self.client.drain_allocation(allocation_id, 0.0)
            except ControlPlaneError:
                await asyncio.sleep(0.5)

    async def _until_settled(self, alloc: Allocation, step: float) -> None:
        """Watch the allocation until the control plane has it past starting."""
        while not decisions.frees_budget_slot(alloc):
            try:
                alloc = await self.client.watch_allocation(alloc.id, alloc.version, timeout=step)
            except ControlPlaneError:
                await asyncio.sleep(0.5)

    async def _keep_slot(self, attempt: _Attempt) -> None:
        """Renew a budget slot on its own schedule, whatever the calls around it take, until
        it is being given back."""
        while attempt.keep().slot:
            await asyncio.sleep(self.budget.slot_ttl / 3)
            await self._renew_slot(attempt)

    async def _renew_slot(self, attempt: _Attempt) -> None:
        """Extend the attempt's slot unless it is being given back; store errors are ridden
        out (the next renewal tries again, and the slot's lease bounds it anyway)."""
        if not attempt.keep().slot:
            return
        with contextlib.suppress(Exception):
            await self.store.renew_budget(attempt.holder, self.budget)

    async def _renew(self, app: str, lease: Lease, attempt: _Attempt) -> None:
        """Keep the lease (and the slot) while the wake runs; return once another holder
        has the lease. Store errors are ridden out: the fencing token still guards writes."""
        failing = False
        while True:
            await asyncio.sleep(decisions.renew_pause(self.lease_ttl, failing))
            if not attempt.keep().lease:
                return
            try:
                renewed = await self.store.renew_lease(app, lease.owner, self.lease_ttl)
            except Exception as exc:  # any: a dead renewer would let the lease lapse
                if not failing:
                    log.warning("wake %s: lease renewal failed (%s); retrying", app, exc)
                failing = True
                self._count("lease_renew_error")
                continue
            failing = False
            if not renewed or not attempt.keep().lease:
                return
            await self._renew_slot(attempt)

    async def _take_budget(self, app: str, spec: WakeAppSpec, attempt: _Attempt) -> None:
        deadline = self.clock() + spec.hold_timeout
        refused = False  # the gate's refusal is counted once per attempt, not per ask
        while True:
            _going_on(attempt)
            remaining = deadline - self.clock()
            decision = await self.store.acquire_budget(
                attempt.holder, spec.tenant, self.budget, decisions.budget_window(remaining)
            )
            self._tally(gallery_tally.budget_keys(decision.granted, refused))
            refused = refused or not decision.granted
            step = decisions.budget_step(decision, remaining, spec.hold_timeout)
            if isinstance(step, Refuse):
                raise WakeRefused.of(step)
            if not isinstance(step, Wait):
                return
            self._count(f"budget_wait:{decision.reason}")
            await asyncio.sleep(step.seconds)

    async def _start_allocation(
        self, app: str, spec: WakeAppSpec, lease: Lease, state: AppWakeState, attempt: _Attempt
    ) -> tuple[AppWakeState, HotTarget | None]:
        """One allocation attempt: (new state, target) or (state, None) on an old epoch."""
        started = self.clock()
        recorded = await self._recorded_allocation(app, state.allocation_key)
        key = decisions.allocation_key(state, lease.token, recorded)
        # The key is stored (fenced) before the ask: whoever holds the lease next asks
        # with it and adopts this allocation, whatever becomes of this holder.
        state = await self._move(
            state,
            "starting",
            lease,
            decisions.BUDGET_GRANTED,
            wake_started_at=self.wall_clock(),
            allocation_key=key,
        )
        attempt.key, attempt.allocation_id = key, ""
        _going_on(attempt)
        alloc = await self.client.create_allocation(app, idempotency_key=key)
        attempt.allocation_id = alloc.id
        deadline = self.clock() + spec.readiness_timeout
        alloc = await self._until_started(alloc, deadline)
        allocation_s = self.clock() - started
        self._phase("allocation", allocation_s)
        probing = self.clock()
        state = await self._move(
            state,
            "readiness_wait",
            lease,
            f"allocation {alloc.id} at {alloc.address}",
            allocation_id=alloc.id,
            address=alloc.address,
            route_epoch=alloc.route_epoch,
        )
        expected = decisions.expected_readiness(state)
        seen_ready = await self._probe(alloc, spec, deadline, expected)
        if seen_ready is None:
            await self._refuse(app, decisions.readiness_timeout(alloc, spec.readiness_timeout))
        readiness_s = self.clock() - probing
        self._phase("readiness", readiness_s)
        if await self._epoch_replaced(app, seen_ready):
            await self._drain_quietly(app, alloc.id)
            move = decisions.old_epoch_move(alloc)
            state = await self._move(state, move.target, lease, move.reason, move.reason_code)
            return state, None
        took = self.clock() - started
        expected = decisions.expected_wake(state.expected_wake_s, took)
        phases = decisions.wake_phases(
            self.wall_clock(),
            budget=attempt.budget_s,
            allocation=allocation_s,
            readiness=readiness_s,
            total=self.clock() - attempt.began,
        )
        state = await self._move(
            state,
            "hot",
            lease,
            f"ready after {took * 1000:.0f} ms",
            failures=0,
            next_wake_at=0.0,
            expected_wake_s=expected,
            last_wake=phases,
        )
        self._expected[app] = expected
        return state, self._adopt(app, state)

    async def _until_started(self, alloc: Allocation, deadline: float) -> Allocation:
        """Watch the allocation until it has an address (starting or later)."""
        while True:
            step = decisions.until_started(alloc, deadline - self.clock())
            if isinstance(step, Refuse):
                await self._refuse(alloc.app, step)
            if not isinstance(step, Wait):
                return alloc
            alloc = await self.client.watch_allocation(
                alloc.id, alloc.version, timeout=step.seconds
            )

    async def _refuse(self, app: str, refusal: Refuse) -> NoReturn:
        """Carry out a refusal: drain the allocation it names, then raise it."""
        if refusal.drain_allocation:
            await self._drain_quietly(app, refusal.drain_allocation)
        raise WakeRefused.of(refusal)

    async def _probe(
        self, alloc: Allocation, spec: WakeAppSpec, deadline: float, expected: float
    ) -> Allocation | None:
        """Readiness: GET the path, pausing as `decisions.probe_pause` says (`expected`: the
        previous wake's readiness phase, s; 0 unknown); the control plane's own `ready`
        (seen by a concurrent watch) counts at once. None: not ready in time."""
        host, _, port = alloc.address.rpartition(":")
        ready = asyncio.Event()
        probed = asyncio.Event()  # the probe is over: the watch stops even if not cancelled
        latest = [alloc]

        async def watch() -> None:
            current = alloc
            while current.state != "ready" and self.clock() < deadline and not probed.is_set():
                if current.state in ("failed", "stopped"):
                    return
                current = await self.client.watch_allocation(
                    current.id, current.version, timeout=min(5.0, deadline - self.clock())
                )
                latest[0] = current
            if current.state == "ready":
                ready.set()

        watcher = asyncio.get_running_loop().create_task(watch(), name="wake readiness watch")
        began = self.clock()
        try:
            while self.clock() < deadline and not ready.is_set():
                refused = False
                try:
                    status, _ = await http_get(
                        host,
                        int(port),
                        spec.readiness_path,
                        min(PROBE_TIMEOUT, max(0.01, deadline - self.clock())),
                        body=False,
                        user_agent=PROBE_USER_AGENT,
                    )
                    if decisions.allocation_passes_readiness(status):
                        return latest[0]
                except ConnectionRefusedError:
                    refused = True
                except (OSError, TimeoutError, ValueError):
                    pass
                pause = decisions.probe_pause(
                    self.clock() - began,
                    refused=refused,
                    expected=expected,
                    interval=spec.readiness_probe_interval,
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(pause, max(0.0, deadline - self.clock()))):
                        await ready.wait()
            return latest[0] if ready.is_set() else None
        finally:
            probed.set()
            await self._stop(spec.name, watcher)

    async def _epoch_replaced(self, app: str, alloc: Allocation) -> bool:
        """True when a promotion replaced the app's route after this allocation was granted.

        Unless the control plane decided it (it saw the allocation ready first), the
        promoted epoch is the route table this process follows (`promoted_epochs`: the
        control plane's change feed, a long poll it answers on every change), else a
        snapshot asked for now. Either can miss a promotion made in the last
        milliseconds, the snapshot while its answer travels; the table spares the wake a
        control-plane round trip between the app answering and `hot`."""
        promoted: int | None = None
        if decisions.needs_route_snapshot(alloc):
            known = self.promoted_epochs()
            if known is None:
                snapshot = await self.client.route_snapshot()
                known = {r.app: r.promoted_epoch for r in snapshot.apps}
            promoted = known.get(app)
        return decisions.epoch_replaced(alloc, promoted)

    async def _fail(self, app: str, lease: Lease, reason: str, reason_code: str = "") -> None:
        with contextlib.suppress(_LeaseLost, Exception):
            state = await self.store.read_state(app)
            spec = self.apps.get(app)
            base = spec.wake_backoff if spec is not None else decisions.BACKOFF_BASE
            backoff = decisions.record_failure(state.failures, self.wall_clock(), base)
            await self._move(
                state,
                "failed",
                lease,
                reason,
                reason_code,
                failures=backoff.failures,
                next_wake_at=backoff.next_wake_at,
            )

    async def _drain_quietly(self, app: str, allocation_id: str, deadline: float = 0.0) -> None:
        self.stop_routing(app, allocation_id)
        with contextlib.suppress(ControlPlaneError):
            await self.client.drain_allocation(allocation_id, deadline)

    # ------------------------------------------------------------------ upkeep

    async def mark_seen(self) -> set[str]:
        """Publish last-seen for apps seen here since the last call, and for every app with
        requests or tunnels in flight here: it stays fresh while anything is in flight."""
        seen, self._seen = self._seen, set()
        seen.update(app for app in self.apps if self.in_flight(app) > 0)
        for app in seen:
            await self.store.touch(app)
        return seen

    async def upkeep(self) -> None:
        """Once a second: publish last-seen, refresh hot views, sleep idle apps."""
        seen = await self.mark_seen()
        for app in list(self._hot):
            state = await self.store.read_state(app)
            if not decisions.is_hot(state):
                self._hot.pop(app, None)
                continue
            self._hot[app] = HotTarget(state.address, state.allocation_id, state.last_wake)
            spec = self.apps.get(app)
            busy, was_seen = self.in_flight(app), app in seen
            # Ask the store for idleness only when nothing here says the app is busy.
            if spec is None or not decisions.may_sleep(state, busy, was_seen):
                continue
            idle = await self.store.idle_for(app)
            if decisions.should_sleep(
                state, idle=idle, idle_timeout=spec.idle_timeout, in_flight=busy, seen=was_seen
            ):
                await self._sleep(app, spec)

    async def _sleep(self, app: str, spec: WakeAppSpec) -> None:
        owner = f"{self.edge_id}:{os.getpid()}:sleep"
        lease = await self.store.acquire_lease(app, owner, self.lease_ttl)
        if lease is None:
            return
        try:
            state = await self.store.read_state(app)
            idle = await self.store.idle_for(app)
            # Re-checked under the lease: another edge may have woken or slept it meanwhile.
            if idle is None or not decisions.should_sleep(
                state, idle=idle, idle_timeout=spec.idle_timeout
            ):
                return
            # Before the store says sleeping: no request from here may go to it after that.
            self.stop_routing(app, state.allocation_id)
            state = await self._move(state, "sleeping", lease, f"idle for {idle:.0f}s")
            allocation_id = state.allocation_id
            try:
                alloc = await self.client.drain_allocation(allocation_id, SLEEP_DRAIN_DEADLINE)
            except ControlPlaneError:
                # Not put to drain: it serves whatever the route table still sends it, as
                # the other processes do.
                self.resume_routing(app, allocation_id)
            else:
                with contextlib.suppress(ControlPlaneError):
                    deadline = self.clock() + SLEEP_DRAIN_DEADLINE + 30.0
                    while alloc.state not in ("stopped", "failed") and self.clock() < deadline:
                        await self.store.renew_lease(app, owner, self.lease_ttl)
                        alloc = await self.client.watch_allocation(alloc.id, alloc.version, 5.0)
            await self._move(
                state,
                "cold",
                lease,
                decisions.DRAINED,
                allocation_id="",
                allocation_key="",
                address="",
                route_epoch=0,
            )
        except _LeaseLost:
            return
        finally:
            await self.store.release_lease(app, owner)

    async def close(self) -> None:
        self._closing = True  # counts from here on wait for the last flush below
        tasks = [*self._flights.values(), *self._background]
        if self._flusher is not None:
            tasks.append(self._flusher)
        # Bounded: a flight or helper whose cancellation was lost ends by its own check.
        await stop_tasks(tasks, CLOSE_STOP_TIMEOUT, what="wake close", errors=logging.DEBUG)
        # What was counted up to now still reaches the store, if it answers in time.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT):
                while self.tally.has_work() and await self.flush_gallery():
                    pass
        if self.tally.has_work():
            log.warning("gallery counts not stored at close: %s", self.tally.total())
        await self.client.close()
        await self.store.close()

    # ------------------------------------------------------------ gallery counts

    def _tally(self, keys: tuple[str, ...]) -> None:
        """Count toward the region-wide gallery; flushed by a task at most every ~0.5 s."""
        if not keys:
            return
        self.tally.add(keys)
        if not self._closing and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self._flush_pending())

    async def _flush_pending(self) -> None:
        """Flush every FLUSH_EVERY (backing off while the store fails) until nothing is left."""
        while self.tally.has_work():
            await asyncio.sleep(gallery_tally.flush_pause(self.tally.failures))
            await self.flush_gallery()

    async def flush_gallery(self) -> bool:
        """Send the batch due to the store in one call; False (kept for the next try) when
        the store did not take it."""
        batch = self.tally.next_batch()
        if batch is None:
            return True
        try:
            await self.store.add_counts(batch.deltas, writer=self.tally.writer, seq=batch.seq)
        except Exception as exc:  # any: the counts are kept, and the task must not die
            if not self.tally.failures:
                log.warning("gallery counts not stored (%r); kept and retried", exc)
            self.tally.failed()
            return False
        self.tally.sent(batch.seq)
        return True

    def _phase(self, phase: str, seconds: float) -> None:
        totals = self.phases.get(phase)
        if totals is None:
            totals = self.phases[phase] = [0.0, 0] + [0] * (len(PHASE_BUCKETS) + 1)
        totals[0] += seconds
        totals[1] += 1
        totals[2 + bisect.bisect_left(PHASE_BUCKETS, seconds)] += 1

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1
