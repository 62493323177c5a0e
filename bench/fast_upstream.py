#!/usr/bin/env python3
"""Minimal fast HTTP/1.1 upstream for the benchmark when nginx is not installed.

An asyncio Protocol with the httptools (llhttp) parser: every request gets
``200`` with a 1 KiB body, keep-alive honoured, pipelining answered in order.

    python bench/fast_upstream.py --port 9001
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

import httptools

BODY = b"x" * 1024
_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1024\r\n"
RESPONSE = _HEAD + b"\r\n" + BODY
RESPONSE_CLOSE = _HEAD + b"Connection: close\r\n\r\n" + BODY
HEAD_RESPONSE = _HEAD + b"\r\n"
HEAD_RESPONSE_CLOSE = _HEAD + b"Connection: close\r\n\r\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = ("parser", "transport")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.transport.write(BAD_REQUEST)
            self.transport.close()
        except httptools.HttpParserError:
            self.transport.write(BAD_REQUEST)
            self.transport.close()

    def on_message_complete(self) -> None:
        if self.transport.is_closing():
            return
        keep_alive = self.parser.should_keep_alive()
        if self.parser.get_method() == b"HEAD":
            self.transport.write(HEAD_RESPONSE if keep_alive else HEAD_RESPONSE_CLOSE)
        else:
            self.transport.write(RESPONSE if keep_alive else RESPONSE_CLOSE)
        if not keep_alive:
            self.transport.close()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
