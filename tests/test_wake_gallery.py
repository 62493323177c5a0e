"""The Wake machine's region-wide gallery counters and the phases of each wake, through
real edges sharing one real Redis, the local control plane and its sample app.

Each test provokes gates and failure modes and reads the store's counters (what the
gallery page shows), waiting for the edges' half-second flushes, then checks the
counts stay put (nothing counted twice). Counter meanings: wake/gallery_tally.py.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
from helpers import eventually, metric_sum, to_toml
from stack import CONTROL_PLANE_TOKEN, RedisProcess, cold_app, sample_app_spec
from webhooks import HOST as SHOP_HOOKS_HOST
from webhooks import QUEUE_RULES, WebhookApp, shop

from scheduler_client.client import ControlPlaneClient
from wake.budget import BudgetLimits
from wake.controller import WakeAppSpec, WakeController
from wake.gallery_tally import Admitted
from wake.store.redis_backend import RedisStore

SETTLE = 1.5  # three flush intervals: whatever was still to come has come


def slow_app(name: str, start_delay: float, **overrides: Any) -> dict[str, Any]:
    spec = sample_app_spec(name, **overrides)
    spec["command"] = [*spec["command"], "--start-delay", str(start_delay)]
    return spec


def region_edge(start_edge, cp, store: str, apps, workers: int | None = None, **sections: Any):
    return start_edge(
        apps=apps,
        edge={"store": store},
        sections={"control_plane": {"url": cp.url}, **sections},
        env={"CONTROL_PLANE_TOKEN": CONTROL_PLANE_TOKEN},
        workers=workers,
    )


async def counts(url: str) -> dict[str, int]:
    store = RedisStore(url)
    try:
        return await store.counts()
    finally:
        await store.close()


async def counted(url: str, expected: dict[str, int], timeout: float = 20.0) -> None:
    """The region's counters become exactly `expected`, and stay so."""
    seen: dict[str, int] = {}

    async def reached() -> bool:
        seen.update(await counts(url))
        return seen == expected

    try:
        await eventually(reached, timeout=timeout, interval=0.2, what="the gallery counts")
    except AssertionError:
        raise AssertionError(f"counts {seen} != expected {expected}") from None
    await asyncio.sleep(SETTLE)
    assert await counts(url) == expected


async def fetch(session, edge, host: str, path: str = "/") -> tuple[int, dict[str, str]]:
    async with session.get(edge.url + path, headers={"Host": host}) as resp:
        await resp.read()
        return resp.status, dict(resp.headers)


TIMING = re.compile(r"^(\w+);dur=(\d+\.\d)$")


def server_timing(value: str) -> dict[str, float]:
    """name -> dur of a Server-Timing value (comma-separated metrics, `;dur=` params)."""
    out = {}
    for metric in value.split(", "):
        found = TIMING.match(metric)
        assert found, f"not a Server-Timing metric: {metric!r} in {value!r}"
        out[found[1]] = float(found[2])
    return out


