"""GET /admin/gallery on a real edge: real Redis, the real local control plane running the
sample app, real wakes; then the control plane stopped and Redis paused and stopped, and
the page still answers 200 with the stale source marked since when."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from helpers import CountingForwarder, eventually, free_port
from stack import CONTROL_PLANE_TOKEN, sample_app_spec

pytestmark = pytest.mark.timeout(150)

APPS = ("shop", "other")
# A bounded gallery answer, however the sources behave (calls are 1 s, run together).
ANSWER_WITHIN = 10.0


def scale_to_zero_app(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "hosts": [f"{name}.localhost"],
        "scale_to_zero": True,
        "hold_timeout": "20s",
        "readiness_timeout": "15s",
        "idle_timeout": "5m",
    }


def start(start_edge, cp_url: str, store: str):
    return start_edge(
        apps=[scale_to_zero_app(name) for name in APPS],
        edge={"store": store},
        sections={"control_plane": {"url": cp_url}},
        env={"CONTROL_PLANE_TOKEN": CONTROL_PLANE_TOKEN},
    )


async def gallery(client: aiohttp.ClientSession, edge) -> dict[str, Any]:
    async with client.get(
        edge.admin_url + "/admin/gallery",
        headers=edge.admin_headers(),
        timeout=aiohttp.ClientTimeout(total=ANSWER_WITHIN),
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "application/json"
        return await resp.json()


def machine(doc: dict, name: str) -> dict:
    return next(m for m in doc["machines"] if m["name"] == name)


def count(doc: dict, name: str, state: str) -> int | None:
    return next(s["count"] for s in machine(doc, name)["states"] if s["name"] == state)


def app_row(doc: dict, name: str) -> dict:
    return next(a for a in doc["apps"] if a["name"] == name)


def shop_moves(doc: dict) -> list[tuple[str, str]]:
    """The page's Wake transitions of `shop`, newest first."""
    return [(t["from_state"], t["to_state"]) for t in doc["transitions"] if t["app"] == "shop"]


