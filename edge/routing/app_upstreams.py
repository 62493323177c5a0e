"""An app's upstreams in one worker: static peers, or the ready allocations of a
scale-to-zero app (from the route table, else what this process's wake made hot)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from edge.routing.admission import AppAdmission
from edge.routing.classification import make_rule
from edge.routing.concurrency_limit import (
    ConcurrencyLimit,
    Gate,
    ReleaseRamp,
    restart_ramp,
    worker_share,
)
from edge.routing.hold_accounting import HoldCaps
from edge.routing.route_table import RouteTable, drain_fence
from edge.server.config import AppConfig, RuleConfig
from edge.upstream.pool import UpstreamPeer, UpstreamPool
from scheduler_client.models import RouteTarget
from wake.controller import WakeController


class RouteTableSource(Protocol):
    """Whoever holds the worker's current route table (swapped as updates arrive)."""

    route_table: RouteTable | None


def concurrency_limit(spec: AppConfig, workers: int) -> ConcurrencyLimit | None:
    """The app's limit in one of `workers` workers (None: no limit)."""
    if spec.max_concurrency is None:
        return None
    ramp = spec.ramp()
    return ConcurrencyLimit(
        worker_share(spec.max_concurrency, workers),
        ReleaseRamp(ramp.start, float(ramp.double_every)) if ramp is not None else None,
    )


class AppUpstreams:
    """An app's upstreams: static peers, or (scale to zero) whatever its wake made hot.

    `pick` prefers the peer with fewest requests in flight; None means not hot. With
    `max_concurrency`, static peers get their gates from the worker (`gate_static_peers`)
    and allocations theirs when first picked (`_pick_gated`, chosen once per config: an
    app without a limit never looks).
    """

    __slots__ = (
        "_pick_hot",
        "admission",
        "clock",
        "limit",
        "name",
        "peers",
        "pool",
        "source",
        "spec",
        "wake",
    )

    def __init__(
        self,
        spec: AppConfig,
        pool: UpstreamPool,
        wake: WakeController | None,
        source: RouteTableSource,
        shared_rules: Sequence[RuleConfig] = (),
        workers: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = spec.name
        self.spec = spec
        self.pool = pool
        self.source = source
        self.clock = clock
        self.wake = wake if spec.scale_to_zero else None
        self.peers = [pool.peer(address) for address in spec.upstreams]
        self.limit = concurrency_limit(spec, workers)
        self._pick_hot: Callable[[], UpstreamPeer | None] = (
            self._pick_dynamic if self.limit is None else self._pick_gated
        )
        rules = tuple(
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
            for rule in (*spec.rules, *shared_rules)
        )
        replay = spec.replay
        self.admission = AppAdmission(
            name=spec.name,
            rules=rules,
            hold_timeout=float(spec.hold_timeout),
            starting_page_after=float(spec.starting_page_after),
            caps=HoldCaps(spec.max_held, int(spec.max_held_body_bytes)),
            queue_max_body=int(replay.max_body) if replay is not None else 0,
            dedupe_key=replay.dedupe_key if replay is not None else "idempotency-key",
        )

    def gate_static_peers(self) -> None:
        """With a limit, each static peer without a gate gets one (no ramp: no wake)."""
        if self.limit is not None and self.wake is None:
            for peer in self.peers:
                if peer.gate is None:
                    peer.gate = Gate(self.name, self.limit, self.clock())

    def pick(self) -> UpstreamPeer | None:
        if self.wake is not None:
            return self._pick_hot()
        peers = self.peers
        if len(peers) == 1:
            return peers[0]
        return min(peers, key=_in_flight)

    def _targets(self, table: RouteTable) -> tuple[RouteTarget, ...] | None:
        """The table's targets for the app, but an allocation this process put to drain."""
        targets = table.targets(self.name)
        wake = self.wake
        if targets and wake is not None and wake.draining:
            fenced = wake.draining.get(self.name)
            if fenced is not None:
                kept, listed = drain_fence(targets, fenced)
                if not listed:  # the table caught up: the fence has done its work
                    wake.resume_routing(self.name, fenced)
                return kept
        return targets

    def _pick_gated(self) -> UpstreamPeer | None:
        """Like `_pick_dynamic`; the allocation's gate is made the first time this worker
        routes to it (its release ramp begins then)."""
        table = self.source.route_table
        if table is not None:
            targets = self._targets(table)
            if targets:
                target = min(targets, key=lambda t: self.pool.peer(t.address).in_flight)
                return self.peer_for(target.address, target.allocation_id)
        hot = self.wake.hot_target(self.name)  # type: ignore[union-attr]
        if hot is None:
            return None
        if table is not None and table.blocked(self.name, hot.allocation_id):
            return None
        return self.peer_for(hot.address, hot.allocation_id)

    def peer_for(self, address: str, allocation: str) -> UpstreamPeer:
        """The pool's peer for an allocation of this app; with a limit, its gate too (the
        ramp begins afresh for an allocation new at that address)."""
        peer = self.pool.peer(address)
        limit = self.limit
        if limit is not None:
            gate = peer.gate
            if gate is None:
                peer.gate = Gate(self.name, limit, self.clock(), allocation, after_wake=True)
            elif gate.allocation != allocation:
                restart_ramp(gate, allocation, self.clock())
        return peer

    def pick_other(self, failed: UpstreamPeer) -> UpstreamPeer | None:
        """Another routable peer of this app than `failed` (least in flight), if any."""
        if self.wake is None:
            others = [p for p in self.peers if p is not failed]
        else:
            table = self.source.route_table
            targets = self._targets(table) if table is not None else None
            others = [
                self.peer_for(t.address, t.allocation_id)
                for t in targets or ()
                if t.address != failed.address
            ]
        return min(others, key=_in_flight) if others else None

    def _pick_dynamic(self) -> UpstreamPeer | None:
        """Ready allocations from the route table, else what this process's wake made hot."""
        table = self.source.route_table
        if table is not None:
            targets = self._targets(table)
            if targets:
                if len(targets) == 1:
                    return self.pool.peer(targets[0].address)
                return min((self.pool.peer(t.address) for t in targets), key=_in_flight)
        target = self.wake.hot_target(self.name)  # type: ignore[union-attr]
        if target is None:
            return None
        if table is not None and table.blocked(self.name, target.allocation_id):
            return None  # draining, or on a cordoned host: no new requests
        return self.pool.peer(target.address)


def _in_flight(peer: UpstreamPeer) -> int:
    return peer.in_flight
