"""ControlPlaneClient against the real local control plane, and against real misbehaving servers.

Attempts are counted with aiohttp's own request tracing on a session handed to the
client, so retry assertions count what went on the wire, not how long it took.
Servers that misbehave on purpose (silent, stalled, scripted status codes) are
real listeners on 127.0.0.1 in the test's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import free_port
from stack import sample_app_spec

from scheduler_client.client import ControlPlaneClient
from scheduler_client.models import (
    Allocation,
    BadRequest,
    Conflict,
    ControlPlaneError,
    Gone,
    NotFound,
    Unauthorized,
    Unavailable,
)

# Every wait in these tests is bounded by this (or by the client's own budget).
WAIT = 30.0


@dataclass
class Wire:
    """An aiohttp session whose requests are counted by aiohttp's tracing hooks."""

    session: aiohttp.ClientSession
    attempts: int = 0
    failures: int = 0
    first_failure: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def wire() -> AsyncIterator[Wire]:
    trace = aiohttp.TraceConfig()
    holder: list[Wire] = []

    async def on_start(*_: Any) -> None:
        holder[0].attempts += 1

    async def on_exception(*_: Any) -> None:
        holder[0].failures += 1
        holder[0].first_failure.set()

    trace.on_request_start.append(on_start)
    trace.on_request_exception.append(on_exception)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        holder.append(Wire(session))
        yield holder[0]


def make_client(
    url: str, token: str, wire: Wire | None = None, **options: Any
) -> ControlPlaneClient:
    options.setdefault("timeout", 5.0)
    options.setdefault("rng", random.Random(1234))
    session = wire.session if wire is not None else None
    return ControlPlaneClient(url, token, session=session, **options)


async def wait_for_state(
    client: ControlPlaneClient, alloc: Allocation, states: set[str]
) -> Allocation:
    """Long-poll the allocation until it reaches one of `states` (bounded)."""
    deadline = time.monotonic() + WAIT
    while alloc.state not in states:
        assert time.monotonic() < deadline, f"allocation stuck in {alloc.state}: {alloc}"
        alloc = await client.watch_allocation(alloc.id, alloc.version, timeout=2.0)
    return alloc


