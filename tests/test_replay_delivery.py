"""The replay client against raw loopback servers: close-delimited answers, 1xx before
the final status, 101 and garbage (final answers), a kept-alive connection the app
closed, a silent app; and `may_send`, asked before each write of a request."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

import pytest

from edge.queue.replay_delivery import DeliveryFailed, NotSent, ReplayConnection

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


# ---------------------------------------------------------------------- may_send

# More than the kernel buffers of a loopback connection whose reader's buffer is small
# (the sender's autotunes to 4 MiB at most): a part of it waits in the edge's transport.
LARGE = 8 * 1024 * 1024


async def serve_small_buffer(handler: Handler) -> tuple[asyncio.Server, str]:
    """serve(), the accepted sockets reading into a 4 KiB kernel buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(handler, sock=sock)
    return server, f"127.0.0.1:{sock.getsockname()[1]}"


async def read_all(reader: asyncio.StreamReader) -> int:
    """Bytes read until the edge closed or reset the connection."""
    total = 0
    try:
        while chunk := await reader.read(65536):
            total += len(chunk)
    except ConnectionError:
        pass
    return total


async def test_a_refused_send_writes_nothing_and_the_next_goes_out() -> None:
    got: list[int] = []

    async def handler(reader, writer) -> None:
        try:
            request = await read_request(reader)
        except asyncio.IncompleteReadError as exc:
            got.append(len(exc.partial))
            return
        got.append(len(request))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    server, address = await serve(handler)
    conn = ReplayConnection()
    try:
        with pytest.raises(NotSent):
            await conn.deliver(address, "POST", HEAD, b"{}", b"", 5, lambda: False)
        assert await conn.deliver(address, "POST", HEAD, b"{}", b"", 5, lambda: True) == 200
        await eventually_equal(lambda: len(got), 2)
        assert got[0] == 0 and got[1] > 0  # the refused one: not a byte
    finally:
        conn.close()
        server.close()


async def test_a_request_the_kernel_cannot_take_at_once_is_asked_again_before_its_last_byte() -> (
    None
):
    """The first part fills the kernel buffers and waits in the transport; the term ends
    meanwhile: when the app has read that part, the last byte is refused, so the app never
    holds the whole request (it reads until the edge resets the connection)."""
    allowed = True
    asked = 0
    read_now = asyncio.Event()
    got: list[int] = []

    def may_send() -> bool:
        nonlocal asked
        asked += 1
        return allowed

    async def handler(reader, writer) -> None:
        await read_now.wait()
        got.append(await read_all(reader))

    server, address = await serve_small_buffer(handler)
    conn = ReplayConnection()
    body = b"x" * LARGE
    try:
        task = asyncio.get_running_loop().create_task(
            conn.deliver(address, "POST", HEAD, body, b"", 10, may_send)
        )
        await asyncio.sleep(0.3)
        assert asked == 1 and not task.done()  # the first part is still being written
        allowed = False
        read_now.set()
        with pytest.raises(NotSent):
            await task
        assert asked == 2
        await eventually_equal(lambda: len(got), 1)
        whole = len(HEAD) + len(b"Content-Length: %d\r\n" % LARGE) + LARGE
        assert got[0] < whole  # never the whole request (at most all but its last byte)
    finally:
        conn.close()
        server.close()


async def test_an_answer_before_the_whole_request_ends_it_and_its_connection() -> None:
    """The app answers (413) after the head, reading no body: the edge stops writing and
    does not reuse the connection, which holds part of a request."""
    connections = 0

    async def handler(reader, writer) -> None:
        nonlocal connections
        connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        if b"Content-Length: 2\r\n" in head:
            await reader.readexactly(2)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(5)  # keeps the connection open, reading no more

    server, address = await serve_small_buffer(handler)
    conn = ReplayConnection()
    try:
        big = await conn.deliver(address, "POST", HEAD, b"x" * LARGE, b"", 10, lambda: True)
        assert big == 413
        assert await conn.deliver(address, "POST", HEAD, b"{}", b"", 5, lambda: True) == 200
        assert connections == 2
    finally:
        conn.close()
        server.close()


async def eventually_equal(value: Callable[[], int], expected: int) -> None:
    for _ in range(100):
        if value() == expected:
            return
        await asyncio.sleep(0.02)
    assert value() == expected
