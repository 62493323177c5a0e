"""The replay client against raw loopback servers: close-delimited answers, 1xx before
the final status, 101 and garbage (final answers), a kept-alive connection the app
closed, and a silent app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from edge.queue.replay_delivery import DeliveryFailed, ReplayConnection

HEAD = b"POST /hooks/a HTTP/1.1\r\nHost: shop.localhost\r\n\r\n"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"127.0.0.1:{port}"


async def test_close_delimited_answer_counts() -> None:
    async def handler(reader, writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello")
        writer.close()

    server, address = await serve(handler)
    conn = ReplayConnection()
    try:
        assert await conn.deliver(address, "POST", HEAD, b"{}", b"", 5) == 200
    finally:
        conn.close()
        server.close()


async def test_informational_answers_are_skipped() -> None:
    async def handler(reader, writer) -> None:
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                break
            writer.write(
                b"HTTP/1.1 100 Continue\r\n\r\n"
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
                b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
            )
        writer.close()

    server, address = await serve(handler)
    conn = ReplayConnection()
    try:
        # Twice on one connection: the second answer is not shifted by the first's 1xx.
        assert await conn.deliver(address, "POST", HEAD, b"{}", b"", 5) == 201
        assert await conn.deliver(address, "POST", HEAD, b"{}", b"", 5) == 201
    finally:
        conn.close()
        server.close()


@pytest.mark.parametrize("headers", [b"Upgrade: x\r\nConnection: Upgrade\r\n", b""])
async def test_101_is_a_final_answer_at_once(headers: bytes) -> None:
    """Issue 12: 101 is the app's answer (the replayer dead-letters it), never an exception
    the replayer does not expect; no timeout is waited. A 101 without Upgrade is refused
    by the parser: a final failure, dead-lettered at once too."""

    async def handler(reader, writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\n" + headers + b"\r\n")
        await asyncio.sleep(10)

    server, address = await serve(handler)
    conn = ReplayConnection()
    started = time.monotonic()
    try:
        if headers:
            assert await conn.deliver(address, "POST", HEAD, b"{}", b"", 5) == 101
        else:
            with pytest.raises(DeliveryFailed) as info:
                await conn.deliver(address, "POST", HEAD, b"{}", b"", 5)
            assert info.value.final
        assert time.monotonic() - started < 1
    finally:
        conn.close()
        server.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HELLO\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    ],
)
async def test_garbage_is_a_final_failure(answer: bytes) -> None:
    """Issue 12: bytes that are not an HTTP response fail the attempt as final (dead letter
    at once), unlike a reset or a timeout, which are retried."""

    async def handler(reader, writer) -> None:
        await read_request(reader)
        writer.write(answer)
        await asyncio.sleep(10)

    server, address = await serve(handler)
    conn = ReplayConnection()
    try:
        with pytest.raises(DeliveryFailed) as info:
            await conn.deliver(address, "POST", HEAD, b"{}", b"", 5)
        assert info.value.final and "malformed" in str(info.value)
    finally:
        conn.close()
        server.close()


async def test_a_kept_alive_connection_the_app_closed_is_replaced() -> None:
    received: list[bytes] = []

    async def handler(reader, writer) -> None:
        received.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()  # without saying Connection: close, as idle timeouts do

    server, address = await serve(handler)
    conn = ReplayConnection()
    try:
        assert await conn.deliver(address, "POST", HEAD, b"1", b"", 5) == 200
        await asyncio.sleep(0.1)
        assert await conn.deliver(address, "POST", HEAD, b"2", b"", 5) == 200
        assert [r.endswith(b"1") for r in received] == [True, False]
        assert len(received) == 2  # each request reached the app once
    finally:
        conn.close()
        server.close()


async def test_a_silent_app_times_out() -> None:
    async def handler(reader, writer) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    server, address = await serve(handler)
    conn = ReplayConnection()
    try:
        with pytest.raises(DeliveryFailed) as info:
            await conn.deliver(address, "POST", HEAD, b"{}", b"", 0.3)
        assert not info.value.final
    finally:
        conn.close()
        server.close()


async def test_connection_refused_fails_the_attempt() -> None:
    server, address = await serve(lambda r, w: asyncio.sleep(0))
    server.close()
    await server.wait_closed()
    with pytest.raises(DeliveryFailed) as info:
        await ReplayConnection().deliver(address, "POST", HEAD, b"{}", b"", 2)
    assert not info.value.final  # retried
