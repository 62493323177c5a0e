"""Delivering one queued request to the app: a lean HTTP/1.1 client on one kept-alive socket."""

from __future__ import annotations

import asyncio
import contextlib

from httptools import HttpParserError, HttpResponseParser

from scheduler_client.config_file import parse_address

# Response bodies are read and dropped; only the status matters.
READ_SIZE = 65536


class _Response:
    __slots__ = (
        "complete",
        "got_bytes",
        "head_only",
        "headers_done",
        "keep_alive",
        "parser",
        "status",
    )

    def __init__(self, head_only: bool) -> None:
        self.status = 0
        self.complete = False
        self.headers_done = False
        self.got_bytes = False
        self.head_only = head_only
        self.keep_alive = False
        self.parser = HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status < 200:
            return  # 1xx (100 Continue, 103 Early Hints): the final answer follows
        self.headers_done = True
        if self.head_only or self.status in (204, 304):
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        if self.status < 200:
            self.status = 0
            return
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
                reused = self._usable(address)
                try:
                    return await self._exchange(address, method, head, body, extra)
                except (DeliveryFailed, OSError) as exc:
                    if not reused or getattr(exc, "got_bytes", True):
                        raise
                    # A kept-alive connection the app had closed meanwhile: the request
                    # never reached it, so one fresh connection is not a second attempt.
                    self.close()
                    return await self._exchange(address, method, head, body, extra)
        except DeliveryFailed:
            self.close()
            raise
        except (OSError, TimeoutError, HttpParserError) as exc:
            self.close()
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from exc

    def _usable(self, address: str) -> bool:
        """Whether an open connection to `address` is there to reuse."""
        writer, reader = self._writer, self._reader
        if writer is None or reader is None or address != self.address:
            return False
        if writer.is_closing() or reader.at_eof():
            self.close()
            return False
        return True

    async def _exchange(
        self, address: str, method: str, head: bytes, body: bytes, extra: bytes
    ) -> int:
        if not self._usable(address):
            self.close()
            host, port = parse_address(address)
            self._reader, self._writer = await asyncio.open_connection(host, port)
            self.address = address
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        writer.write(head[:-2] + b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n" + body)
        await writer.drain()
        response = _Response(method == "HEAD")
        while not response.complete:
            data = await reader.read(READ_SIZE)
            if not data:
                if response.headers_done:
                    # Ended by the close (no length): the app answered; that is the outcome.
                    self.close()
                    return response.status
                failed = DeliveryFailed("connection closed before the response")
                failed.got_bytes = response.got_bytes  # type: ignore[attr-defined]
                raise failed
            response.got_bytes = True
            response.parser.feed_data(data)
        if not response.keep_alive:
            self.close()
        return response.status

    def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
