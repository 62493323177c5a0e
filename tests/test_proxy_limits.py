"""Every limit is configurable and enforced: the values here differ from the hostile tests'."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from helpers import (
    Closed,
    RawResponse,
    assert_edge_error,
    close,
    connect,
    eventually,
    exchange,
    read_for,
    read_response,
    request_bytes,
    send,
)

KiB = 1024


@pytest.fixture(scope="module")
def small_edge(module_edge_launcher):
    """One edge for the module's limit tests: each only opens its own connections."""
    return module_edge_launcher(
        limits={
            "max_request_line": "1KiB",
            "max_header_bytes": "2KiB",
            "max_headers": 8,
            "max_body": "10KiB",
            "keepalive_timeout": "1s",
        }
    )


async def status_of(port: int, data: bytes) -> int | None:
    resp = await exchange(port, data)
    return None if resp is None else resp.status


async def test_request_line_limit(small_edge, upstream) -> None:
    assert await status_of(small_edge.port, request_bytes("GET", "/echo?q=" + "a" * 900)) == 200
    resp = await exchange(small_edge.port, request_bytes("GET", "/echo?q=" + "a" * 1100))
    assert_edge_error(resp, 414)
    assert len(upstream.log()) == 1


async def test_header_bytes_limit(small_edge, upstream) -> None:
    fits = [("X-A", "v" * 600), ("X-B", "v" * 600)]
    assert await status_of(small_edge.port, request_bytes("GET", "/echo", headers=fits)) == 200
    too_big = [("X-A", "v" * 800), ("X-B", "v" * 800), ("X-C", "v" * 800)]
    resp = await exchange(small_edge.port, request_bytes("GET", "/echo", headers=too_big))
    assert_edge_error(resp, 431)
    assert len(upstream.log()) == 1


async def test_header_count_limit(small_edge, upstream) -> None:
    five = [(f"X-H{i}", "v") for i in range(5)]
    assert await status_of(small_edge.port, request_bytes("GET", "/echo", headers=five)) == 200
    twelve = [(f"X-H{i}", "v") for i in range(12)]
    resp = await exchange(small_edge.port, request_bytes("GET", "/echo", headers=twelve))
    assert_edge_error(resp, 431)
    assert len(upstream.log()) == 1


async def test_body_limit(small_edge, upstream) -> None:
    resp = await exchange(small_edge.port, request_bytes("POST", "/echo", body=b"x" * 10 * KiB))
    assert resp is not None and resp.status == 200
    assert json.loads(resp.body)["body_len"] == 10 * KiB
    resp = await exchange(
        small_edge.port, request_bytes("POST", "/echo", body=b"x" * (10 * KiB + 1))
    )
    assert_edge_error(resp, 413)
    assert [e["body_len"] for e in upstream.log()] == [10 * KiB]


async def test_keepalive_timeout_closes_idle_connection(small_edge, upstream) -> None:
    reader, writer = await connect(small_edge.port)
    try:
        await send(writer, request_bytes("GET", "/echo"))
        assert (await read_response(reader)).status == 200
        # keepalive_timeout is 1s: the idle connection is closed well within 10 s.
        data, eof = await read_for(reader, 10.0)
    finally:
        await close(writer)
    assert eof, "idle keep-alive connection still open after 10 s (keepalive_timeout = 1s)"
    assert b"HTTP/1.1 200" not in data


async def test_header_timeout_is_configurable(start_edge, upstream) -> None:
    edge = start_edge(limits={"header_timeout": "2s"})
    reader, writer = await connect(edge.port)
    try:
        await send(writer, b"GET /echo HTTP/1.1\r\nHost: app.localhost\r\n")  # never finished
        try:
            # 2s configured; the 10s default would not end it within 8 s.
            resp: RawResponse | None = await read_response(reader, timeout=8)
        except Closed:
            resp = None
    finally:
        await close(writer)
    if resp is not None:
        assert_edge_error(resp, 408)
    assert upstream.log() == []


