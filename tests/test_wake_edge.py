"""Scale-to-zero through the edge: holding, coalescing, refusing, failing, sleeping.

Real local control plane running the sample app as processes, a real edge
process (memory:// store, one worker) in front of it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from helpers import eventually
from stack import CONTROL_PLANE_TOKEN, sample_app_spec

HOST = "shop.localhost"


def scale_to_zero_app(name: str = "shop", **overrides: Any) -> dict[str, Any]:
    app = {
        "name": name,
        "hosts": [f"{name}.localhost"],
        "scale_to_zero": True,
        "hold_timeout": "15s",
        "readiness_timeout": "10s",
        "idle_timeout": "5m",
    }
    app.update(overrides)
    return app


def edge_for(start_edge, cp, apps: list[dict[str, Any]], **sections: Any):
    return start_edge(
        apps=apps,
        sections={"control_plane": {"url": cp.url}, **sections},
        env={"CONTROL_PLANE_TOKEN": CONTROL_PLANE_TOKEN},
    )


async def allocations(cp, app: str = "shop") -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession(headers=cp.headers()) as session,
        session.get(f"{cp.url}/v1/allocations", params={"app": app}) as resp,
    ):
        return (await resp.json())["allocations"]


async def get(session: aiohttp.ClientSession, edge, host: str = HOST, path: str = "/", **kw):
    async with session.get(edge.url + path, headers={"Host": host, **kw}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_cold_get_is_held_woken_and_served(start_control_plane, start_edge, client) -> None:
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    edge = edge_for(start_edge, cp, [scale_to_zero_app()])
    status, headers, body = await get(client, edge)
    assert status == 200, body
    assert headers["Server-Timing"].startswith("wake;dur=")

    # The edge may see the app answer before the control plane's own readiness poll does.
    async def control_plane_ready() -> bool:
        return [a["state"] for a in await allocations(cp)] == ["ready"]

    await eventually(control_plane_ready, timeout=10, interval=0.05, what="allocation ready")
    allocated = await allocations(cp)
    assert len(allocated) == 1 and allocated[0]["state"] == "ready"
    assert headers["X-Allocation-Id"] == allocated[0]["id"]
    # Hot now: no wait, same allocation.
    status, headers, _ = await get(client, edge)
    assert status == 200 and "Server-Timing" not in headers
    assert headers["X-Allocation-Id"] == allocated[0]["id"]


async def test_stampede_in_one_process_is_one_wake(start_control_plane, start_edge, client) -> None:
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    edge = edge_for(start_edge, cp, [scale_to_zero_app()])
    results = await asyncio.gather(*(get(client, edge) for _ in range(300)))
    assert [status for status, _, _ in results] == [200] * 300
    assert len({headers["X-Allocation-Id"] for _, headers, _ in results}) == 1
    assert len(await allocations(cp)) == 1


async def test_unsafe_request_is_refused_but_starts_the_wake(
    start_control_plane, start_edge, client
) -> None:
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    edge = edge_for(start_edge, cp, [scale_to_zero_app()])
    async with client.post(
        edge.url + "/echo", data=b"payload", headers={"Host": HOST, "Stripe-Signature": "t=1"}
    ) as resp:
        assert resp.status == 503
        assert int(resp.headers["Retry-After"]) >= 1
        assert resp.headers["X-Edge-Error"] == "not_safe_to_hold"

    async def woke() -> bool:
        return any(a["state"] == "ready" for a in await allocations(cp))

    await eventually(woke, timeout=20, what="the wake started by the refused POST")
    async with client.post(edge.url + "/echo", data=b"payload", headers={"Host": HOST}) as resp:
        assert resp.status == 200  # the sender's retry finds the app hot
        assert await resp.read() == b"payload"
    assert len(await allocations(cp)) == 1


async def test_request_with_idempotency_key_is_held(
    start_control_plane, start_edge, client
) -> None:
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    edge = edge_for(start_edge, cp, [scale_to_zero_app()])
    async with client.post(
        edge.url + "/echo",
        data=b"order-42",
        headers={"Host": HOST, "Idempotency-Key": "k-42"},
    ) as resp:
        assert resp.status == 200
        assert await resp.read() == b"order-42"
        assert "Server-Timing" in resp.headers


async def test_readiness_timeout_fails_and_backs_off(
    start_control_plane, start_edge, client
) -> None:
    slow = sample_app_spec(
        "shop",
        command=sample_app_spec("shop")["command"] + ["--start-delay", "30"],
        start_timeout="60s",
    )
    cp = start_control_plane(apps=[slow])
    # A back-off no loaded machine outlasts between two requests (the default is 1 s).
    app = scale_to_zero_app(readiness_timeout="1s", wake_backoff="30s")
    edge = edge_for(start_edge, cp, [app])
    status, headers, body = await get(client, edge)
    assert status == 503, body
    assert headers["X-Edge-Error"] == "readiness_timeout"
    assert int(headers["Retry-After"]) >= 1
    # Inside the back-off the next request is refused at once, and no new wake starts.
    status, headers, _ = await get(client, edge)
    assert status == 503 and headers["X-Edge-Error"] == "wake_backoff"
    assert int(headers["Retry-After"]) > 20  # the app's wake_backoff, not the default 1 s
    allocated = await allocations(cp)
    assert len(allocated) == 1

    async def drained() -> bool:
        return (await allocations(cp))[0]["state"] in ("draining", "stopped")

    await eventually(drained, timeout=20, what="the timed-out allocation drained")


async def test_the_edge_notices_readiness_itself_with_bounded_dense_probing(
    start_control_plane, start_edge, client
) -> None:
    """The control plane probes a path that never passes (so its allocation stays
    `starting`): the wake completes on the edge's own probe. The app counts the probes
    it answered during its 1 s start: dense (the old 5 ms doubling to 250 ms schedule
    sends about ten), but bounded (about 200 a second at most, decisions.probe_pause)."""
    spec = sample_app_spec("shop")
    slow = sample_app_spec(
        "shop",
        command=[*spec["command"], "--start-delay", "1"],
        readiness_path="/never",  # 503 while starting, 404 after: never ready for the CP
        start_timeout="60s",
    )
    cp = start_control_plane(apps=[slow])
    edge = edge_for(start_edge, cp, [scale_to_zero_app()])
    status, headers, body = await get(client, edge)
    assert status == 200, body
    assert "Server-Timing" in headers  # held for the wake
    allocated = await allocations(cp)
    assert len(allocated) == 1 and allocated[0]["state"] == "starting"
    assert headers["X-Allocation-Id"] == allocated[0]["id"]
    status, _, body = await get(client, edge, path="/probes")
    assert status == 200, body
    probes = json.loads(body)["readiness"]
    assert set(probes) == {"edge-wake-probe"}, probes  # the control plane probes /never
    assert 20 < probes["edge-wake-probe"] < 400, probes


async def test_hold_timeout_answers_503_and_the_wake_completes(
    start_control_plane, start_edge, client
) -> None:
    slow = sample_app_spec(
        "shop", command=sample_app_spec("shop")["command"] + ["--start-delay", "2"]
    )
    cp = start_control_plane(apps=[slow])
    edge = edge_for(start_edge, cp, [scale_to_zero_app(hold_timeout="500ms")])
    status, headers, _ = await get(client, edge)
    assert status == 503 and headers["X-Edge-Error"] == "hold_timeout"
    assert int(headers["Retry-After"]) >= 1

    async def hot() -> bool:
        status, _, _ = await get(client, edge)
        return status == 200

    await eventually(hot, timeout=30, interval=0.5, what="the app hot after the hold timeout")
    assert len(await allocations(cp)) == 1


async def test_a_hold_longer_than_the_upstream_idle_timeout_ends_with_503(
    start_control_plane, start_edge, client
) -> None:
    # The upstream idle timeout bounds exchanges with an upstream; a held request has
    # none yet, and its own bound (the hold timeout) decides: 503 + Retry-After, never 504.
    slow = sample_app_spec(
        "shop", command=sample_app_spec("shop")["command"] + ["--start-delay", "10"]
    )
    cp = start_control_plane(apps=[slow])
    edge = edge_for(
        start_edge, cp, [scale_to_zero_app(hold_timeout="2500ms")], upstream={"idle_timeout": "1s"}
    )
    started = asyncio.get_running_loop().time()
    status, headers, _ = await get(client, edge)
    assert status == 503 and headers["X-Edge-Error"] == "hold_timeout", headers
    assert int(headers["Retry-After"]) >= 1
    assert asyncio.get_running_loop().time() - started >= 2.0


async def test_idle_app_sleeps_and_wakes_again(start_control_plane, start_edge, client) -> None:
    cp = start_control_plane(apps=[sample_app_spec("shop", drain_grace="1s")])
    edge = edge_for(start_edge, cp, [scale_to_zero_app(idle_timeout="1s")])
    status, headers, _ = await get(client, edge)
    assert status == 200
    first = headers["X-Allocation-Id"]

    async def stopped() -> bool:
        return (await allocations(cp))[0]["state"] == "stopped"

    await eventually(stopped, timeout=30, interval=0.3, what="the idle app drained")

    async def cold() -> bool:
        status, body = edge.admin_get("/admin/apps")
        apps = {a["name"]: a for a in __import__("json").loads(body)["apps"]}
        return status == 200 and apps["shop"]["state"] == "cold"

    await eventually(cold, timeout=10, what="wake state cold")
    status, headers, _ = await get(client, edge)
    assert status == 200 and headers["X-Allocation-Id"] != first
    assert "Server-Timing" in headers
    assert len(await allocations(cp)) == 2


async def test_unknown_path_for_static_apps_unchanged(start_edge, upstream, client) -> None:
    """Static apps never touch the wake machinery (no control plane configured)."""
    edge = start_edge()
    status, headers, _ = await get(client, edge, host="app.localhost", path="/echo")
    assert status == 200 and "Server-Timing" not in headers


async def test_browser_gets_a_starting_page(start_control_plane, start_edge, client) -> None:
    slow = sample_app_spec(
        "shop", command=sample_app_spec("shop")["command"] + ["--start-delay", "2"]
    )
    cp = start_control_plane(apps=[slow])
    edge = edge_for(start_edge, cp, [scale_to_zero_app(starting_page_after="200ms")])
    status, headers, body = await get(client, edge, Accept="text/html,application/xhtml+xml")
    assert status == 503
    assert headers["Content-Type"].startswith("text/html")
    assert b'http-equiv="refresh"' in body and b"shop is starting" in body
    # A non-browser client keeps waiting instead.
    status, headers, _ = await get(client, edge, Accept="application/json")
    assert status == 200 and "Server-Timing" in headers


async def test_old_route_epoch_is_never_routed_and_the_wake_retries(
    start_control_plane, start_edge, client
) -> None:
    slow = sample_app_spec(
        "shop", command=sample_app_spec("shop")["command"] + ["--start-delay", "2"]
    )
    cp = start_control_plane(apps=[slow])
    async with aiohttp.ClientSession(headers=cp.headers()) as api:
        async with api.post(f"{cp.url}/v1/allocations", json={"app": "shop"}) as resp:
            promoted = (await resp.json())["id"]

        async def ready(alloc_id: str) -> bool:
            return any(a["id"] == alloc_id and a["state"] == "ready" for a in await allocations(cp))

        await eventually(lambda: ready(promoted), timeout=20, what="allocation to promote")
        # Take it out of the route, so the edge finds the app without a ready target.
        async with api.get(f"{cp.url}/v1/routes") as resp:
            epoch = (await resp.json())["apps"][0]["epoch"]
        async with api.post(
            f"{cp.url}/v1/routes/cas",
            json={"app": "shop", "expected_epoch": epoch, "allocation_ids": []},
        ) as resp:
            assert resp.status == 200
        edge = edge_for(start_edge, cp, [scale_to_zero_app()])
        held = asyncio.ensure_future(get(client, edge))

        async def wake_starting() -> bool:
            return any(a["id"] != promoted for a in await allocations(cp))

        await eventually(wake_starting, timeout=20, interval=0.05, what="the wake's allocation")
        stale = next(a["id"] for a in await allocations(cp) if a["id"] != promoted)
        async with api.post(
            f"{cp.url}/v1/promotions", json={"app": "shop", "allocation_id": promoted}
        ) as resp:
            assert resp.status == 201
        status, headers, _ = await held
    assert status == 200
    assert headers["X-Allocation-Id"] != stale

    async def stale_drained() -> bool:
        return any(
            a["id"] == stale and a["state"] in ("draining", "stopped")
            for a in await allocations(cp)
        )

    await eventually(stale_drained, timeout=20, what="the stale allocation drained")
    status, body = edge.admin_get("/admin/apps")
    shop = next(a for a in __import__("json").loads(body)["apps"] if a["name"] == "shop")
    assert any("old route epoch" in t["reason"] for t in shop["transitions"])


async def test_wake_metrics_count_transitions_and_rejections(
    start_control_plane, start_edge, client
) -> None:
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    edge = edge_for(start_edge, cp, [scale_to_zero_app()])
    async with client.delete(edge.url + "/x", headers={"Host": HOST}) as resp:
        assert resp.status == 503
    status, _, _ = await get(client, edge)
    assert status == 200

    def counted() -> bool:
        text = edge.metrics()
        return (
            "edge_wake_transitions_total" in text
            and 'from="readiness_wait",to="hot"' in text
            and 'reason="not_safe_to_hold"' in text
        )

    await eventually(counted, timeout=10, what="wake metrics")


async def test_held_request_cap_answers_503(start_control_plane, start_edge, client) -> None:
    slow = sample_app_spec(
        "shop", command=sample_app_spec("shop")["command"] + ["--start-delay", "1"]
    )
    cp = start_control_plane(apps=[slow])
    edge = edge_for(start_edge, cp, [scale_to_zero_app(max_held=2)])
    results = await asyncio.gather(*(get(client, edge) for _ in range(6)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200, 200, 503, 503, 503, 503]
    for status, headers, _ in results:
        if status == 503:
            assert headers["X-Edge-Error"] == "hold_cap" and "Retry-After" in headers
    assert len(await allocations(cp)) == 1


async def test_wake_slower_than_hold_is_refused_at_once(
    start_control_plane, start_edge, client
) -> None:
    slow = sample_app_spec(
        "shop",
        command=sample_app_spec("shop")["command"] + ["--start-delay", "2"],
        drain_grace="1s",
    )
    cp = start_control_plane(apps=[slow])
    edge = edge_for(start_edge, cp, [scale_to_zero_app(hold_timeout="1s", idle_timeout="1s")])
    status, headers, _ = await get(client, edge)
    assert status == 503 and headers["X-Edge-Error"] == "hold_timeout"

    def state_is(wanted: str):
        def check() -> bool:
            status, body = edge.admin_get("/admin/apps")
            apps = {a["name"]: a for a in __import__("json").loads(body)["apps"]}
            return status == 200 and apps["shop"]["state"] == wanted

        return check

    await eventually(state_is("hot"), timeout=20, what="the first wake to finish")
    await eventually(state_is("cold"), timeout=30, interval=0.3, what="the app asleep again")
    # The app is known to take ~2 s to wake, more than the 1 s hold: no point holding.
    status, headers, _ = await get(client, edge)
    assert status == 503 and headers["X-Edge-Error"] == "wake_slower_than_hold"
    assert int(headers["Retry-After"]) >= 2


async def test_classification_rules_decide_hold_or_reject(
    start_control_plane, start_edge, client
) -> None:
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    rules = [
        {"class": "reject", "methods": ["GET"], "path_prefix": "/admin"},
        {"class": "hold", "methods": ["POST"], "header": "X-Retry-Safe"},
    ]
    edge = edge_for(start_edge, cp, [scale_to_zero_app(rules=rules)])
    status, headers, _ = await get(client, edge, path="/admin/panel")
    assert status == 503 and headers["X-Edge-Error"] == "not_safe_to_hold"
    async with client.post(
        edge.url + "/echo", data=b"retry-me", headers={"Host": HOST, "X-Retry-Safe": "1"}
    ) as resp:
        assert resp.status == 200 and await resp.read() == b"retry-me"
        assert "Server-Timing" in resp.headers or len(await allocations(cp)) == 1


async def test_one_app_of_another_tenant_is_not_queued_behind_a_tenants_fleet(
    start_control_plane, start_edge, client
) -> None:
    """Budget 1: tenant big's 6 cold apps ask first, then tenant small's one app. Round-
    robin across tenants wakes small's app within the first 3 wakes (arrival order: last).
    """
    big = [f"big{i}" for i in range(6)]
    specs = [
        sample_app_spec(name, command=sample_app_spec(name)["command"] + ["--start-delay", "1"])
        for name in [*big, "small"]
    ]
    cp = start_control_plane(apps=specs)
    apps = [scale_to_zero_app(name, tenant="big", hold_timeout="40s") for name in big]
    apps.append(scale_to_zero_app("small", tenant="small", hold_timeout="40s"))
    edge = edge_for(
        start_edge,
        cp,
        apps,
        budget={"max_concurrent_wakes": 1, "max_wakes_per_second": 100},
    )
    done: list[str] = []

    async def wake(name: str) -> None:
        status, _, body = await get(client, edge, host=f"{name}.localhost")
        assert status == 200, (name, body)
        done.append(name)

    fleet = []
    for name in big:  # spaced, so they reach the budget in this order
        fleet.append(asyncio.create_task(wake(name)))
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # every big app is waiting for the budget; big0 is starting
    await asyncio.gather(*fleet, wake("small"))
    assert done.index("small") <= 2, done
    assert [name for name in done if name != "small"] == big  # each tenant in arrival order