async def eventually(check: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Poll `check` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + WAIT
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# --------------------------------------------------------------- the real API


async def test_every_call_round_trips(start_control_plane) -> None:
    cp = start_control_plane(apps=[sample_app_spec("hello")])
    async with make_client(cp.url, cp.token) as client:
        region = await client.get_region()
        assert region.state == "eligible"

        hosts = await client.list_hosts()
        assert [h.name for h in hosts] == ["local"]
        assert (await client.get_host("local")).state == "uncordoned"
        assert (await client.cordon_host("local")).state == "cordoned"
        assert (await client.uncordon_host("local")).state == "uncordoned"

        first = await client.create_allocation("hello", idempotency_key="k-1")
        again = await client.create_allocation("hello", idempotency_key="k-1")
        assert again.id == first.id
        ready = await wait_for_state(client, first, {"ready", "failed"})
        assert ready.state == "ready", ready.reason
        assert (await client.get_allocation(first.id)).state == "ready"
        assert [a.id for a in await client.list_allocations(app="hello")] == [first.id]
        assert first.id in [a.id for a in await client.list_allocations()]

        snapshot = await client.route_snapshot()
        app_epoch = next((r.epoch for r in snapshot.apps if r.app == "hello"), 0)
        route = await client.route_cas("hello", app_epoch, [first.id])
        assert route.epoch > snapshot.epoch
        assert [t.allocation_id for t in route.targets] == [first.id]
        changes = await client.route_changes(after=snapshot.epoch, timeout=1.0)
        assert [c.app for c in changes.changes] == ["hello"]

        edge = await client.register_edge("edge-1")
        assert edge.edge_id == "edge-1"
        assert (await client.ack_epoch("edge-1", route.epoch)).acked_epoch == route.epoch
        assert [e.edge_id for e in await client.list_edges()] == ["edge-1"]

        promotion = await client.create_promotion("hello", first.id, propagation_timeout_s=20.0)
        assert promotion.state == "requested"

        async def propagating() -> Any:
            p = await client.get_promotion(promotion.id)
            return p if p.state in ("edge_propagating", "healthy", "failed") else None

        promotion = await eventually(propagating, "the promotion to reach edge_propagating")
        assert promotion.state == "edge_propagating", promotion.reason
        await client.ack_epoch("edge-1", promotion.to_epoch)

        async def healthy() -> Any:
            p = await client.get_promotion(promotion.id)
            return p if p.state in ("healthy", "rolled_back", "failed") else None

        assert (await eventually(healthy, "the promotion to end")).state == "healthy"
        assert (await client.approve_promotion(promotion.id)).approved

        draining = await client.drain_allocation(first.id, 0.5)
        assert draining.state in ("draining", "stopped")
        assert (await client.stop_allocation(first.id)).state in ("draining", "stopped")
        assert (await wait_for_state(client, draining, {"stopped", "failed"})).state == "stopped"

        disabled = await client.set_region("disabled", "maintenance")
        assert (disabled.state, disabled.reason) == ("disabled", "maintenance")
        with pytest.raises(Unavailable, match="maintenance"):
            await client.create_allocation("hello", idempotency_key="k-2")
        # A deliberate refusal shows the control plane alive: the breaker stays closed.
        assert client.breaker.state == "closed"
        assert (await client.set_region("eligible")).state == "eligible"


async def test_unknown_resources_are_not_found_and_not_retried(
    start_control_plane, wire: Wire
) -> None:
    cp = start_control_plane()
    async with make_client(cp.url, cp.token, wire, retries=3) as client:
        with pytest.raises(NotFound):
            await client.get_allocation("a-does-not-exist")
        assert wire.attempts == 1
        with pytest.raises(NotFound):
            await client.get_promotion("p-nope")
        with pytest.raises(NotFound):
            await client.get_host("elsewhere")
        with pytest.raises(NotFound):
            await client.create_allocation("no-such-app", idempotency_key="k")
        assert wire.attempts == 4
        assert client.breaker.state == "closed"
        assert client.breaker.consecutive_failures == 0


async def test_wrong_token_is_unauthorized(start_control_plane, wire: Wire) -> None:
    cp = start_control_plane()
    async with make_client(cp.url, "not-the-token", wire, retries=3) as client:
        with pytest.raises(Unauthorized):
            await client.get_region()
        with pytest.raises(Unauthorized):
            await client.route_snapshot()
    assert wire.attempts == 2


async def test_stale_epoch_cas_is_a_conflict(start_control_plane, wire: Wire) -> None:
    cp = start_control_plane(apps=[sample_app_spec("hello")])
    async with make_client(cp.url, cp.token, wire) as client:
        # An empty route is a legal target; it still takes an epoch.
        route = await client.route_cas("hello", 0, [])
        assert route.epoch > 0
        with pytest.raises(Conflict, match="epoch") as conflict:
            await client.route_cas("hello", 0, [])
        assert conflict.value.reason_code == "route_epoch_conflict"
        assert wire.attempts == 2
        # The current epoch goes through.
        assert (await client.route_cas("hello", route.epoch, [])).epoch > route.epoch


async def test_expired_epoch_is_gone(start_control_plane) -> None:
    cp = start_control_plane(apps=[sample_app_spec("hello")], route_history=1)
    async with make_client(cp.url, cp.token) as client:
        epoch = 0
        for _ in range(3):
            epoch = (await client.route_cas("hello", epoch, [])).epoch
        with pytest.raises(Gone):
            await client.route_changes(after=0, timeout=0.1)
        with pytest.raises(Gone):
            await client.route_changes(after=epoch + 10, timeout=0.1)


async def test_long_poll_outlives_the_call_timeout(start_control_plane) -> None:
    cp = start_control_plane()
    # The poll (1 s) is longer than the per-call timeout (0.3 s): the long-poll gets its own.
    async with make_client(cp.url, cp.token, timeout=0.3, retries=0) as client:
        current = (await client.route_snapshot()).epoch
        changes = await client.route_changes(after=current, timeout=1.0)
        assert changes.epoch == current
        assert changes.changes == []


async def test_empty_ids_are_refused_before_the_network(wire: Wire) -> None:
    async with make_client(f"http://127.0.0.1:{free_port()}", "t", wire) as client:
        with pytest.raises(BadRequest):
            await client.get_allocation("")
        with pytest.raises(BadRequest):
            await client.set_region("sideways")
    assert wire.attempts == 0


# ------------------------------------------------------ kill, restart, breaker


async def test_idempotent_call_survives_a_restart(start_control_plane, wire: Wire) -> None:
    cp = start_control_plane()
    client = make_client(
        cp.url,
        cp.token,
        wire,
        timeout=2.0,
        retries=60,
        backoff_base=0.05,
        backoff_cap=0.5,
        breaker_failures=1000,  # this test is about retries, not the breaker
    )
    async with client:
        await client.get_region()
        cp.kill()

        async def restart_once_a_retry_is_under_way() -> None:
            await asyncio.wait_for(wire.first_failure.wait(), WAIT)
            await asyncio.to_thread(cp.start)

        restarter = asyncio.create_task(restart_once_a_retry_is_under_way())
        try:
            region = await client.get_region()
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(restarter, WAIT)
        assert region.state == "eligible"
        # The first attempt after the kill failed; a later one reached the new process.
        assert wire.failures >= 1
        assert wire.attempts >= 3


async def test_non_idempotent_calls_are_sent_once(start_control_plane, wire: Wire) -> None:
    cp = start_control_plane(apps=[sample_app_spec("hello")])
    options = {"retries": 2, "backoff_base": 0.01, "breaker_failures": 100}
    async with make_client(cp.url, cp.token, wire, **options) as client:
        await client.get_region()
        cp.kill()
        wire.attempts = 0
        with pytest.raises(Unavailable):
            await client.route_cas("hello", 0, [])
        assert wire.attempts == 1
        with pytest.raises(Unavailable):
            await client.create_promotion("hello", "a-1")
        assert wire.attempts == 2
        with pytest.raises(Unavailable):
            await client.create_allocation("hello")
        assert wire.attempts == 3
        # The same calls made safe to repeat are retried: the key, and a GET.
        with pytest.raises(Unavailable, match="3 attempts"):
            await client.create_allocation("hello", idempotency_key="k-9")
        assert wire.attempts == 6
        with pytest.raises(Unavailable, match="3 attempts"):
            await client.get_allocation("a-1")
        assert wire.attempts == 9


async def test_breaker_opens_fails_fast_and_a_probe_closes_it(
    start_control_plane, wire: Wire
) -> None:
    cp = start_control_plane()
    client = make_client(
        cp.url, cp.token, wire, retries=0, breaker_failures=3, breaker_cooldown=1.0
    )
    async with client:
        await client.get_region()
        cp.kill()
        wire.attempts = 0
        for _ in range(3):
            with pytest.raises(Unavailable) as info:
                await client.get_region()
            assert "circuit open" not in str(info.value)
        assert wire.attempts == 3
        assert client.breaker.state == "open"

        # Open: fail fast, nothing sent.
        with pytest.raises(Unavailable, match="circuit open"):
            await client.get_region()
        with pytest.raises(Unavailable, match="circuit open"):
            await client.route_cas("x", 0, [])
        assert wire.attempts == 3

        # After the cool-down one probe goes out; the server is still down, so it re-opens.
        await asyncio.sleep(client.breaker.retry_after() + 0.05)
        with pytest.raises(Unavailable) as info:
            await client.get_region()
        assert "circuit open" not in str(info.value)
        assert wire.attempts == 4
        assert client.breaker.state == "open"

        # Restarted server: the next probe succeeds and closes the breaker.
        await asyncio.to_thread(cp.start)
        await asyncio.sleep(client.breaker.retry_after() + 0.05)
        assert (await client.get_region()).state == "eligible"
        assert client.breaker.state == "closed"
        assert wire.attempts == 5
        assert (await client.list_hosts())[0].name == "local"


# ------------------------------------------------------ servers that misbehave


@dataclass
class RawServer:
    """A TCP listener on 127.0.0.1 that answers with `reply` (maybe nothing) and then stalls."""

    reply: bytes
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        if self.reply:
            writer.write(self.reply)
            await writer.drain()
        # Never finish: read until the client gives up and closes.
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def raw_server(reply: bytes) -> AsyncIterator[RawServer]:
    raw = RawServer(reply)
    raw.server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
    try:
        yield raw
    finally:
        raw.server.close()
        for writer in raw.writers:
            writer.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(raw.server.wait_closed(), 5)


STALLS = {
    "silent": b"",
    "stalls after the head": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n",
    "stalls mid-body": (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{"
    ),
}


@pytest.mark.parametrize("reply", STALLS.values(), ids=STALLS.keys())
async def test_no_call_hangs_past_its_budget(reply: bytes, wire: Wire) -> None:
    async with raw_server(reply) as raw:
        options = {"timeout": 0.3, "retries": 1, "backoff_base": 0.05, "backoff_cap": 0.1}
        async with make_client(raw.url, "t", wire, **options) as client:
            budget = client.budget()
            started = time.monotonic()
            with pytest.raises(Unavailable, match="timed out"):
                await client.get_region()
            assert time.monotonic() - started < 10 * budget
            assert wire.attempts == 2  # timeouts are retried for an idempotent call

            # A long-poll's budget is its poll plus the call timeout, per attempt.
            poll_budget = client.budget(0.2 + client.timeout)
            started = time.monotonic()
            with pytest.raises(Unavailable):
                await client.watch_allocation("a-1", 0, timeout=0.2)
            assert time.monotonic() - started < 10 * poll_budget

            # Sent once, and still bounded.
            before = wire.attempts
            started = time.monotonic()
            with pytest.raises(Unavailable):
                await client.route_cas("x", 0, [])
            assert time.monotonic() - started < 10 * client.budget(retry=False)
            assert wire.attempts == before + 1


@dataclass
class Scripted:
    """A real HTTP server answering queued (status, body, headers); records each request."""

    replies: list[tuple[int, bytes, dict[str, str]]]
    seen: list[tuple[str, str, str, bytes]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(
            (request.method, request.raw_path, request.headers.get("Authorization", ""), body)
        )
        status, payload, headers = self.replies.pop(0) if self.replies else (500, b"", {})
        return web.Response(status=status, body=payload, headers=headers)


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    script = Scripted([])
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", script.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    script.url = f"http://127.0.0.1:{port}"
    try:
        yield script
    finally:
        await runner.cleanup()


REGION_JSON = b'{"name": "local", "state": "eligible"}'
JSON = {"Content-Type": "application/json"}


async def test_gateway_errors_are_retried_with_the_token_each_time(scripted: Scripted) -> None:
    scripted.replies = [
        (502, b"bad gateway", {}),
        (503, b"", {"Retry-After": "0"}),
        (504, b"", {}),
        (200, REGION_JSON, JSON),
    ]
    async with make_client(scripted.url, "tok", retries=3, backoff_base=0.01) as client:
        region = await client.get_region()
    assert region.state == "eligible"
    assert [s[:3] for s in scripted.seen] == [("GET", "/v1/region", "Bearer tok")] * 4


async def test_internal_errors_and_4xx_are_not_retried(scripted: Scripted) -> None:
    scripted.replies = [
        (500, b'{"error": "internal", "message": "boom"}', JSON),
        (400, b'{"error": "bad_request", "message": "no"}', JSON),
    ]
    async with make_client(scripted.url, "tok", retries=3, backoff_base=0.01) as client:
        with pytest.raises(ControlPlaneError, match="boom") as info:
            await client.get_region()
        assert type(info.value) is ControlPlaneError
        assert client.breaker.consecutive_failures == 1  # a crash-type 5xx counts
        with pytest.raises(BadRequest, match="no"):
            await client.get_region()
    assert len(scripted.seen) == 2


async def test_errors_map_by_code_then_status(scripted: Scripted) -> None:
    scripted.replies = [
        (409, b'{"error": "gone", "message": "code wins"}', JSON),
        (404, b"<html>not found</html>", {}),
        (418, b"teapot", {}),
        (413, b"", {}),
        (200, b'{"name": "local"}', JSON),  # a required field missing
    ]
    async with make_client(scripted.url, "tok", retries=3) as client:
        with pytest.raises(Gone, match="code wins"):
            await client.get_region()
        with pytest.raises(NotFound):
            await client.get_region()
        with pytest.raises(BadRequest, match="418"):
            await client.get_region()
        with pytest.raises(ControlPlaneError, match="413"):
            await client.get_region()
        with pytest.raises(ControlPlaneError, match="undecodable"):
            await client.get_region()
    assert len(scripted.seen) == 5


async def test_bodies_and_queries_on_the_wire(scripted: Scripted) -> None:
    alloc = b'{"id": "a/1", "app": "hello", "state": "ready"}'
    scripted.replies = [(201, alloc, JSON), (200, alloc, JSON), (200, alloc, JSON)]
    async with make_client(scripted.url, "tok") as client:
        await client.create_allocation("hello", idempotency_key="key-1")
        await client.watch_allocation("a/1", 7, timeout=2.5)
        await client.drain_allocation("a/1", 1.5)
    (m1, p1, _, b1), (m2, p2, _, _), (m3, p3, _, b3) = scripted.seen
    assert (m1, p1) == ("POST", "/v1/allocations")
    assert b1 == b'{"app":"hello","idempotency_key":"key-1"}'
    # The id is one path segment even with a slash in it.
    assert (m2, p2) == ("GET", "/v1/allocations/a%2F1/watch?version=7&timeout=2.5")
    assert (m3, p3, b3) == ("POST", "/v1/allocations/a%2F1/drain", b'{"deadline_s":1.5}')


async def test_one_session_per_client_closed_with_it(scripted: Scripted) -> None:
    scripted.replies = [(200, REGION_JSON, JSON)] * 2
    client = make_client(scripted.url, "tok")
    async with client:
        await client.get_region()
        session = client._session
        await client.get_region()
        assert client._session is session
    assert session is not None and session.closed
    with pytest.raises(RuntimeError):
        await client.get_region()


async def test_a_session_handed_in_is_left_open(scripted: Scripted, wire: Wire) -> None:
    scripted.replies = [(200, REGION_JSON, JSON)]
    async with make_client(scripted.url, "tok", wire) as client:
        await client.get_region()
    assert not wire.session.closed
