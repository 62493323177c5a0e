"""Replays each app's durable queue once the app is hot: in order, once, or dead-lettered.

Theory of operation. Every worker scans the apps that have a replay policy about
once a second (and at once after it queued something). An app with queued
requests is woken; once it is hot, the worker that wins the app's replayer lease
delivers entries one at a time, oldest first, so per-app order holds while the
apps of a region spread over every edge. Each delivery is counted before it is
sent (`begin`); a 2xx marks the dedupe record delivered and acks in one script;
4xx, a 101 or other 1xx taken as the answer, and bytes that are not HTTP go to the
dead letters at once (the reason says why), so one entry never blocks the queue;
5xx, timeouts and connection errors are retried with back-off until max_attempts,
then dead-lettered. A replayer that dies leaves its entries
pending; the next lease holder claims them once idle for `claim_idle` (or at once
when it is the same worker restarted, which reads its own pending entries first).
Every replay write is fenced by the lease's token (checked in its Lua script): a
replayer whose lease lapsed and was taken over gets LeaseLost and stops. A send to
the app cannot be fenced by the store, so it is fenced by the replayer's own term
(LeaseTerm: its clock, a margin inside the TTL, ended by a refused renewal): the
request's last byte is written only when the term, asked right then with no await
before the write, is still valid; a replayer frozen or starved past it sends nothing
the app could act on. The lease renewer stops on the replay's end, checked each turn,
not only on cancel() (which a redis-py call can lose), and is waited for a bounded
time (`stop_tasks`), so a replay that ended always lets its lease go.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from edge.queue.durable_queue import (
    DroppedDeadLetter,
    DurableQueue,
    LeaseLost,
    QueuedRequest,
    id_ms,
)
from edge.queue.replay_delivery import DeliveryFailed, NotSent, ReplayConnection
from edge.queue.replay_policy import LeaseTerm, Outcome, dead_reason, outcome_of, retry_delay
from edge.server.config import AppConfig
from scheduler_client import backoff
from scheduler_client.task_stop import stop_tasks
from wake.controller import HotTarget, WakeController
from wake.store.protocol import Lease, StoreUnavailable

SCAN_INTERVAL = 1.0
LEASE_TTL = 10.0
BATCH = 32
# Bodies of one batch held in memory at most (a batch is at least one entry).
BATCH_BYTES = 8 * 1024 * 1024
# While another edge's entries wait out claim_idle, or the store is down.
PAUSE = 0.5
T = TypeVar("T")
# How long a delivery's known outcome is retried while the store is away.
OUTCOME_WRITE_FOR = 60.0

logger = logging.getLogger(__name__)


class Replayer:
    """One worker's replay loop over every app that can queue."""

    def __init__(
        self,
        queue: DurableQueue,
        wake: WakeController,
        consumer: str,
        apps: Callable[[], dict[str, AppConfig]],
        count: Callable[[str, str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue = queue
        self.wake = wake
        self.consumer = consumer
        self.owner = f"{consumer}/{os.getpid()}"
        self.apps = apps
        self.count = count
        # Lease terms are counted and checked on it: read at each call (never a time
        # cached before an await), as it must be right before a delivery's last byte.
        self.clock = clock
        self._running: dict[str, asyncio.Task[None]] = {}
        self._poke = asyncio.Event()
        self._stopping = False
        self._last_problem: dict[str, str] = {}  # logged once per app until it changes
        self._lost_events: set[asyncio.Event] = set()  # one per app being replayed here

    def _stop_all(self) -> None:
        for event in self._lost_events:
            event.set()

    def poke(self) -> None:
        """Something was queued here: scan now rather than within the second."""
        self._poke.set()

    async def run(self) -> None:
        while not self._stopping:
            for name, app in self.apps().items():
                if name not in self._running:
                    task = asyncio.get_running_loop().create_task(self._replay_if_queued(app))
                    self._running[name] = task
                    task.add_done_callback(lambda _t, name=name: self._running.pop(name, None))
            self._poke.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SCAN_INTERVAL):
                    await self._poke.wait()

    async def _replay_if_queued(self, app: AppConfig) -> None:
        try:
            queued, _ = await self.queue.depth(app.name)
            if not queued:
                return
            policy = app.replay
            assert policy is not None
            # Before any wake: what waited past its retention is dead-lettered even
            # while the app cannot be woken, so the queue never fills with the expired.
            expired, dropped = await self.queue.expire(
                app.name, float(policy.retention), policy.max_dead_letters
            )
            for _ in range(expired):
                self.count(app.name, "dead_lettered")
            self._dropped(app, dropped)
            target = await self.wake.ensure_hot(app.name, float(app.hold_timeout))
            if self._stopping:
                return  # closed meanwhile (its cancellation may have been lost): no new lease
            asked = self.clock()
            lease = await self.queue.acquire_replayer(app.name, self.owner, LEASE_TTL)
            if lease is None:
                logger.debug("app %s: %d queued, replayed by another edge", app.name, queued)
                return
            logger.debug("app %s: replaying %d queued to %s", app.name, queued, target.address)
            try:
                await self._replay_holding(app, target, lease, LeaseTerm(LEASE_TTL, asked))
            finally:
                try:
                    await self.queue.release_replayer(app.name, lease)
                except StoreUnavailable as exc:  # the lease runs out by itself
                    logger.debug("app %s: replayer lease not released: %s", app.name, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # store down, wake refused or timed out: next scan retries
            problem = f"{type(exc).__name__}: {exc}"
            if self._last_problem.get(app.name) != problem:
                self._last_problem[app.name] = problem
                logger.warning("replay of app %s paused: %s", app.name, problem)
            else:
                logger.debug("replay of app %s still paused: %s", app.name, problem)
            await asyncio.sleep(PAUSE)
        else:
            if self._last_problem.pop(app.name, None) is not None:
                logger.info("replay of app %s resumed", app.name)

    async def _replay_holding(
        self, app: AppConfig, target: HotTarget, lease: Lease, term: LeaseTerm
    ) -> None:
        lost = asyncio.Event()  # set when the lease is lost, or on shutdown
        over = asyncio.Event()  # set when this replay ends: the renewer stops on it
        self._lost_events.add(lost)
        renewer = asyncio.get_running_loop().create_task(
            self._renew(app.name, lease, lost, term, over), name="replay lease renewer"
        )
        connection = ReplayConnection()

        def within_term() -> bool:
            # Asked right before each write of a delivery, the clock read then.
            return term.valid(self.clock())

        try:
            await self._replay_batches(app, target, lease, lost, connection, within_term)
        except LeaseLost:
            # Every replay write checks the lease: one refused means another edge holds
            # the app now (ours lapsed: a failover, a long pause), and it replays from here.
            self.count(app.name, "lease_lost")
            logger.info("app %s: replayer lease lost; another edge takes over", app.name)
        finally:
            over.set()  # before the cancel, which a renewal in its Redis call can lose
            self._lost_events.discard(lost)
            connection.close()
            # Bounded: the lease is released after this, whether the renewer ended or not.
            if await stop_tasks([renewer], what=f"replay of app {app.name}"):
                self.count(app.name, "renewer_stuck")

    async def _replay_batches(
        self,
        app: AppConfig,
        target: HotTarget,
        lease: Lease,
        lost: asyncio.Event,
        connection: ReplayConnection,
        within_term: Callable[[], bool],
    ) -> None:
        while not lost.is_set() and not self._stopping:
            policy = app.replay
            assert policy is not None
            count = max(1, min(BATCH, BATCH_BYTES // max(1, int(policy.max_body))))
            batch = await self.queue.next_batch(
                app.name, self.consumer, float(policy.claim_idle), count, lease
            )
            if batch is None:
                await asyncio.sleep(PAUSE)
                continue
            if not batch:
                return
            now_ms = await self.queue.server_ms()
            begun: int | None = None  # the next entry's attempt, begun with a finish
            for i, entry in enumerate(batch):
                if lost.is_set() or self._stopping:
                    return
                if now_ms - id_ms(entry.id) > policy.retention * 1000:
                    logger.debug("app %s: %s expired in the queue", app.name, entry.id)
                    dropped = await self.queue.dead_letter(
                        app.name, entry, lease, "expired", 0, 0, policy.max_dead_letters
                    )
                    self._dropped(app, dropped)
                    self.count(app.name, "dead_lettered")
                    begun = None
                    continue
                after = batch[i + 1] if i + 1 < len(batch) else None
                target, begun = await self._deliver(
                    app, entry, target, connection, begun, after, lost, lease, within_term
                )
            app = self.apps().get(app.name, app)  # a reload changes the policy

    async def _deliver(
        self,
        app: AppConfig,
        entry: QueuedRequest,
        target: HotTarget,
        conn: ReplayConnection,
        begun: int | None,
        after: QueuedRequest | None,
        lost: asyncio.Event,
        lease: Lease,
        within_term: Callable[[], bool],
    ) -> tuple[HotTarget, int | None]:
        """Deliver until done or dead-lettered. Returns the target for the next entry and,
        when the finish began `after` too, its attempt number. Each write of the request
        is made only `within_term`."""
        policy = app.replay
        assert policy is not None
        while True:
            if lost.is_set() or self._stopping:
                return target, None  # the entry stays pending; whoever replays next has it
            attempt = begun if begun is not None else await self.queue.begin(app.name, entry, lease)
            begun = None
            if attempt == 0:
                self.count(app.name, "already_done")
                return target, None
            extra = b"X-Edge-Queued-Id: %b\r\nX-Edge-Replay-Attempt: %d\r\n" % (
                entry.id.encode(),
                attempt,
            )
            self.wake.seen(app.name)
            status: int | None
            try:
                status = await conn.deliver(
                    target.address,
                    entry.method,
                    entry.head,
                    entry.body,
                    extra,
                    float(policy.attempt_timeout),
                    within_term,
                )
                error, final = f"status {status}", False
            except NotSent:
                # Frozen (or starved) past our own term, or a renewal was refused: the
                # lease may be another edge's by now, so sending could deliver twice. The
                # app has no whole request of this attempt; the entry stays pending.
                self.count(app.name, "lease_lost")
                logger.info("app %s: replayer lease term over; %s not sent", app.name, entry.id)
                lost.set()
                return target, None
            except DeliveryFailed as exc:
                status, error, final = None, str(exc), exc.final
                if not final:  # the app answered, badly: it is still there
                    self.wake.forget_hot(app.name, target.address)
            outcome = outcome_of(status, attempt, policy.max_attempts, final)
            self.count(app.name, outcome.value)
            logger.debug(
                "app %s: %s attempt %d: %s -> %s",
                app.name,
                entry.id,
                attempt,
                error,
                outcome.value,
            )
            if outcome is Outcome.DONE:
                then = await self._known_outcome(
                    app.name, functools.partial(self.queue.finish, app.name, entry, lease, after)
                )
                return target, then
            if outcome is Outcome.DEAD:
                reason = dead_reason(status, error, attempt, policy.max_attempts, final)
                dropped = await self._known_outcome(
                    app.name,
                    functools.partial(
                        self.queue.dead_letter,
                        app.name,
                        entry,
                        lease,
                        reason,
                        status or 0,
                        attempt,
                        policy.max_dead_letters,
                    ),
                )
                self._dropped(app, dropped)
                return target, None
            delay = retry_delay(attempt, float(policy.backoff_initial), float(policy.backoff_max))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await lost.wait()  # a lost lease or a shutdown ends the back-off early
            if self._stopping:
                return target, None
            target = await self.wake.ensure_hot(app.name, float(app.hold_timeout))

    async def _known_outcome(self, app: str, write: Callable[[], Awaitable[T]]) -> T:
        """Record an outcome the app already gave, riding out a store outage (bounded):
        forgetting it would send the request again once the store is back."""
        deadline = asyncio.get_running_loop().time() + OUTCOME_WRITE_FOR
        for failures in itertools.count():
            try:
                return await write()
            except StoreUnavailable as exc:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0 or self._stopping:
                    raise
                if not failures:
                    logger.warning("app %s: recording a delivery's outcome: %s; retrying", app, exc)
                await asyncio.sleep(min(left, backoff.delay(failures, 0.1, 2.0)))
        raise StoreUnavailable("unreachable")  # itertools.count() never ends

    def _dropped(self, app: AppConfig, dropped: list[DroppedDeadLetter]) -> None:
        """Dead letters dropped by the cap: each is counted and logged, since its request
        is gone for good (nothing else records it)."""
        if not dropped:
            return
        for _ in dropped:
            self.count(app.name, "dead_letter_trimmed")
        cap = app.replay.max_dead_letters if app.replay is not None else 0
        logger.warning(
            "app %s: %d dead letter(s) dropped, over max_dead_letters = %d: %s",
            app.name,
            len(dropped),
            cap,
            "; ".join(
                f"queued id {d.queued_id} (dead letter {d.id}, key {d.key}, {d.reason})"
                for d in dropped
            ),
        )

    async def _renew(
        self, app: str, lease: Lease, lost: asyncio.Event, term: LeaseTerm, over: asyncio.Event
    ) -> None:
        """Renew the replay lease every LEASE_TTL/3 until the replay holding it is `over`
        (checked after each pause and each renewal, not left to a cancellation) or refused."""
        while not over.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LEASE_TTL / 3):
                    await over.wait()
            if over.is_set():
                return
            asked = self.clock()  # before the ask: the store's TTL starts no earlier
            try:
                renewed = await self.queue.renew_replayer(app, lease, LEASE_TTL)
            except StoreUnavailable as exc:
                # Keep trying within the TTL; the lease may still be ours.
                logger.debug("app %s: replayer lease not renewed: %s", app, exc)
                continue
            if over.is_set():
                return  # ended during the call: the lease is being let go, not renewed again
            if not renewed:
                logger.info("app %s: replayer lease lost; another edge takes over", app)
                term.end()  # a delivery under way must not send its last byte now
                lost.set()
                return
            term.renewed(asked)

    async def close(self, grace: float = 5.0) -> None:
        """Stop taking entries; a delivery in progress gets `grace` seconds to finish, so
        the app is not handed the same request again by the next replayer."""
        self._stopping = True
        self._poke.set()
        self._stop_all()
        tasks = list(self._running.values())
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        # Each stops on _stopping too (a lost cancellation); the store call it is in is bounded.
        await stop_tasks(tasks, what="replayer close")
