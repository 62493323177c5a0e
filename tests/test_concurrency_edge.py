"""`[[apps]] max_concurrency` through real edges: a freshly woken app is not trampled by
the requests held for it, hot traffic waits its turn, a wait past its bound is a 503,
slots never leak, reloads apply at once, and the release ramp climbs after a wake.

The overloadable app is bench/apps/sample_app.py with `--max-in-flight 8`: over 8
requests at once it answers 503 "overloaded" and counts it, and `GET /in-flight` says
the most it saw at once (asked directly at the allocation, not through the edge).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import (
    connect,
    eventually,
    free_port,
    metric_sum,
    read_for,
    request_bytes,
    reset,
    send,
    to_toml,
)
from stack import (
    CONTROL_PLANE_TOKEN,
    SAMPLE_APP,
    START_TIMEOUT,
    cold_app,
    http_get,
    sample_app_spec,
    stop_process,
)

APP_LIMIT = 8  # what the app itself can take at once
BURST = 2000
SLOW = "/slow?seconds=0.01"  # each request in flight a little while, so they overlap


def overloadable(name: str, *extra: str) -> dict[str, Any]:
    """A control-plane app: the sample app answering 503 over APP_LIMIT at once."""
    spec = sample_app_spec(name)
    spec["command"] = [*spec["command"], "--max-in-flight", str(APP_LIMIT), *extra]
    return spec


async def allocation_address(cp, app: str) -> str:
    async with (
        aiohttp.ClientSession(headers=cp.headers()) as session,
        session.get(f"{cp.url}/v1/allocations", params={"app": app}) as resp,
    ):
        ready = [a for a in (await resp.json())["allocations"] if a["state"] == "ready"]
    assert len(ready) == 1, ready
    return ready[0]["address"]


async def app_counts(session: aiohttp.ClientSession, address: str, reset: bool = False) -> dict:
    """What the app saw: in flight now, the most at once, how many it answered 503."""
    url = f"http://{address}/in-flight" + ("?reset=1" if reset else "")
    async with session.get(url) as resp:
        return await resp.json()


async def status_of(session: aiohttp.ClientSession, url: str, host: str, path: str) -> int:
    async with session.get(url + path, headers={"Host": host}) as resp:
        await resp.read()
        return resp.status


async def burst(session: aiohttp.ClientSession, edge, host: str, n: int) -> Counter[int]:
    """`n` GETs at once; how many got each status."""
    statuses = await asyncio.gather(*(status_of(session, edge.url, host, SLOW) for _ in range(n)))
    return Counter(statuses)


def edge_for(start_edge, cp, apps: list[dict[str, Any]], **kwargs: Any):
    return start_edge(
        apps=apps,
        sections={"control_plane": {"url": cp.url}},
        env={"CONTROL_PLANE_TOKEN": CONTROL_PLANE_TOKEN},
        **kwargs,
    )


def woken_app(**overrides: Any) -> dict[str, Any]:
    # Every request of the burst is held while the app starts (2 s), then released at once.
    return cold_app("shop", hold_timeout="60s", max_held=BURST + 100, **overrides)


async def wake_with_a_burst(start_control_plane, start_edge, client, app: dict, **edge_kw):
    cp = start_control_plane(apps=[overloadable("shop", "--start-delay", "2")])
    edge = edge_for(start_edge, cp, [app], **edge_kw)
    statuses = await burst(client, edge, "shop.localhost", BURST)
    seen = await app_counts(client, await allocation_address(cp, "shop"))
    return edge, statuses, seen


async def test_a_woken_app_gets_at_most_its_limit_from_2000_held_requests(
    start_control_plane, start_edge, client
) -> None:
    edge, statuses, seen = await wake_with_a_burst(
        start_control_plane, start_edge, client, woken_app(max_concurrency=APP_LIMIT)
    )
    assert statuses == Counter({200: BURST}), statuses
    assert seen["overloaded"] == 0 and seen["max"] <= APP_LIMIT, seen
    assert seen["max"] >= APP_LIMIT // 2, seen  # the limit is used, not one at a time

    def counted() -> bool:
        text = edge.metrics()
        return (
            metric_sum(text, "edge_upstream_queue_wait_seconds_count", app="shop") > BURST / 2
            and metric_sum(text, "edge_upstream_queued", app="shop") == 0
            and metric_sum(text, "edge_upstream_in_flight", app="shop") == 0
        )

    await eventually(counted, what="the waits counted, nothing left waiting or in flight")


async def test_without_a_limit_the_same_wake_tramples_the_app(
    start_control_plane, start_edge, client
) -> None:
    """The failing case the limit exists for: the held requests overload the app."""
    _, statuses, seen = await wake_with_a_burst(
        start_control_plane, start_edge, client, woken_app()
    )
    assert statuses[503] > 0, statuses
    assert seen["max"] > APP_LIMIT and seen["overloaded"] == statuses[503], seen


async def test_two_workers_share_the_limit_so_the_app_never_sees_more(
    start_control_plane, start_edge, client, fresh_redis
) -> None:
    # ceil(8 / 2) = 4 per worker: 8 at most in all, whichever worker holds what.
    _, statuses, seen = await wake_with_a_burst(
        start_control_plane,
        start_edge,
        client,
        woken_app(max_concurrency=APP_LIMIT),
        edge={"store": fresh_redis},
        workers=2,
    )
    assert statuses == Counter({200: BURST}), statuses
    assert seen["overloaded"] == 0 and seen["max"] <= APP_LIMIT, seen


async def test_the_release_ramp_starts_at_a_quarter_and_climbs(
    start_control_plane, start_edge, client
) -> None:
    cp = start_control_plane(apps=[overloadable("shop", "--start-delay", "1")])
    # 300 requests of 50 ms two at a time take 7.5 s: the ramp doubles before they are done,
    # and the two readings below (about 1 s after the first answer) come well inside 6 s.
    ramp = {"start": 0.25, "double_every": "6s"}
    edge = edge_for(start_edge, cp, [woken_app(max_concurrency=APP_LIMIT, release_ramp=ramp)])
    path = "/slow?seconds=0.05"
    requests = [
        asyncio.ensure_future(status_of(client, edge.url, "shop.localhost", path))
        for _ in range(300)
    ]
    done, _ = await asyncio.wait(requests, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    assert done, "no request answered within 30 s"
    address = await allocation_address(cp, "shop")
    started = await app_counts(client, address, reset=True)
    await asyncio.sleep(1.0)
    first_second = await app_counts(client, address)
    statuses = Counter(await asyncio.gather(*requests))
    after = await app_counts(client, address)
    assert statuses == Counter({200: 300}), statuses
    # The wake's first 6 s: a quarter of 8.
    assert started["max"] <= 2 and first_second["max"] <= 2, (started, first_second)
    assert 2 < after["max"] <= APP_LIMIT, after  # then it doubled


# ------------------------------------------------------------------ hot traffic


class SampleApp:
    """bench/apps/sample_app.py as a static upstream of our own (stopped at teardown)."""

    def __init__(self, log_dir: Path, *args: str) -> None:
        self.port = free_port()
        self.log = log_dir / f"sample-{self.port}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(SAMPLE_APP), "--port", str(self.port), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while http_get(f"http://127.0.0.1:{self.port}/healthz")[0] != 200:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def overloadable_upstream(tmp_path: Path):
    app = SampleApp(tmp_path, "--max-in-flight", str(APP_LIMIT))
    yield app
    stop_process(app.proc, group=False)


def static_app(name: str, *upstreams: str, **overrides: Any) -> dict[str, Any]:
    return {"name": name, "hosts": [f"{name}.localhost"], "upstreams": list(upstreams), **overrides}


async def test_hot_traffic_waits_its_turn_under_the_limit(
    start_edge, client, overloadable_upstream
) -> None:
    address = overloadable_upstream.address
    edge = start_edge(apps=[static_app("hot", address, max_concurrency=APP_LIMIT)])
    statuses = await burst(client, edge, "hot.localhost", 500)
    seen = await app_counts(client, address)
    assert statuses == Counter({200: 500}), statuses
    assert seen["overloaded"] == 0 and seen["max"] <= APP_LIMIT, seen

    def counted() -> bool:
        text = edge.metrics()
        return (
            metric_sum(text, "edge_upstream_queue_wait_seconds_count", app="hot") > 0
            and metric_sum(text, "edge_upstream_queued", app="hot") == 0
        )

    await eventually(counted, what="hot requests counted as waiting, none left")


async def test_hot_traffic_without_the_limit_overloads_the_same_app(
    start_edge, client, overloadable_upstream
) -> None:
    address = overloadable_upstream.address
    edge = start_edge(apps=[static_app("hot", address)])
    statuses = await burst(client, edge, "hot.localhost", 500)
    seen = await app_counts(client, address)
    assert statuses[503] > 0 and seen["max"] > APP_LIMIT, (statuses, seen)


async def test_a_wait_past_its_bound_is_503_with_retry_after_never_a_hang(
    start_edge, upstream, client
) -> None:
    edge = start_edge(
        apps=[static_app("one", upstream.address, max_concurrency=1)],
        upstream={"response_header_timeout": "1s"},
    )
    # The slot is held by a response in progress (headers and a first chunk, then a pause).
    reader, writer = await connect(edge.port)
    await send(writer, request_bytes("GET", "/stream?id=long", host="one.localhost"))
    first, _ = await read_for(reader, 1.0)
    assert b"first-chunk" in first
    started = time.monotonic()
    async with client.get(edge.url + "/echo", headers={"Host": "one.localhost"}) as resp:
        body = await resp.read()
        assert resp.status == 503, body
        assert resp.headers["X-Edge-Error"] == "concurrency_wait_timeout"
        assert int(resp.headers["Retry-After"]) >= 1
    assert 0.9 <= time.monotonic() - started < 5.0
    assert all(entry["path"] != "/echo" for entry in upstream.log())  # it never went
    upstream.release("long")
    rest, _ = await read_for(reader, 2.0)
    assert b"rest-of-the-body" in rest
    writer.close()
    # The slot came back: the next request goes at once.
    assert await status_of(client, edge.url, "one.localhost", "/echo") == 200

    def counted() -> bool:
        text = edge.metrics()
        return metric_sum(text, "edge_rejections_total", reason="concurrency_wait_timeout") == 1

    await eventually(counted, what="the wait timeout counted")


async def _abort_after(port: int, path: str, host: str, seconds: float) -> None:
    """A client that sends a request, then goes away after `seconds`: a reset, since a FIN
    alone is a half-close that still gets its answer."""
    reader, writer = await connect(port)
    await send(writer, request_bytes("GET", path, host=host))
    await read_for(reader, seconds)
    reset(writer)


async def test_slots_never_leak_through_aborts_errors_and_timeouts(
    start_edge, upstream, client
) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: connect refused
    edge = start_edge(
        apps=[
            static_app("two", upstream.address, max_concurrency=2),
            static_app("broken", dead, max_concurrency=1),
        ],
        upstream={"response_header_timeout": "1s"},
    )
    host = "two.localhost"
    port = edge.port
    # Both slots taken, then their clients reset: one before the answer, one mid-response.
    await asyncio.gather(
        _abort_after(port, "/hold?id=first", host, 0.5),
        _abort_after(port, "/stream?id=second", host, 0.5),
    )
    await eventually(
        lambda: upstream.state("first") == upstream.state("second") == "cancelled",
        what="both aborted at the upstream too",
    )
    jobs = []
    for i in range(12):
        jobs.append(status_of(client, edge.url, host, "/echo"))
        jobs.append(status_of(client, edge.url, host, "/status/500"))  # the app's 5xx
        jobs.append(status_of(client, edge.url, "broken.localhost", "/"))  # connect refused
        jobs.append(_abort_after(port, f"/stream?id=s{i}", host, 0.2))  # gone mid-response
        jobs.append(_abort_after(port, f"/hold?id=h{i}", host, 0.3))  # gone before the answer
        jobs.append(_abort_after(port, "/echo", host, 0.0))  # gone while waiting or sent
        if i % 4 == 0:
            jobs.append(status_of(client, edge.url, host, "/slow-headers?delay=3"))  # 504
    results = await asyncio.gather(*jobs)
    statuses = Counter(r for r in results if r is not None)
    assert statuses[502] >= 12 and statuses[200] > 0, statuses

    def nothing_held() -> bool:
        text = edge.metrics()
        return (
            all(
                metric_sum(text, name, app=app) == 0
                for name in ("edge_upstream_in_flight", "edge_upstream_queued")
                for app in ("two", "broken")
            )
            and "edge_upstream_in_flight" in text
        )

    await eventually(nothing_held, timeout=15, what="every slot given back, nobody waiting")
    # And both slots really are free: two responses held open at once both reach the app.
    upstream.reset()
    holds = [
        asyncio.ensure_future(status_of(client, edge.url, host, f"/hold?id=after{i}"))
        for i in range(2)
    ]
    await eventually(
        lambda: all(upstream.state(f"after{i}") == "waiting" for i in range(2)),
        what="both requests at the upstream at once",
    )
    for i in range(2):
        upstream.release(f"after{i}")
    assert await asyncio.gather(*holds) == [200, 200]


async def test_reload_applies_a_changed_limit_to_requests_already_waiting(
    start_edge, upstream, client
) -> None:
    edge = start_edge(apps=[static_app("one", upstream.address, max_concurrency=1)])
    reader, writer = await connect(edge.port)
    await send(writer, request_bytes("GET", "/stream?id=r1", host="one.localhost"))
    assert b"first-chunk" in (await read_for(reader, 1.0))[0]
    waiting = asyncio.ensure_future(status_of(client, edge.url, "one.localhost", "/echo"))
    await asyncio.sleep(0.5)
    assert not waiting.done()  # behind the stream holding the only slot

    def reload(**app: Any) -> None:
        config = dict(edge.config)
        config["apps"] = [static_app("one", upstream.address, **app)]
        edge.config_path.write_text(to_toml(config))
        edge.proc.send_signal(signal.SIGHUP)

    reload(max_concurrency=2)
    assert await asyncio.wait_for(waiting, 10) == 200  # let through while the stream is open
    assert upstream.state("r1") == "waiting"
    reload()  # no limit at all now: more at once than either limit allowed
    await eventually(lambda: edge.output().count("config reloaded") >= 2, what="2nd reload")
    streams = [
        asyncio.ensure_future(status_of(client, edge.url, "one.localhost", f"/stream?id=r{i}"))
        for i in (2, 3)
    ]
    await eventually(
        lambda: upstream.state("r2") == upstream.state("r3") == "waiting",
        what="three responses in progress at once",
    )
    for key in ("r1", "r2", "r3"):
        upstream.release(key)
    assert await asyncio.gather(*streams) == [200, 200]
    writer.close()


async def test_an_open_websocket_does_not_hold_a_slot(start_edge, upstream, client) -> None:
    """Upgrade requests count until the 101; the tunnel after it does not."""
    edge = start_edge(
        apps=[static_app("one", upstream.address, max_concurrency=1)],
        upstream={"response_header_timeout": "2s"},
    )
    async with client.ws_connect(edge.url + "/ws", headers={"Host": "one.localhost"}) as ws:
        await ws.send_str("ping")
        assert (await ws.receive(timeout=5)).data == "ping"
        # With the tunnel open, the only slot is free for a request.
        assert await status_of(client, edge.url, "one.localhost", "/echo") == 200
        await ws.send_str("still open")
        assert (await ws.receive(timeout=5)).data == "still open"
