"""One bounded HTTP/1.1 GET on a fresh connection: readiness and session probes."""

from __future__ import annotations

import asyncio
import contextlib

_MAX_RESPONSE = 64 * 1024


async def http_get(
    host: str,
    port: int,
    path: str,
    timeout: float,
    body: bool = True,
    user_agent: str = "edge-probe",
) -> tuple[int, bytes]:
    """(status, body) of one GET to host:port; raises OSError, TimeoutError or ValueError.

    With body=False it returns as soon as the head has arrived, so a server that
    keeps the connection open regardless of `Connection: close` still counts.
    """

    async def exchange() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, port, limit=_MAX_RESPONSE)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Connection: close\r\nUser-Agent: {user_agent}\r\n\r\n".encode("latin-1")
            )
            await writer.drain()
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                raise ValueError(f"no complete HTTP response head: {exc}") from None
            lines = head.decode("latin-1").split("\r\n")
            status_line = lines[0].split()
            if len(status_line) < 2 or not status_line[0].startswith("HTTP/"):
                raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
            status = int(status_line[1])
            if not body:
                return status, b""
            length = None
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            # Without Content-Length the body ends at EOF (we asked for Connection: close).
            want = _MAX_RESPONSE if length is None else min(length, _MAX_RESPONSE)
            data = b""
            while len(data) < want:
                more = await reader.read(want - len(data))
                if not more:
                    break
                data += more
            return status, data
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return await asyncio.wait_for(exchange(), timeout)
