"""Everything one worker's connections share: routes, pool, limits, stats, deadlines."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import TYPE_CHECKING

from edge.http.forward_headers import TrustedProxies
from edge.http.front_protocol import DRAINING
from edge.http.host_pattern import HostTable, host_from_header
from edge.ops.worker_stats import WorkerStats
from edge.routing.classification import make_rule
from edge.server.config import AppConfig, Config
from edge.upstream.pool import UpstreamPeer, UpstreamPool
from wake.budget import BudgetLimits
from wake.controller import WakeAppSpec, WakeController

if TYPE_CHECKING:
    from edge.http.access_log import AccessLog
    from edge.http.front_protocol import FrontConnection
    from edge.queue.durable_queue import DurableQueue
    from edge.queue.replayer import Replayer
    from edge.routing.route_follower import RouteFollower
    from edge.routing.route_table import RouteTable


class FrontLimits:
    """Client-side limits, copied out of config for attribute-speed access."""

    __slots__ = (
        "header_timeout",
        "keepalive_timeout",
        "max_body",
        "max_connections",
        "max_head_bytes",
        "max_header_bytes",
        "max_headers",
        "max_request_line",
    )

    def __init__(self, config: Config) -> None:
        limits = config.limits
        self.max_request_line = int(limits.max_request_line)
        self.max_headers = limits.max_headers
        self.max_header_bytes = int(limits.max_header_bytes)
        self.max_body = int(limits.max_body)
        self.header_timeout = float(limits.header_timeout)
        self.keepalive_timeout = float(limits.keepalive_timeout)
        self.max_connections = limits.max_connections
        # The request line counts toward the head too.
        self.max_head_bytes = int(limits.max_request_line) + int(limits.max_header_bytes)


class AppRoute:
    """An app's upstreams: static peers, or (scale to zero) whatever its wake made hot.

    `pick` prefers the peer with fewest requests in flight; None means not hot.
    """

    __slots__ = ("ctx", "name", "peers", "pool", "rules", "spec", "wake")

    def __init__(
        self,
        spec: AppConfig,
        pool: UpstreamPool,
        wake: WakeController | None,
        ctx: WorkerContext,
    ) -> None:
        self.name = spec.name
        self.spec = spec
        self.pool = pool
        self.ctx = ctx
        self.wake = wake if spec.scale_to_zero else None
        self.peers = [pool.peer(address) for address in spec.upstreams]
        self.rules = tuple(
            make_rule(
                rule.request_class,
                methods=rule.methods,
                path=rule.path,
                path_prefix=rule.path_prefix,
                path_glob=rule.path_glob,
                host=rule.host,
                header=rule.header,
                header_value=rule.header_value,
                content_type=rule.content_type,
            )
            for rule in (*spec.rules, *ctx.config.classification)
        )

    def pick(self) -> UpstreamPeer | None:
        if self.wake is not None:
            return self._pick_dynamic(self.wake)
        peers = self.peers
        if len(peers) == 1:
            return peers[0]
        return min(peers, key=_in_flight)

    def pick_other(self, failed: UpstreamPeer) -> UpstreamPeer | None:
        """Another routable peer of this app than `failed` (least in flight), if any."""
        if self.wake is None:
            others = [p for p in self.peers if p is not failed]
        else:
            table = self.ctx.route_table
            targets = table.targets(self.name) if table is not None else None
            others = [
                self.pool.peer(t.address) for t in targets or () if t.address != failed.address
            ]
        return min(others, key=_in_flight) if others else None

    def _pick_dynamic(self, wake: WakeController) -> UpstreamPeer | None:
        """Ready allocations from the route table, else what this process's wake made hot."""
        table = self.ctx.route_table
        if table is not None:
            targets = table.targets(self.name)
            if targets:
                if len(targets) == 1:
                    return self.pool.peer(targets[0].address)
                return min((self.pool.peer(t.address) for t in targets), key=_in_flight)
        target = wake.hot_target(self.name)
        if target is None:
            return None
        if table is not None and table.blocked(self.name, target.allocation_id):
            return None  # draining, or on a cordoned host: no new requests
        return self.pool.peer(target.address)


def _in_flight(peer: UpstreamPeer) -> int:
    return peer.in_flight


def wake_specs(config: Config) -> dict[str, WakeAppSpec]:
    return {
        app.name: WakeAppSpec(
            name=app.name,
            tenant=app.tenant,
            hold_timeout=float(app.hold_timeout),
            readiness_path=app.readiness_path,
            readiness_timeout=float(app.readiness_timeout),
            idle_timeout=float(app.idle_timeout),
        )
        for app in config.apps
        if app.scale_to_zero
    }


