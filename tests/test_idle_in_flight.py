"""Idle-to-sleep counts what is in flight anywhere: long requests and WebSockets on one
worker or edge keep the app awake for every other worker and edge (issue 12, §3)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
from helpers import eventually
from stack import CONTROL_PLANE_TOKEN, sample_app_spec
from test_wake_decisions import FakeClock

from edge.server.worker import in_flight_by_app
from scheduler_client.client import ControlPlaneClient
from wake.budget import BudgetLimits
from wake.controller import HotTarget, WakeAppSpec, WakeController
from wake.store.memory import MemoryStore
from wake.store.protocol import AppWakeState

HOST = "shop.localhost"


def shop(idle_timeout: str) -> dict[str, Any]:
    return {
        "name": "shop",
        "hosts": [HOST],
        "scale_to_zero": True,
        "hold_timeout": "15s",
        "readiness_timeout": "10s",
        "idle_timeout": idle_timeout,
    }


def region_edge(start_edge, cp, store: str, idle_timeout: str, workers: int):
    return start_edge(
        apps=[shop(idle_timeout)],
        edge={"store": store},
        sections={"control_plane": {"url": cp.url}},
        env={"CONTROL_PLANE_TOKEN": CONTROL_PLANE_TOKEN},
        workers=workers,
    )


async def allocations(cp) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession(headers=cp.headers()) as session,
        session.get(f"{cp.url}/v1/allocations", params={"app": "shop"}) as resp,
    ):
        return (await resp.json())["allocations"]


async def status_of(client: aiohttp.ClientSession, edge, path: str) -> int:
    try:
        async with client.get(edge.url + path, headers={"Host": HOST}) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return 0  # cut mid-response


# ------------------------------------------------------------------ plain functions


def test_in_flight_by_app_counts_requests_and_tunnels_per_app() -> None:
    addresses = {"shop": ["127.0.0.1:9001", "127.0.0.1:9002"], "blog": ["127.0.0.1:9003"]}
    requests = {"127.0.0.1:9001": 2, "127.0.0.1:9002": 1, "127.0.0.1:9004": 7}
    tunnels = ["127.0.0.1:9003", "127.0.0.1:9001", "127.0.0.1:9009"]
    assert in_flight_by_app(addresses, requests, tunnels) == {"shop": 4, "blog": 1}
    assert in_flight_by_app({"shop": []}, requests, tunnels) == {"shop": 0}


async def test_upkeep_marks_apps_in_flight_as_seen() -> None:
    """Last-seen stays fresh in the shared store while anything is in flight here, even for
    an app this process never woke and has not seen a request start for since."""
    store_clock = FakeClock(1000.0)
    store = MemoryStore(clock=store_clock)
    busy = {"shop": 1, "blog": 0}
    wake = WakeController(
        store,
        ControlPlaneClient("http://127.0.0.1:9", "unused"),  # never called: nothing is hot
        edge_id="test-edge",
        budget=BudgetLimits(),
        apps={name: WakeAppSpec(name=name, idle_timeout=3.0) for name in busy},
        in_flight=lambda app: busy[app],
    )
    try:
        await wake.upkeep()
        store_clock.now += 10.0
        await wake.upkeep()
        assert await store.idle_for("shop") == 0.0
        assert await store.idle_for("blog") is None
    finally:
        await wake.close()


class StuckDrain(ControlPlaneClient):
    """A control plane whose drain call does not return (slow, or unreachable with retries)."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9", "unused")
        self.draining = asyncio.Event()

    async def drain_allocation(self, allocation_id: str, deadline: float = 0.0) -> Any:
        self.draining.set()
        await asyncio.Event().wait()


async def test_in_flight_is_published_while_upkeep_is_busy_putting_another_app_to_sleep() -> None:
    """Putting one app to sleep can take the upkeep tens of seconds: meanwhile the apps in
    flight here must still be marked seen, or another process sleeps them."""
    store_clock = FakeClock(1000.0)
    store = MemoryStore(clock=store_clock)
    lease = await store.acquire_lease("idle", "waker", 10.0)
    assert lease is not None
    hot = AppWakeState(app="idle", state="hot", address="127.0.0.1:9", allocation_id="a-1")
    assert await store.write_state(hot, lease.token)
    await store.release_lease("idle", "waker")
    await store.touch("idle")
    busy = {"idle": 0, "busy": 1}
    client = StuckDrain()
    wake = WakeController(
        store,
        client,
        edge_id="test-edge",
        budget=BudgetLimits(),
        apps={name: WakeAppSpec(name=name, idle_timeout=3.0) for name in busy},
        in_flight=lambda app: busy[app],
    )
    wake._hot["idle"] = HotTarget("127.0.0.1:9", "a-1")  # this process knows it hot
    store_clock.now += 10.0
    upkeep = asyncio.create_task(wake.upkeep())
    try:
        async with asyncio.timeout(5):
            await client.draining.wait()  # the upkeep is stuck putting "idle" to sleep
        store_clock.now += 10.0
        await wake.mark_seen()
        assert await store.idle_for("busy") == 0.0
        assert not upkeep.done()
    finally:
        upkeep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await upkeep
        await wake.close()


# ------------------------------------------------------------------ real processes


async def test_long_requests_on_one_edge_keep_the_app_awake_for_another(
    start_control_plane, start_edge, fresh_redis, client
) -> None:
    """Edge A woke the app and then sees nothing; edge B (2 workers) serves 8 ten-second
    requests. A must not call the app idle while they are in flight."""
    cp = start_control_plane(apps=[sample_app_spec("shop", drain_grace="1s")])
    # Workers mark what they have in flight as seen once a second: an idle timeout of a few
    # of those leaves room for a stalled second on a loaded machine.
    waker = region_edge(start_edge, cp, fresh_redis, "4s", workers=1)
    server = region_edge(start_edge, cp, fresh_redis, "4s", workers=2)
    assert await status_of(client, waker, "/") == 200
    statuses = await asyncio.gather(
        *(status_of(client, server, "/slow?seconds=10") for _ in range(8))
    )
    allocated = await allocations(cp)
    assert statuses == [200] * 8, (statuses, allocated)
    assert [a["state"] for a in allocated] == ["ready"], allocated

    async def slept() -> bool:
        return [a["state"] for a in await allocations(cp)] == ["stopped"]

    # Idle-to-sleep still works once nothing is in flight.
    await eventually(slept, timeout=30, interval=0.5, what="the idle app drained")


async def test_websocket_keeps_the_app_awake(
    start_control_plane, start_edge, fresh_redis, client
) -> None:
    """A WebSocket quiet for three idle timeouts is in flight: the app stays hot."""
    cp = start_control_plane(apps=[sample_app_spec("shop", drain_grace="1s")])
    # Seen once a second while in flight: 4 s leaves room for a stalled second.
    edge = region_edge(start_edge, cp, fresh_redis, "4s", workers=2)
    # Wake it over several connections, so both workers are likely to know it hot.
    assert await asyncio.gather(*(status_of(client, edge, "/") for _ in range(8))) == [200] * 8
    async with client.ws_connect(edge.url + "/ws", headers={"Host": HOST}) as ws:
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "hello"
        await asyncio.sleep(12.5)
        await ws.send_str("still there")
        message = await ws.receive(timeout=5)
        allocated = await allocations(cp)
        assert message.data == "still there", (message, allocated)
    assert [a["state"] for a in allocated] == ["ready"], allocated
