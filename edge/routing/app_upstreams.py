"""An app's upstreams in one worker: static peers, or the ready allocations of a
scale-to-zero app (from the route table, else what this process's wake made hot)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from edge.routing.admission import AppAdmission
from edge.routing.classification import make_rule
from edge.routing.hold_accounting import HoldCaps
from edge.routing.route_table import RouteTable
from edge.server.config import AppConfig, RuleConfig
from edge.upstream.pool import UpstreamPeer, UpstreamPool
from wake.controller import WakeController


class RouteTableSource(Protocol):
    """Whoever holds the worker's current route table (swapped as updates arrive)."""

    route_table: RouteTable | None


class AppUpstreams:
    """An app's upstreams: static peers, or (scale to zero) whatever its wake made hot.

    `pick` prefers the peer with fewest requests in flight; None means not hot.
    """

    __slots__ = ("admission", "name", "peers", "pool", "source", "spec", "wake")

    def __init__(
        self,
        spec: AppConfig,
        pool: UpstreamPool,
        wake: WakeController | None,
        source: RouteTableSource,
        shared_rules: Sequence[RuleConfig] = (),
    ) -> None:
        self.name = spec.name
        self.spec = spec
        self.pool = pool
        self.source = source
        self.wake = wake if spec.scale_to_zero else None
        self.peers = [pool.peer(address) for address in spec.upstreams]
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
            table = self.source.route_table
            targets = table.targets(self.name) if table is not None else None
            others = [
                self.pool.peer(t.address) for t in targets or () if t.address != failed.address
            ]
        return min(others, key=_in_flight) if others else None

    def _pick_dynamic(self, wake: WakeController) -> UpstreamPeer | None:
        """Ready allocations from the route table, else what this process's wake made hot."""
        table = self.source.route_table
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
