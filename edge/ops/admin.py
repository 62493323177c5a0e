"""Admin listener (worker 0): health, readiness, metrics, reload and queues; a bearer token
guards every mutating call (and every read when the operator set the token)."""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
from aiohttp import web

from edge.ops.admin_token import AdminToken, admin_may
from edge.ops.gallery_feed import GalleryFeed
from edge.ops.gallery_page import add_gallery_page
from edge.ops.metrics import render_metrics
from edge.ops.worker_stats import StatsSnapshot, read_snapshots
from edge.queue.durable_queue import DurableQueue
from edge.server.config import (
    AppConfig,
    ConfigError,
    load_config,
    replay_apps,
    restart_keys,
    restart_refusal,
)
from edge.server.worker_context import WorkerContext, count_config_check
from scheduler_client.client import ControlPlaneClient
from scheduler_client.config_file import parse_address
from wake.store.protocol import StoreUnavailable

MAX_LIST = 1000
STALE_AFTER = 5.0

logger = logging.getLogger(__name__)


class Readiness(msgspec.Struct):
    ready: bool
    reason: str
    workers_expected: int
    workers_reporting: int
    route_epoch: int | None = None
    # Seconds since the control plane last answered; grows while it is unreachable.
    route_table_age_s: float | None = None
    routes_stale: bool = False


class AdminState:
    """What the admin handlers read: this worker's context and the shared stats folder."""

    def __init__(
        self,
        ctx: WorkerContext,
        stats_dir: Path,
        workers: int,
        config_path: str,
        supervised: bool,
        *,
        edge_id: str = "",
        control_plane: ControlPlaneClient | None = None,
    ) -> None:
        self.ctx = ctx
        self.stats_dir = stats_dir
        self.workers = workers
        self.config_path = config_path
        self.supervised = supervised
        self.serving = False
        # The gallery's own client (short timeout, no retries), so a slow control plane
        # neither holds the page nor spends the wake's retries and breaker.
        self.gallery = GalleryFeed(ctx, self.snapshots, control_plane, edge_id=edge_id)

    def snapshots(self) -> list[StatsSnapshot]:
        """Other workers' files plus this worker's live counters."""
        now = time.time()
        own = self.ctx.stats.snapshot()
        others = [
            s
            for s in read_snapshots(self.stats_dir)
            if s.index != own.index and now - s.written_at < STALE_AFTER
        ]
        return [own, *others]

    def readiness(self) -> Readiness:
        reporting = len(self.snapshots())
        if not self.serving:
            reason = "not serving yet"
        elif self.ctx.draining:
            reason = "shutting down"
        elif reporting < self.workers:
            reason = f"{reporting} of {self.workers} workers reporting"
        elif self.ctx.follower is not None and self.ctx.route_table is None:
            reason = "no route snapshot applied yet"
        else:
            reason = "ok"
        follower = self.ctx.follower
        table = self.ctx.route_table
        age = follower.age() if follower is not None else None
        return Readiness(
            reason == "ok",
            reason,
            self.workers,
            reporting,
            route_epoch=table.epoch if table is not None else None,
            route_table_age_s=round(age, 3) if age is not None else None,
            routes_stale=bool(follower and follower.stale),
        )


