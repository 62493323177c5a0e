"""The route table without I/O: snapshots, contiguous changes, refusals, gaps, routability."""

from __future__ import annotations

from edge.routing.route_table import Outcome, apply_changes, drain_fence, from_snapshot
from scheduler_client.models import AppRoute, RouteChange, RouteSnapshot, RouteTarget


def target(alloc: str, state: str = "ready", host_state: str = "uncordoned") -> RouteTarget:
    return RouteTarget(
        allocation_id=alloc,
        address=f"127.0.0.1:{9000 + len(alloc)}",
        state=state,
        host_state=host_state,
    )


def change(epoch: int, app: str, *targets: RouteTarget) -> RouteChange:
    return RouteChange(
        epoch=epoch, app=app, route=AppRoute(app=app, epoch=epoch, targets=list(targets))
    )


def snapshot_at(epoch: int) -> RouteSnapshot:
    return RouteSnapshot(
        epoch=epoch, apps=[AppRoute(app="shop", epoch=epoch, targets=[target("a1")])]
    )


def test_snapshot_then_contiguous_changes() -> None:
    table = from_snapshot(snapshot_at(5))
    result = apply_changes(
        table, [change(6, "shop", target("a2")), change(7, "blog", target("b1"))]
    )
    assert result.outcome is Outcome.APPLIED and result.refused == 0
    assert result.table.epoch == 7
    assert [t.allocation_id for t in result.table.targets("shop") or ()] == ["a2"]
    assert [t.allocation_id for t in result.table.targets("blog") or ()] == ["b1"]
    assert table.epoch == 5  # the old table is untouched: readers never see half a batch


def test_old_epochs_are_refused_and_counted() -> None:
    table = from_snapshot(snapshot_at(5))
    result = apply_changes(table, [change(4, "shop", target("x")), change(5, "shop", target("y"))])
    assert result.outcome is Outcome.NOTHING and result.refused == 2
    assert result.table is table
    assert [t.allocation_id for t in table.targets("shop") or ()] == ["a1"]


def test_a_gap_applies_nothing_and_asks_for_a_resync() -> None:
    table = from_snapshot(snapshot_at(5))
    batch = [change(6, "shop", target("a2")), change(8, "shop", target("a3"))]
    result = apply_changes(table, batch)
    assert result.outcome is Outcome.GAP
    assert result.table is table and table.epoch == 5


def test_unsorted_batch_is_applied_in_epoch_order() -> None:
    table = from_snapshot(snapshot_at(5))
    result = apply_changes(
        table, [change(7, "shop", target("a3")), change(6, "shop", target("a2"))]
    )
    assert result.outcome is Outcome.APPLIED and result.table.epoch == 7
    assert [t.allocation_id for t in result.table.targets("shop") or ()] == ["a3"]


def test_only_ready_targets_on_uncordoned_hosts_are_routable() -> None:
    table = from_snapshot(
        RouteSnapshot(
            epoch=1,
            apps=[
                AppRoute(
                    app="shop",
                    epoch=1,
                    targets=[
                        target("ready"),
                        target("draining", state="draining"),
                        target("cordoned", host_state="cordoned"),
                    ],
                )
            ],
        )
    )
    assert [t.allocation_id for t in table.targets("shop") or ()] == ["ready"]
    assert table.blocked("shop", "draining") and table.blocked("shop", "cordoned")
    assert not table.blocked("shop", "ready") and not table.blocked("shop", "unknown")
    assert table.targets("nope") is None


def test_an_allocation_put_to_drain_here_is_fenced_until_the_table_says_so() -> None:
    """The edge drains a1 (a sleep) before the control plane's table shows it draining:
    a1 is left out while the table lists it ready; once the table stops listing it, the
    fence has nothing to do and can go."""
    table = from_snapshot(
        RouteSnapshot(epoch=5, apps=[AppRoute(app="shop", epoch=5, targets=[target("a1")])])
    )
    kept, listed = drain_fence(table.targets("shop") or (), "a1")
    assert kept == () and listed
    both = apply_changes(table, [change(6, "shop", target("a1"), target("b22"))]).table
    kept, listed = drain_fence(both.targets("shop") or (), "a1")
    assert [t.allocation_id for t in kept] == ["b22"] and listed
    caught_up = apply_changes(both, [change(7, "shop", target("a1", "draining"), target("b22"))])
    kept, listed = drain_fence(caught_up.table.targets("shop") or (), "a1")
    assert [t.allocation_id for t in kept] == ["b22"] and not listed
