"""Gathers the gallery's inputs for the admin listener; `gallery.py` builds the document.

Theory of operation. Two sources are asked, each by one shared refresh at a time:
the wake store (counters, the apps' states, the journal, the budget, queue depths)
at most every STORE_INTERVAL, the control plane (its machine report and
allocations) at most every CONTROL_PLANE_INTERVAL, however many viewers poll.
Every call is bounded by CALL_TIMEOUT and the calls of one refresh run together,
so an answer never waits much longer than that. A call that fails keeps the last
answer of that part and marks the source stale (`gallery.source_status`); nothing
here raises, so the page is served while Redis or the control plane is down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import yarl

from edge.ops.gallery import (
    MAX_TRANSITIONS,
    AppInput,
    ControlPlaneData,
    ControlPlaneStatus,
    Gallery,
    GalleryInputs,
    Sources,
    SourceStatus,
    StoreData,
    gallery_view,
    source_status,
)
from edge.ops.worker_stats import StatsSnapshot
from edge.server.config import replay_apps
from edge.server.worker_context import WorkerContext
from scheduler_client.client import ControlPlaneClient
from scheduler_client.models import NotFound

CALL_TIMEOUT = 1.0
CONTROL_PLANE_INTERVAL = 1.0
STORE_INTERVAL = 0.5


def public_name(url: str) -> str:
    """A store or control plane address fit to show: no user, password or query."""
    try:
        parsed = yarl.URL(url)
        return str(parsed.with_user(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return url.partition("://")[0] + "://"


def due(started_at: float | None, now: float, interval: float) -> bool:
    """Whether a source may be asked again: never asked, or asked `interval` ago."""
    return started_at is None or now - started_at >= interval


def summary(errors: dict[str, str]) -> str:
    """One line for a source's failed calls: the message once when they all say the same."""
    messages = list(dict.fromkeys(errors.values()))
    if len(messages) == 1:
        return messages[0]
    return "; ".join(f"{call}: {message}" for call, message in errors.items())


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer in {CALL_TIMEOUT:g}s"
    text = str(exc)
    return text or type(exc).__name__


async def _bounded(call: Awaitable[Any]) -> Any:
    async with asyncio.timeout(CALL_TIMEOUT):
        return await call


class _Refresh:
    """Runs `fetch` at most once per `interval`; concurrent callers share the one running."""

    def __init__(
        self, fetch: Callable[[], Awaitable[None]], interval: float, clock: Callable[[], float]
    ) -> None:
        self.fetch = fetch
        self.interval = interval
        self.clock = clock
        self.started_at: float | None = None
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        if (self.task is None or self.task.done()) and due(
            self.started_at, self.clock(), self.interval
        ):
            self.started_at = self.clock()
            self.task = asyncio.get_running_loop().create_task(self.fetch())
        if self.task is not None:
            # Shielded: a viewer that leaves does not cancel the others' refresh.
            await asyncio.shield(self.task)


