"""The replayer against a real redis-server and a real app on 127.0.0.1 whose lease lapses
mid-delivery (issue 12): fenced off by the new holder, it sends nothing more; and whose
term ends while a delivery is still connecting (issue 13): it sends nothing of it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from helpers import eventually
from test_replay_delivery import read_request, serve

from edge.queue import replayer as replayer_module
from edge.queue.durable_queue import DurableQueue, QueuedRequest
from edge.queue.replayer import Replayer
from edge.server.config import AppConfig, load_config_text
from wake.controller import HotTarget
from wake.store.protocol import Lease

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


def edge_a_replayer(
    queue: DurableQueue, address: str, events: list[str], **clock: Callable[[], float]
) -> Replayer:
    """Edge A's replayer of app `shop` at `address`, counting its events into `events`."""
    config = shop()
    return Replayer(
        queue,
        HotAt(address),  # type: ignore[arg-type]
        "edge-a",
        lambda: {"shop": config},
        lambda _app, event: events.append(event),
        **clock,
    )


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
    replayer = edge_a_replayer(queue, address, events)
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


# ------------------------------------------- the term ends while a delivery connects


class SlowAcceptApp:
    """An app on 127.0.0.1 whose accept queue is full until `open()`: the kernel drops a
    connecting replayer's SYN, so its connect waits for the retransmit (1 s) — an await
    between the replayer's decision to deliver and its write, held by real sockets.
    Once open, it records every whole request it reads (answered 200), and the bytes
    of any it got only part of."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        # Connected by the kernel, never accepted: it fills the backlog of 0.
        self._filler = socket.create_connection(self.listener.getsockname())
        self.received: list[bytes] = []
        self.partial: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def open(self) -> None:
        self.listener.setblocking(False)
        filler, _ = await asyncio.get_running_loop().sock_accept(self.listener)
        filler.close()
        self.server = await asyncio.start_server(self._serve, sock=self.listener)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                self.received.append(await read_request(reader))
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    self.partial.append(exc.partial)
                break
            except (ConnectionError, asyncio.LimitOverrunError):
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        writer.close()

    def close(self) -> None:
        self._filler.close()
        if self.server is not None:
            self.server.close()
        self.listener.close()


@contextlib.asynccontextmanager
async def replaying_one(
    redis_url: str, address: str, **clock: Callable[[], float]
) -> AsyncIterator[tuple[DurableQueue, list[str]]]:
    """Edge A's replayer for app `shop` at `address` (its `clock=` if given), one entry
    queued; yields the queue and the events A counted."""
    queue = DurableQueue(redis_url)
    events: list[str] = []
    replayer = edge_a_replayer(queue, address, events, **clock)
    task = asyncio.get_running_loop().create_task(replayer.run())
    try:
        await queue.enqueue(
            "shop",
            method=b"POST",
            path=b"/hooks/a",
            head=HEAD,
            body=b'{"n": 0}',
            key="k0",
            arrived=0,
            retention=3600,
            max_queued=10,
        )
        replayer.poke()
        yield queue, events
    finally:
        await replayer.close(grace=1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await queue.close()


def began(raw: aioredis.Redis, queue: DurableQueue) -> Callable[[], Awaitable[bool]]:
    """A check: A counted attempt 1 of the queued entry, so it is delivering it (held in
    connect by a SlowAcceptApp)."""

    async def check() -> bool:
        entries = await raw.xrange(queue.key("shop", "queue"), count=1)
        if not entries:
            return False
        return await raw.hget(queue.key("shop", "attempts"), entries[0][0]) == b"1"

    return check


async def test_a_delivery_still_connecting_when_the_lease_is_taken_over_sends_nothing(
    fresh_redis: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What a freeze past the lease does, without one: the store gives the lease to edge B
    while A's delivery waits in connect; A's renewal is refused. A connects after that,
    and must not send (before issue 13 it had decided before connecting, and sent)."""
    monkeypatch.setattr(replayer_module, "LEASE_TTL", 1.0)  # renewals every 1/3 s
    caplog.set_level(logging.INFO, logger="edge.queue.replayer")
    app = SlowAcceptApp()
    raw = aioredis.from_url(fresh_redis)
    try:
        async with replaying_one(fresh_redis, app.address) as (queue, events):
            await eventually(began(raw, queue), timeout=5, interval=0.01, what="attempt 1")
            await raw.pexpire(queue.key("shop", "replayer"), 1)
            await asyncio.sleep(0.05)
            assert await queue.acquire_replayer("shop", "edge-b", 30) is not None

            def refused() -> bool:
                return "replayer lease lost" in caplog.text

            await eventually(refused, timeout=3, interval=0.02, what="A's renewal refused")
            await app.open()  # A's connect completes at its SYN's retransmit
            await eventually(lambda: "lease_lost" in events, timeout=5, what="A fenced off")
            await asyncio.sleep(0.3)  # a send would have arrived by now
            assert app.received == [] and app.partial == []
            assert events.count("lease_lost") == 1 and "delivered" not in events
            # The entry waits for B, attempt 1 counted: B's send is attempt 2.
            assert await queue.depth("shop") == (1, 0)
            assert await began(raw, queue)()
    finally:
        await raw.aclose()
        app.close()


