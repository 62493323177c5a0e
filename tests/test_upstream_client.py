"""The awaitable upstream client against raw loopback servers: what a response gives back,
keep-alive reuse and its one replacement, upgrades and failures that end at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from edge.upstream.client import UpstreamClient, UpstreamFailed

REQUEST = b"GET /a HTTP/1.1\r\nHost: app.localhost\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Server:
    """A loopback server that numbers its connections and counts the requests it read."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self.connections)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def read(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        return head


async def request(client: UpstreamClient, port: int, timeout: float = 5, **kw: bool):
    return await client.request(
        "127.0.0.1", port, REQUEST, head_only=kw.get("head_only", False), timeout=timeout
    )


async def test_status_headers_and_kept_body_over_one_kept_alive_connection() -> None:
    async def handler(reader, writer, _n) -> None:
        while True:
            await server.read(reader)
            writer.write(b"HTTP/1.1 201 Made\r\nX-A: 1\r\nContent-Length: 10\r\n\r\n0123456789")

    async with Server(handler) as server:
        client = UpstreamClient(keep_body=4)
        try:
            for _ in range(3):
                response = await request(client, server.port)
                assert (response.status, response.reason) == (201, b"Made")
                assert (b"X-A", b"1") in response.headers
                assert bytes(response.body) == b"0123"  # the rest read and dropped
                assert not response.upgraded
            assert server.connections == 1
        finally:
            client.close()


async def test_head_response_ends_at_its_head() -> None:
    async def handler(reader, writer, _n) -> None:
        while True:
            await server.read(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n")

    async with Server(handler) as server:
        client = UpstreamClient()
        try:
            assert (await request(client, server.port, head_only=True)).status == 200
            assert (await request(client, server.port, head_only=True)).status == 200
            assert server.connections == 1
        finally:
            client.close()


@pytest.mark.parametrize("upgrade", [True, False])
async def test_101_ends_the_exchange_at_once(upgrade: bool) -> None:
    """The client speaks no tunnel: an upgrade is reported, a bare 101 is a failure; neither
    waits for the timeout, and the connection is not kept."""
    headers = b"Upgrade: x\r\nConnection: Upgrade\r\n" if upgrade else b""

    async def handler(reader, writer, _n) -> None:
        await server.read(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\n" + headers + b"\r\n" + OK)
        await asyncio.sleep(10)

    async with Server(handler) as server:
        client = UpstreamClient()
        started = time.monotonic()
        try:
            if upgrade:
                response = await request(client, server.port)
                assert (response.status, response.upgraded) == (101, True)
            else:
                with pytest.raises(UpstreamFailed):
                    await request(client, server.port)
            assert time.monotonic() - started < 1
            assert client._peer is not None and not client._peer.idle
        finally:
            client.close()


async def test_a_kept_alive_connection_closed_unanswered_is_replaced_once() -> None:
    async def handler(reader, writer, n) -> None:
        await server.read(reader)
        writer.write(OK)
        if n == 1:
            await server.read(reader)  # the second request meets an idle timeout's close

    async with Server(handler) as server:
        client = UpstreamClient()
        try:
            assert (await request(client, server.port)).status == 200
            assert (await request(client, server.port)).status == 200
            assert (server.connections, server.requests) == (2, 3)
        finally:
            client.close()


async def test_no_replacement_for_a_fresh_connection_or_after_bytes() -> None:
    async def handler(reader, writer, n) -> None:
        await server.read(reader)
        if n == 1:
            return  # a fresh connection closed unanswered: that is the attempt's outcome
        writer.write(OK)
        await server.read(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")  # a reused one that got bytes back

    async with Server(handler) as server:
        client = UpstreamClient()
        try:
            with pytest.raises(UpstreamFailed, match="closed before the response"):
                await request(client, server.port)
            assert (await request(client, server.port)).status == 200
            with pytest.raises(UpstreamFailed):
                await request(client, server.port)
            assert server.connections == 2
        finally:
            client.close()


async def test_a_timed_out_connection_is_not_reused() -> None:
    async def handler(reader, writer, n) -> None:
        await server.read(reader)
        if n == 1:
            await asyncio.sleep(10)
        writer.write(OK)
        await asyncio.sleep(10)

    async with Server(handler) as server:
        client = UpstreamClient()
        try:
            with pytest.raises(UpstreamFailed, match="within"):
                await request(client, server.port, timeout=0.2)
            assert (await request(client, server.port)).status == 200
            assert server.connections == 2
        finally:
            client.close()


async def test_bytes_past_the_response_drop_the_connection() -> None:
    async def handler(reader, writer, _n) -> None:
        await server.read(reader)
        writer.write(OK + b"HTTP/1.1 200 OK\r\n")  # framing the client cannot trust
        await asyncio.sleep(10)

    async with Server(handler) as server:
        client = UpstreamClient()
        try:
            assert (await request(client, server.port)).status == 200
            await asyncio.sleep(0.05)
            assert (await request(client, server.port)).status == 200
            assert server.connections == 2
        finally:
            client.close()


async def test_close_fails_an_exchange_in_progress() -> None:
    async def handler(reader, writer, _n) -> None:
        await server.read(reader)
        writer.write(OK)
        await server.read(reader)
        await asyncio.sleep(10)

    async with Server(handler) as server:
        client = UpstreamClient()
        assert (await request(client, server.port)).status == 200
        pending = asyncio.ensure_future(request(client, server.port))
        await asyncio.sleep(0.1)
        client.close()
        with pytest.raises(UpstreamFailed, match="closed by the caller"):
            await asyncio.wait_for(pending, 1)
        assert server.connections == 1  # not taken for a stale connection and replaced