async def test_a_stampede_across_two_edges_is_199_requests_coalesced_into_one_wake(
    start_control_plane, start_edge, fresh_redis, client
) -> None:
    cp = start_control_plane(apps=[slow_app("shop", 1.0)])
    edges = [region_edge(start_edge, cp, fresh_redis, [cold_app("shop")]) for _ in range(2)]
    results = await asyncio.gather(
        *(fetch(client, edges[i % 2], "shop.localhost") for i in range(200))
    )
    assert [status for status, _ in results] == [200] * 200
    # Every request but the one that started the wake joined it: both edges' requests,
    # the first one on the other edge included (it found the lease taken).
    await counted(
        fresh_redis,
        {
            "wakes": 1,
            "failure:wake_stampede": 199,
            "gate_passed:request_class_safe_to_hold": 200,
            "gate_passed:wake_budget_available": 1,
            "gate_passed:allocation_passes_readiness": 1,
            "gate_passed:unsafe_replay_policy_exists": 2,  # each edge's config at start
        },
    )
    # Every held request: its own wait, then the phases of the one wake that released it,
    # on the edge that drove it and (from the store's last_wake) on the other.
    timings = [server_timing(headers["Server-Timing"]) for _, headers in results]
    assert all(list(t) == ["wake", "budget", "allocation", "readiness"] for t in timings)
    phases = {(t["budget"], t["allocation"], t["readiness"]) for t in timings}
    assert len(phases) == 1, phases
    [(budget, allocation, readiness)] = phases
    assert budget >= 0 and allocation >= 0 and readiness >= 0
    # The sample app answers 503 for its first second: readiness waits that out after the
    # allocation has its address (the local control plane gives one before the spawn).
    assert allocation + readiness >= 1000
    assert all(0 < t["wake"] < 20_000 for t in timings)
    assert max(t["wake"] for t in timings) >= budget + allocation + readiness
    store = RedisStore(fresh_redis)
    try:
        last = (await store.read_state("shop")).last_wake
    finally:
        await store.close()
    assert last is not None and last.at > 0
    assert (last.budget_ms, last.allocation_ms, last.readiness_ms) == (
        budget,
        allocation,
        readiness,
    )
    # Each figure is rounded to 0.1 ms: the total at least the sum, rounded the same way.
    assert last.total_ms >= round(budget + allocation + readiness, 1)
    # Hot now: no wait, no Server-Timing, nothing counted.
    status, headers = await fetch(client, edges[1], "shop.localhost")
    assert status == 200 and "Server-Timing" not in headers
    await asyncio.sleep(SETTLE)
    assert (await counts(fresh_redis))["gate_passed:request_class_safe_to_hold"] == 200


async def test_webhooks_while_cold_are_counted_queued_or_rejected(
    start_control_plane, start_edge, fresh_redis, client, tmp_path
) -> None:
    hooks = WebhookApp(tmp_path, start_delay=0.5, gated=True)
    cp = start_control_plane(apps=[hooks.spec, slow_app("cart", 1.5)])
    edge = region_edge(
        start_edge, cp, fresh_redis, [shop(), cold_app("cart")], budget={"wake_lease_ttl": "2s"}
    )

    async def post(host: str, event: str) -> int:
        headers = {"Host": host, "X-Event-Id": event, "Content-Type": "application/json"}
        async with client.post(edge.url + "/hooks/pay", data=b"{}", headers=headers) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(
        *(post(SHOP_HOOKS_HOST, f"evt_{i}") for i in range(4)),
        *(post("cart.localhost", f"evt_{i}") for i in range(3)),
    )
    assert statuses == [202] * 4 + [503] * 3
    hooks.open()
    await counted(
        fresh_redis,
        {
            "gate_refused:request_class_safe_to_hold": 7,
            "failure:payment_webhook_while_cold": 7,
            "failure:payment_webhook_while_cold:queued": 4,
            "failure:payment_webhook_while_cold:rejected": 3,
            # Each app's first POST started its wake; the others joined it.
            "wakes": 2,
            "failure:wake_stampede": 5,
            "gate_passed:wake_budget_available": 2,
            "gate_passed:allocation_passes_readiness": 2,
            "gate_passed:unsafe_replay_policy_exists": 1,
        },
    )
    # The per-worker metric counts the same failure mode.
    metrics = edge.metrics()
    assert metric_sum(metrics, "edge_wake_gallery_total", id="payment_webhook_while_cold") == 7


async def test_a_readiness_timeout_is_the_readiness_gates_refusal(
    start_control_plane, start_edge, fresh_redis, client
) -> None:
    cp = start_control_plane(apps=[slow_app("shop", 30.0, start_timeout="60s")])
    edge = region_edge(start_edge, cp, fresh_redis, [cold_app("shop", readiness_timeout="1s")])
    status, headers = await fetch(client, edge, "shop.localhost")
    assert status == 503 and headers["X-Edge-Error"] == "readiness_timeout"
    await counted(
        fresh_redis,
        {
            "gate_passed:request_class_safe_to_hold": 1,
            "wakes": 1,
            "gate_passed:wake_budget_available": 1,
            "gate_refused:allocation_passes_readiness": 1,
            "failure:readiness_timeout": 1,
            "gate_passed:unsafe_replay_policy_exists": 1,
        },
    )