async def test_a_delivery_still_connecting_when_its_term_ends_sends_nothing(
    fresh_redis: str,
) -> None:
    """A frozen past its own term while its delivery connects (its clock jumps 20 s; no
    renewal comes between): the connect completes, nothing is sent. The lease is still
    A's in the store, so A takes it again, with a new term, and delivers attempt 2."""
    jump = 0.0

    def clock() -> float:
        return time.monotonic() + jump

    app = SlowAcceptApp()
    raw = aioredis.from_url(fresh_redis)
    try:
        async with replaying_one(fresh_redis, app.address, clock=clock) as (queue, events):
            await eventually(began(raw, queue), timeout=5, interval=0.01, what="attempt 1")
            jump = 20.0  # A's term (8 s of a 10 s lease) is over by its own clock
            await app.open()
            await eventually(lambda: "lease_lost" in events, timeout=5, what="A fenced off")
            await eventually(lambda: app.received, timeout=5, what="attempt 2 delivered")
            await asyncio.sleep(0.3)
            assert app.partial == []
            assert len(app.received) == 1
            assert b"X-Edge-Replay-Attempt: 2\r\n" in app.received[0]
            assert events == ["lease_lost", "delivered"]
    finally:
        await raw.aclose()
        app.close()


# ------------------------------------------- the replay ends while its renewer is in Redis


class RenewalRacingQueue(DurableQueue):
    """A real Redis queue whose replay, once the queue is empty, ends only after the lease
    renewer has begun a renewal: the replay is over while the renewer is in its Redis call."""

    def __init__(self, url: str, yields: int) -> None:
        super().__init__(url)
        self.yields = yields  # loop turns between the renewal's start and the replay's end
        self.renewing = asyncio.Event()
        self.raced = False

    async def renew_replayer(self, app: str, lease: Lease, ttl: float) -> bool:
        self.renewing.set()
        return await super().renew_replayer(app, lease, ttl)

    async def next_batch(
        self, app: str, consumer: str, claim_idle: float, count: int, lease: Lease
    ) -> list[QueuedRequest] | None:
        batch = await super().next_batch(app, consumer, claim_idle, count, lease)
        if batch == [] and not self.raced:  # nothing left: the replay's last call
            self.raced = True
            self.renewing.clear()  # the next renewal's start, not one already over
            await self.renewing.wait()
            for _ in range(self.yields):
                await asyncio.sleep(0)
        return batch


@pytest.mark.parametrize("yields", [0, 1, 2])
async def test_a_replay_that_ends_mid_renewal_lets_its_lease_go_and_goes_on(
    fresh_redis: str, monkeypatch: pytest.MonkeyPatch, yields: int
) -> None:
    """The replay ends while its lease renewer is inside a Redis call, where a cancellation
    can be lost (Python 3.11's asyncio.wait_for, in every command redis-py sends, returns
    the finished send instead). The renewer must stop anyway: the replay lease is released,
    not renewed until the process exits, and the replayer replays what is queued next."""
    monkeypatch.setattr(replayer_module, "LEASE_TTL", 0.6)  # renewals every 0.2 s
    received: list[bytes] = []

    async def app(reader, writer) -> None:
        while True:
            try:
                received.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        writer.close()

    server, address = await serve(app)
    queue = RenewalRacingQueue(fresh_redis, yields)
    raw = aioredis.from_url(fresh_redis)
    events: list[str] = []
    replayer = edge_a_replayer(queue, address, events)
    task = asyncio.get_running_loop().create_task(replayer.run())

    async def queue_one(n: int) -> None:
        await queue.enqueue(
            "shop",
            method=b"POST",
            path=b"/hooks/a",
            head=HEAD,
            body=json.dumps({"n": n}).encode(),
            key=f"k{n}",
            arrived=0,
            retention=3600,
            max_queued=10,
        )
        replayer.poke()

    try:
        await queue_one(0)
        await eventually(lambda: queue.raced, timeout=5, what="the replay's end raced")

        async def let_go() -> bool:
            return not await raw.exists(queue.key("shop", "replayer"))

        await eventually(let_go, timeout=3, interval=0.05, what="the replay lease let go")
        await queue_one(1)  # the replayer goes on: the next entry is replayed
        await eventually(lambda: events.count("delivered") == 2, timeout=5, what="entry 1")
        assert [json.loads(r.partition(b"\r\n\r\n")[2])["n"] for r in received] == [0, 1]
    finally:
        # Bounded: a replay that never ends would hold close() up as well.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(replayer.close(grace=1), 10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await raw.aclose()
        await queue.close()
        server.close()