def _auth_middleware(token: AdminToken) -> Callable:
    expected = f"Bearer {token.value}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Callable[..., Awaitable]) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        authorized = hmac.compare_digest(given, expected)
        if not admin_may(request.method, request.path, authorized, token.reads_open):
            where = f" (in {token.path})" if token.path else ""
            return web.Response(
                status=401,
                text=f"admin: bearer token required{where}\n",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    return check


def build_admin_app(state: AdminState, token: AdminToken) -> web.Application:
    if not token.value:
        raise ValueError("the admin listener needs a token")  # mutating calls need one, always
    app = web.Application(middlewares=[_auth_middleware(token)])

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        ready = state.readiness()
        return web.Response(
            status=200 if ready.ready else 503,
            body=msgspec.json.encode(ready),
            content_type="application/json",
        )

    async def metrics(_: web.Request) -> web.Response:
        wake = state.ctx.wake
        in_use = None
        depths: dict[str, tuple[int, int]] = {}
        # A down store must not break /metrics: region-wide gauges are left out instead.
        if wake is not None:
            try:
                in_use = (await wake.store.budget_usage(wake.budget)).in_use
            except Exception as exc:
                logger.debug("metrics without the budget in use: %r", exc)
        queue = state.ctx.queue
        if queue is not None:
            try:
                for name in replay_apps(state.ctx.config):
                    depths[name] = await queue.depth(name)
            except Exception as exc:
                logger.debug("metrics without queue depths: %r", exc)
        body = render_metrics(state.snapshots, in_use, depths)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})

    async def reload(_: web.Request) -> web.Response:
        try:
            new = load_config(state.config_path)
        except ConfigError as exc:
            # Refused here, it never reaches the workers' reload: counted here instead.
            count_config_check(state.ctx.wake, exc)
            return web.json_response({"reloaded": False, "error": str(exc)}, status=400)
        keys = restart_keys(state.ctx.config, new)
        if keys:
            answer = {"reloaded": False, "error": restart_refusal(keys), "restart_needed": keys}
            return web.json_response(answer, status=409)
        if state.supervised:
            os.kill(os.getppid(), signal.SIGHUP)
        else:
            os.kill(os.getpid(), signal.SIGHUP)
        return web.json_response({"reloaded": True})

    async def apps(_: web.Request) -> web.Response:
        ctx = state.ctx
        wake = ctx.wake
        rows = []
        for name, route in ctx.apps.items():
            row: dict = {
                "name": name,
                "scale_to_zero": route.spec.scale_to_zero,
                "held": ctx.holds.held(name),
                "upstreams": [peer.address for peer in route.peers],
            }
            if route.wake is not None and wake is not None:
                wake_state = await wake.store.read_state(name)
                target = wake.hot_target(name)
                row.update(
                    state=wake_state.state,
                    reason=wake_state.reason,
                    allocation_id=wake_state.allocation_id,
                    address=wake_state.address,
                    expected_wake_s=wake_state.expected_wake_s,
                    failures=wake_state.failures,
                    hot_here=target is not None,
                    transitions=msgspec.to_builtins(await wake.store.transitions(name, 10)),
                )
            else:
                row["state"] = "hot"
            rows.append(row)
        budget_use = None
        if wake is not None:
            usage = await wake.store.budget_usage(wake.budget)
            budget_use = {
                "in_use": usage.in_use,
                "waiting": usage.waiting,
                "limit": wake.budget.max_concurrent_wakes,
                "by_tenant": usage.by_tenant,
            }
        return web.json_response({"apps": rows, "budget": budget_use})

    async def gallery(_: web.Request) -> web.Response:
        # Always 200: a source that does not answer shows in the document's `sources`.
        return web.Response(
            body=msgspec.json.encode(await state.gallery.gallery()),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def budget(_: web.Request) -> web.Response:
        wake = state.ctx.wake
        if wake is None:
            return web.json_response({"budget": None, "reason": "no app scales to zero"})
        usage = await wake.store.budget_usage(wake.budget)
        return web.json_response(
            {"limits": msgspec.to_builtins(wake.budget), "usage": msgspec.to_builtins(usage)}
        )

    async def routes(_: web.Request) -> web.Response:
        ctx = state.ctx
        follower = ctx.follower
        table = ctx.route_table
        if follower is None:
            return web.json_response({"routes": None, "reason": "no control plane configured"})
        age = follower.age()
        return web.json_response(
            {
                "applied_epoch": table.epoch if table is not None else None,
                "table_age_s": round(age, 3) if age is not None else None,
                "stale": follower.stale,
                "refused_updates": follower.refused,
                "resyncs": follower.resyncs,
                "acks": follower.acks,
                "apps": [
                    msgspec.to_builtins(route)
                    for route in (table.apps.values() if table is not None else [])
                ],
            }
        )

    def queue_for(request: web.Request) -> tuple[DurableQueue, AppConfig]:
        queue = state.ctx.queue
        name = request.match_info["app"]
        app_config = replay_apps(state.ctx.config).get(name)
        if queue is None or app_config is None:
            raise web.HTTPNotFound(
                text=json.dumps({"error": f"app {name!r} has no durable queue here"}),
                content_type="application/json",
            )
        return queue, app_config

    def which(request: web.Request) -> str:
        kind = request.match_info["which"]
        if kind not in ("queued", "dead"):
            raise web.HTTPNotFound(
                text=json.dumps({"error": "expected /queued or /dead"}),
                content_type="application/json",
            )
        return kind

    async def queues(_: web.Request) -> web.Response:
        queue = state.ctx.queue
        rows = []
        for name in replay_apps(state.ctx.config) if queue is not None else ():
            queued, dead = await queue.depth(name)  # type: ignore[union-attr]
            rows.append({"app": name, "queued": queued, "dead_letters": dead})
        return web.json_response({"queues": rows})

    async def queue_list(request: web.Request) -> web.Response:
        queue, app_config = queue_for(request)
        kind = which(request)
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            limit = -1
        if not 1 <= limit <= MAX_LIST:
            return web.json_response({"error": f"limit must be 1..{MAX_LIST}"}, status=400)
        entries = await queue.list(app_config.name, kind, limit)
        return web.json_response({"app": app_config.name, kind: msgspec.to_builtins(entries)})

    async def queue_replay(request: web.Request) -> web.Response:
        queue, app_config = queue_for(request)
        dead_id = request.match_info["id"]
        if not re.fullmatch(r"\d+-\d+", dead_id):
            return web.json_response({"error": f"not a queue id: {dead_id!r}"}, status=400)
        assert app_config.replay is not None
        new_id = await queue.requeue_dead(
            app_config.name, dead_id, float(app_config.replay.retention)
        )
        if new_id is None:
            return web.json_response({"error": f"no dead letter {dead_id}"}, status=404)
        if state.ctx.replayer is not None:
            state.ctx.replayer.poke()
        return web.json_response({"app": app_config.name, "dead_id": dead_id, "queued_id": new_id})

    async def queue_purge(request: web.Request) -> web.Response:
        queue, app_config = queue_for(request)
        kind = which(request)
        entry_id = request.match_info.get("id", "")
        if entry_id and not re.fullmatch(r"\d+-\d+", entry_id):
            return web.json_response({"error": f"not a queue id: {entry_id!r}"}, status=400)
        removed = await queue.purge(app_config.name, kind, entry_id)
        return web.json_response({"app": app_config.name, "purged": removed})

    @web.middleware
    async def store_errors(
        request: web.Request, handler: Callable[..., Awaitable]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except StoreUnavailable as exc:
            return web.json_response({"error": f"store unavailable: {exc}"}, status=503)

    app.middlewares.append(store_errors)
    app.router.add_get("/admin/queues", queues)
    app.router.add_get("/admin/queues/{app}/{which}", queue_list)
    app.router.add_post("/admin/queues/{app}/dead/{id}/replay", queue_replay)
    app.router.add_delete("/admin/queues/{app}/{which}", queue_purge)
    app.router.add_delete("/admin/queues/{app}/{which}/{id}", queue_purge)
    app.router.add_get("/admin/routes", routes)
    app.router.add_get("/admin/apps", apps)
    app.router.add_get("/admin/budget", budget)
    app.router.add_get("/admin/gallery", gallery)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/admin/reload", reload)
    add_gallery_page(app)
    return app


async def start_admin(state: AdminState, listen: str, token: AdminToken) -> web.AppRunner:
    runner = web.AppRunner(build_admin_app(state, token), access_log=None)
    await runner.setup()
    host, port = parse_address(listen)
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner
