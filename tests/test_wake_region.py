"""Wakes across edge processes sharing Redis: one wake per app, the region-wide budget,
a lease holder killed mid-wake, Redis going away, and a live budget change."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import time
from typing import Any

import aiohttp
import pytest
from helpers import ROOT, eventually, to_toml
from stack import CONTROL_PLANE_TOKEN, cold_app, sample_app_spec

TINY_APP = ROOT / "bench" / "apps" / "tiny_app.py"


def tiny_app_spec(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "command": ["{python}", str(TINY_APP), "--port", "{port}", "--name", "{allocation}"],
        "artifact": str(TINY_APP),
        "readiness_path": "/",
        "start_timeout": "15s",
        "drain_grace": "1s",
    }


@pytest.fixture(autouse=True)
def _many_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_region_edge(start_edge, cp, store: str, apps, **sections: Any):
    return start_edge(
        apps=apps,
        edge={"store": store},
        sections={"control_plane": {"url": cp.url}, **sections},
        env={"CONTROL_PLANE_TOKEN": CONTROL_PLANE_TOKEN},
    )


async def cp_get(cp, path: str) -> Any:
    async with (
        aiohttp.ClientSession(headers=cp.headers()) as api,
        api.get(cp.url + path) as resp,
    ):
        return await resp.json()


async def fetch(session, edge, host: str) -> tuple[int, dict[str, str]]:
    try:
        async with session.get(edge.url + "/", headers={"Host": host}) as resp:
            await resp.read()
            return resp.status, dict(resp.headers)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 0, {"error": repr(exc)}


def worker_pids(edge) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(edge.proc.pid)], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]


@pytest.fixture(params=["redis", "cluster"])
def region_store(request: pytest.FixtureRequest) -> str:
    """The shared store's URL, emptied: one redis-server, or the Redis Cluster."""
    if request.param == "cluster":
        return request.getfixturevalue("fresh_cluster").url
    return request.getfixturevalue("fresh_redis")


async def test_stampede_across_two_edges_is_one_wake(
    start_control_plane, start_edge, region_store, client
) -> None:
    cp = start_control_plane(apps=[tiny_app_spec("shop")])
    edges = [start_region_edge(start_edge, cp, region_store, [cold_app("shop")]) for _ in range(2)]
    results = await asyncio.gather(
        *(fetch(client, edges[i % 2], "shop.localhost") for i in range(2000))
    )
    statuses = [status for status, _ in results]
    assert statuses.count(200) == 2000, {s: statuses.count(s) for s in set(statuses)}
    allocations = (await cp_get(cp, "/v1/allocations?app=shop"))["allocations"]
    assert len(allocations) == 1
    assert {headers["X-Allocation-Id"] for _, headers in results} == {allocations[0]["id"]}


def max_concurrent_starts(entries: list[dict[str, Any]]) -> int:
    """Replay the control plane's journal: most allocations before `ready` at once."""
    starting: set[str] = set()
    peak = 0
    for entry in entries:
        if entry["machine"] != "allocation":
            continue
        if entry["to_state"] in ("planned", "pulling", "starting"):
            starting.add(entry["subject"])
        else:
            starting.discard(entry["subject"])
        peak = max(peak, len(starting))
    return peak


async def test_fleet_wake_never_exceeds_the_budget(
    start_control_plane, start_edge, fresh_redis, client
) -> None:
    names = [f"app{i:03d}" for i in range(200)]
    cp = start_control_plane(apps=[tiny_app_spec(n) for n in names], max_allocations=300)
    # Every request comes from this one client: its own wake allowance is off.
    budget = {"max_concurrent_wakes": 10, "max_wakes_per_second": 200, "client_wake_rate": 0}
    apps = [cold_app(n, hold_timeout="30s") for n in names]
    edges = [start_region_edge(start_edge, cp, fresh_redis, apps, budget=budget) for _ in range(2)]
    started = time.monotonic()
    results = await asyncio.gather(
        *(fetch(client, edges[i % 2], f"{n}.localhost") for i, n in enumerate(names))
    )
    elapsed = time.monotonic() - started
    for status, headers in results:
        assert status == 200 or (status == 503 and "Retry-After" in headers), (status, headers)
    assert elapsed < 30 + 15  # nothing hung past its hold timeout (plus slack)
    journal = (await cp_get(cp, "/v1/journal"))["entries"]
    assert 1 <= max_concurrent_starts(journal) <= 10
    assert sum(1 for status, _ in results if status == 200) >= 1