async def test_a_wake_told_to_wait_by_the_budget_is_refused_once(
    start_control_plane, start_edge, fresh_redis, client
) -> None:
    cp = start_control_plane(apps=[slow_app("a", 1.0), slow_app("b", 1.0)])
    edge = region_edge(
        start_edge,
        cp,
        fresh_redis,
        [cold_app("a"), cold_app("b")],
        budget={"max_concurrent_wakes": 1},
    )
    results = await asyncio.gather(
        fetch(client, edge, "a.localhost"), fetch(client, edge, "b.localhost")
    )
    assert [status for status, _ in results] == [200, 200]
    # One wake waited out the other's slot, asking the budget again every few ms.
    await counted(
        fresh_redis,
        {
            "gate_passed:request_class_safe_to_hold": 2,
            "wakes": 2,
            "gate_passed:wake_budget_available": 2,
            "gate_refused:wake_budget_available": 1,
            "gate_passed:allocation_passes_readiness": 2,
            "gate_passed:unsafe_replay_policy_exists": 1,
        },
    )
    budgets = sorted(server_timing(h["Server-Timing"])["budget"] for _, h in results)
    assert budgets[1] >= 500  # the waiting wake's budget phase shows the wait


async def test_an_old_route_epoch_is_counted_and_the_retry_is_no_new_wake(
    start_control_plane, start_edge, fresh_redis, client
) -> None:
    cp = start_control_plane(apps=[slow_app("shop", 2.0)])
    async with aiohttp.ClientSession(headers=cp.headers()) as api:

        async def allocations() -> list[dict[str, Any]]:
            async with api.get(f"{cp.url}/v1/allocations", params={"app": "shop"}) as resp:
                return (await resp.json())["allocations"]

        async with api.post(f"{cp.url}/v1/allocations", json={"app": "shop"}) as resp:
            promoted = (await resp.json())["id"]

        async def ready() -> bool:
            return any(a["id"] == promoted and a["state"] == "ready" for a in await allocations())

        await eventually(ready, timeout=20, what="the allocation to promote")
        async with api.get(f"{cp.url}/v1/routes") as resp:
            epoch = (await resp.json())["apps"][0]["epoch"]
        cas = {"app": "shop", "expected_epoch": epoch, "allocation_ids": []}
        async with api.post(f"{cp.url}/v1/routes/cas", json=cas) as resp:
            assert resp.status == 200
        edge = region_edge(start_edge, cp, fresh_redis, [cold_app("shop")])
        held = asyncio.ensure_future(fetch(client, edge, "shop.localhost"))

        async def wake_allocating() -> bool:
            return any(a["id"] != promoted for a in await allocations())

        await eventually(wake_allocating, timeout=20, interval=0.05, what="the wake's allocation")
        promotion = {"app": "shop", "allocation_id": promoted}
        async with api.post(f"{cp.url}/v1/promotions", json=promotion) as resp:
            assert resp.status == 201
        status, _ = await held
    assert status == 200
    await counted(
        fresh_redis,
        {
            "gate_passed:request_class_safe_to_hold": 1,
            "wakes": 1,
            "gate_passed:wake_budget_available": 1,
            "failure:old_route_epoch": 1,
            "gate_passed:allocation_passes_readiness": 1,
            "gate_passed:unsafe_replay_policy_exists": 1,
        },
    )


async def test_config_loads_pass_or_are_refused_by_the_replay_policy_gate(
    start_control_plane, start_edge, fresh_redis, client
) -> None:
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    edge = region_edge(start_edge, cp, fresh_redis, [cold_app("shop")], workers=2)
    await counted(fresh_redis, {"gate_passed:unsafe_replay_policy_exists": 1})  # worker 0 only

    async def reload() -> int:
        url = edge.admin_url + "/admin/reload"
        async with client.post(url, headers=edge.admin_headers()) as resp:
            await resp.read()
            return resp.status

    good = edge.config_path.read_text()
    queue_without_policy = {**edge.config, "apps": [cold_app("shop", rules=QUEUE_RULES)]}
    edge.config_path.write_text(to_toml(queue_without_policy))
    assert await reload() == 400
    await counted(
        fresh_redis,
        {
            "gate_passed:unsafe_replay_policy_exists": 1,
            "gate_refused:unsafe_replay_policy_exists": 1,
        },
    )
    edge.config_path.write_text(good)
    assert await reload() == 200
    await counted(
        fresh_redis,
        {
            "gate_passed:unsafe_replay_policy_exists": 2,
            "gate_refused:unsafe_replay_policy_exists": 1,
        },
    )