class GalleryFeed:
    """The last answers of each source, refreshed on demand, turned into the gallery."""

    def __init__(
        self,
        ctx: WorkerContext,
        snapshots: Callable[[], list[StatsSnapshot]],
        client: ControlPlaneClient | None,
        *,
        edge_id: str,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.ctx = ctx
        self.snapshots = snapshots
        self.client = client
        self.edge_id = edge_id
        self.wall_clock = wall_clock
        self.store_data = StoreData()
        self.cp_data = ControlPlaneData()
        config = ctx.config
        self.store_status = SourceStatus(name=public_name(config.edge.store), ok=True)
        url = config.control_plane.url
        self.cp_status = ControlPlaneStatus(
            name=public_name(url) if url else "",
            ok=client is not None,
            error="" if client is not None else "no control plane configured",
            configured=client is not None,
        )
        self._store = _Refresh(self._fetch_store, STORE_INTERVAL, clock)
        self._cp = _Refresh(self._fetch_control_plane, CONTROL_PLANE_INTERVAL, clock)

    async def gallery(self) -> Gallery:
        """The gallery now: sources asked if due (bounded), the rest from their last answers."""
        refreshes = [self._store.run()]
        if self.client is not None:
            refreshes.append(self._cp.run())
        await asyncio.gather(*refreshes)
        return gallery_view(self.inputs(), self.wall_clock())

    def inputs(self) -> GalleryInputs:
        ctx = self.ctx
        config = ctx.config
        wake = ctx.wake
        queued = replay_apps(config) if ctx.queue is not None else {}
        held: dict[str, int] = {}
        for snapshot in self.snapshots():
            for app, n in snapshot.held_by_app.items():
                held[app] = held.get(app, 0) + n
        apps = [
            AppInput(
                name=app.name,
                tenant=app.tenant,
                scale_to_zero=app.scale_to_zero,
                queue=app.name in queued,
                held=held.get(app.name, 0),
                hot_here=wake is not None and wake.hot_target(app.name) is not None,
            )
            for app in config.apps
        ]
        return GalleryInputs(
            edge_id=self.edge_id,
            apps=apps,
            budget_limits=wake.budget if wake is not None else None,
            counts_scope="edge" if config.edge.store.startswith("memory://") else "region",
            store=self.store_data,
            control_plane=self.cp_data,
            sources=Sources(store=self.store_status, control_plane=self.cp_status),
        )

    async def _fetch_store(self) -> None:
        wake = self.ctx.wake
        if wake is None:
            self.store_status = msgspec.structs.replace(
                self.store_status, ok=False, stale_since=None, error="unused: no app scales to zero"
            )
            return
        config = self.ctx.config
        names = [app.name for app in config.apps if app.scale_to_zero]
        queue = self.ctx.queue
        queued = list(replay_apps(config)) if queue is not None else []
        calls: dict[str, Awaitable[Any]] = {
            "counts": wake.store.counts(),
            "states": wake.store.read_states(names),
            "transitions": wake.store.transitions(None, MAX_TRANSITIONS),
            "budget": wake.store.budget_usage(wake.budget),
        }
        for name in queued:
            calls["depth:" + name] = queue.depth(name)  # type: ignore[union-attr]
        results = await asyncio.gather(*map(_bounded, calls.values()), return_exceptions=True)
        answered = dict(zip(calls, results, strict=True))
        errors = {k: _describe(v) for k, v in answered.items() if isinstance(v, Exception)}
        fresh = {k: v for k, v in answered.items() if not isinstance(v, BaseException)}
        data = self.store_data
        states = data.states
        if "states" in fresh:
            states = {**(states or {}), **{s.app: s for s in fresh["states"]}}
        depths = {k.partition(":")[2]: v for k, v in fresh.items() if k.startswith("depth:")}
        self.store_data = StoreData(
            counts=fresh.get("counts", data.counts),
            states=states,
            transitions=fresh.get("transitions", data.transitions),
            budget=fresh.get("budget", data.budget),
            depths={**data.depths, **depths},
        )
        self.store_status = source_status(
            self.store_status, ok=not errors, error=summary(errors), now=self.wall_clock()
        )

    async def _fetch_control_plane(self) -> None:
        client = self.client
        assert client is not None
        report, allocations = await asyncio.gather(
            _bounded(client.machine_report()),
            _bounded(client.list_allocations()),
            return_exceptions=True,
        )
        errors: dict[str, str] = {}
        data = self.cp_data
        if isinstance(report, NotFound):
            report = None  # a control plane without the report: its machines are unreported
        elif isinstance(report, Exception):
            errors["report"] = _describe(report)
            report = data.report
        if isinstance(allocations, Exception):
            errors["allocations"] = _describe(allocations)
            allocations = data.allocations
        self.cp_data = ControlPlaneData(report=report, allocations=allocations)  # type: ignore[arg-type]
        self.cp_status = source_status(
            self.cp_status, ok=not errors, error=summary(errors), now=self.wall_clock()
        )