async def test_lease_holder_killed_mid_wake_is_replaced(
    start_control_plane, start_edge, fresh_redis, client
) -> None:
    slow = sample_app_spec(
        "shop", command=sample_app_spec("shop")["command"] + ["--start-delay", "4"]
    )
    cp = start_control_plane(apps=[slow])
    budget = {"wake_lease_ttl": "1s"}
    first, second = (
        start_region_edge(start_edge, cp, fresh_redis, [cold_app("shop")], budget=budget)
        for _ in range(2)
    )
    held = asyncio.ensure_future(fetch(client, first, "shop.localhost"))

    async def wake_started() -> bool:
        return bool((await cp_get(cp, "/v1/allocations?app=shop"))["allocations"])

    await eventually(wake_started, timeout=15, interval=0.05, what="the first edge's wake")
    for pid in worker_pids(first):
        os.kill(pid, signal.SIGKILL)
    status, _ = await held
    assert status != 200  # its holder died with the request
    status, headers = await fetch(client, second, "shop.localhost")
    assert status == 200, headers
    transitions = (await cp_get(cp, "/v1/allocations?app=shop"))["allocations"]
    assert headers["X-Allocation-Id"] in {a["id"] for a in transitions}


async def test_redis_down_mid_wake(start_control_plane, start_edge, client, own_redis) -> None:
    slow = sample_app_spec(
        "cold", command=sample_app_spec("cold")["command"] + ["--start-delay", "2"]
    )
    cp = start_control_plane(apps=[slow, tiny_app_spec("warm")])
    edge = start_region_edge(start_edge, cp, own_redis.url, [cold_app("cold"), cold_app("warm")])
    status, _ = await fetch(client, edge, "warm.localhost")
    assert status == 200  # warm is hot now
    held = asyncio.ensure_future(fetch(client, edge, "cold.localhost"))
    await asyncio.sleep(0.5)
    own_redis.stop()
    started = time.monotonic()
    status, headers = await held
    assert status == 503 and "Retry-After" in headers, headers
    assert time.monotonic() - started < 15  # promptly, well inside the 20 s hold
    for _ in range(20):  # hot apps keep serving with the store gone
        status, _ = await fetch(client, edge, "warm.localhost")
        assert status == 200
    own_redis.start()

    async def recovered() -> bool:
        status, _ = await fetch(client, edge, "cold.localhost")
        return status == 200

    await eventually(recovered, timeout=30, interval=0.5, what="wakes after Redis returns")


async def test_live_budget_change_drops_nothing(
    start_control_plane, start_edge, fresh_redis, client
) -> None:
    cp = start_control_plane(apps=[tiny_app_spec("shop")])
    edge = start_region_edge(start_edge, cp, fresh_redis, [cold_app("shop")])
    assert (await fetch(client, edge, "shop.localhost"))[0] == 200
    stop = asyncio.Event()
    statuses: list[int] = []

    async def load() -> None:
        for _ in range(5000):
            if stop.is_set():
                return
            statuses.append((await fetch(client, edge, "shop.localhost"))[0])

    loaders = [asyncio.ensure_future(load()) for _ in range(8)]
    await asyncio.sleep(0.5)
    config = dict(edge.config)
    config["budget"] = {"max_concurrent_wakes": 3, "max_wakes_per_second": 2.5}
    edge.config_path.write_text(to_toml(config))
    edge.proc.send_signal(signal.SIGHUP)

    def applied() -> bool:
        status, body = edge.admin_get("/admin/budget")
        return status == 200 and json.loads(body)["limits"]["max_concurrent_wakes"] == 3

    await eventually(applied, timeout=10, what="the new budget")
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*loaders)
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}


async def test_budget_slot_is_kept_while_the_control_plane_cannot_confirm_the_start(
    start_control_plane, start_edge, fresh_redis, client
) -> None:
    # The edge's probe sees the app ready while the control plane does not (its
    # readiness path never answers 2xx) and then stops answering (paused): the slot
    # must stay taken, or the region would start more apps at once than budgeted.
    # It is given back once the control plane settles the allocation.
    app = sample_app_spec("shop", readiness_path="/never-ready", start_timeout="8s")
    cp = start_control_plane(apps=[app])
    edge = start_region_edge(
        start_edge, cp, fresh_redis, [cold_app("shop", readiness_timeout="20s")],
        control_plane={"url": cp.url, "timeout": "1s", "retries": 0},
    )  # fmt: skip
    status, _ = await fetch(client, edge, "shop.localhost")
    assert status == 200  # hot through the edge's own probe
    cp.pause()
    try:
        await asyncio.sleep(3)  # several failed control-plane calls later
        _, body = edge.admin_get("/admin/budget")
        assert json.loads(body)["usage"]["in_use"] == 1
    finally:
        cp.resume()

    def released() -> bool:
        _, body = edge.admin_get("/admin/budget")
        return json.loads(body)["usage"]["in_use"] == 0

    await eventually(released, timeout=25, what="the slot given back once the start is settled")
