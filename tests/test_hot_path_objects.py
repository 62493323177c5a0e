"""The objects every request reads keep CPython's specialized attribute and method lookups.

On CPython 3.11 an instance whose class has had 30 or more attributes set gets a plain
__dict__, and then every `self.x` and `self.f()` on it is looked up the slow way (a few
hundred instructions more per call: bench/hot_path_cost.py saw +0.5 % per request from one
attribute too many on the worker context). The worker context has slots; a front
connection, which has none, must stay under the limit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import connect, read_response, request_bytes, send, to_toml

from edge.http.front_protocol import FrontConnection
from edge.server.config import load_config
from edge.server.worker_context import WorkerContext

# CPython 3.11's SHARED_KEYS_MAX_SIZE: the 30th attribute no longer fits the shared keys.
SHARED_KEYS_MAX = 30
BODY = b"x" * 64


class Upstream(asyncio.Protocol):
    """Answers every request (whole in one read) 200 with a small body, keep-alive."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for _ in range(data.count(b"\r\n\r\n")):
            self.transport.write(  # type: ignore[attr-defined]
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
            )


@contextlib.asynccontextmanager
async def served(tmp_path: Path, **app: object) -> AsyncIterator[tuple[WorkerContext, int]]:
    """A worker context and its front on 127.0.0.1 (in this loop) before one upstream."""
    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(Upstream, "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]
    config_path = tmp_path / "edge.toml"
    entry = {"name": "app", "hosts": ["app.localhost"], "upstreams": [f"127.0.0.1:{up_port}"]}
    config = {
        "edge": {"listen": "127.0.0.1:8080", "admin_listen": "127.0.0.1:9090"},
        "apps": [{**entry, **app}],
    }
    config_path.write_text(to_toml(config))
    ctx = WorkerContext(load_config(config_path), loop, 0)
    front = await loop.create_server(lambda: FrontConnection(ctx), "127.0.0.1", 0)
    try:
        yield ctx, front.sockets[0].getsockname()[1]
    finally:
        for conn in list(ctx.connections):
            conn._close(abort=True)
        ctx.pool.close()
        front.close()
        upstream.close()


async def test_the_worker_context_keeps_its_attributes_in_slots(tmp_path: Path) -> None:
    async with served(tmp_path) as (ctx, _port):
        assert not hasattr(ctx, "__dict__")


@pytest.mark.parametrize("app", [{}, {"max_concurrency": 10_000}], ids=["unset", "limit"])
async def test_a_front_connection_that_served_requests_stays_under_the_limit(
    tmp_path: Path, app: dict[str, object]
) -> None:
    async with served(tmp_path, **app) as (ctx, port):
        reader, writer = await connect(port)
        for _ in range(3):
            assert await send(writer, request_bytes("GET", "/"))
            assert (await read_response(reader, "GET")).status == 200
        (conn,) = ctx.connections
        names = sorted(vars(conn))
        assert len(names) < SHARED_KEYS_MAX, f"{len(names)} attributes: {names}"
        writer.close()
