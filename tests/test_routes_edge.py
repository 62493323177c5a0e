"""The edge following the control plane's route table: acks, promotions, resyncs, outages."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import aiohttp
from helpers import eventually
from stack import CONTROL_PLANE_TOKEN, sample_app_spec

HOST = "shop.localhost"


def app_entry() -> dict[str, Any]:
    return {
        "name": "shop",
        "hosts": [HOST],
        "scale_to_zero": True,
        "hold_timeout": "15s",
        "readiness_timeout": "10s",
    }


def start(start_edge, cp, **kw: Any):
    return start_edge(
        apps=[app_entry()],
        sections={"control_plane": {"url": cp.url}},
        env={"CONTROL_PLANE_TOKEN": CONTROL_PLANE_TOKEN},
        **kw,
    )


async def api(cp, method: str, path: str, body: Any = None) -> Any:
    async with (
        aiohttp.ClientSession(headers=cp.headers()) as session,
        session.request(method, cp.url + path, json=body) as resp,
    ):
        return resp.status, await resp.json()


async def new_ready_allocation(cp) -> str:
    _, alloc = await api(cp, "POST", "/v1/allocations", {"app": "shop"})

    async def ready() -> bool:
        _, current = await api(cp, "GET", f"/v1/allocations/{alloc['id']}")
        return current["state"] == "ready"

    await eventually(ready, timeout=20, what="allocation ready")
    return alloc["id"]


def admin_json(edge, path: str) -> dict[str, Any]:
    status, body = edge.admin_get(path)
    assert status in (200, 503), body
    return json.loads(body)


async def serving(edge, session) -> str:
    async with session.get(edge.url + "/", headers={"Host": HOST}) as resp:
        await resp.read()
        assert resp.status == 200
        return resp.headers["X-Allocation-Id"]


async def test_edges_apply_and_ack_and_a_promotion_goes_healthy(
    start_control_plane, start_edge, client
) -> None:
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    first = await new_ready_allocation(cp)
    edges = [start(start_edge, cp), start(start_edge, cp)]
    for edge in edges:
        ready = admin_json(edge, "/readyz")
        assert ready["ready"] and ready["route_epoch"] >= 1
        assert await serving(edge, client) == first
    second = await new_ready_allocation(cp)
    _, snapshot = await api(cp, "GET", "/v1/routes")
    status, promotion = await api(
        cp,
        "POST",
        "/v1/promotions",
        {"app": "shop", "allocation_id": second, "expected_epoch": snapshot["apps"][0]["epoch"]},
    )
    assert status == 201

    async def healthy() -> bool:
        _, current = await api(cp, "GET", f"/v1/promotions/{promotion['id']}")
        return current["state"] == "healthy"

    await eventually(healthy, timeout=20, what="promotion healthy")
    _, current = await api(cp, "GET", f"/v1/promotions/{promotion['id']}")
    assert len(current["waiting_for"]) == 2 and sorted(current["acked_by"]) == sorted(
        current["waiting_for"]
    )
    # After the ack no request is served by the old allocation.
    for edge in edges:
        for _ in range(10):
            assert await serving(edge, client) == second
    _, listed = await api(cp, "GET", "/v1/edges")
    assert all(e["acked_epoch"] >= current["to_epoch"] for e in listed["edges"])


async def test_promotion_rolls_back_when_an_edge_never_acks(
    start_control_plane, start_edge, client
) -> None:
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    first = await new_ready_allocation(cp)
    alive, frozen = start(start_edge, cp), start(start_edge, cp)
    assert await serving(alive, client) == first
    workers = [int(p) for p in os.popen(f"pgrep -P {frozen.proc.pid}").read().split()]
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)  # registered and live, but acks nothing
    try:
        second = await new_ready_allocation(cp)
        _, promotion = await api(
            cp,
            "POST",
            "/v1/promotions",
            {"app": "shop", "allocation_id": second, "propagation_timeout_s": 2},
        )

        async def rolled_back() -> bool:
            _, current = await api(cp, "GET", f"/v1/promotions/{promotion['id']}")
            return current["state"] == "rolled_back"

        await eventually(rolled_back, timeout=20, what="promotion rolled back")
        # The previous route is restored: the live edge follows it back.

        async def back_on_first() -> bool:
            return await serving(alive, client) == first

        await eventually(back_on_first, timeout=10, what="routes restored")
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)


async def test_410_from_the_feed_triggers_a_resync(start_control_plane, start_edge, client) -> None:
    cp = start_control_plane(apps=[sample_app_spec("shop")], route_history=1)
    await new_ready_allocation(cp)
    edge = start(start_edge, cp)
    workers = [int(p) for p in os.popen(f"pgrep -P {edge.proc.pid}").read().split()]
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(3):  # more changes than the feed keeps
            await new_ready_allocation(cp)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    _, snapshot = await api(cp, "GET", "/v1/routes")

    def resynced() -> bool:
        routes = admin_json(edge, "/admin/routes")
        return routes["resyncs"] >= 1 and routes["applied_epoch"] == snapshot["epoch"]

    await eventually(resynced, timeout=20, what="a resync after 410")


async def test_control_plane_outage_keeps_hot_apps_serving(
    start_control_plane, start_edge, client
) -> None:
    """The control plane is gone for 30 s under load: every request still answers 200."""
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    allocation = await new_ready_allocation(cp)
    edge = start(start_edge, cp)
    assert await serving(edge, client) == allocation
    stop = asyncio.Event()
    statuses: list[int] = []

    async def load() -> None:
        for _ in range(20_000):
            if stop.is_set():
                return
            async with client.get(edge.url + "/", headers={"Host": HOST}) as resp:
                await resp.read()
                statuses.append(resp.status)
            await asyncio.sleep(0.01)

    loaders = [asyncio.ensure_future(load()) for _ in range(4)]
    cp.kill()
    try:
        await asyncio.sleep(30)
        ready = admin_json(edge, "/readyz")
        assert ready["routes_stale"] and ready["route_table_age_s"] >= 25
    finally:
        cp.start()
    try:

        def fresh() -> bool:
            ready = admin_json(edge, "/readyz")
            return not ready["routes_stale"] and ready["route_table_age_s"] < 5

        # Up to a retry's back-off (5 s), then a poll that does not wait: reachable again
        # on its answer (before: only once a whole 25 s long-poll had been held).
        await eventually(fresh, timeout=12, what="resync after the control plane returns")
    finally:
        stop.set()
        await asyncio.gather(*loaders)
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}


async def test_connection_failure_moves_an_idempotent_request_to_another_allocation(
    start_control_plane, start_edge, client
) -> None:
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    first = await new_ready_allocation(cp)
    second = await new_ready_allocation(cp)
    edge = start(start_edge, cp)
    _, gone = await api(cp, "GET", f"/v1/allocations/{first}")
    os.killpg(gone["pid"], signal.SIGKILL)  # dies without the edge hearing of it yet
    for _ in range(10):
        assert await serving(edge, client) == second

    def retried() -> bool:
        return 'kind="retried_elsewhere"' in edge.metrics()

    await eventually(retried, timeout=5, what="the retry on another allocation counted")


async def test_draining_allocation_gets_no_new_requests(
    start_control_plane, start_edge, client
) -> None:
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    first = await new_ready_allocation(cp)
    second = await new_ready_allocation(cp)
    edge = start(start_edge, cp)
    seen = {await serving(edge, client) for _ in range(20)}
    assert seen <= {first, second}
    await api(cp, "POST", f"/v1/allocations/{first}/drain", {"deadline_s": 5})

    async def only_second() -> bool:
        return {await serving(edge, client) for _ in range(10)} == {second}

    await eventually(only_second, timeout=10, what="draining allocation left out")


async def test_promotion_under_load_switches_without_errors(
    start_control_plane, start_edge, client
) -> None:
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    first = await new_ready_allocation(cp)
    edge = start(start_edge, cp)
    second = await new_ready_allocation(cp)
    # Both are routed now; pin the route to the first so the promotion is a real switch.
    _, snapshot = await api(cp, "GET", "/v1/routes")
    epoch = snapshot["apps"][0]["epoch"]
    status, _ = await api(
        cp,
        "POST",
        "/v1/routes/cas",
        {"app": "shop", "expected_epoch": epoch, "allocation_ids": [first]},
    )
    assert status == 200
    stop = asyncio.Event()
    results: list[tuple[float, int, str]] = []

    async def load() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(3000):
            if stop.is_set():
                return
            started = loop.time()
            try:
                async with client.get(edge.url + "/", headers={"Host": HOST}) as resp:
                    await resp.read()
                    results.append((started, resp.status, resp.headers.get("X-Allocation-Id", "")))
            except aiohttp.ClientError as exc:
                results.append((started, 0, repr(exc)))

    loaders = [asyncio.ensure_future(load()) for _ in range(8)]
    await asyncio.sleep(0.5)
    _, promotion = await api(cp, "POST", "/v1/promotions", {"app": "shop", "allocation_id": second})

    async def healthy() -> bool:
        _, current = await api(cp, "GET", f"/v1/promotions/{promotion['id']}")
        return current["state"] == "healthy"

    await eventually(healthy, timeout=20, what="promotion healthy under load")
    acked_at = asyncio.get_running_loop().time()
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*loaders)
    assert {status for _, status, _ in results} == {200}
    after = [alloc for started, _, alloc in results if started > acked_at]
    assert after and set(after) == {second}
    assert first in {alloc for started, _, alloc in results if started < acked_at}


async def test_drain_closes_websockets_with_1001_at_the_deadline(
    start_control_plane, start_edge, client
) -> None:
    cp = start_control_plane(apps=[sample_app_spec("shop", drain_grace="2s")])
    first = await new_ready_allocation(cp)
    edge = start(start_edge, cp)
    second = await new_ready_allocation(cp)
    assert await serving(edge, client) in (first, second)
    sockets = []
    for _ in range(6):
        ws = await client.ws_connect(edge.url + "/ws", headers={"Host": HOST})
        sockets.append(ws)
    loop = asyncio.get_running_loop()
    await api(cp, "POST", f"/v1/allocations/{first}/drain", {"deadline_s": 2})
    drained_at = loop.time()
    statuses = [await serving_status(edge, client) for _ in range(30)]
    assert set(statuses) == {200}  # plain requests never fail during the drain

    async def close_frame(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage | None:
        try:
            return await ws.receive(timeout=10)
        except TimeoutError:
            return None  # a socket on the other allocation stays open

    closes = await asyncio.gather(*(close_frame(ws) for ws in sockets))
    closed_at = loop.time()
    on_first = [m for m in closes if m is not None and m.type == aiohttp.WSMsgType.CLOSE]
    assert on_first, [m.type for m in closes]
    assert all(m.data == 1001 for m in on_first)
    assert closed_at - drained_at >= 1.5  # not before the deadline
    for ws in sockets:
        await ws.close()


async def serving_status(edge, session) -> int:
    async with session.get(edge.url + "/", headers={"Host": HOST}) as resp:
        await resp.read()
        return resp.status


async def test_disabled_region_answers_503_and_never_wakes(
    start_control_plane, start_edge, client
) -> None:
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    edge = start(start_edge, cp)
    status, _ = await api(cp, "PUT", "/v1/region", {"state": "disabled", "reason": "maintenance"})
    assert status == 200

    async def refused() -> bool:
        async with client.get(edge.url + "/", headers={"Host": HOST}) as resp:
            body = await resp.read()
            return (
                resp.status == 503
                and resp.headers.get("X-Edge-Error") == "region_disabled"
                and (b"maintenance" in body)
            )

    await eventually(refused, timeout=10, what="503 for a disabled region")
    _, listed = await api(cp, "GET", "/v1/allocations?app=shop")
    assert listed["allocations"] == []  # no wake was started
    await api(cp, "PUT", "/v1/region", {"state": "eligible"})

    async def serves() -> bool:
        async with client.get(edge.url + "/", headers={"Host": HOST}) as resp:
            await resp.read()
            return resp.status == 200

    await eventually(serves, timeout=30, interval=0.5, what="wakes again once eligible")
