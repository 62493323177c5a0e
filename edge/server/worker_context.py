"""Everything one worker's connections share: routes, pool, limits, stats, deadlines."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import TYPE_CHECKING

from edge.http.exchange import DRAINING
from edge.http.forward_headers import HeaderClasses, TrustedProxies
from edge.http.front_services import FrontLimits
from edge.http.host_pattern import HostTable, host_bytes, parse_host_header
from edge.http.release_line import ReleaseLine
from edge.ops.worker_stats import WorkerStats
from edge.routing.app_upstreams import AppUpstreams
from edge.routing.client_wake_rate import ClientWakeAllowance, ClientWakeRate
from edge.routing.concurrency_limit import Ticket, pump, set_limit
from edge.routing.hold_accounting import HoldAccounting, HoldCaps
from edge.server.config import REPLAY_POLICY_GATE, Config, ConfigError, refused_gate
from edge.upstream.pool import UpstreamPool
from wake.budget import BudgetLimits
from wake.controller import WakeAppSpec, WakeController

if TYPE_CHECKING:
    from edge.http.access_log import AccessLog
    from edge.http.front_protocol import FrontConnection
    from edge.queue.durable_queue import DurableQueue
    from edge.queue.replayer import Replayer
    from edge.routing.route_follower import RouteFollower
    from edge.routing.route_table import RouteTable
    from scheduler_client.models import Region


def wake_specs(config: Config) -> dict[str, WakeAppSpec]:
    return {
        app.name: WakeAppSpec(
            name=app.name,
            tenant=app.tenant,
            hold_timeout=float(app.hold_timeout),
            readiness_path=app.readiness_path,
            readiness_timeout=float(app.readiness_timeout),
            readiness_probe_interval=float(app.readiness_probe_interval),
            idle_timeout=float(app.idle_timeout),
            wake_backoff=float(app.wake_backoff),
        )
        for app in config.apps
        if app.scale_to_zero
    }


def count_config_check(wake: WakeController | None, error: ConfigError | None) -> None:
    """One config load for the gallery's gate "unsafe replay policy exists": passed when it
    loaded, refused when that gate refused it (worker 0 counts, once per load it reads)."""
    if wake is None:
        return  # no scale-to-zero app, no wake machine to count for
    if error is None:
        wake.gate_checked(REPLAY_POLICY_GATE, passed=True)
    elif refused_gate(error):
        wake.gate_checked(refused_gate(error), passed=False)


def hold_caps(config: Config) -> HoldCaps:
    """The worker-wide caps on held requests."""
    return HoldCaps(config.hold.max_held, int(config.hold.max_held_body_bytes))


def client_wake_rate(config: Config) -> ClientWakeRate:
    """Wakes one client may start: a burst, then a steady rate (per worker)."""
    budget = config.budget
    return ClientWakeRate(float(budget.client_wake_rate), float(budget.client_wake_burst))


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

    # Slots, not a __dict__: read on every request, and CPython 3.11 gives an instance of a
    # class with 30 or more attributes a plain dict, which no longer specializes attribute
    # and method lookups (each `ctx.x()` then costs a few hundred instructions more).
    __slots__ = (
        "_closing_at",
        "_id_prefix",
        "_ids",
        "_route_cache",
        "access_log",
        "access_log_sample",
        "apps",
        "config",
        "connections",
        "draining",
        "follower",
        "header_classes",
        "holds",
        "index",
        "limits",
        "loop",
        "pool",
        "queue",
        "releases",
        "replayer",
        "route_table",
        "routes",
        "scheme",
        "stats",
        "trusted_proxies",
        "tunnels",
        "upstream_header_timeout",
        "upstream_idle_timeout",
        "wake",
        "wake_allowance",
        "workers",
    )

    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        index: int,
        access_log: AccessLog | None = None,
        wake: WakeController | None = None,
        workers: int = 1,
    ) -> None:
        self.loop = loop
        self.index = index
        self.workers = workers  # each takes its share of an app's max_concurrency
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
            max_connecting=config.upstream.max_connecting_per_upstream,
            max_head=int(config.limits.max_response_head),
        )
        self.holds = HoldAccounting(hold_caps(config))
        self.releases = ReleaseLine(loop)
        self.wake_allowance = ClientWakeAllowance(client_wake_rate(config))
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
        self.limits = FrontLimits(config.limits)
        self.holds.caps = hold_caps(config)
        self.wake_allowance.rate = client_wake_rate(config)
        self.trusted_proxies = TrustedProxies(config.edge.trusted_proxies)
        self.header_classes = HeaderClasses(config.edge.client_identity_headers)
        self.scheme = b"https" if config.edge.tls is not None else b"http"
        self.upstream_header_timeout = float(config.upstream.response_header_timeout)
        self.upstream_idle_timeout = float(config.upstream.idle_timeout)
        self.access_log_sample = config.edge.access_log_sample
        self.pool.connect_timeout = config.upstream.connect_timeout
        self.pool.keepalive_idle = config.upstream.keepalive_idle
        self.pool.max_head = int(config.limits.max_response_head)
        self.apps = {
            app.name: AppUpstreams(
                app,
                self.pool,
                self.wake,
                self,
                config.classification,
                self.workers,
                self.loop.time,
            )
            for app in config.apps
        }
        self._apply_limits()
        self.routes = HostTable(
            {host: self.apps[app.name] for app in config.apps for host in app.hosts}
        )
        self._route_cache: dict[bytes, tuple[AppUpstreams, bytes]] = {}
        if self.wake is not None:
            self.wake.apply(budget_limits(config), wake_specs(config))

    def _apply_limits(self) -> None:
        """A reload's max_concurrency applies at once to the gates in use; a gate whose app
        lost its limit (or went) lets its line through and is dropped; then static peers of
        limited apps get the gates they lack."""
        limits = {name: route.limit for name, route in self.apps.items()}
        now = self.loop.time()
        for peer in self.pool.peers():
            gate = peer.gate
            if gate is None:
                continue
            limit = limits.get(gate.app)
            if limit != gate.limit:
                self._run_turns(set_limit(gate, limit, now))
            if limit is None:
                peer.gate = None  # requests in flight give their slots back to it all the same
        for route in self.apps.values():
            route.gate_static_peers()

    def _run_turns(self, tickets: list[Ticket]) -> None:
        for ticket in tickets:
            self.loop.call_soon(ticket.item)  # type: ignore[arg-type]

    def limited_counts(self) -> dict[str, list[int]]:
        """Per app with max_concurrency: [requests in flight through its gates, waiting]."""
        counts: dict[str, list[int]] = {}
        for peer in self.pool.peers():
            gate = peer.gate
            if gate is not None:
                app = counts.setdefault(gate.app, [0, 0])
                app[0] += gate.in_flight
                app[1] += gate.queued
        return counts

    def promoted_epochs(self) -> dict[str, int] | None:
        """Each app's promoted route epoch in the followed table, for the wake's old-epoch
        check; None while the follower has no table it trusts (none yet, a resync due,
        or the control plane unreachable)."""
        follower = self.follower
        if follower is None or follower.table is None or follower.stale or follower.resync_needed:
            return None
        return {app: route.promoted_epoch for app, route in follower.table.apps.items()}

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

    def region(self) -> Region | None:
        return self.follower.region if self.follower is not None else None

    def route_for(self, host_value: bytes) -> tuple[AppUpstreams, bytes] | None:
        """The app for a raw Host value and the normalised host to forward; cached per raw
        value, so a validated host costs one dict lookup."""
        found = self._route_cache.get(host_value)
        if found is None:
            parsed = parse_host_header(host_value)
            route = self.routes.lookup(parsed[0]) if parsed is not None else None
            if route is None:
                return None
            found = (route, host_bytes(*parsed))  # type: ignore[misc]
            if len(self._route_cache) < 4096:
                self._route_cache[host_value] = found
        return found

    def next_request_id(self) -> bytes:
        return self._id_prefix + b"%x" % next(self._ids)

    def sweep(self) -> None:
        """Enforce connection deadlines and expire idle upstream connections."""
        now = self.loop.time()
        for conn in list(self.connections):
            if conn.deadline <= now and conn.deadline_kind != DRAINING:
                conn.on_deadline(now)
            if conn.body_check and conn.body_check <= now:
                conn.on_body_check(now)
        for peer in self.pool.peers():
            gate = peer.gate
            if gate is not None and gate.queued:  # the ramp may have grown since
                self._run_turns(pump(gate, now))
        self.pool.sweep(now)
