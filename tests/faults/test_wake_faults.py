"""Faults in the middle of a wake, on the real stack: two edges sharing a real Redis (AOF
on), the local control plane running the sample app with a start delay, real clients.

Each case injects one fault while a wake is starting and checks the promises: every
client gets an answer (200, or 503 with Retry-After) within its bound; once things
settle the app has exactly one allocation serving it (none left starting, ready and
unrouted, or orphaned); the region's wake budget has no slot in use.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from helpers import eventually, metric_sum
from stack import CONTROL_PLANE_TOKEN, sample_app_spec

pytestmark = pytest.mark.timeout(150)

HOST = "shop.localhost"
START_DELAY = 3.0
LEASE_TTL = "1s"
HOLD = 20.0
# Every client answer arrives within the hold timeout plus the store's and control
# plane's own bounds.
ANSWER_BOUND = HOLD + 15.0
LIVE = ("planned", "pulling", "starting", "ready")


def cold_shop(**overrides: Any) -> dict[str, Any]:
    app = {
        "name": "shop",
        "hosts": [HOST],
        "scale_to_zero": True,
        "hold_timeout": f"{HOLD:g}s",
        "readiness_timeout": "15s",
        "idle_timeout": "10m",
    }
    app.update(overrides)
    return app


def slow_shop() -> dict[str, Any]:
    spec = sample_app_spec("shop")
    spec["command"] = [*spec["command"], "--start-delay", str(START_DELAY)]
    return spec


def region_edge(start_edge, cp, redis_url: str, app: dict[str, Any] | None = None):
    return start_edge(
        apps=[app or cold_shop()],
        edge={"store": redis_url},
        sections={"control_plane": {"url": cp.url}, "budget": {"wake_lease_ttl": LEASE_TTL}},
        env={"CONTROL_PLANE_TOKEN": CONTROL_PLANE_TOKEN},
    )


async def cp_allocations(cp, app: str = "shop") -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession(headers=cp.headers()) as api,
        api.get(f"{cp.url}/v1/allocations", params={"app": app}) as resp,
    ):
        return (await resp.json())["allocations"]


async def ask(client: aiohttp.ClientSession, edge) -> tuple[int, dict[str, str], float]:
    """One GET through `edge`: (status, headers, seconds); status 0 when the connection failed."""
    started = time.monotonic()
    try:
        async with client.get(edge.url + "/", headers={"Host": HOST}) as resp:
            await resp.read()
            return resp.status, dict(resp.headers), time.monotonic() - started
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 0, {"error": repr(exc)}, time.monotonic() - started


def answered_within_bounds(results: list[tuple[int, dict[str, str], float]]) -> None:
    for status, headers, seconds in results:
        assert seconds < ANSWER_BOUND, (status, headers, seconds)
        assert status in (200, 503), (status, headers)
        if status == 503:
            assert "Retry-After" in headers, headers


async def settled_with_one_allocation(cp, client, edges) -> str:
    """Wait until a request is served and exactly one allocation is live; its id."""

    async def one_live_and_served() -> bool:
        status, headers, _ = await ask(client, edges[-1])
        live = [a for a in await cp_allocations(cp) if a["state"] in LIVE]
        return status == 200 and len(live) == 1 and live[0]["id"] == headers["X-Allocation-Id"]

    try:
        await eventually(one_live_and_served, timeout=60, interval=0.5, what="one live allocation")
    except AssertionError:
        states = [(a["id"], a["state"]) for a in await cp_allocations(cp)]
        pytest.fail(f"not exactly one live allocation serving the app: {states}")
    live = [a for a in await cp_allocations(cp) if a["state"] in LIVE]
    return live[0]["id"]


async def no_budget_slot_in_use(edge) -> None:
    await eventually(
        lambda: metric_sum(edge.metrics(), "edge_wake_budget_in_use") == 0,
        timeout=40,
        interval=0.5,
        what="the wake budget slot given back",
    )


def worker_pids(edge) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(edge.proc.pid)], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]


async def wake_then(
    cp, client, edges, fault: Callable[[], Awaitable[None]]
) -> list[tuple[int, dict[str, str], float]]:
    """Clients on every edge ask for the cold app; once its allocation exists, `fault`."""
    asks = [asyncio.ensure_future(ask(client, edge)) for edge in edges for _ in range(3)]

    async def allocation_created() -> bool:
        return bool(await cp_allocations(cp))

    await eventually(allocation_created, timeout=20, interval=0.05, what="the wake's allocation")
    await fault()
    return list(await asyncio.gather(*asks))


# ------------------------------------------------------------------------------- cases


async def test_redis_writes_paused_mid_wake(start_control_plane, start_edge, client, own_redis):
    cp = start_control_plane(apps=[slow_shop()])
    edges = [region_edge(start_edge, cp, own_redis.url) for _ in range(2)]

    async def pause_writes() -> None:
        own_redis.pause_writes(5000)

    answered_within_bounds(await wake_then(cp, client, edges, pause_writes))
    await settled_with_one_allocation(cp, client, edges)
    await no_budget_slot_in_use(edges[0])


async def test_redis_killed_and_restarted_mid_wake(
    start_control_plane, start_edge, client, own_redis
):
    cp = start_control_plane(apps=[slow_shop()])
    edges = [region_edge(start_edge, cp, own_redis.url) for _ in range(2)]

    async def restart_redis() -> None:
        own_redis.crash()
        await asyncio.sleep(1.0)
        own_redis.start()

    answered_within_bounds(await wake_then(cp, client, edges, restart_redis))
    await settled_with_one_allocation(cp, client, edges)
    await no_budget_slot_in_use(edges[0])


async def test_edge_sigkilled_mid_wake(start_control_plane, start_edge, client, fresh_redis):
    cp = start_control_plane(apps=[slow_shop()])
    first, second = (region_edge(start_edge, cp, fresh_redis) for _ in range(2))
    held = asyncio.ensure_future(ask(client, first))

    async def allocation_created() -> bool:
        return bool(await cp_allocations(cp))

    await eventually(allocation_created, timeout=20, interval=0.05, what="the wake's allocation")
    for pid in worker_pids(first):
        os.kill(pid, signal.SIGKILL)
    status, _, _ = await held
    assert status == 0  # the request died with its worker: a reset, not a hang
    answered_within_bounds([await ask(client, second)])
    await settled_with_one_allocation(cp, client, [second])
    await no_budget_slot_in_use(second)


async def test_edge_sigstopped_mid_wake(start_control_plane, start_edge, client, fresh_redis):
    cp = start_control_plane(apps=[slow_shop()])
    first, second = (region_edge(start_edge, cp, fresh_redis) for _ in range(2))
    stopped: list[int] = []

    async def freeze_the_waker() -> None:
        # The wake's lease holder is the first edge (it asked first); it stays frozen
        # past its lease, so the second edge takes the wake over.
        stopped.extend(worker_pids(first))
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(3.0)

    held = asyncio.ensure_future(ask(client, first))
    try:
        results = await wake_then(cp, client, [second], freeze_the_waker)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    answered_within_bounds([*results, await held])
    await settled_with_one_allocation(cp, client, [first, second])
    await no_budget_slot_in_use(second)


async def test_control_plane_killed_mid_allocation(
    start_control_plane, start_edge, client, fresh_redis
):
    cp = start_control_plane(apps=[slow_shop()])
    edge = region_edge(start_edge, cp, fresh_redis)

    async def kill_control_plane() -> None:
        cp.kill()
        await asyncio.sleep(1.0)
        cp.start()

    answered_within_bounds(await wake_then(cp, client, [edge], kill_control_plane))
    await settled_with_one_allocation(cp, client, [edge])
    await no_budget_slot_in_use(edge)


async def test_app_crashing_during_readiness(start_control_plane, start_edge, client, fresh_redis):
    crashing = sample_app_spec("shop")
    # Binds its port, never answers, exits 3 while the edge probes its readiness.
    crashing["command"] = [
        "{python}",
        "-c",
        "import socket, sys, time; s = socket.socket(); "
        "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(1.5); sys.exit(3)",
        "{port}",
    ]
    cp = start_control_plane(apps=[crashing])
    edge = region_edge(start_edge, cp, fresh_redis, cold_shop(readiness_timeout="5s"))
    results = [await ask(client, edge) for _ in range(2)]
    answered_within_bounds(results)
    assert all(status == 503 for status, _, _ in results), results
    live = [a for a in await cp_allocations(cp) if a["state"] in LIVE]
    assert live == [], live  # nothing left starting or ready
    await no_budget_slot_in_use(edge)
