"""Delivering one queued request to the app: a lean HTTP/1.1 client on one kept-alive socket."""

from __future__ import annotations

import asyncio
import contextlib

from httptools import HttpParserError, HttpResponseParser

from scheduler_client.config_file import parse_address

# Response bodies are read and dropped; only the status matters.
READ_SIZE = 65536


class _Response:
    __slots__ = ("complete", "head_only", "keep_alive", "parser", "status")

    def __init__(self, head_only: bool) -> None:
        self.status = 0
        self.complete = False
        self.head_only = head_only
        self.keep_alive = False
        self.parser = HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.head_only or self.status in (204, 304) or 100 <= self.status < 200:
            self.complete = self.status >= 200
            self.keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()


class DeliveryFailed(Exception):
    """Timed out, or the connection failed before a whole response arrived."""


class ReplayConnection:
    """A kept-alive connection to one app address, reopened when it breaks."""

    def __init__(self) -> None:
        self.address = ""
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def deliver(
        self, address: str, method: str, head: bytes, body: bytes, extra: bytes, timeout: float
    ) -> int:
        """Send `head` (ending in a blank line) with `extra` header lines and `body`;
        the response status. Raises DeliveryFailed."""
        try:
            async with asyncio.timeout(timeout):
                return await self._exchange(address, method, head, body, extra)
        except DeliveryFailed:
            self.close()
            raise
        except (OSError, TimeoutError, HttpParserError) as exc:
            self.close()
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from exc

    async def _exchange(
        self, address: str, method: str, head: bytes, body: bytes, extra: bytes
    ) -> int:
        if self._writer is None or address != self.address or self._writer.is_closing():
            self.close()
            host, port = parse_address(address)
            self._reader, self._writer = await asyncio.open_connection(host, port)
            self.address = address
        reader, writer = self._reader, self._writer
        assert reader is not None
        writer.write(head[:-2] + b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n" + body)
        await writer.drain()
        response = _Response(method == "HEAD")
        while not response.complete:
            data = await reader.read(READ_SIZE)
            if not data:
                raise DeliveryFailed("connection closed before the response ended")
            response.parser.feed_data(data)
        if not response.keep_alive:
            self.close()
        return response.status

    def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