def budget_limits(config: Config) -> BudgetLimits:
    budget = config.budget
    return BudgetLimits(
        max_concurrent_wakes=budget.max_concurrent_wakes,
        max_wakes_per_second=budget.max_wakes_per_second,
        tenant_max_concurrent_wakes=budget.tenant_max_concurrent_wakes,
        slot_ttl=float(budget.wake_slot_ttl),
    )


class WorkerContext:
    """Shared by every FrontConnection of one worker process."""

    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        index: int,
        access_log: AccessLog | None = None,
        wake: WakeController | None = None,
    ) -> None:
        self.loop = loop
        self.index = index
        self.stats = WorkerStats(index)
        self.connections: set[FrontConnection] = set()
        self.draining = False
        self.access_log = access_log
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(5).hex().encode() + b"-"
        self.pool = UpstreamPool(
            connect_timeout=config.upstream.connect_timeout,
            keepalive_idle=config.upstream.keepalive_idle,
            max_idle=config.upstream.max_idle_per_upstream,
            max_conns=config.upstream.max_connections_per_upstream,
        )
        self.held_total = 0
        self.held_bytes = 0
        self.held_by_app: dict[str, int] = {}
        self.held_bytes_by_app: dict[str, int] = {}
        self.wake = wake
        self.route_table: RouteTable | None = None
        self.tunnels: set[FrontConnection] = set()
        self._closing_at: dict[str, asyncio.TimerHandle] = {}
        self.follower: RouteFollower | None = None
        # Durable queue and its replayer: set by the worker when an app can queue.
        self.queue: DurableQueue | None = None
        self.replayer: Replayer | None = None
        self.apply(config)

    def apply(self, config: Config) -> None:
        """Adopt a (re)loaded config; connections see it on their next request."""
        self.config = config
        self.limits = FrontLimits(config)
        self.trusted_proxies = TrustedProxies(config.edge.trusted_proxies)
        self.scheme = b"https" if config.edge.tls is not None else b"http"
        self.upstream_header_timeout = float(config.upstream.response_header_timeout)
        self.upstream_idle_timeout = float(config.upstream.idle_timeout)
        self.access_log_sample = config.edge.access_log_sample
        self.pool.connect_timeout = config.upstream.connect_timeout
        self.pool.keepalive_idle = config.upstream.keepalive_idle
        self.apps = {app.name: AppRoute(app, self.pool, self.wake, self) for app in config.apps}
        self.routes = HostTable(
            {host: self.apps[app.name] for app in config.apps for host in app.hosts}
        )
        self._route_cache: dict[bytes, AppRoute] = {}
        if self.wake is not None:
            self.wake.apply(budget_limits(config), wake_specs(config))

    def adopt_route_table(self, table: RouteTable) -> None:
        """Swap in a new table; tunnels to draining allocations close at their deadline."""
        self.route_table = table
        for route in table.apps.values():
            for target in route.targets:
                deadline = target.drain_deadline
                if target.state != "draining" or deadline is None:
                    continue
                if target.address in self._closing_at:
                    continue
                delay = max(0.0, deadline - time.time())
                self._closing_at[target.address] = self.loop.call_later(
                    delay, self._close_tunnels_to, target.address
                )

    def _close_tunnels_to(self, address: str) -> None:
        self._closing_at.pop(address, None)
        for conn in list(self.tunnels):
            tunnel = conn.tunnel
            if tunnel is not None and tunnel.peer.address == address:
                conn.close_tunnel_going_away()

    def route_for(self, host_value: bytes) -> AppRoute | None:
        """Route by a raw Host value; parsed hosts are cached per raw value."""
        route = self._route_cache.get(host_value)
        if route is None:
            host = host_from_header(host_value)
            route = self.routes.lookup(host) if host is not None else None
            if route is None:
                return None
            if len(self._route_cache) < 4096:
                self._route_cache[host_value] = route
        return route

    def next_request_id(self) -> bytes:
        return self._id_prefix + b"%x" % next(self._ids)

    def sweep(self) -> None:
        """Enforce connection deadlines and expire idle upstream connections."""
        now = self.loop.time()
        for conn in list(self.connections):
            if conn.deadline <= now and conn.deadline_kind != DRAINING:
                conn.on_deadline(now)
        self.pool.sweep(now)
