"""The epoch-fenced route table: snapshots and change batches applied as whole tables, no I/O.

Theory of operation. A `RouteTable` is immutable; applying a snapshot or a batch
of changes builds a new one, and the worker swaps one reference, so a request
sees either the old table or the new one, never half of a batch. The control
plane numbers every route change with the next region-wide epoch, so changes
arrive contiguous: one not newer than the applied epoch is refused (old route
epoch), one that skips ahead means changes were missed (edge replay gap) and
the caller resyncs from a snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import Enum

import msgspec

from scheduler_client.models import AppRoute, RouteChange, RouteSnapshot, RouteTarget


class Outcome(Enum):
    APPLIED = "applied"
    NOTHING = "nothing"  # every change was old
    GAP = "gap"  # changes were missed: resync from a snapshot


class RouteTable(msgspec.Struct, frozen=True):
    epoch: int
    apps: Mapping[str, AppRoute]
    # Per app, its routable targets, filtered once per table rather than per request.
    ready: Mapping[str, tuple[RouteTarget, ...]]

    def targets(self, app: str) -> tuple[RouteTarget, ...] | None:
        """The app's routable targets (ready, host not cordoned); None if the app has no route."""
        return self.ready.get(app)

    def blocked(self, app: str, allocation_id: str) -> bool:
        """True when the table knows this allocation and says: no new requests."""
        route = self.apps.get(app)
        if route is None:
            return False
        for target in route.targets:
            if target.allocation_id == allocation_id:
                return not routable(target)
        return False


class ApplyResult(msgspec.Struct, frozen=True):
    table: RouteTable
    outcome: Outcome
    refused: int  # changes not newer than the applied epoch


def drain_fence(
    targets: tuple[RouteTarget, ...], allocation_id: str
) -> tuple[tuple[RouteTarget, ...], bool]:
    """The targets but an allocation put to drain here (the table not yet saying so), and
    whether the table still lists it ready (False: the table caught up, the fence can go)."""
    kept = tuple(t for t in targets if t.allocation_id != allocation_id)
    return kept, len(kept) != len(targets)


def routable(target: RouteTarget) -> bool:
    return target.state == "ready" and target.host_state == "uncordoned"


def _routable_targets(route: AppRoute) -> tuple[RouteTarget, ...]:
    return tuple(t for t in route.targets if routable(t))


def from_snapshot(snapshot: RouteSnapshot) -> RouteTable:
    return RouteTable(
        epoch=snapshot.epoch,
        apps={route.app: route for route in snapshot.apps},
        ready={route.app: _routable_targets(route) for route in snapshot.apps},
    )


def apply_changes(table: RouteTable, changes: Iterable[RouteChange]) -> ApplyResult:
    """Apply a batch atomically: all of it, or (on a gap) none of it."""
    apps: dict[str, AppRoute] | None = None
    ready: dict[str, tuple[RouteTarget, ...]] = {}
    epoch = table.epoch
    refused = 0
    for change in sorted(changes, key=lambda c: c.epoch):
        if change.epoch <= epoch:
            refused += 1
            continue
        if change.epoch != epoch + 1:
            return ApplyResult(table, Outcome.GAP, refused)
        if apps is None:
            apps = dict(table.apps)
            ready = dict(table.ready)
        apps[change.app] = change.route
        ready[change.app] = _routable_targets(change.route)
        epoch = change.epoch
    if apps is None:
        return ApplyResult(table, Outcome.NOTHING, refused)
    new = RouteTable(epoch=epoch, apps=apps, ready=ready)
    return ApplyResult(new, Outcome.APPLIED, refused)
