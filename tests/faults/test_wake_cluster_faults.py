"""Faults of a Redis Cluster store mid-wake, on the real stack: two edges on the local
3+3 cluster, the local control plane running slow-starting sample apps.

The master serving the app's slot dies: the wake completes or is retried, one
allocation is left, every client is answered within its bound. The master serving
`{budget}` dies with slots its replica never got: starts at once stay within
wake.budget.starts_bound_after_failover (at most twice the budget).
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from helpers import eventually
from stack import cold_app, sample_app_spec
from test_wake_faults import (
    answered_within_bounds,
    no_budget_slot_in_use,
    region_edge,
    settled_with_one_allocation,
    slow_shop,
    wake_then,
)
from test_wake_region import cp_get, fetch, max_concurrent_starts, start_region_edge

from scheduler_client.local.redis_cluster import LocalRedisCluster
from wake.budget import starts_bound_after_failover

log = logging.getLogger(__name__)
pytestmark = pytest.mark.timeout(120)

STARTING = ("planned", "pulling", "starting")


def app_key(app: str) -> str:
    """A key of `app` as the edges' store names it (prefix `edge`): the app's slot."""
    return f"edge:{{{app}}}:state"


def sample_command(name: str) -> list[str]:
    """The control plane's command line for the sample app `name`."""
    return sample_app_spec(name)["command"]


async def test_app_slot_master_killed_mid_wake(
    start_control_plane, start_edge, client, fresh_cluster: LocalRedisCluster
) -> None:
    """SIGKILL, no goodbye: the cluster promotes the replica after its node timeout (2 s)."""
    cp = start_control_plane(apps=[slow_shop()])
    edges = [region_edge(start_edge, cp, fresh_cluster.url) for _ in range(2)]
    master, _ = fresh_cluster.owner_of(app_key("shop"))

    async def kill_master() -> None:
        fresh_cluster.kill(master)

    results = await wake_then(cp, client, edges, kill_master)
    answered_within_bounds(results)
    await settled_with_one_allocation(cp, client, edges)
    await no_budget_slot_in_use(edges[0])


def apps_off(cluster: LocalRedisCluster, master_address: str, count: int) -> list[str]:
    """`count` app names whose keys live on other masters than `master_address`."""
    names: list[str] = []
    for i in range(200):
        owner, _ = cluster.owner_of(app_key(f"app{i}"))
        if owner.address != master_address:
            names.append(f"app{i}")
        if len(names) == count:
            return names
    raise AssertionError(f"fewer than {count} apps off {master_address}")


async def test_budget_master_lost_with_its_slots(
    start_control_plane, start_edge, client, fresh_cluster: LocalRedisCluster
) -> None:
    """The `{budget}` master grants every slot while its replica is cut off, then dies
    and the replica is promoted: starts at once exceed the budget by at most the slots
    held on the lost master (here all `limit` of them, so at most 2 x limit)."""
    limit = 3
    budget_key = "edge:{budget}:slots"  # every budget key shares its slot
    master, replica = fresh_cluster.owner_of(budget_key)
    # The apps' own keys elsewhere: only the budget is lost, not their leases or states.
    names = apps_off(fresh_cluster, master.address, 3 * limit)
    slow = [sample_app_spec(n, command=[*sample_command(n), "--start-delay", "5"]) for n in names]
    cp = start_control_plane(apps=slow, max_allocations=50)
    budget = {"max_concurrent_wakes": limit, "max_wakes_per_second": 100, "client_wake_rate": 0}
    apps = [cold_app(n, hold_timeout="30s") for n in names]
    edges = [
        start_region_edge(start_edge, cp, fresh_cluster.url, apps, budget=budget) for _ in range(2)
    ]

    # Cut the replica off (stopped, its link dropped): it receives no grant from here on.
    fresh_cluster.pause(replica)
    with master.client() as c:
        assert c.client_kill_filter(_type="replica") == 1
    asks = [
        asyncio.ensure_future(fetch(client, edges[i % 2], f"{n}.localhost"))
        for i, n in enumerate(names)
    ]

    async def budget_spent() -> bool:
        allocations = (await cp_get(cp, "/v1/allocations"))["allocations"]
        return sum(a["state"] in STARTING for a in allocations) == limit

    await eventually(budget_spent, timeout=20, interval=0.05, what="every slot granted")
    with master.client() as c:
        held_on_lost_master = c.zcard(budget_key)
    fresh_cluster.kill(master)
    fresh_cluster.resume(replica)
    fresh_cluster.take_over(replica)
    results = await asyncio.gather(*asks)

    for status, headers in results:
        assert status == 200 or (status == 503 and "Retry-After" in headers), (status, headers)
    assert sum(status == 200 for status, _ in results) >= limit
    peak = max_concurrent_starts((await cp_get(cp, "/v1/journal"))["entries"])
    bound = starts_bound_after_failover(limit, held_on_lost_master)
    log.info("budget %d, %d held on the lost master: peak %d, bound %d", limit,
             held_on_lost_master, peak, bound)  # fmt: skip
    assert held_on_lost_master == limit and bound == 2 * limit
    # Above the budget (the lost slots were real), never above the bound.
    assert limit < peak <= bound, (peak, bound)