async def test_max_connections(start_edge, upstream) -> None:
    edge = start_edge(limits={"max_connections": 5})
    conns = [await connect(edge.port) for _ in range(5)]
    extra = []
    try:
        for i, (reader, writer) in enumerate(conns):
            await send(writer, request_bytes("GET", f"/echo?conn={i}"))
            assert (await read_response(reader)).status == 200

        # The 6th: refused, closed, or 503, but never served.
        try:
            reader6, writer6 = await connect(edge.port)
        except OSError:
            sixth = None
        else:
            extra.append(writer6)
            await send(writer6, request_bytes("GET", "/echo?conn=6"))
            try:
                sixth = await read_response(reader6, timeout=5)
            except Closed:
                sixth = None
        if sixth is not None:
            assert_edge_error(sixth, 503)
        assert "/echo?conn=6" not in upstream.paths()

        # The first five are still usable.
        for i, (reader, writer) in enumerate(conns):
            await send(writer, request_bytes("GET", f"/echo?again={i}"))
            resp = await read_response(reader)
            assert resp.status == 200
            assert json.loads(resp.body)["path"] == f"/echo?again={i}"

        # Closing one frees a slot for a new client.
        await close(conns[0][1])

        async def new_client_served() -> bool:
            resp = await exchange(edge.port, request_bytes("GET", "/echo?later"))
            return resp is not None and resp.status == 200

        await eventually(new_client_served, timeout=10, interval=0.2, what="a freed slot")
    finally:
        for _, writer in conns[1:]:
            await close(writer)
        for writer in extra:
            await close(writer)


async def test_max_connections_counts_concurrent_not_total(start_edge, upstream) -> None:
    edge = start_edge(limits={"max_connections": 3})
    served = set()
    for i in range(12):
        # One connection at a time; a close may take a moment to be counted out.

        async def served_now(i: int = i) -> bool:
            resp = await exchange(edge.port, request_bytes("GET", f"/echo?seq={i}"))
            return resp is not None and resp.status == 200

        await eventually(served_now, timeout=5, interval=0.1, what=f"connection {i} served")
        served.add(f"/echo?seq={i}")
    assert set(upstream.paths()) == served


async def test_connections_per_upstream_are_capped(start_edge, upstream) -> None:
    """A burst waits for pooled connections instead of opening one per request."""
    edge = start_edge(upstream={"max_connections_per_upstream": 3})
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> int:
            async with session.get(
                edge.url + f"/echo?i={i}", headers={"Host": "app.localhost"}
            ) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one(i) for i in range(100)))
    assert statuses == [200] * 100
    log = upstream.log()
    assert len(log) == 100
    ports = {tuple(entry["peer"]) for entry in log}
    assert 1 <= len(ports) <= 3


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_body_slower_than_the_minimum_rate_is_cut(start_edge, upstream, framing) -> None:
    """A body trickling below [limits] min_body_rate after body_rate_grace gets 408 (or
    a close) within a few seconds, not the upstream idle timeout (30 s)."""
    edge = start_edge(
        limits={"min_body_rate": "1KiB", "body_rate_grace": "1s"},
        upstream={"idle_timeout": "30s", "response_header_timeout": "30s"},
    )
    if framing == "length":
        head = request_bytes("POST", "/echo?trickle", headers=[("Content-Length", "100000")])
        piece = b"x"
    else:
        head = request_bytes("POST", "/echo?trickle", headers=[("Transfer-Encoding", "chunked")])
        piece = b"1\r\nx\r\n"
    reader, writer = await connect(edge.port)
    try:
        await send(writer, head)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 8.0
        data, eof = b"", False
        while loop.time() < deadline and not (data or eof):
            if not await send(writer, piece):
                eof = True
                break
            data, eof = await read_for(reader, 0.5)
    finally:
        await close(writer)
    assert data.startswith(b"HTTP/1.1 408") or (eof and not data), (data[:200], eof)


async def test_a_body_at_the_minimum_rate_gets_through(start_edge, upstream) -> None:
    edge = start_edge(limits={"min_body_rate": "1KiB", "body_rate_grace": "1s"})
    size = 8 * KiB
    head = request_bytes("POST", "/echo?steady", headers=[("Content-Length", str(size))])
    reader, writer = await connect(edge.port)
    try:
        await send(writer, head)
        for _ in range(8):  # 4 KiB/s for 2 s
            await send(writer, b"y" * KiB)
            await asyncio.sleep(0.25)
        resp = await read_response(reader)
    finally:
        await close(writer)
    assert resp.status == 200
    assert json.loads(resp.body)["body_len"] == size