async def until(client, edge, done, what: str, timeout: float = 30.0) -> dict[str, Any]:
    """The first gallery document for which `done` holds (polled, bounded)."""
    last: dict[str, Any] = {}

    async def check() -> bool:
        nonlocal last
        last = await gallery(client, edge)
        return bool(done(last))

    try:
        await eventually(check, timeout=timeout, interval=0.2, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last document: {last}") from None
    return last


async def test_the_gallery_follows_a_wake_and_survives_its_sources_going_down(
    start_control_plane, start_edge, own_redis, client
) -> None:
    cp = start_control_plane(apps=[sample_app_spec(name) for name in APPS])
    edge = start(start_edge, cp.url, own_redis.url)

    doc = await until(
        client,
        edge,
        lambda d: d["sources"]["control_plane"]["ok"] and machine(d, "allocation")["reported"],
        "the first answers of both sources",
    )
    # Before any request: every scale-to-zero app is cold, region-wide.
    assert count(doc, "wake", "cold") == len(APPS)
    assert count(doc, "wake", "hot") == 0
    assert doc["sources"]["store"] == {
        "name": own_redis.url,
        "ok": True,
        "stale_since": None,
        "error": "",
    }
    assert doc["sources"]["control_plane"]["configured"] is True
    assert machine(doc, "wake")["counts_scope"] == "region"
    assert [m["reported"] for m in doc["machines"]] == [True] * 5 + [False] * 2
    assert count(doc, "host_drain", "uncordoned") == 1 and count(doc, "region", "eligible") == 1
    assert doc["budget"]["limit"] > 0 and doc["budget"]["in_use"] == 0
    assert app_row(doc, "shop")["allocations"] == []

    async with client.get(edge.url + "/", headers={"Host": "shop.localhost"}) as resp:
        assert resp.status == 200, await resp.text()

    # The held count is the workers' snapshot (every 0.5 s): on a loaded machine the one
    # taken while the request was held can still be the latest when the app shows hot.
    # The journal entry for `hot` is written after the state (the release goes first), so
    # a page can show the app hot one refresh before it shows that transition.
    doc = await until(
        client,
        edge,
        lambda d: (
            count(d, "wake", "hot") == 1
            and count(d, "allocation", "ready") == 1
            and app_row(d, "shop")["held"] == 0
            and shop_moves(d)[:1] == [("readiness_wait", "hot")]
        ),
        "the woken app hot, its allocation ready, its request no longer held, journalled",
    )
    assert count(doc, "wake", "cold") == len(APPS) - 1
    shop = app_row(doc, "shop")
    assert (shop["state"], shop["hot_here"], shop["held"]) == ("hot", True, 0)
    assert [a["state"] for a in shop["allocations"]] == ["ready"]
    assert shop["allocations"][0]["address"].startswith("127.0.0.1:")
    # The wake controller records the phases of the wake that made the app hot, when it does.
    if shop["last_wake"] is not None:
        assert set(shop["last_wake"]) == {
            "at",
            "budget_ms",
            "allocation_ms",
            "readiness_ms",
            "total_ms",
        }
    assert shop_moves(doc)[:4] == [
        ("readiness_wait", "hot"),
        ("starting", "readiness_wait"),
        ("wake_requested", "starting"),
        ("cold", "wake_requested"),
    ]
    assert all(
        t["machine"] == "wake" and t["edge_id"] == doc["edge_id"] for t in doc["transitions"]
    )
    allocation_gates = {g["id"]: g for g in machine(doc, "allocation")["gates"]}
    assert allocation_gates["health_readiness_pass"]["passed"] == 1

    # The control plane goes away: still 200, marked stale since then, Wake data intact.
    stopped_at = time.time()
    cp.stop()
    doc = await until(
        client,
        edge,
        lambda d: not d["sources"]["control_plane"]["ok"],
        "the control plane marked stale",
    )
    source = doc["sources"]["control_plane"]
    assert source["stale_since"] is not None and source["stale_since"] >= stopped_at - 1
    assert source["error"]
    assert count(doc, "wake", "hot") == 1 and doc["sources"]["store"]["ok"] is True
    # Its machines keep the last report it gave, the page says since when.
    assert count(doc, "allocation", "ready") == 1
    later = await gallery(client, edge)
    assert later["sources"]["control_plane"]["stale_since"] == source["stale_since"]

    # Redis stops answering (SIGSTOP): still 200 in bounded time, the store marked stale.
    own_redis.pause()
    try:
        doc = await until(
            client, edge, lambda d: not d["sources"]["store"]["ok"], "the store marked stale"
        )
        assert doc["sources"]["store"]["stale_since"] is not None
        assert doc["sources"]["store"]["error"]
        assert count(doc, "wake", "hot") == 1  # the last answer, shown as stale
    finally:
        own_redis.resume()
    doc = await until(
        client,
        edge,
        lambda d: d["sources"]["store"]["ok"],
        "the store clear again once Redis answers",
    )
    assert doc["sources"]["store"]["stale_since"] is None and doc["sources"]["store"]["error"] == ""

    # Redis stopped (connection refused), then back on its port.
    own_redis.stop()
    await until(client, edge, lambda d: not d["sources"]["store"]["ok"], "a stopped Redis")
    own_redis.start()
    await until(client, edge, lambda d: d["sources"]["store"]["ok"], "a restarted Redis")


async def test_held_requests_are_counted_across_workers(
    start_control_plane, start_edge, own_redis, client
) -> None:
    slow = sample_app_spec("shop")
    slow["command"] = [*slow["command"], "--start-delay", "5"]
    cp = start_control_plane(apps=[slow, sample_app_spec("other")])
    edge = start_edge(
        apps=[scale_to_zero_app(name) for name in APPS],
        edge={"store": own_redis.url},
        sections={"control_plane": {"url": cp.url}},
        env={"CONTROL_PLANE_TOKEN": CONTROL_PLANE_TOKEN},
        workers=2,
    )
    n = 8
    # A connection per request, so the kernel spreads them over both workers.
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=60),
    ) as session:

        async def held_get() -> int:
            async with session.get(edge.url + "/", headers={"Host": "shop.localhost"}) as resp:
                await resp.read()
                return resp.status

        requests = [asyncio.create_task(held_get()) for _ in range(n)]
        try:
            await until(
                client,
                edge,
                lambda d: app_row(d, "shop")["held"] == n,
                f"{n} requests held, summed over both workers",
                timeout=20,
            )
        finally:
            statuses = await asyncio.gather(*requests)
    assert statuses == [200] * n
    await until(client, edge, lambda d: app_row(d, "shop")["held"] == 0, "holds released")


async def test_many_viewers_ask_the_control_plane_at_most_once_a_second(
    start_control_plane, start_edge, own_redis, client
) -> None:
    cp = start_control_plane(apps=[sample_app_spec(name) for name in APPS])
    async with CountingForwarder(cp.port, b"GET /v1/machines ") as forwarder:
        # In a thread: the launcher waits for /readyz synchronously, and the forwarder
        # runs on this loop.
        edge = await asyncio.to_thread(
            start, start_edge, f"http://127.0.0.1:{forwarder.port}", own_redis.url
        )
        began = time.monotonic()
        for _ in range(10):  # ten rounds of twenty viewers polling at once
            docs = await asyncio.gather(*(gallery(client, edge) for _ in range(20)))
            assert all(d["sources"]["control_plane"]["ok"] for d in docs)
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - began
        assert forwarder.count >= 1
        assert forwarder.count <= elapsed / 1.0 + 2, (forwarder.count, elapsed)


def test_gallery_reads_need_the_token_when_reads_are_closed(start_edge) -> None:
    secret = "gallery-secret"
    edge = start_edge(edge={"admin_listen": f"0.0.0.0:{free_port()}", "admin_token": secret})
    edge.admin_token = ""
    assert edge.admin_get("/admin/gallery")[0] == 401
    edge.admin_token = "wrong"
    assert edge.admin_get("/admin/gallery")[0] == 401
    edge.admin_token = secret
    status, body = edge.admin_get("/admin/gallery")
    assert status == 200, body
    doc = json.loads(body)
    # No app scales to zero and no control plane: nothing to count, said so.
    assert doc["budget"] is None and doc["transitions"] == []
    assert doc["sources"]["control_plane"]["configured"] is False
    assert doc["sources"]["store"]["name"] == "memory://"
    assert machine(doc, "wake")["reported"] is False
    assert [a["state"] for a in doc["apps"]] == ["hot"]