async def test_counts_made_while_redis_is_down_reach_it_once_it_is_back(
    start_control_plane, start_edge, own_redis: RedisProcess, client
) -> None:
    # An app that stays starting throughout, so every POST finds it cold: answered 503
    # at once, whatever the store does, and counted.
    cp = start_control_plane(apps=[slow_app("shop", 60.0, start_timeout="120s")])
    edge = region_edge(
        start_edge,
        cp,
        own_redis.url,
        [cold_app("shop", readiness_timeout="60s")],
        budget={"client_wake_rate": 0},
    )

    async def post() -> None:
        async with client.post(
            edge.url + "/hooks/pay", data=b"{}", headers={"Host": "shop.localhost"}
        ) as resp:
            await resp.read()
            assert resp.status == 503 and resp.headers["X-Edge-Error"] == "not_safe_to_hold"

    def expected(rejected: int) -> dict[str, int]:
        return {
            "gate_refused:request_class_safe_to_hold": rejected,
            "failure:payment_webhook_while_cold": rejected,
            "failure:payment_webhook_while_cold:rejected": rejected,
            "wakes": 1,
            "failure:wake_stampede": rejected - 1,  # the first POST's wake is still starting
            "gate_passed:wake_budget_available": 1,
            "gate_passed:unsafe_replay_policy_exists": 1,
        }

    for _ in range(3):
        await post()
    await counted(own_redis.url, expected(3))
    own_redis.stop()
    for _ in range(5):
        await post()
    await asyncio.sleep(2.0)  # flushes fail meanwhile; the counts are kept
    own_redis.start()  # same port, the AOF keeps what was counted before
    await counted(own_redis.url, expected(8), timeout=30)


async def test_a_batch_redis_applied_after_its_sender_gave_up_is_counted_once(
    start_control_plane, own_redis: RedisProcess
) -> None:
    # SIGSTOP: the batch sits in Redis's socket, the controller times out and sends it
    # again; Redis, resumed, runs both. The batch's (writer, seq) makes the second a no-op.
    cp = start_control_plane(apps=[])
    store = RedisStore(own_redis.url, socket_timeout=0.5, connect_timeout=0.5, op_timeout=1.0)
    wake = WakeController(
        store,
        ControlPlaneClient(cp.url, cp.token),
        edge_id="edge-a",
        budget=BudgetLimits(),
        apps={"shop": WakeAppSpec(name="shop")},
    )
    held = "gate_passed:request_class_safe_to_hold"
    rejected = {
        "gate_refused:request_class_safe_to_hold": 1,
        "failure:payment_webhook_while_cold": 1,
        "failure:payment_webhook_while_cold:rejected": 1,
    }
    closed = False
    try:
        wake.admitted(Admitted.HELD)
        wake.admitted(Admitted.HELD)
        await counted(own_redis.url, {held: 2})
        own_redis.pause()
        try:
            wake.admitted(Admitted.REJECTED)
            await eventually(lambda: wake.tally.failures >= 1, timeout=10, what="a failed flush")
            wake.admitted(Admitted.HELD)
        finally:
            own_redis.resume()
        await counted(own_redis.url, {held: 3, **rejected})
        assert not wake.tally.has_work()
        # Shutdown sends what is still pending, without waiting for the next flush.
        wake.admitted(Admitted.HELD)
        await wake.close()
        closed = True
        assert await counts(own_redis.url) == {held: 4, **rejected}
    finally:
        if not closed:
            await wake.close()
