"""Follows the control plane's route table: snapshot, then the change feed; acks each epoch.

One follower per worker (each worker is an edge to the control plane: it
registers, long-polls, and acks what it has applied), so a promotion's
`edge_propagating` waits for exactly the processes that route requests. When
the control plane is unreachable the last table keeps serving and the follower
reports its age; a gap or a 410 from the feed triggers a snapshot resync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from edge.routing.route_table import Outcome, RouteTable, apply_changes, from_snapshot
from scheduler_client import backoff
from scheduler_client.client import ControlPlaneClient
from scheduler_client.models import ControlPlaneError, Gone, Region
from scheduler_client.task_stop import stop_tasks

RETRY_MIN = 0.2
RETRY_MAX = 5.0
# Region changes carry no route epoch, so the region is re-read at this pace.
REGION_REFRESH = 2.0

logger = logging.getLogger(__name__)


class RouteFollower:
    def __init__(
        self,
        client: ControlPlaneClient,
        edge_id: str,
        on_table: Callable[[RouteTable], None],
        *,
        poll_timeout: float = 25.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.edge_id = edge_id
        self.on_table = on_table
        self.poll_timeout = poll_timeout
        self.clock = clock
        self.table: RouteTable | None = None
        self.last_contact: float | None = None
        self.stale = False
        self.refused = 0
        self.resyncs = 0
        self.acks = 0
        self.ack_seconds = 0.0
        self.failures = 0
        self.resync_needed = False
        self._poll_started: float | None = None
        # The region's state as last read; only an `eligible` region starts wakes.
        self.region: Region | None = None
        self._stopping = False

    def age(self) -> float | None:
        """Seconds the table has gone unconfirmed (None before the first answer).

        A long-poll in progress is the control plane holding the line, not silence:
        it counts only once it runs past its own timeout.
        """
        if self.last_contact is None:
            return None
        now = self.clock()
        if self._poll_started is not None:
            return max(0.0, now - self._poll_started - self.poll_timeout)
        return now - self.last_contact

    def stop(self) -> None:
        """Follow no more: checked by the loops each turn, as a cancellation can be lost."""
        self._stopping = True

    async def run(self) -> None:
        """Follow until stopped or cancelled; every failure is retried with back-off."""
        followed = asyncio.Event()  # the region watch stops on it, cancelled or not
        region = asyncio.get_running_loop().create_task(
            self._watch_region(followed), name="region watch"
        )
        try:
            await self._follow_forever()
        finally:
            followed.set()
            await stop_tasks([region], what="route follower")

    async def _watch_region(self, followed: asyncio.Event) -> None:
        """Region changes carry no route epoch: re-read the region every REGION_REFRESH."""
        while not followed.is_set():
            try:
                self.region = await self.client.get_region()
            except (ControlPlaneError, OSError, TimeoutError) as exc:  # the feed reports it
                logger.debug("region not refreshed: %s", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REGION_REFRESH):
                    await followed.wait()

    async def _follow_forever(self) -> None:
        failed_in_a_row = 0
        registered = False
        while not self._stopping:
            try:
                if not registered:
                    await self.client.register_edge(self.edge_id)
                    registered = True
                if self.table is None or self.resync_needed:
                    await self._resync()
                else:
                    # After a failure, ask without waiting: the first answer ends `stale`
                    # at once, not when a whole long-poll has been held.
                    await self._follow(0.0 if failed_in_a_row else self.poll_timeout)
                self._contact()
                failed_in_a_row = 0
            except Gone:
                # The feed no longer holds our epoch: resync; the current table keeps serving.
                logger.debug("routes: the feed no longer holds our epoch; resyncing")
                self.resyncs += 1
                self.resync_needed = True
                self._contact()
            except (ControlPlaneError, OSError, TimeoutError) as exc:
                self.failures += 1
                if not self.stale:
                    self.stale = True
                    logger.warning(
                        "routes: control plane unreachable (%s); serving the last table (epoch %s)",
                        exc,
                        self.table.epoch if self.table else "none",
                    )
                else:
                    logger.debug("routes: control plane still unreachable: %s", exc)
                await asyncio.sleep(backoff.delay(failed_in_a_row, RETRY_MIN, RETRY_MAX))
                failed_in_a_row += 1

    def _contact(self) -> None:
        self.last_contact = self.clock()
        if self.stale:
            self.stale = False
            logger.info("routes: control plane reachable again")

    async def _resync(self) -> None:
        snapshot = await self.client.route_snapshot()
        self._contact()
        self.resync_needed = False
        if snapshot.region is not None:
            self.region = snapshot.region
        self._publish(from_snapshot(snapshot))
        await self._ack()

    async def _follow(self, poll_timeout: float) -> None:
        assert self.table is not None
        self._poll_started = self.clock()
        try:
            feed = await self.client.route_changes(
                self.table.epoch, timeout=poll_timeout, edge_id=self.edge_id
            )
        finally:
            self._poll_started = None
        self._contact()
        result = apply_changes(self.table, feed.changes)
        self.refused += result.refused
        if result.refused:
            logger.debug("routes: %d change(s) refused (old route epoch)", result.refused)
        if result.outcome is Outcome.GAP:
            logger.debug("routes: gap after epoch %d; resyncing", self.table.epoch)
            self.resyncs += 1
            await self._resync()
        elif result.outcome is Outcome.APPLIED:
            self._publish(result.table)
            await self._ack()

    def _publish(self, table: RouteTable) -> None:
        logger.debug("routes: table at epoch %d", table.epoch)
        self.table = table
        self.on_table(table)

    async def _ack(self) -> None:
        assert self.table is not None
        started = self.clock()
        await self.client.ack_epoch(self.edge_id, self.table.epoch)
        self.acks += 1
        self.ack_seconds += self.clock() - started
