"""The replayer against a real redis-server and a real app on 127.0.0.1 whose lease lapses
mid-delivery (issue 12): fenced off by the new holder, it sends nothing more."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis
from helpers import eventually
from test_replay_delivery import read_request, serve

from edge.queue.durable_queue import DurableQueue
from edge.queue.replayer import Replayer
from edge.server.config import AppConfig, load_config_text
from wake.controller import HotTarget

CONFIG = """
[edge]
store = "redis://127.0.0.1:6379/0"

[control_plane]
url = "http://127.0.0.1:7070"

[[apps]]
name = "shop"
hosts = ["shop.localhost"]
scale_to_zero = true
rules = [{class = "queue", methods = ["POST"]}]

[apps.replay]
max_attempts = 3
retention = "1h"
dedupe_key = "hash"
max_body = "1KiB"
attempt_timeout = "10s"
claim_idle = "20s"
"""
HEAD = b"POST /hooks/a HTTP/1.1\r\nHost: shop.localhost\r\n\r\n"


class HotAt:
    """The wake side of the replayer for an app that is up at one address already; the
    wake machine has its own tests, this one is about the lease."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def ensure_hot(self, app: str, timeout: float) -> HotTarget:
        return HotTarget(self.address, "alloc-1")

    def seen(self, app: str) -> None:
        pass

    def forget_hot(self, app: str, address: str) -> None:
        pass


def shop() -> AppConfig:
    return load_config_text(CONFIG, "edge.toml").apps[0]


async def test_a_replayer_whose_lease_lapsed_mid_delivery_sends_nothing_more(
    fresh_redis: str,
) -> None:
    received: list[bytes] = []
    answer_first = asyncio.Event()

    async def app(reader, writer) -> None:
        while True:
            try:
                received.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                break
            if len(received) == 1:
                await answer_first.wait()  # the first delivery is slow
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        writer.close()

    server, address = await serve(app)
    queue = DurableQueue(fresh_redis)
    raw = aioredis.from_url(fresh_redis)
    events: list[str] = []
    config = shop()
    replayer = Replayer(
        queue,
        HotAt(address),  # type: ignore[arg-type]
        "edge-a",
        lambda: {"shop": config},
        lambda _app, event: events.append(event),
    )
    task = asyncio.get_running_loop().create_task(replayer.run())
    try:
        for i in range(3):
            body = json.dumps({"n": i}).encode()
            await queue.enqueue(
                "shop",
                method=b"POST",
                path=b"/hooks/a",
                head=HEAD,
                body=body,
                key=f"k{i}",
                arrived=0,
                retention=3600,
                max_queued=10,
            )
        replayer.poke()
        await eventually(lambda: len(received) == 1, timeout=5, what="the first delivery")
        # Its lease lapses (a failover that lost it, a long pause) and edge B takes the app.
        await raw.pexpire(queue.key("shop", "replayer"), 1)
        await asyncio.sleep(0.05)
        assert await queue.acquire_replayer("shop", "edge-b", 30) is not None
        answer_first.set()
        await eventually(lambda: "lease_lost" in events, timeout=3, what="edge A fenced off")
        await asyncio.sleep(1.5)  # a scan later: A does not replay an app B holds
        assert [json.loads(r.partition(b"\r\n\r\n")[2])["n"] for r in received] == [0]
        # The first delivery is recorded (B will not send it again); the rest wait for B.
        assert await queue.depth("shop") == (2, 0)
        assert events.count("delivered") == 1
    finally:
        await replayer.close(grace=1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await raw.aclose()
        await queue.close()
        server.close()
